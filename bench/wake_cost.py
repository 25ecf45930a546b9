#!/usr/bin/env python3
"""What one wake-up costs on this machine, before any work: the floor under every phase group.

    .venv/bin/python bench/wake_cost.py [--seconds 5] [--period-ms 15]

Measurement only. A thread that does nothing but sleep in `epoll_wait` (the selector the
network loop uses) with a timeout of `--period-ms`, as the service's loop does between phase
groups, reports the CPU time of each wake-up (`time.thread_time`, which counts the kernel's
share too) and the process's CPU over the run. The service pays this once per phase group,
whatever the group publishes (docs/design.md, "How many groups").
"""

from __future__ import annotations

import argparse
import os
import selectors
import statistics
import time


def measure(seconds: float, period_s: float) -> dict[str, float]:
    selector = selectors.DefaultSelector()
    read_end, write_end = os.pipe()
    selector.register(read_end, selectors.EVENT_READ)
    costs: list[int] = []
    cpu0, end = time.process_time(), time.monotonic() + seconds
    try:
        while time.monotonic() < end:
            before = time.thread_time_ns()
            selector.select(period_s)
            costs.append(time.thread_time_ns() - before)
    finally:
        selector.close()
        os.close(read_end)
        os.close(write_end)
    return {"wakeups_per_s": len(costs) / seconds,
            "median_us": statistics.median(costs) / 1000,
            "cpu_pct_of_core": 100 * (time.process_time() - cpu0) / seconds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--period-ms", type=float, default=15.0)
    args = parser.parse_args()
    r = measure(args.seconds, args.period_ms / 1000)
    print(f"an empty wake-up every {args.period_ms:g} ms: {r['median_us']:.1f} µs of CPU each "
          f"(median), {r['wakeups_per_s']:.1f} wake-ups a second, "
          f"{r['cpu_pct_of_core']:.2f} % of a core")


if __name__ == "__main__":
    main()
