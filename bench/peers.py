# ruff: noqa: PLW1509
# (preexec_fn only raises RLIMIT_NOFILE, and the parent starts its children from its only thread)
"""The publishers issue 12 compares, each in its own process: the service (the real CLI with
its default settings), Node-RED (an inject node per topic wired to one `mqtt out` node) and
the bare scheduled paho loop (`run.py --role loop`). Also the spinner that loads one core."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

from common import REPO, RUN, Service, make_entries, payload_for, raise_nofile

from scheduler_publisher.scheduling.spread import auto_slots

NODE_RED_DIR = REPO / "bench" / ".node-red"  # git-ignored; filled by `npm install` on first use
NODE_RED_JS = NODE_RED_DIR / "node_modules" / "node-red" / "red.js"
NODE_RED_PACKAGE = "node-red@4"
PEERS = ("service", "node-red", "loop", "service-100-slots")


class Peer(Protocol):
    name: str
    # publishes on the service's grid with this many phase slots (None: on phases of its own)
    phase_slots: int | None
    started_at: float  # time.time() just before the process was spawned

    @property
    def pid(self) -> int: ...

    def alive(self) -> None: ...

    def stop(self) -> None: ...


def stop_process(proc: subprocess.Popen[bytes], grace: float = 15) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


class _ProcessPeer:
    """A peer that is one child process, its output in `<tag>.log` (the bare loop, Node-RED)."""

    name: str

    def _spawn(self, work: Path, tag: str, cmd: list[str]) -> None:
        self._out = (work / f"{tag}.log").open("wb")
        self.started_at = time.time()
        self._proc = subprocess.Popen(
            cmd,
            stdout=self._out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            preexec_fn=raise_nofile,
        )

    @property
    def pid(self) -> int:
        return self._proc.pid

    def alive(self) -> None:
        if self._proc.poll() is not None:
            raise RuntimeError(f"{self.name} exited with {self._proc.returncode}")

    def stop(self) -> None:
        stop_process(self._proc)
        self._out.close()


class ServicePeer:
    name = "service"
    flags: tuple[str, ...] = ()  # beyond the defaults
    fixed_slots: int | None = None  # --phase-slots in `flags`; None: auto, the default

    def __init__(self, work: Path, port: int, n: int, prefix: str, tag: str) -> None:
        self.phase_slots: int | None = self.fixed_slots or auto_slots(n)  # its interval's
        self._svc = Service(
            work, port, make_entries(n, 1.0, prefix), tag, defaults=True, extra=self.flags
        )
        self.started_at = self._svc.started_at

    @property
    def pid(self) -> int:
        return self._svc.pid

    def alive(self) -> None:
        self._svc.alive()

    def stop(self) -> None:
        self._svc.stop()


class WideSpreadPeer(ServicePeer):
    """The service with 100 phase groups per period at every size (`--phase-slots 100`): the
    spread of every release before auto, what it costs beside what auto costs."""

    name = "service-100-slots"
    fixed_slots = 100
    flags = ("--phase-slots", "100")


class LoopPeer(_ProcessPeer):
    name = "loop"

    def __init__(self, work: Path, port: int, n: int, prefix: str, tag: str) -> None:
        # the service's default grid (roles.loop_groups)
        self.phase_slots: int | None = auto_slots(n)
        self._spawn(
            work,
            tag,
            [
                sys.executable,
                str(RUN),
                "--role",
                "loop",
                "--port",
                str(port),
                "--n",
                str(n),
                "--prefix",
                prefix,
            ],
        )


# ==== Node-RED ===================================================================================
def node_red_unavailable(which: Callable[[str], str | None] = shutil.which) -> str | None:
    """Why the Node-RED peer cannot run here, or None when it can."""
    if which("node") is None:
        return "`node` is not on PATH"
    if not NODE_RED_JS.exists() and which("npm") is None:
        return f"Node-RED is not installed in {NODE_RED_DIR} and `npm` is not on PATH"
    return None


def install_node_red(log: Callable[[str], None]) -> None:
    """`npm install node-red@4` into the ignored folder, once."""
    if NODE_RED_JS.exists():
        return
    log(f"installing {NODE_RED_PACKAGE} into {NODE_RED_DIR} (first use)")
    NODE_RED_DIR.mkdir(parents=True, exist_ok=True)
    subprocess.run(
        [
            "npm",
            "install",
            "--prefix",
            str(NODE_RED_DIR),
            "--no-audit",
            "--no-fund",
            "--omit=dev",
            "--loglevel=error",
            NODE_RED_PACKAGE,
        ],
        check=True,
        timeout=600,
        stdin=subprocess.DEVNULL,
    )


def node_red_version() -> str | None:
    package = NODE_RED_JS.parent / "package.json"
    if not package.exists():
        return None
    return str(json.loads(package.read_text())["version"])


def node_red_flow(
    messages: list[tuple[str, bytes]], port: int, client_id: str
) -> list[dict[str, Any]]:
    """The flow an operator would draw: an inject node per topic (its topic and static payload,
    repeat 1 s, fired once 0.1 s after deploy like the service's first publish at start),
    all wired to one `mqtt out` node, QoS 0, on one broker connection (MQTT 3.1.1, Node-RED's
    default; keepalive 30 s like the service's)."""
    broker = {
        "id": "bench-broker",
        "type": "mqtt-broker",
        "name": "bench",
        "broker": "127.0.0.1",
        "port": str(port),
        "clientid": client_id,
        "autoConnect": True,
        "usetls": False,
        "protocolVersion": "4",
        "keepalive": "30",
        "cleansession": True,
    }
    out = {
        "id": "bench-out",
        "type": "mqtt out",
        "z": "bench-tab",
        "name": "",
        "topic": "",
        "qos": "0",
        "retain": "false",
        "broker": "bench-broker",
        "x": 400,
        "y": 40,
        "wires": [],
    }
    injects = [
        {
            "id": f"bench-inject-{i}",
            "type": "inject",
            "z": "bench-tab",
            "name": "",
            "props": [{"p": "payload"}, {"p": "topic", "vt": "str"}],
            "repeat": "1",
            "crontab": "",
            "once": True,
            "onceDelay": 0.1,
            "topic": topic,
            "payload": payload.decode(),
            "payloadType": "str",
            "x": 100,
            "y": 40 + i,
            "wires": [["bench-out"]],
        }
        for i, (topic, payload) in enumerate(messages)
    ]
    return [{"id": "bench-tab", "type": "tab", "label": "bench"}, broker, out, *injects]


def node_red_settings(user_dir: Path) -> str:
    """settings.js: no editor and no HTTP at all (headless), everything in a temp userDir."""
    return (
        "module.exports = {\n"
        f"    userDir: {json.dumps(str(user_dir))},\n"
        '    flowFile: "flows.json",\n'
        "    httpAdminRoot: false,\n"
        "    httpNodeRoot: false,\n"
        "    credentialSecret: false,\n"
        "    diagnostics: { enabled: false },\n"
        "    runtimeState: { enabled: false },\n"
        "    telemetry: { enabled: false },\n"
        "    externalModules: { autoInstall: false, palette: { allowInstall: false } },\n"
        "};\n"
    )


class NodeRedPeer(_ProcessPeer):
    name = "node-red"
    phase_slots: int | None = None  # each inject node's timer starts at deploy: its own phase

    def __init__(self, work: Path, port: int, n: int, prefix: str, tag: str) -> None:
        self._user_dir = Path(tempfile.mkdtemp(prefix=f"{tag}-", dir=work))
        entries = make_entries(n, 1.0, prefix)
        messages = [(e["topic"], payload_for(i)) for i, e in enumerate(entries)]
        flow = node_red_flow(messages, port, f"bench-{tag}-{uuid.uuid4().hex[:6]}")
        (self._user_dir / "flows.json").write_text(json.dumps(flow))
        settings = self._user_dir / "settings.js"
        settings.write_text(node_red_settings(self._user_dir))
        self._spawn(
            work,
            tag,
            [
                "node",
                str(NODE_RED_JS),
                "--settings",
                str(settings),
                "--userDir",
                str(self._user_dir),
                str(self._user_dir / "flows.json"),
            ],
        )

    def stop(self) -> None:
        super().stop()
        shutil.rmtree(self._user_dir, ignore_errors=True)


def start_peer(name: str, work: Path, port: int, n: int, prefix: str, tag: str) -> Peer:
    kinds: dict[str, type[ServicePeer] | type[LoopPeer] | type[NodeRedPeer]] = {
        "service": ServicePeer,
        "service-100-slots": WideSpreadPeer,
        "loop": LoopPeer,
        "node-red": NodeRedPeer,
    }
    return kinds[name](work, port, n, prefix, tag)


class Spinner:
    """A child process that keeps one core busy, bounded in time even if we die."""

    def __init__(self, seconds: float) -> None:
        self._proc = subprocess.Popen(
            [sys.executable, str(RUN), "--role", "spin", "--seconds", str(seconds)],
            stdin=subprocess.DEVNULL,
        )

    @property
    def pid(self) -> int:
        return self._proc.pid

    def stop(self) -> None:
        stop_process(self._proc, grace=5)
