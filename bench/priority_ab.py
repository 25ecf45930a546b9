#!/usr/bin/env python3
"""Whether a real-time scheduling policy takes the p99 tail away (issue 12).

    .venv/bin/python bench/priority_ab.py [--entries 1000] [--rounds 6] [--priority 10]
                                          [--modes off,process,network-thread]

Measurement only; needs root (CAP_SYS_NICE). Each round runs the service (CLI, default
settings) once per mode, in alternating order, as the comparison windows of bench/run.py do:
start-up, warm-up, a 20 s window, the C subscriber's period error. Once the service publishes,
before the warm-up, each mode changes how its threads are scheduled:

- `off`: as started (SCHED_OTHER, nice 0);
- `process`: every thread SCHED_FIFO at `--priority`;
- `network-thread`: only the thread that used the most CPU so far (the network thread, which
  runs the phase groups) SCHED_FIFO.

Compare the spread of each mode's p99 over the rounds, not single windows
(docs/design.md, "A real-time scheduling policy").
"""

from __future__ import annotations

import argparse
import os
import tempfile
import uuid
from collections.abc import Callable
from pathlib import Path

from common import Broker, Sub, thread_cpu_seconds
from compare import CompareParams, measure_peer

MODES = ("off", "process", "network-thread")


def thread_ids(pid: int) -> list[int]:
    return [int(name) for name in os.listdir(f"/proc/{pid}/task")]


def busiest_thread(pid: int) -> int:
    return max(thread_ids(pid), key=lambda tid: thread_cpu_seconds(pid, tid))


def policy(mode: str, priority: int) -> Callable[[int], None] | None:
    """What `mode` does to the service once it publishes (None: nothing)."""
    fifo = os.sched_param(priority)

    def whole_process(pid: int) -> None:
        for tid in thread_ids(pid):
            os.sched_setscheduler(tid, os.SCHED_FIFO, fifo)

    def network_thread(pid: int) -> None:
        os.sched_setscheduler(busiest_thread(pid), os.SCHED_FIFO, fifo)

    return {"process": whole_process, "network-thread": network_thread}.get(mode)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--entries", type=int, default=1000)
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--priority", type=int, default=10)
    ap.add_argument("--modes", default=",".join(MODES))
    args = ap.parse_args()
    modes = args.modes.split(",")
    unknown = set(modes) - set(MODES)
    if unknown:
        ap.error(f"unknown modes {sorted(unknown)}; expected some of {', '.join(MODES)}")
    n = args.entries
    params = CompareParams(sizes=(n,), peers=("service",), rounds=1, warmup_s=5.0,
                           window_s=20.0, loaded_n=n)
    with tempfile.TemporaryDirectory() as d:
        work = Path(d)
        broker = Broker(work)
        broker.start()
        try:
            for r in range(args.rounds):
                for mode in modes if r % 2 == 0 else modes[::-1]:
                    prefix = f"bench/prio{n}-{uuid.uuid4().hex[:6]}"
                    sub = Sub(broker.port, prefix)
                    try:
                        w = measure_peer(work, broker.port, sub, "service", n,
                                         f"{prefix}/service", params,
                                         started=policy(mode, args.priority))
                    finally:
                        sub.close()
                    print(f"{n} entries, {mode}: p50 {w['p50_ms']:.2f} / p99 {w['p99_ms']:.2f} / "
                          f"max {w['max_ms']:.1f} ms, CPU {w['cpu_us_per_msg']:.1f} µs per "
                          f"message, load {w['loadavg_1m']:.2f}", flush=True)
        finally:
            broker.stop()


if __name__ == "__main__":
    main()
