"""The command line: validate, exit codes, help, signals, secrets and the JSON log stream.

`validate`, `--help` and `--version` run in-process (they only parse and print); everything
about `run` uses the real process against a real Mosquitto.
"""

from __future__ import annotations

import importlib.metadata
import json
import platform
import re
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from datetime import datetime
from itertools import pairwise
from pathlib import Path
from typing import Any

import pytest

from scheduler_publisher import __version__
from scheduler_publisher.cli.main import main
from scheduler_publisher.settings import BrokerSettings
from tests.support import (
    REPO,
    Mosquitto,
    ServiceProcess,
    Subscriber,
    SubscriberFactory,
    cli_args,
    entry,
    free_port,
    iter_json,
    wait_until,
    write_config,
)

SAMPLE = REPO / "JSON" / "payloadStaticConfig.json"
ECS_KEYS = (
    "@timestamp",
    "log.level",
    "message",
    "ecs.version",
    "log.logger",
    "service.name",
    "service.version",
    "process.pid",
)
USER, PASSWORD = "gw01", "s3cr3t-XYZ"


@pytest.fixture
def no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    """Any attempt to open a connection fails the test."""

    def refuse(*_: Any, **__: Any) -> None:
        raise AssertionError("tried to connect somewhere")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


def run_main(argv: list[str]) -> int:
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    code = exit_info.value.code
    return code if isinstance(code, int) else 0


@pytest.fixture
def start_process(tmp_path: Path) -> Iterator[Callable[..., ServiceProcess]]:
    """Starts the real CLI with its files under tmp_path; killed at teardown if still running."""
    procs: list[ServiceProcess] = []

    def start(
        port: int,
        entries: list[dict[str, Any]] | None,
        *extra: str,
        command: tuple[str, ...] = ("run",),
    ) -> ServiceProcess:
        config = None
        if entries is not None:
            config = tmp_path / "config.json"
            write_config(config, entries)
        args = cli_args(
            port,
            config,
            *extra,
            command=command,
            state_db=tmp_path / "state.db",
            log_file=tmp_path / "service.log",
            backoff=(0.2, 1),
        )
        proc = ServiceProcess(args, cwd=tmp_path)
        procs.append(proc)
        return proc

    yield start
    for proc in procs:
        proc.stop()


@pytest.fixture
def auth_broker(tmp_path: Path) -> Iterator[Mosquitto]:
    """A Mosquitto that accepts only USER / PASSWORD."""
    passwords = tmp_path / "passwd"
    subprocess.run(["mosquitto_passwd", "-c", "-b", str(passwords), USER, PASSWORD], check=True)
    # per_listener_settings is off: these are global, and the later allow_anonymous wins.
    b = Mosquitto(tmp_path, extra=f"allow_anonymous false\npassword_file {passwords}")
    b.start()
    yield b
    b.stop()


def log_timestamp(event: dict[str, Any]) -> float:
    return datetime.fromisoformat(event["@timestamp"].replace("Z", "+00:00")).timestamp()


def all_output(proc: ServiceProcess, log_file: Path) -> str:
    text = log_file.read_text(encoding="utf-8") if log_file.exists() else ""
    return "\n".join([*proc.stdout, *proc.stderr, text])


# ---- validate -------------------------------------------------------------------------------


def test_validate_accepts_the_bundled_sample(
    no_network: None, capsys: pytest.CaptureFixture[str]
) -> None:
    """`validate` exits 0 on JSON/payloadStaticConfig.json without connecting anywhere."""
    assert run_main(["validate", "--config", str(SAMPLE)]) == 0

    out = capsys.readouterr().out
    assert "valid: 4 valid entries, 0 errors" in out


def test_validate_reports_every_problem_and_exits_1(
    no_network: None, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`validate` on an invalid file prints every problem with its place and exits 1."""
    config = tmp_path / "bad.json"
    write_config(
        config,
        [
            entry("ok", "a/ok"),
            entry("pump-7", "a/pump", interval=0, qos=5),
            {"id": "no-topic", "data": {}, "interval": 1},
            entry("ok", "a/dup"),
        ],
    )

    assert run_main(["validate", "--config", str(config)]) == 1

    err = capsys.readouterr().err
    for problem in (
        'error: entry 2 (id "pump-7"): interval must be between 0.1 and 86400, got 0',
        'error: entry 2 (id "pump-7"): qos must be 0, 1 or 2, got 5',
        'error: entry 3 (id "no-topic"): topic is required',
        'error: entry 4 (id "ok"): id must be unique, got "ok" (already used by entry 1)',
    ):
        assert problem in err


def test_validate_on_unparsable_json_exits_1_with_the_place(
    no_network: None, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`validate` on text that is not JSON says where it broke and exits 1."""
    config = tmp_path / "broken.json"
    config.write_text('[{"id": "a", "topic": "t",\n')

    assert run_main(["validate", "--config", str(config)]) == 1

    err = capsys.readouterr().err
    assert "not valid JSON" in err
    assert "line 2" in err


# ---- run: start-up, help, version -----------------------------------------------------------


def test_run_on_a_broken_config_exits_3_with_a_short_message(
    tmp_path: Path, start_process: Callable[..., ServiceProcess]
) -> None:
    """`run` with a config that is not JSON exits 3 with a few lines and no traceback."""
    config = tmp_path / "config.json"
    config.write_text("{ this is not json")

    proc = start_process(free_port(), None, "--config", str(config))

    assert proc.wait(30) == 3
    proc.stop()  # joins the output readers
    stderr = "\n".join(proc.stderr)
    assert "Traceback" not in stderr
    assert 1 <= len(proc.stderr) <= 5
    assert str(config) in stderr
    assert "not valid JSON" in stderr
    assert "validate" in stderr


def test_a_start_without_a_config_file_says_how_to_get_one_and_creates_no_logs_folder(
    tmp_path: Path,
) -> None:
    """Run from a folder without JSON/: exit 3, a hint naming --config and sample-config, and
    no ./logs/ left behind."""
    proc = subprocess.run(
        [sys.executable, "-m", "scheduler_publisher", "--options-file", "", "--http-port", "0"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )

    assert proc.returncode == 3
    assert "Traceback" not in proc.stderr
    assert "JSON/payloadStaticConfig.json" in proc.stderr
    assert f"relative to {tmp_path}" in proc.stderr
    assert "--config PATH" in proc.stderr
    assert "scheduler-publisher sample-config > PATH" in proc.stderr
    assert list(tmp_path.iterdir()) == []


def test_embedded_broker_on_a_busy_port_exits_5_in_one_line_naming_port(
    tmp_path: Path, start_process: Callable[..., ServiceProcess]
) -> None:
    """`--embedded-broker` on a port in use: exit 5, one line suggesting --port, no traceback."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        proc = start_process(port, None, "--config", str(SAMPLE), "--embedded-broker")
        assert proc.wait(30) == 5
    proc.stop()
    assert proc.stderr == [
        f"scheduler-publisher: cannot start: port {port} on 127.0.0.1 is already in use (another "
        f"MQTT broker?); pick a free one with --port, for example `scripts/demo --port "
        f"{port + 10000 if port < 55535 else 11883}`"
    ]
    assert not [line for line in proc.stdout if "Traceback" in line]


def test_busy_http_port_is_logged_with_a_hint_to_use_http_port(
    broker: Mosquitto, tmp_path: Path, start_process: Callable[..., ServiceProcess], topic_base: str
) -> None:
    """When --http-port is taken, http_bind_failed suggests --http-port; publishing goes on."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        proc = start_process(
            broker.port,
            [entry("h", f"{topic_base}/h", interval=3600)],
            "--http-port",
            str(taken.getsockname()[1]),
        )
        failed = proc.wait_for_event("http_bind_failed", timeout=20)
    assert "--http-port" in failed["hint"]
    proc.wait_for_event("mqtt_connected", timeout=20)


def test_run_is_the_default_command(
    broker: Mosquitto,
    subscriber_factory: SubscriberFactory,
    start_process: Callable[..., ServiceProcess],
    topic_base: str,
) -> None:
    """`python -m scheduler_publisher --broker ... --port ...` runs the publisher."""
    topic = f"{topic_base}/default"
    sub = subscriber_factory(topic)

    proc = start_process(broker.port, [entry("default", topic, interval=3600)], command=())

    assert sub.wait_for(topic, timeout=20)[0].json() == {"online": 1, "sensor": "default"}
    proc.wait_for_event("mqtt_connected")


def test_version_prints_the_package_and_library_versions(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """`--version` prints this version, then paho-mqtt's, APScheduler's and Python's; exit 0."""
    assert run_main(["--version"]) == 0

    lines = capsys.readouterr().out.splitlines()
    assert lines == [
        f"scheduler-publisher {__version__}",
        f"paho-mqtt {importlib.metadata.version('paho-mqtt')}",
        f"APScheduler {importlib.metadata.version('APScheduler')}",
        f"Python {platform.python_version()}",
    ]


def test_importing_the_cli_loads_no_mqtt_scheduler_or_watcher_library() -> None:
    """`validate`, `--version` and the sample commands load no paho, APScheduler or watchdog."""
    code = (
        "import sys, scheduler_publisher, scheduler_publisher.cli.main; "
        "print(sorted({m.split('.')[0] for m in sys.modules} & "
        "{'paho', 'apscheduler', 'watchdog', 'amqtt'}))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO
    ).stdout
    assert out.strip() == "[]"


def test_sample_commands_print_the_shipped_files(capsys: pytest.CaptureFixture[str]) -> None:
    """`sample-config` and `systemd-unit` print the sample entries and the unit, byte for byte."""
    assert run_main(["sample-config"]) == 0
    assert capsys.readouterr().out == SAMPLE.read_text()
    assert run_main(["systemd-unit"]) == 0
    assert capsys.readouterr().out == (REPO / "systemd" / "scheduler-publisher.service").read_text()


def test_help_names_the_commands_and_run_help_lists_every_flag(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """`--help` names run (the default) and validate; `run --help` lists the flags."""
    assert run_main(["--help"]) == 0
    top = capsys.readouterr().out
    for command in ("validate", "show-options", "sample-config", "sample-options", "systemd-unit"):
        assert command in top
    assert "run the publisher (default)" in top

    assert run_main(["run", "--help"]) == 0
    flags = capsys.readouterr().out
    for flag in (
        "--broker",
        "--port",
        "--username",
        "--password",
        "--password-file",
        "--config",
        "--client-id",
        "--mqtt-version",
        "--backoff-min",
        "--backoff-max",
        "--max-retries",
        "--will-delay",
        "--status-topic",
        "--tls",
        "--cafile",
        "--tls-insecure",
        "--no-watch",
        "--log-level",
        "--log-format",
        "--log-file",
        "--stats-interval",
        "--state-db",
        "--http-port",
        "--embedded-broker",
        "--echo",
    ):
        assert re.search(rf"\s{re.escape(flag)}\b", flags), flag


# ---- run: signals ---------------------------------------------------------------------------


def test_sigterm_delivers_a_just_published_qos1_message_then_goes_offline_and_exits_0(
    broker: Mosquitto,
    subscriber_factory: SubscriberFactory,
    tmp_path: Path,
    start_process: Callable[..., ServiceProcess],
    topic_base: str,
) -> None:
    """SIGTERM: a just-published QoS 1 message arrives, then offline and exit 0 within 5 s."""
    client_id = f"sp-sigterm-{uuid.uuid4().hex[:8]}"
    status_topic = f"scheduler-publisher/{client_id}/status"
    tick, added = f"{topic_base}/tick", f"{topic_base}/added"
    sub = subscriber_factory(f"{topic_base}/#", status_topic)
    proc = start_process(
        broker.port,
        [entry("tick", tick, interval=0.1, qos=1)],
        "--no-watch",
        "--client-id",
        client_id,
    )
    sub.wait_for(tick, count=5, timeout=20)
    sub.wait_for(status_topic, where=lambda m: m.json() == {"online": 1})

    # SIGHUP makes the service publish the added entry at once; SIGTERM follows right away.
    write_config(
        tmp_path / "config.json",
        [entry("tick", tick, interval=0.1, qos=1), entry("added", added, interval=3600, qos=1)],
    )
    proc.signal(signal.SIGHUP)
    proc.wait_for_event("config_reloaded")
    sent = time.monotonic()
    proc.signal(signal.SIGTERM)

    assert proc.wait(5) == 0
    assert time.monotonic() - sent < 5
    offline = sub.wait_for(status_topic, where=lambda m: m.json() == {"online": 0}, timeout=5)
    assert offline[0].at - sent < 5
    assert sub.on(added)[0].json() == {"online": 1, "sensor": "added"}
    proc.stop()
    # Every publish the service counted was delivered, and nothing was delivered uncounted
    # (which would mean it disconnected before the broker's acknowledgement).
    stopped = proc.wait_for_event("service_stopped")
    assert len(sub.on(tick)) + len(sub.on(added)) == stopped["total_published"]


# ---- run: the longest client id (issue 27, #11) ----------------------------------------------


@pytest.mark.parametrize("protocol", ["5", "3.1.1"])
def test_the_longest_client_id_allowed_connects_and_announces_itself(
    broker: Mosquitto,
    subscriber_factory: SubscriberFactory,
    start_process: Callable[..., ServiceProcess],
    topic_base: str,
    protocol: str,
) -> None:
    """A --client-id of 65,508 bytes, the most that the status topic around it fits in MQTT's
    65,535, is taken by Mosquitto: the service goes online on that topic and publishes, and
    its lwt entry connects with an id derived from it."""
    head = f"sp-long-{uuid.uuid4().hex[:8]}-"
    client_id = head + "c" * (65508 - len(head))
    status = f"scheduler-publisher/{client_id}/status"
    assert len(status.encode()) == 65535
    tick, will = f"{topic_base}/tick", f"{topic_base}/will"
    sub = subscriber_factory(tick, will, status)
    start_process(
        broker.port,
        [entry("tick", tick, interval=0.2), entry("will", will, interval=0.2, lwt=True)],
        "--no-watch",
        "--client-id",
        client_id,
        "--mqtt-version",
        protocol,
    )
    sub.wait_for(status, where=lambda m: m.json() == {"online": 1}, timeout=30)
    sub.wait_for(tick, count=2, timeout=30)
    sub.wait_for(will, count=2, timeout=30)


def test_lwt_client_ids_of_long_service_ids_differ_past_the_cut() -> None:
    """An lwt entry's derived id keeps 42 bytes of the service's id: two service ids that
    differ only after those (as default ids for two config files on one host with a long
    host name do) still derive two ids for one entry id, each within 64 bytes."""
    common = "scheduler-publisher-gateway-plant-07-0035969e-"
    one, other = (
        BrokerSettings(client_id=common + "4e08f1b1"),
        BrokerSettings(client_id=common + "10fc51f2"),
    )
    for entry_id in ("boiler-temperature", "a b", "x" * 100):
        derived = {one.entry_client_id(entry_id), other.entry_client_id(entry_id)}
        assert len(derived) == 2, derived
        assert all(len(cid.encode()) <= 64 for cid in derived)


def test_two_services_with_long_ids_keep_their_lwt_connections_apart(
    broker: Mosquitto,
    subscriber_factory: SubscriberFactory,
    tmp_path: Path,
    topic_base: str,
) -> None:
    """Two services whose client ids share their first 50 bytes, each with an lwt entry of
    one id too long for `<client-id>/<entry id>`: each entry keeps its own connection, and the
    broker closes none for another."""
    common = f"sp-long-{uuid.uuid4().hex[:8]}-" + "c" * 33
    topics = [f"{topic_base}/{n}" for n in range(2)]
    sub = subscriber_factory(*topics)
    procs = []
    for n, topic in enumerate(topics):
        config = tmp_path / f"config-{n}.json"
        write_config(config, [entry("will-of-the-boiler-room", topic, interval=0.2, lwt=True)])
        args = cli_args(broker.port, config, "--no-watch", client_id=f"{common}-{n}")
        procs.append(ServiceProcess(args, cwd=tmp_path))
    try:
        for topic in topics:
            sub.wait_for(topic, count=15, timeout=30)
    finally:
        for proc in procs:
            proc.stop()
    taken_over = [
        line for line in broker.log.read_text().splitlines() if "already connected" in line
    ]
    assert taken_over == []


# ---- run: secrets ---------------------------------------------------------------------------


def test_password_never_appears_in_any_log_line_even_at_debug(
    auth_broker: Mosquitto,
    tmp_path: Path,
    start_process: Callable[..., ServiceProcess],
    topic_base: str,
) -> None:
    """With --log-level DEBUG and a broker that needs it, the password is in no output."""
    topic = f"{topic_base}/auth"
    sub = Subscriber(auth_broker.port, [topic])
    sub.client.username_pw_set(USER, PASSWORD)
    sub.start()
    try:
        proc = start_process(
            auth_broker.port,
            [entry("auth", topic, interval=0.5, qos=1)],
            "--username",
            USER,
            "--password",
            PASSWORD,
            "--log-level",
            "DEBUG",
        )
        sub.wait_for(topic, count=2, timeout=20)
    finally:
        sub.stop()
    proc.wait_for_event("mqtt_connected")
    proc.signal(signal.SIGTERM)
    assert proc.wait(10) == 0
    proc.stop()

    output = all_output(proc, tmp_path / "service.log")
    assert "Sending CONNECT" in output  # paho's DEBUG records were rendered, to both places
    assert "Sending CONNECT" in (tmp_path / "service.log").read_text(encoding="utf-8")
    assert PASSWORD not in output


@pytest.mark.parametrize("where", ["MQTT_PASSWORD", "credential"])
def test_a_stale_password_in_the_options_file_loses_to_the_environment_on_the_wire(
    where: str,
    auth_broker: Mosquitto,
    tmp_path: Path,
    topic_base: str,
    processes: list[ServiceProcess],
) -> None:
    """The options file's old password does not beat a correct $MQTT_PASSWORD or systemd
    credential: the service connects with the environment's and publishes."""
    topic = f"{topic_base}/env-pw"
    config = tmp_path / "config.json"
    write_config(config, [entry("env-pw", topic, interval=0.5)])
    options = tmp_path / "options.toml"
    options.write_text(f'username = "{USER}"\npassword = "stale-{PASSWORD}"\n')
    env = {"MQTT_PASSWORD": PASSWORD}
    if where == "credential":
        (tmp_path / "creds").mkdir()
        (tmp_path / "creds" / "mqtt-password").write_text(f"{PASSWORD}\n")
        env = {"CREDENTIALS_DIRECTORY": str(tmp_path / "creds")}
    sub = Subscriber(auth_broker.port, [topic])
    sub.client.username_pw_set(USER, PASSWORD)
    sub.start()
    try:
        args = cli_args(auth_broker.port, config, "--options-file", str(options))
        processes.append(ServiceProcess(args, cwd=tmp_path, env=env))
        sub.wait_for(topic, timeout=20)
    finally:
        sub.stop()
    assert not [e for e in processes[0].events() if e["message"] == "mqtt_connect_failed"]


def without_client_id(args: list[str]) -> list[str]:
    """cli_args' list without its unique --client-id: the service derives its own."""
    at = args.index("--client-id")
    return args[:at] + args[at + 2 :]


def test_an_acl_written_from_show_options_fits_the_running_service(
    broker: Mosquitto, tmp_path: Path, topic_base: str, processes: list[ServiceProcess]
) -> None:
    """With the derived client id (host and config path) and a shard's suffix, the status
    topic show-options prints is the one the service announces on, and the client id is the
    one the broker sees."""
    config = tmp_path / "entries.json"
    write_config(config, [entry(f"e{i}", f"{topic_base}/e{i}") for i in range(6)])
    args = without_client_id(cli_args(broker.port, config, "--shard", "2/3"))
    shown = ServiceProcess(["show-options", *args[1:]], cwd=tmp_path)
    assert shown.wait(30) == 0
    shown.stop()
    values = dict(line.split("  # ")[0].split(" = ", 1) for line in shown.stdout if " = " in line)
    client_id, status_topic = json.loads(values["client-id"]), json.loads(values["status-topic"])
    assert client_id.endswith("-2-of-3")
    assert status_topic == f"scheduler-publisher/{client_id}/status"

    sub = Subscriber(broker.port, [status_topic]).start()
    try:
        processes.append(ServiceProcess(args, cwd=tmp_path))
        sub.wait_for(status_topic, timeout=20)
    finally:
        sub.stop()
    assert f" as {client_id} " in broker.log.read_text()


def test_wrong_password_is_reported_in_words_and_retried_with_backoff(
    auth_broker: Mosquitto,
    tmp_path: Path,
    start_process: Callable[..., ServiceProcess],
    topic_base: str,
) -> None:
    """A refused password is logged in words ("Not authorized") and retried with backoff."""
    wrong = f"wrong-{PASSWORD}"
    proc = start_process(
        auth_broker.port,
        [entry("x", f"{topic_base}/x")],
        "--username",
        USER,
        "--password",
        wrong,
        "--log-level",
        "DEBUG",
        "--backoff-min",
        "0.4",
        "--backoff-max",
        "0.8",
    )

    def failures() -> list[dict[str, Any]]:
        return [e for e in proc.events() if e["message"] == "mqtt_connect_failed"]

    wait_until(lambda: len(failures()) >= 4, 20, message="four failed attempts")
    proc.signal(signal.SIGTERM)
    assert proc.wait(10) == 0
    proc.stop()

    seen = failures()
    assert all(
        re.search(r"not authori[sz]ed|bad user ?name or password", e["reason"], re.I) for e in seen
    ), [e["reason"] for e in seen]
    times = [log_timestamp(e) for e in seen]
    gaps = [b - a for a, b in pairwise(times)]
    # The backoff waits at least half of 0.4 s before each retry (jitter); a hot loop would not.
    assert min(gaps) > 0.15, gaps
    assert len(seen) <= (times[-1] - times[0]) / 0.2 + 2
    assert not [e for e in proc.events() if e["message"] == "mqtt_connected"]
    assert wrong not in all_output(proc, tmp_path / "service.log")


# ---- run: the log stream --------------------------------------------------------------------


def test_every_stdout_line_is_ecs_json_paho_included_and_no_info_line_per_publish(
    broker: Mosquitto,
    subscriber_factory: SubscriberFactory,
    tmp_path: Path,
    start_process: Callable[..., ServiceProcess],
    topic_base: str,
) -> None:
    """Every stdout line is ECS JSON, paho's DEBUG records too; no INFO line per publish."""
    topic = f"{topic_base}/often"
    sub = subscriber_factory(topic)
    proc = start_process(broker.port, [entry("often", topic, interval=0.1)], "--log-level", "DEBUG")
    sub.wait_for(topic, count=20, timeout=20)
    proc.signal(signal.SIGTERM)
    assert proc.wait(10) == 0
    proc.stop()

    lines = [line for line in proc.stdout if line.strip()]
    # The log file sits next to the config: its writes must not come back as watchdog DEBUG
    # records, each of which would be written and trigger the next (thousands a second).
    assert len(lines) < 500
    events = list(iter_json(lines))
    assert len(events) == len(lines)  # every line parsed
    for event in events:
        assert isinstance(event, dict)
        assert list(event)[: len(ECS_KEYS)] == list(ECS_KEYS), event
        assert event["service.name"] == "scheduler-publisher"
    paho = [e for e in events if e["log.logger"] == "paho.mqtt.client"]
    assert any(e["log.level"] == "debug" and "PUBLISH" in e["message"] for e in paho)
    info = [e["message"] for e in events if e["log.level"] == "info"]
    assert "service_started" in info
    assert "mqtt_connected" in info
    assert len(info) < 10, info  # 20+ messages were published
    file_events = list(iter_json((tmp_path / "service.log").read_text().splitlines()))
    assert file_events
    assert all(list(e)[: len(ECS_KEYS)] == list(ECS_KEYS) for e in file_events)


# ---- run: the quick start -------------------------------------------------------------------


def test_embedded_broker_with_echo_prints_the_sample_entries(
    tmp_path: Path, start_process: Callable[..., ServiceProcess]
) -> None:
    """`--embedded-broker --echo` prints `echo <topic>` for every sample entry within 10 s."""
    topics = [e["topic"] for e in json.loads(SAMPLE.read_text())]
    proc = start_process(free_port(), None, "--config", str(SAMPLE), "--embedded-broker", "--echo")

    def echoed() -> set[str]:
        return {
            t
            for t in topics
            for line in list(proc.stdout)
            if line.startswith((f"echo {t}: ", f"echo {t} (retained): "))
        }

    try:
        wait_until(lambda: echoed() == set(topics), 10, message="an echo line per sample topic")
    except AssertionError:
        raise AssertionError(
            f"echoed {sorted(echoed())}; output:\n"
            + "\n".join(proc.stdout[-20:] + proc.stderr[-20:])
        ) from None
    first = next(line for line in proc.stdout if line.startswith("echo site/"))
    assert json.loads(first.split(": ", 1)[1])["online"] == 1
