#!/usr/bin/env python3
"""What one wake-up costs on this machine, before any work: the floor under every phase group.

    .venv/bin/python bench/wake_cost.py [--seconds 5] [--period-ms 15]

Measurement only. A thread that does nothing but sleep in `epoll_wait` (the selector the
network loop uses) with a timeout of `--period-ms`, as the service's loop does between phase
groups, reports the CPU time of each wake-up (`time.thread_time`, which counts the kernel's
share too) and the process's CPU over the run. The service pays this once per phase group,
whatever the group publishes (docs/design.md, "How many groups").

It also reports how late such a thread wakes at a deadline, woken as the network loop wakes
for a phase group (`epoll_wait` to a millisecond before, then a precise sleep): no process can
publish more punctually than its thread wakes, so this is the floor under every peer's period
error (docs/design.md, "The machine's own wake-up lateness"). `bench/run.py` measures it
before the comparison and shows it beside the p99 targets.
"""

from __future__ import annotations

import argparse
import math
import os
import selectors
import statistics
import time

GRAIN = 0.001  # as netloop.TIMER_GRAIN: epoll_wait rounds its timeout up to whole milliseconds


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


def lateness(seconds: float, period_s: float) -> dict[str, float]:
    """How late (ms) a thread wakes at deadlines `period_s` apart for `seconds`: p50, p99,
    max, and how many of the wake-ups were more than 5 ms late."""
    selector = selectors.DefaultSelector()
    read_end, write_end = os.pipe()
    selector.register(read_end, selectors.EVENT_READ)
    late: list[float] = []
    try:
        due = time.monotonic() + period_s
        for _ in range(max(1, math.floor(seconds / period_s))):
            ahead = due - GRAIN - time.monotonic()
            if ahead > 0:
                selector.select(ahead)
            rest = due - time.monotonic()
            if rest > 0:
                time.sleep(rest)
            late.append((time.monotonic() - due) * 1000)
            due += period_s
    finally:
        selector.close()
        os.close(read_end)
        os.close(write_end)
    late.sort()
    return {"wakeups": len(late), "p50_ms": late[len(late) // 2],
            "p99_ms": late[min(len(late) - 1, int(len(late) * 0.99))], "max_ms": late[-1],
            "over_5ms": sum(x > 5 for x in late)}


def describe_lateness(r: dict[str, float]) -> str:
    return (f"p50 {r['p50_ms']:.2f} / p99 {r['p99_ms']:.2f} / max {r['max_ms']:.2f} ms over "
            f"{r['wakeups']:,} wake-ups, {r['over_5ms']:,} more than 5 ms late")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--period-ms", type=float, default=15.0)
    args = parser.parse_args()
    r = measure(args.seconds, args.period_ms / 1000)
    print(f"an empty wake-up every {args.period_ms:g} ms: {r['median_us']:.1f} µs of CPU each "
          f"(median), {r['wakeups_per_s']:.1f} wake-ups a second, "
          f"{r['cpu_pct_of_core']:.2f} % of a core")
    late = lateness(args.seconds, args.period_ms / 1000)
    print(f"woken at a deadline every {args.period_ms:g} ms: lateness {describe_lateness(late)}")


if __name__ == "__main__":
    main()
