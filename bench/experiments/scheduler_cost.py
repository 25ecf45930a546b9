#!/usr/bin/env python3
"""APScheduler's bookkeeping per job run, without MQTT (issue 12).

    .venv/bin/python bench/experiments/scheduler_cost.py [--entries 5000] [--seconds 10] \
        [--repeats 5] [--profile | --real] [--listen]

Builds the service's real `Schedule` (its job stores, executor and shared grid triggers) with
N entries x 1 s and a no-op tick, then drives the scheduler's own `_process_jobs` loop on a
fake clock that jumps from one due group to the next: `--seconds` simulated seconds run in
well under that, with no sleeping and no other thread competing. It prints the CPU time per
job run (process time over the runs) of each repeat, and their median and minimum: that is
what the scheduler spends per publish apart from the publish itself. On a shared
machine compare minimums, or interleave runs. `--profile` runs once under cProfile and prints
the top functions by internal time. `--real` instead starts the scheduler as the service does
and lets it run `--seconds` of real time per repeat on a network loop without sessions (the
thread the service's scheduler runs on), waking on the real clock.
`--listen` adds a no-op listener for every job event, so the executor builds and dispatches
EVENT_JOB_EXECUTED for every run (without one, it builds none).
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import statistics
import sys
import threading
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import apscheduler.schedulers.base as aps_base

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # bench/: the shared harness

import common  # noqa: F401 - puts the repository on sys.path: one harness with the tests
from apscheduler.events import EVENT_ALL
from apscheduler.schedulers.base import STATE_RUNNING

from scheduler_publisher.config.loader import PublishConfig
from scheduler_publisher.scheduling import scheduler as scheduling
from scheduler_publisher.scheduling.scheduler import Schedule
from tests.support import session_free_loop


class FakeClock:
    """Stands in for `datetime` where the scheduler reads the time: `now()` is ours."""

    current = datetime.now(UTC) - timedelta(hours=1)

    @classmethod
    def now(cls, tz: Any = None) -> datetime:
        return cls.current if tz is None else cls.current.astimezone(tz)


def build(entries: int, listen: bool) -> tuple[Schedule, list[int]]:
    runs = [0]

    def tick(_entry_id: str, _slot: datetime | None = None, _missed: int = 0) -> None:
        runs[0] += 1

    # The scheduler never wakes itself here (started paused, see below): this thread drives
    # _process_jobs.
    schedule = Schedule(tick, session_free_loop())
    if listen:
        schedule.scheduler.add_listener(lambda _event: None, EVENT_ALL)
    # Started paused: jobs added while paused go straight into the job store.
    schedule.scheduler.start(paused=True)
    for i in range(entries):
        schedule.add(PublishConfig(id=f"bench/{i}", topic=f"bench/{i}", data={}, interval=1.0))
    schedule.scheduler.state = STATE_RUNNING
    return schedule, runs


def drive(schedule: Schedule, seconds: float) -> int:
    """Runs every due group until `seconds` of fake time have passed; returns the wake-ups."""
    scheduler = schedule.scheduler
    store = scheduler._jobstores["entries"]
    end = FakeClock.current + timedelta(seconds=seconds)
    wakeups = 0
    while (due := store.get_next_run_time()) is not None and due <= end:
        FakeClock.current = due
        scheduler._process_jobs()
        wakeups += 1
    return wakeups


def measure(
    schedule: Schedule, runs: list[int], seconds: float, profiler: cProfile.Profile | None
) -> tuple[float, int]:
    """µs of CPU per job run over `seconds` of fake time, and the wake-ups it took."""
    runs[0] = 0
    start = time.process_time()
    if profiler is not None:
        profiler.enable()
    wakeups = drive(schedule, seconds)
    if profiler is not None:
        profiler.disable()
    return (time.process_time() - start) * 1e6 / max(1, runs[0]), wakeups


def measure_real(entries: int, seconds: float) -> float:
    """µs of CPU per job run of the started scheduler, on the real clock."""
    runs = [0]

    def tick(_entry_id: str, _slot: datetime | None = None, _missed: int = 0) -> None:
        runs[0] += 1

    loop = session_free_loop()
    schedule = Schedule(tick, loop)
    schedule.start()
    for i in range(entries):
        schedule.add(PublishConfig(id=f"bench/{i}", topic=f"bench/{i}", data={}, interval=1.0))
    threading.Event().wait(2.0)  # warm-up: every group once
    runs[0], start = 0, time.process_time()
    threading.Event().wait(seconds)  # the loop's thread works meanwhile; this one idles
    cpu, done = time.process_time() - start, runs[0]
    schedule.shutdown()
    loop.stop(5)
    return cpu * 1e6 / max(1, done)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--entries", type=int, default=5000)
    parser.add_argument("--seconds", type=float, default=10.0, help="fake seconds per repeat")
    parser.add_argument("--repeats", type=int, default=5)
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--profile", action="store_true", help="print cProfile's top functions")
    mode.add_argument("--real", action="store_true", help="the started scheduler, real clock")
    parser.add_argument("--listen", action="store_true", help="a listener for every job event")
    args = parser.parse_args()
    if args.real:
        per_run = [round(measure_real(args.entries, args.seconds), 1) for _ in range(args.repeats)]
        print(
            f"{args.entries} entries x 1 s, {args.seconds:g} s real time per repeat: "
            f"µs CPU per run {per_run}, median {statistics.median(per_run):.1f}, "
            f"min {min(per_run):.1f}"
        )
        return

    profiler = cProfile.Profile() if args.profile else None
    # The fake clock, where the scheduler reads the time: APScheduler's module and ours
    # (LoopScheduler._process_jobs).
    ours: Any = scheduling
    real_datetime = aps_base.datetime
    aps_base.datetime = ours.datetime = FakeClock
    try:
        schedule, runs = build(args.entries, args.listen)
        drive(schedule, 2.0)  # warm-up: every group once, caches filled
        figures = [
            measure(schedule, runs, args.seconds, profiler)
            for _ in range(1 if profiler else args.repeats)
        ]
    finally:
        aps_base.datetime = ours.datetime = real_datetime
    schedule.shutdown()
    per_run = [round(us, 1) for us, _ in figures]
    print(
        f"{args.entries} entries x 1 s, {args.seconds:g} s simulated per repeat "
        f"({runs[0]} runs in {figures[-1][1]} wake-ups): µs CPU per run {per_run}, "
        f"median {statistics.median(per_run):.1f}, min {min(per_run):.1f}"
    )
    if profiler is not None:
        pstats.Stats(profiler).sort_stats("tottime").print_stats(18)


if __name__ == "__main__":
    main()
