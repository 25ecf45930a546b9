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

`--timerfd` also measures the other way to wake at a deadline: `epoll_wait` on a Linux timerfd
armed at the deadline, one wake-up instead of two, with the CPU each deadline costs both ways
(docs/design.md, "Waking once, on a timerfd").
"""

from __future__ import annotations

import argparse
import ctypes
import math
import os
import selectors
import statistics
import time

from common import steal_ms

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
    return {
        "wakeups_per_s": len(costs) / seconds,
        "median_us": statistics.median(costs) / 1000,
        "cpu_pct_of_core": 100 * (time.process_time() - cpu0) / seconds,
    }


class _Timespec(ctypes.Structure):
    _fields_ = (("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long))


class _Itimerspec(ctypes.Structure):
    _fields_ = (("it_interval", _Timespec), ("it_value", _Timespec))


class TimerFd:
    """A Linux timerfd armed at absolute CLOCK_MONOTONIC deadlines, the clock of
    `time.monotonic()`, through libc (Python 3.11 has no `os.timerfd_create`)."""

    CLOCK_MONOTONIC, TFD_TIMER_ABSTIME = 1, 1
    TFD_NONBLOCK, TFD_CLOEXEC = os.O_NONBLOCK, os.O_CLOEXEC

    def __init__(self) -> None:
        self._libc = ctypes.CDLL(None, use_errno=True)
        self.fd = self._libc.timerfd_create(
            self.CLOCK_MONOTONIC, self.TFD_NONBLOCK | self.TFD_CLOEXEC
        )
        if self.fd < 0:
            raise OSError(ctypes.get_errno(), "timerfd_create")

    def arm(self, when: float) -> None:
        whole, nanos = divmod(round(when * 1e9), 1_000_000_000)  # nanos < 1e9, as required
        spec = _Itimerspec(_Timespec(0, 0), _Timespec(whole, nanos))
        if (
            self._libc.timerfd_settime(self.fd, self.TFD_TIMER_ABSTIME, ctypes.byref(spec), None)
            < 0
        ):
            raise OSError(ctypes.get_errno(), "timerfd_settime")

    def close(self) -> None:
        os.close(self.fd)


def lateness(seconds: float, period_s: float, *, timerfd: bool = False) -> dict[str, float]:
    """How late (ms) a thread wakes at deadlines `period_s` apart for `seconds`: p50, p99,
    max, how many of the wake-ups were more than 5 ms late, the thread's CPU per deadline, and
    the host's steal meanwhile (ms, both CPUs). Woken as the network loop wakes (`epoll_wait`
    to GRAIN before, then a precise sleep), or, with `timerfd`, once, by `epoll_wait` on a
    timerfd armed at the deadline."""
    selector = selectors.DefaultSelector()
    read_end, write_end = os.pipe()
    selector.register(read_end, selectors.EVENT_READ)
    timer = TimerFd() if timerfd else None
    if timer is not None:
        selector.register(timer.fd, selectors.EVENT_READ)
    late: list[float] = []
    cpu0, steal0 = time.thread_time(), steal_ms()
    try:
        due = time.monotonic() + period_s
        for _ in range(max(1, math.floor(seconds / period_s))):
            if timer is not None:
                timer.arm(due)
                while not selector.select(None):
                    pass
                os.read(timer.fd, 8)  # the expiry count: clears the readiness
            else:
                _sleep_until(selector, due)
            late.append((time.monotonic() - due) * 1000)
            due += period_s
    finally:
        selector.close()
        os.close(read_end)
        os.close(write_end)
        if timer is not None:
            timer.close()
    cpu_us = (time.thread_time() - cpu0) * 1e6 / len(late)
    late.sort()
    return {
        "wakeups": len(late),
        "p50_ms": late[len(late) // 2],
        "p99_ms": late[min(len(late) - 1, int(len(late) * 0.99))],
        "max_ms": late[-1],
        "over_5ms": sum(x > 5 for x in late),
        "cpu_us_per_deadline": cpu_us,
        "steal_ms": steal_ms() - steal0,
    }


def _sleep_until(selector: selectors.BaseSelector, due: float) -> None:
    """As the network loop: `epoll_wait` to GRAIN before `due`, then a precise sleep."""
    ahead = due - GRAIN - time.monotonic()
    if ahead > 0:
        selector.select(ahead)
    rest = due - time.monotonic()
    if rest > 0:
        time.sleep(rest)


def describe_lateness(r: dict[str, float]) -> str:
    """One line; the host's steal when it was measured (results written before it: none)."""
    steal = f"; host steal meanwhile {r['steal_ms']:.0f} ms" if "steal_ms" in r else ""
    return (
        f"p50 {r['p50_ms']:.2f} / p99 {r['p99_ms']:.2f} / max {r['max_ms']:.2f} ms over "
        f"{r['wakeups']:,} wake-ups, {r['over_5ms']:,} more than 5 ms late{steal}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--period-ms", type=float, default=15.0)
    parser.add_argument(
        "--timerfd",
        action="store_true",
        help="also wake at the deadlines through a timerfd, and compare",
    )
    args = parser.parse_args()
    r = measure(args.seconds, args.period_ms / 1000)
    print(
        f"an empty wake-up every {args.period_ms:g} ms: {r['median_us']:.1f} µs of CPU each "
        f"(median), {r['wakeups_per_s']:.1f} wake-ups a second, "
        f"{r['cpu_pct_of_core']:.2f} % of a core"
    )
    late = lateness(args.seconds, args.period_ms / 1000)
    print(
        f"woken at a deadline every {args.period_ms:g} ms: lateness {describe_lateness(late)}; "
        f"{late['cpu_us_per_deadline']:.0f} µs of CPU per deadline"
    )
    if args.timerfd:
        late = lateness(args.seconds, args.period_ms / 1000, timerfd=True)
        print(
            f"woken at a deadline every {args.period_ms:g} ms by a timerfd: lateness "
            f"{describe_lateness(late)}; {late['cpu_us_per_deadline']:.0f} µs of CPU per "
            "deadline"
        )


if __name__ == "__main__":
    main()
