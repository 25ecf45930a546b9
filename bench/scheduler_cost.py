#!/usr/bin/env python3
"""APScheduler's bookkeeping per job run, without MQTT (issue 12).

    .venv/bin/python bench/scheduler_cost.py [--entries 5000] [--seconds 20] [--profile]

Builds the service's real `Schedule` (its job stores, executor and shared grid triggers) with
N entries x 1 s and a no-op tick, then drives the scheduler's own `_process_jobs` loop on a
fake clock that jumps from one due group to the next: `--seconds` simulated seconds run in
well under that, with no sleeping and no other thread competing. It prints the CPU time per
job run (process time over the runs), which is everything the scheduler thread spends per
publish apart from the publish itself. `--profile` runs the same under cProfile and prints the
top functions by internal time.
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import time
from datetime import UTC, datetime, timedelta
from typing import Any

import apscheduler.schedulers.base as aps_base
from apscheduler.schedulers.base import STATE_RUNNING

from scheduler_publisher.config import PublishConfig
from scheduler_publisher.scheduling import Schedule


class FakeClock:
    """Stands in for `datetime` inside APScheduler's scheduler module: `now()` is ours."""

    current = datetime.now(UTC) - timedelta(hours=1)

    @classmethod
    def now(cls, tz: Any = None) -> datetime:
        return cls.current if tz is None else cls.current.astimezone(tz)


def build(entries: int) -> tuple[Schedule, list[int]]:
    runs = [0]

    def tick(_entry_id: str, _slot: datetime | None = None, _missed: int = 0) -> None:
        runs[0] += 1

    schedule = Schedule(tick)
    # Started paused: the scheduler thread then sleeps until shutdown and this thread drives
    # _process_jobs itself. Jobs added while paused go straight into the job store.
    schedule._scheduler.start(paused=True)
    for i in range(entries):
        schedule.add(PublishConfig(id=f"bench/{i}", topic=f"bench/{i}", data={}, interval=1.0))
    schedule._scheduler.state = STATE_RUNNING
    return schedule, runs


def drive(schedule: Schedule, seconds: float) -> int:
    """Runs every due group until `seconds` of fake time have passed; returns the wake-ups."""
    scheduler = schedule._scheduler
    store = scheduler._jobstores["entries"]
    end = FakeClock.current + timedelta(seconds=seconds)
    wakeups = 0
    while (due := store.get_next_run_time()) is not None and due <= end:
        FakeClock.current = due
        scheduler._process_jobs()
        wakeups += 1
    return wakeups


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--entries", type=int, default=5000)
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--profile", action="store_true", help="print cProfile's top functions")
    args = parser.parse_args()

    real_datetime = aps_base.datetime
    aps_base.datetime = FakeClock  # the fake clock
    try:
        schedule, runs = build(args.entries)
        drive(schedule, 2.0)  # warm-up: every group once, caches filled
        runs[0] = 0
        profiler = cProfile.Profile() if args.profile else None
        start = time.process_time()
        if profiler is not None:
            profiler.enable()
        wakeups = drive(schedule, args.seconds)
        if profiler is not None:
            profiler.disable()
        cpu = time.process_time() - start
    finally:
        aps_base.datetime = real_datetime
    schedule.shutdown()
    print(f"{args.entries} entries, {args.seconds:g} s simulated: {runs[0]} runs in "
          f"{wakeups} wake-ups, {cpu * 1e6 / max(1, runs[0]):.1f} µs CPU per run")
    if profiler is not None:
        pstats.Stats(profiler).sort_stats("tottime").print_stats(18)


if __name__ == "__main__":
    main()
