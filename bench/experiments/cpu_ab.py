#!/usr/bin/env python3
"""CPU per delivered message of two versions of the service, run back to back (issue 12).

    git archive <commit> scheduler_publisher | tar -x -C /tmp/before
    .venv/bin/python bench/experiments/cpu_ab.py --before /tmp/before \
        [--entries 1000] [--seconds 15] [--repeats 3]

Measurement only, for a shared machine: each repeat runs the service of `--before` (a folder
holding an older `scheduler_publisher` package, put first on PYTHONPATH) and this checkout's,
in alternating order, each against its own Mosquitto with N entries x 1 s at QoS 0 and the
CLI's default settings (as bench/profile_service.py). After every topic arrived once and a
warm-up, it prints the process's CPU (/proc) over the window divided by the messages the
subscriber received, the % of a core and the load average. Compare ranges, not single runs.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # bench/: the shared harness

from common import Broker, Sub, proc_cpu_seconds
from peers import ServicePeer

WARM_UP = 4.0  # seconds past the start-up burst


def measure(source: str | None, entries: int, seconds: float) -> tuple[float, float]:
    """(CPU µs per delivered message, fraction of a core) of one run; `source` None is this
    checkout's package."""
    os.environ.pop("PYTHONPATH", None)
    if source is not None:
        os.environ["PYTHONPATH"] = source  # the service's child process imports it first
    with tempfile.TemporaryDirectory(prefix="sp-ab-") as tmp:
        work = Path(tmp)
        broker = Broker(work)
        broker.start()
        prefix = f"bench/ab{entries}-{uuid.uuid4().hex[:6]}"
        sub = Sub(broker.port, prefix)
        peer = ServicePeer(work, broker.port, entries, prefix, "ab")
        try:
            if sub.wait_all_seen(entries, 60) is None:
                raise RuntimeError("not every topic seen")
            time.sleep(WARM_UP)
            total0, cpu0 = sub.ask(op="first_seen")["total"], proc_cpu_seconds(peer.pid)
            time.sleep(seconds)
            cpu = proc_cpu_seconds(peer.pid) - cpu0
            time.sleep(0.5)  # the last ticks' messages in flight
            messages = sub.ask(op="first_seen")["total"] - total0
            return cpu * 1e6 / max(1, messages), cpu / seconds
        finally:
            peer.stop()
            sub.close()
            broker.stop()
            os.environ.pop("PYTHONPATH", None)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--before", required=True, help="folder holding the older package")
    ap.add_argument("--entries", type=int, default=1000)
    ap.add_argument("--seconds", type=float, default=15)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    variants: list[tuple[str, str | None]] = [("before", args.before), ("after", None)]
    for repeat in range(args.repeats):
        for name, source in variants if repeat % 2 == 0 else variants[::-1]:
            us, core = measure(source, args.entries, args.seconds)
            print(
                f"{args.entries} entries, {name}: {us:.1f} µs per message, "
                f"{100 * core:.1f} % of a core, load {os.getloadavg()[0]:.2f}",
                flush=True,
            )


if __name__ == "__main__":
    main()
