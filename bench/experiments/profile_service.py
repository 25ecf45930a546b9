#!/usr/bin/env python3
"""Where the service's CPU per message goes: py-spy on the real CLI (default settings).

    .venv/bin/pip install py-spy   # not a project dependency
    .venv/bin/python bench/experiments/profile_service.py \
        [--entries 1000] [--seconds 20] [--rate 500]

Measurement only. It starts its own Mosquitto, the service with N entries at 1 s (HTTP, state
DB, watcher and JSON logs on, as in the issue-12 comparison) and a counting subscriber, waits
until every topic arrived once plus a warm-up, then samples every thread with
`py-spy record --nonblocking` (no pauses) for the window. The samples' shares, scaled by the
process's CPU over the window (/proc) and the messages delivered in it, give CPU µs per
message: by area (the package of the innermost frame), by function (self time) and for a few
entry points (inclusive time).
"""

from __future__ import annotations

import argparse
import collections
import re
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # bench/: the shared harness

from common import Broker, Sub, proc_cpu_seconds
from peers import ServicePeer

# the innermost frame's file decides the area; first match wins
AREAS = (
    ("apscheduler", "APScheduler"),
    ("paho/", "paho"),
    ("structlog", "logging (structlog)"),
    ("logging/", "logging (stdlib)"),
    ("prometheus_client", "prometheus_client"),
    ("watchdog", "watchdog"),
    ("sqlite3", "sqlite3"),
    ("scheduler_publisher/", "scheduler_publisher"),
    ("selectors.py", "stdlib selectors"),
    ("socket.py", "stdlib socket"),
    ("threading.py", "stdlib threading"),
)
# inclusive time of these functions (substring of a frame)
ENTRY_POINTS = (
    "_process_jobs",
    "publish",
    "_packet_queue",
    "loop_write",
    "loop_read",
    "loop_misc",
    "_run_job",
    "submit_job",
    "_emit",
    "_dispatch_event",
    "_modify",
    "update_job",
    "get_next_fire_time",
    "info",
    "tick",
)
# innermost frames of a thread that is blocked, not running: py-spy's idle detection misses
# them without pausing the process, so they are dropped here and reported apart
WAITS = (
    "EpollSelector.select",
    "PollSelector.select",
    "SelectSelector.select",
    "Condition.wait",
    "Event.wait",
    "Thread.join",
    "socket.accept",
)
FRAME = re.compile(r"^(?P<func>.*) \((?P<file>[^:]*)(:\d+)?\)$")


def area_of(frame: str) -> str:
    m = FRAME.match(frame)
    file = m.group("file") if m else frame
    for key, name in AREAS:
        if key in file:
            return f"{name}.{Path(file).stem}" if name == "scheduler_publisher" else name
    return "other"


def func_name(frame: str) -> str:
    m = FRAME.match(frame)
    return (m.group("func") if m else frame).rsplit(".", 1)[-1]


def parse_collapsed(text: str) -> list[tuple[list[str], int]]:
    stacks = []
    for line in text.splitlines():
        stack, _, count = line.rpartition(" ")
        if stack and count.isdigit():
            stacks.append((stack.split(";"), int(count)))
    return stacks


def tally(stacks: list[tuple[list[str], int]]) -> dict[str, collections.Counter[str]]:
    areas: collections.Counter[str] = collections.Counter()
    funcs: collections.Counter[str] = collections.Counter()
    inclusive: collections.Counter[str] = collections.Counter()
    threads: collections.Counter[str] = collections.Counter()
    for frames, count in stacks:
        leaf = frames[-1]
        if leaf.startswith(tuple(w + " " for w in WAITS)):
            areas["(blocked: not CPU)"] += count
            continue
        areas[area_of(leaf)] += count
        funcs[re.sub(r":\d+\)$", ")", leaf)] += count  # per function, not per line
        threads[frames[0]] += count
        names = {func_name(f) for f in frames[1:]}
        for ep in names.intersection(ENTRY_POINTS):
            inclusive[ep] += count
    return {"areas": areas, "functions": funcs, "inclusive": inclusive, "threads": threads}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--entries", type=int, default=1000)
    ap.add_argument("--seconds", type=int, default=20)
    ap.add_argument("--rate", type=int, default=500, help="py-spy samples per second")
    venv_py_spy = Path(sys.executable).parent / "py-spy"
    ap.add_argument("--py-spy", default=shutil.which("py-spy") or venv_py_spy)
    ap.add_argument("--top", type=int, default=25)
    ap.add_argument(
        "--gil",
        action="store_true",
        help="only samples of the thread holding the GIL (py-spy --gil): Python "
        "work only, without waits for the GIL and calls that release it",
    )
    args = ap.parse_args()
    if not Path(args.py_spy).exists():
        print("py-spy not found: `.venv/bin/pip install py-spy`, or pass --py-spy PATH")
        return 2
    with tempfile.TemporaryDirectory(prefix="sp-profile-") as tmp:
        work = Path(tmp)
        broker = Broker(work)
        broker.start()
        prefix = f"bench/p{args.entries}-{uuid.uuid4().hex[:6]}"
        sub = Sub(broker.port, prefix)
        peer = ServicePeer(work, broker.port, args.entries, prefix, "profile")
        try:
            if sub.wait_all_seen(args.entries, 60) is None:
                raise RuntimeError("not every topic seen")
            time.sleep(5)  # warm-up: past the start-up burst
            total0, cpu0 = sub.ask(op="first_seen")["total"], proc_cpu_seconds(peer.pid)
            out = work / "profile.txt"
            subprocess.run(
                [
                    args.py_spy,
                    "record",
                    "--pid",
                    str(peer.pid),
                    "--duration",
                    str(args.seconds),
                    "--rate",
                    str(args.rate),
                    "--nonblocking",
                    "--threads",
                    "--format",
                    "raw",
                    "--output",
                    str(out),
                    *(["--gil"] if args.gil else []),
                ],
                check=True,
                capture_output=True,
            )
            cpu = proc_cpu_seconds(peer.pid) - cpu0
            time.sleep(0.5)  # the last ticks' messages in flight
            messages = sub.ask(op="first_seen")["total"] - total0
            report(tally(parse_collapsed(out.read_text())), cpu, messages, args)
        finally:
            peer.stop()
            sub.close()
            broker.stop()
    return 0


def report(
    t: dict[str, collections.Counter[str]], cpu: float, messages: int, args: argparse.Namespace
) -> None:
    blocked = t["areas"].pop("(blocked: not CPU)", 0)
    samples = sum(t["areas"].values())
    us_per_msg = cpu * 1e6 / messages if messages else float("nan")
    print(
        f"{args.entries} entries x 1 s, {args.seconds} s window: CPU {cpu:.2f} s for "
        f"{messages:,} messages = {us_per_msg:.1f} µs per message; {samples:,} busy samples "
        f"at {args.rate}/s ({blocked:,} samples of blocked threads left out)"
    )
    for title, key, top in (
        ("area (innermost frame)", "areas", 20),
        ("thread", "threads", 10),
        ("function, self time", "functions", args.top),
        ("entry point, inclusive", "inclusive", 20),
    ):
        print(f"\n| {title} | share | µs per message |\n|---|---|---|")
        for name, count in t[key].most_common(top):
            share = count / samples
            print(f"| `{name}` | {100 * share:.1f} % | {share * us_per_msg:.1f} |")


if __name__ == "__main__":
    sys.exit(main())
