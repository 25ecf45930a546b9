"""The container image (Dockerfile, scripts/build-image), built once per module on the local
Debian 12 base and run with podman against the test Mosquitto (`--network host`).

What an operator relies on: it publishes, runs as a non-root user, passes its HEALTHCHECK, logs
JSON lines on stdout and writes no log file, keeps its state in the volume, follows a live edit
of the mounted entries file, and as PID 1 stops on SIGTERM after its offline announcements,
with exit code 0 within `podman stop`'s 5 s.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.support import (
    Mosquitto,
    SubscriberFactory,
    entry,
    free_port,
    json_has,
    offline,
    online,
    wait_until,
    write_config,
)

REPO = Path(__file__).resolve().parent.parent
TAG = "localhost/scheduler-publisher:test"
UID = 10001  # the Dockerfile's user
STOP_SECONDS = 5  # `podman stop --time`: SIGTERM, then SIGKILL (exit 137) after this long


def podman(*args: str, timeout: float = 60, check: bool = True) -> str:
    """podman with this machine's settings (scripts/podman writes them; nothing under /etc)."""
    result = subprocess.run(
        [str(REPO / "scripts" / "podman"), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    if check and result.returncode != 0:
        raise AssertionError(f"podman {' '.join(args)}: exit {result.returncode}\n{result.stderr}")
    return result.stdout


@pytest.fixture(scope="module")
def image() -> str:
    """The image, built from this tree (the base image is built once and kept)."""
    if shutil.which("podman") is None or shutil.which("mmdebstrap") is None:
        pytest.fail("podman and mmdebstrap are missing: run scripts/setup as root")
    result = subprocess.run(
        [str(REPO / "scripts" / "build-image"), TAG],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert result.returncode == 0, f"scripts/build-image failed:\n{result.stderr}"
    return TAG


@dataclass(frozen=True)
class Running:
    name: str
    etc: Path  # mounted read-only at /etc/scheduler-publisher
    state: Path  # mounted at /var/lib/scheduler-publisher
    base: str  # the entries' topic prefix
    status_topic: str

    def logs(self) -> str:
        return podman("logs", self.name)

    def inspect(self, template: str) -> str:
        return podman("inspect", "--format", template, self.name).strip()


def write_etc(etc: Path, base: str, name: str) -> str:
    """The mounted folder: the entries file and an options file; returns the status topic."""
    etc.mkdir()
    write_config(
        etc / "entries.json",
        [
            entry("pump", f"{base}/pump", interval=1, lwt=True, data={"room": "pump"}),
            entry("meter", f"{base}/meter", interval=1),
        ],
    )
    status_topic = f"{base}/status"
    # Read because it is there: the status topic arriving shows the image found it.
    (etc / "scheduler-publisher.toml").write_text(
        f'client-id = "{name}"\nstatus-topic = "{status_topic}"\n'
    )
    return status_topic


def start_container(image: str, tmp_path: Path, broker: Mosquitto, base: str) -> Running:
    etc = tmp_path / "etc"
    state = tmp_path / "state"
    name = f"sp-test-{uuid.uuid4().hex[:10]}"
    status_topic = write_etc(etc, base, name)
    state.mkdir()
    os.chown(state, UID, UID)  # what `podman volume create` or a fresh volume gives the user
    settings = {"BROKER": "127.0.0.1", "PORT": str(broker.port), "HTTP_PORT": str(free_port())}
    env = [f"--env=SCHEDULER_PUBLISHER_{key}={value}" for key, value in settings.items()]
    podman(
        "run",
        "--detach",
        f"--name={name}",
        "--network=host",
        # What it writes goes to the volume: no /tmp either, as under Kubernetes'
        # readOnlyRootFilesystem.
        "--read-only",
        "--read-only-tmpfs=false",
        f"--volume={etc}:/etc/scheduler-publisher:ro",
        f"--volume={state}:/var/lib/scheduler-publisher",
        *env,
        image,
    )
    return Running(name, etc, state, base, status_topic)


@pytest.fixture
def container(image: str, tmp_path: Path, broker: Mosquitto, topic_base: str) -> Iterator[Running]:
    running = start_container(image, tmp_path, broker, topic_base)
    yield running
    podman("rm", "--force", "--time=0", running.name, check=False)


def wait_started(running: Running) -> None:
    def started() -> bool:
        return '"service_started"' in running.logs()

    wait_until(started, 60, interval=0.2, message=f"{running.name} to log service_started")


def log_lines(running: Running) -> list[dict[str, object]]:
    """Every line the service wrote on stdout, each parsed as JSON (fails on one that is not)."""
    lines = [line for line in running.logs().splitlines() if line.strip()]
    return [json.loads(line) for line in lines]


def test_the_image_runs_as_a_user_logs_json_and_keeps_state_in_the_volume(
    image: str, container: Running, subscriber_factory: SubscriberFactory
) -> None:
    sub = subscriber_factory(f"{container.base}/#")
    wait_started(container)
    sub.wait_for(f"{container.base}/pump", where=online, timeout=30)
    sub.wait_for(f"{container.base}/meter", where=json_has(sensor="meter"), timeout=30)

    assert podman("exec", container.name, "id", "-u").strip() == str(UID)
    status = podman("exec", container.name, "cat", "/proc/1/status")  # PID 1 is the service
    uids = next(line.split()[1:] for line in status.splitlines() if line.startswith("Uid:"))
    assert uids == [str(UID)] * 4  # real, effective, saved, file system
    assert "/var/lib/scheduler-publisher" in podman(
        "image", "inspect", "--format", "{{json .Config.Volumes}}", image
    )

    # The HEALTHCHECK: python's urllib on /health, through the container's own settings.
    assert "/health" in podman(
        "image", "inspect", "--format", "{{json .Config.Healthcheck}}", image
    )
    podman("healthcheck", "run", container.name, timeout=30)

    events = {line["message"] for line in log_lines(container)}
    assert {"service_started", "mqtt_connected"} <= events

    # The counters checkpoint lands in the volume, and no log file anywhere: not in the volume
    # (the working folder, where the default ./logs/ would go), nor in the container's own
    # layer (podman diff lists what the container added or changed there).
    wait_until((container.state / "state.db").exists, 30, message="state.db in the volume")
    in_volume = {path.name for path in container.state.iterdir()}
    assert in_volume <= {"state.db", "state.db-wal", "state.db-shm", ".state.db.lock"}, in_volume
    changes = json.loads(podman("diff", "--format=json", container.name))
    changed = [path for paths in changes.values() for path in paths]
    assert not [path for path in changed if "log" in path], changed


def test_a_live_edit_reaches_the_wire_and_sigterm_stops_it_cleanly(
    container: Running, subscriber_factory: SubscriberFactory
) -> None:
    base = container.base
    sub = subscriber_factory(f"{base}/#")
    wait_started(container)
    sub.wait_for(container.status_topic, where=lambda m: m.json() == {"online": 1}, timeout=30)
    sub.wait_for(f"{base}/pump", where=online, timeout=30)

    # An atomic replace in the mounted folder (a ConfigMap update is the same kind of swap).
    write_config(
        container.etc / "entries.json",
        [
            entry("pump", f"{base}/pump", interval=1, lwt=True, data={"room": "pump"}),
            entry("meter", f"{base}/meter", interval=1, data={"sensor": "meter", "v": 2}),
        ],
    )
    sub.wait_for(f"{base}/meter", where=json_has(v=2), timeout=30)

    # SIGTERM to PID 1; after STOP_SECONDS podman would SIGKILL it (exit 137).
    podman("stop", f"--time={STOP_SECONDS}", container.name, timeout=60)
    assert container.inspect("{{.State.ExitCode}}") == "0"
    assert sub.wait_for(f"{base}/pump", where=offline, timeout=10)[-1].json() == {
        "online": 0,
        "room": "pump",
    }
    sub.wait_for(container.status_topic, where=lambda m: m.json() == {"online": 0}, timeout=10)
    events = [line["message"] for line in log_lines(container)]
    assert "service_stopped" in events
