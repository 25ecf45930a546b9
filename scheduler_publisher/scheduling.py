"""The APScheduler adapter: one interval job per entry, all calling one shared tick function.

Settings, and why (notes §1):
- UTC, and each job's grid anchored at a fixed start_date with a per-id phase (plan.grid_start):
  restarts and reschedules land on the same slots, and entries sharing an interval are spread.
- No `jitter` (it drifts) and `misfire_grace_time=None` (the default of 1 s silently drops runs).
- `coalesce=False`, so the executor sees every slot that came due at once: it publishes once
  and counts the rest as missed, instead of losing them silently.
- An inline executor: the tick only hands a message to the network thread and never blocks,
  so it runs in the scheduler thread itself, without a thread pool hop per run.
"""

from __future__ import annotations

import contextlib
import functools
import time
from collections.abc import Callable, Iterable
from datetime import UTC, datetime
from typing import Any

from apscheduler.executors.base import BaseExecutor
from apscheduler.jobstores.base import JobLookupError
from apscheduler.jobstores.memory import MemoryJobStore
from apscheduler.schedulers.background import BackgroundScheduler
from apscheduler.triggers.interval import IntervalTrigger

from scheduler_publisher.config import PublishConfig
from scheduler_publisher.logs import get_logger
from scheduler_publisher.plan import grid_start

log = get_logger("scheduler_publisher.scheduling")

# Entries' jobs and the service's own live in separate job stores, so that no entry id can
# name an internal job (an entry called "__heartbeat__" once replaced the heartbeat, issue 11
# #9). Every call that names a job names its store too.
ENTRY_JOBS = "entries"
INTERNAL_JOBS = "internal"
HEARTBEAT_JOB = "heartbeat"
JOB_NAME = "publish"
# entry id, scheduled slot, slots missed before it (the last two defaulted: APScheduler checks
# the callable's signature against the args given to add_job)
Tick = Callable[[str, datetime | None, int], None]


class GridTrigger(IntervalTrigger):  # type: ignore[misc]  # APScheduler 3 is untyped
    """An IntervalTrigger that, when it finds itself behind (a stall, or the wall clock stepped
    forward), goes straight to the current slot instead of walking every missed slot one by
    one: APScheduler's own walk is O(missed) per job, which after a clock step from 1970 hangs
    the process (APScheduler #35, #526, #1066; notes §1.6)."""

    __slots__ = ()  # like IntervalTrigger's: no per-instance __dict__

    def get_next_fire_time(self, previous: datetime | None, now: datetime) -> datetime | None:
        following = super().get_next_fire_time(previous, now)
        if previous is not None and following is not None and following < now:
            following = super().get_next_fire_time(None, now)  # the first slot at/after now
        return following  # type: ignore[no-any-return]


@functools.lru_cache(maxsize=65_536)
def grid_trigger(interval: float, start: datetime) -> GridTrigger:
    """One trigger per (interval, phase slot), shared by every job on that slot: triggers are
    immutable, and with phase slots (plan.py) thousands of entries share a few hundred."""
    return GridTrigger(seconds=interval, timezone=UTC, start_date=start)


class InlineExecutor(BaseExecutor):  # type: ignore[misc]  # APScheduler 3 is untyped
    """Runs each due job directly in the scheduler thread."""

    def submit_job(self, job: Any, run_times: list[datetime]) -> None:
        slot = run_times[-1]
        interval = job.trigger.interval_length
        skipped = (slot - run_times[0]).total_seconds() + (datetime.now(UTC) - slot).total_seconds()
        try:
            job.func(*job.args, slot, int(skipped // interval))
        except Exception:  # a failing tick must not stop the other jobs
            log.exception("tick_failed", entry_id=job.id)

    def _do_submit_job(self, job: Any, run_times: list[datetime]) -> None:  # pragma: no cover
        raise NotImplementedError  # submit_job does the work


class Schedule:
    def __init__(self, tick: Tick) -> None:
        # Wrapped in a partial: APScheduler then keeps no "module:qualname" reference string per
        # job (~100 B each), which only pickling job stores need; ours lives in memory.
        self._tick = functools.partial(tick)
        self.heartbeat = time.monotonic()
        self._scheduler = BackgroundScheduler(
            timezone=UTC,
            jobstores={ENTRY_JOBS: MemoryJobStore(), INTERNAL_JOBS: MemoryJobStore()},
            executors={"default": InlineExecutor()},
            job_defaults={"coalesce": False, "max_instances": 1, "misfire_grace_time": None},
        )

    def start(self) -> None:
        self._add_heartbeat()
        self._scheduler.start()

    def _add_heartbeat(self) -> None:
        self._scheduler.add_job(self._beat, GridTrigger(seconds=1, timezone=UTC),
                                id=HEARTBEAT_JOB, args=(), replace_existing=True,
                                jobstore=INTERNAL_JOBS)

    def shutdown(self) -> None:
        if self._scheduler.running:
            self._scheduler.shutdown(wait=True)

    def _beat(self, _slot: datetime | None = None, _missed: int = 0) -> None:
        self.heartbeat = time.monotonic()

    def is_alive(self, max_silence: float = 10.0) -> bool:
        thread = getattr(self._scheduler, "_thread", None)
        alive = thread is not None and thread.is_alive()
        return bool(alive) and time.monotonic() - self.heartbeat < max_silence

    def add(self, entry: PublishConfig) -> None:
        """Add, or replace with a new grid: the next slot of the grid, not now + interval."""
        trigger = grid_trigger(entry.interval, grid_start(entry.id, entry.interval))
        # A shared name: APScheduler would otherwise build the same string for every job.
        self._scheduler.add_job(self._tick, trigger, id=entry.id, args=(entry.id,),
                                name=JOB_NAME, replace_existing=True, jobstore=ENTRY_JOBS)

    def remove(self, entry_id: str) -> None:
        # Never scheduled (it was invalid from the start): nothing to remove.
        with contextlib.suppress(JobLookupError):
            self._scheduler.remove_job(entry_id, jobstore=ENTRY_JOBS)

    def rebuild(self, entries: Iterable[PublishConfig]) -> None:
        """Re-anchor every job on its grid from the current clock (after a wall-clock step)."""
        # The heartbeat too: after a backward step it would otherwise stay silent for the size
        # of the step, and health_problems() would withhold the systemd watchdog ping.
        self._add_heartbeat()
        for entry in entries:
            self.add(entry)

    def job_ids(self) -> set[str]:
        return {job.id for job in self._scheduler.get_jobs(jobstore=ENTRY_JOBS)}

    def next_run(self, entry_id: str) -> datetime | None:
        job = self._scheduler.get_job(entry_id, jobstore=ENTRY_JOBS)
        return None if job is None else job.next_run_time

