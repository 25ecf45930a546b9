# ruff: noqa: E501, PLW1509
# (lines moved from run.py are long; preexec_fn only raises RLIMIT_NOFILE, and the parent starts its children from its only thread)
"""What every benchmark part shares: the payloads and entries, /proc readings, and the
processes it starts (Mosquitto, the counting subscriber, the service's CLI)."""

from __future__ import annotations

import contextlib
import json
import math
import os
import resource
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any, cast

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # run as `python bench/run.py`: make the test harness importable
    sys.path.insert(0, str(REPO))

from scheduler_publisher.scheduling.plan import grid_start  # noqa: E402
from tests.support import Mosquitto, call, cli_args, free_port  # noqa: E402 - one harness with the tests

RUN = REPO / "bench" / "run.py"  # every helper role runs as `run.py --role NAME`
RUNTIME_VENV = REPO / "bench" / ".runtime-venv"  # git-ignored; made by runtime_python()
# The interpreter the service runs under: this one (the development venv), unless
# use_service_python() chose the runtime venv's.
_service_python = sys.executable
CLK_TCK = os.sysconf("SC_CLK_TCK")
GRID_ANCHOR = 1704067200.0  # 2024-01-01T00:00:00Z, the same anchor as scheduler_publisher.plan


def data_for(i: int) -> dict[str, Any]:
    """Every entry's `data`; the bare loop publishes the same-sized payload."""
    return {"value": i % 1000, "unit": "C", "site": "bench"}


def payload_for(i: int) -> bytes:
    return json.dumps({"online": 1, **data_for(i)}, separators=(",", ":")).encode()


def grid_offset(entry_id: str, interval: float, slots: int) -> float:
    """The entry's phase on its grid with `slots` phase groups: the service's own computation,
    not a copy of it."""
    return grid_start(entry_id, interval, slots).timestamp() - GRID_ANCHOR


def runtime_python() -> str:
    """The interpreter of a venv that holds what `pip install scheduler-publisher` gives a
    gateway: this checkout installed as a wheel with its runtime dependencies, and nothing
    else. The development venv also holds the test and demo tools, and some change the
    service: structlog imports `rich` whenever it is installed (4.5 MB of RSS here, pulled in
    by amqtt's typer). Made on first use (PyPI); the package is reinstalled from the checkout
    every time, so the code measured is the code checked out."""
    python = RUNTIME_VENV / "bin" / "python"
    pip = [str(python), "-m", "pip", "install", "--quiet", "--disable-pip-version-check"]
    if not python.exists():
        subprocess.run([sys.executable, "-m", "venv", str(RUNTIME_VENV)], check=True)
        subprocess.run([*pip, str(REPO)], check=True, timeout=900, stdin=subprocess.DEVNULL)
    else:
        subprocess.run(
            [*pip, "--no-deps", "--force-reinstall", str(REPO)],
            check=True,
            timeout=900,
            stdin=subprocess.DEVNULL,
        )
    return str(python)


def use_service_python(python: str) -> None:
    """Run every later Service under `python`."""
    global _service_python  # noqa: PLW0603 - one setting for the whole benchmark run
    _service_python = python


def service_python() -> str:
    return _service_python


def raise_nofile() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard != resource.RLIM_INFINITY else 65536
    with contextlib.suppress(ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, min(65536, target)), hard))


def pct(values: list[float], p: float) -> float:
    if not values:
        return float("nan")
    s = sorted(values)
    k = min(len(s) - 1, max(0, math.ceil(p / 100 * len(s)) - 1))
    return s[k]


# ==== /proc readings ===============================================================================
def _stat_cpu_seconds(path: str) -> float:
    """utime + stime of a /proc stat file (a process's or one thread's), in seconds."""
    with open(path) as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK  # fields 14 and 15 of stat(5)


def proc_cpu_seconds(pid: int) -> float:
    """utime + stime of every thread of the process, in seconds."""
    return _stat_cpu_seconds(f"/proc/{pid}/stat")


def thread_cpu_seconds(pid: int, tid: int) -> float:
    """utime + stime of one thread of the process, in seconds."""
    return _stat_cpu_seconds(f"/proc/{pid}/task/{tid}/stat")


def steal_ms(stat: str | None = None) -> float:
    """Time the hypervisor ran something else on this guest's CPUs since boot, summed over the
    CPUs, in ms: the `steal` column of the aggregate `cpu` line of /proc/stat (proc(5)), read
    from `stat` when given. A window's share of it says whether a late window coincided with
    the host taking the CPUs away (docs/design.md, "Host steal in the windows")."""
    if stat is None:
        with open("/proc/stat") as f:
            stat = f.read()
    for line in stat.splitlines():
        fields = line.split()
        if fields and fields[0] == "cpu":
            return 1000 * int(fields[8]) / CLK_TCK if len(fields) > 8 else 0.0
    raise ValueError("no aggregate cpu line in /proc/stat")


def proc_rss_kb(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


# ==== parent-side helpers ==========================================================================
# Queues and connections unbounded, so the broker never limits what a run measures (the tests'
# broker keeps its bounds). The last value of a repeated Mosquitto option wins.
BENCH_BROKER = (
    "max_queued_messages 1000000\n"
    "max_queued_bytes 0\n"
    "max_connections -1\n"
    "set_tcp_nodelay true\n"
    "sys_interval 1\n"  # $SYS counters every second: what the broker received (bench/shards.py)
)


def Broker(workdir: Path) -> Mosquitto:  # noqa: N802 - reads as the class it used to be
    """The benchmark's broker: the tests' Mosquitto launcher with unbounded queues."""
    return Mosquitto(workdir, extra=BENCH_BROKER)


class Sub:
    """The subscriber process."""

    def __init__(self, port: int, prefix: str) -> None:
        self.proc = subprocess.Popen(
            [
                sys.executable,
                str(RUN),
                "--role",
                "sub",
                "--port",
                str(port),
                "--prefix",
                prefix,
            ],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            preexec_fn=raise_nofile,
        )
        first = self._read()
        if not first.get("ready"):
            raise RuntimeError("subscriber failed to start")

    def _read(self) -> dict[str, Any]:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError("subscriber died")
        return json.loads(line)  # type: ignore[no-any-return]

    def ask(self, **cmd: Any) -> dict[str, Any]:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps(cmd) + "\n")
        self.proc.stdin.flush()
        return self._read()

    def wait_all_seen(self, n: int, timeout: float, prefix: str = "") -> float | None:
        """Wall time when the last of n topics (under `prefix`, if given) was first seen
        (None on timeout)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            r = self.ask(op="first_seen", prefix=prefix)
            if r["topics"] >= n:
                return float(r["last_first"])
            time.sleep(0.05)
        return None

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.ask(op="quit")
        with contextlib.suppress(Exception):
            self.proc.wait(5)
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


class Service:
    """The real CLI in a subprocess."""

    def __init__(
        self,
        workdir: Path,
        port: int,
        entries: list[dict[str, Any]],
        name: str,
        *,
        http_port: int = 0,
        watch: bool = False,
        defaults: bool = False,
        shard: str | None = None,
        config_name: str | None = None,
        extra: Sequence[str] = (),
    ) -> None:
        """`shard` ("K/N") runs one shard of the entries; shards share one file when they
        are given one `config_name` (the file is `<config_name>.json`, else `<name>.json`).
        `extra`: more flags of `run`.

        The config file is in a folder of its own, `workdir/JSON/`, as on a gateway: the
        watcher follows that folder, and the logs, the state database and whatever the
        benchmark writes stay out of it (each write there would wake the watcher's threads)."""
        folder = workdir / "JSON"
        folder.mkdir(exist_ok=True)
        self.config = folder / f"{config_name or name}.json"
        write_atomically(self.config, entries)
        self.out = workdir / f"{name}.log"
        self.http_port = http_port
        cmd = (
            self._default_cmd(workdir, port, name)
            if defaults
            else self._lean_cmd(port, name, watch)
        )
        if shard is not None:
            cmd += ["--shard", shard]
        cmd += extra  # more flags of `run`
        self._out = self.out.open("wb")
        self.started_at = time.time()
        self.proc = subprocess.Popen(
            cmd, stdout=self._out, stderr=subprocess.STDOUT, cwd=workdir, preexec_fn=raise_nofile
        )

    def _default_cmd(self, workdir: Path, port: int, name: str) -> list[str]:
        """The CLI with its default settings: HTTP, the state DB, the watcher, INFO JSON logs
        to stdout and to the rotated log file. Only what must differ on a shared machine is
        set: the broker, a free HTTP port, files in the run's own folder, and no options file
        (so that one in /etc cannot change the settings)."""
        if not self.http_port:
            self.http_port = free_port()
        return [
            _service_python,
            "-m",
            "scheduler_publisher",
            *cli_args(
                port,
                self.config,
                "--options-file",
                "",
                http_port=self.http_port,
                state_db=workdir / f"{name}.db",
                log_file=workdir / f"{name}.json.log",
                client_id=f"bench-{name}-{uuid.uuid4().hex[:6]}",
            ),
        ]

    def _lean_cmd(self, port: int, name: str, watch: bool) -> list[str]:
        """Issue #6's scenarios: no state DB, no log file, warnings only."""
        cmd = [
            _service_python,
            "-m",
            "scheduler_publisher",
            *cli_args(
                port,
                self.config,
                "--log-level",
                "WARNING",
                http_port=self.http_port,
                client_id=f"bench-{name}-{uuid.uuid4().hex[:6]}",
            ),
        ]
        if not watch:
            cmd.append("--no-watch")
        return cmd

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> None:
        if self.proc.poll() is not None:
            tail = self.out.read_text(errors="replace")[-2000:]
            raise RuntimeError(f"service exited with {self.proc.returncode}:\n{tail}")

    def status(self) -> dict[str, Any]:
        reply = call(self.http_port, "/status", timeout=30)
        if reply.status != 200:
            raise RuntimeError(f"/status answered {reply.status}: {reply.body[:200]!r}")
        return cast("dict[str, Any]", reply.json())

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._out.close()


def write_atomically(path: Path, entries: list[dict[str, Any]]) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(entries))
    os.replace(tmp, path)


def make_entries(n: int, interval: float, prefix: str) -> list[dict[str, Any]]:
    return [
        {
            "id": f"e{i:05d}",
            "topic": f"{prefix}/e{i:05d}",
            "data": data_for(i),
            "interval": interval,
            "qos": 0,
        }
        for i in range(n)
    ]


def verdict_word(ok: bool | None) -> str:
    """A target's verdict in the benchmark's tables: met, MISSED, or n/a when not measured."""
    return "n/a" if ok is None else ("met" if ok else "MISSED")


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)
