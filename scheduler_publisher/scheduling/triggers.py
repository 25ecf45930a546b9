"""The triggers of the entries' jobs: an interval entry's grid, a cron entry's slots.

Read in APScheduler 3.11's triggers/interval.py and triggers/cron.py; docs/design.md, "Phase
slots: spread, but in groups" and "Cron entries":
- UTC, and each grid anchored at a fixed start_date with a per-id phase (plan.grid_start):
  restarts and reschedules land on the same slots, and entries sharing an interval are spread.
- No `jitter` (it drifts). When behind (a stall, or the wall clock stepped forward), both go
  straight to the current slot instead of walking every missed slot.
- Many jobs, few distinct triggers: every entry on one phase slot shares one GridTrigger,
  which computes the group's next slot once for all its jobs (docs/design.md, "CPU per
  message: profile").
- A cron entry's job runs on CronSlots, shared by every entry with the same expression and
  zone: no phase, slots in UTC that never go back through a DST fold.
"""

from __future__ import annotations

import functools
from datetime import UTC, datetime
from typing import Any

from apscheduler.triggers.interval import IntervalTrigger

from scheduler_publisher.config.cron_slots import CronSlots, cron_slots
from scheduler_publisher.config.loader import PublishConfig
from scheduler_publisher.scheduling.plan import SLOTS_PER_PERIOD, grid_start


class GridTrigger(IntervalTrigger):  # type: ignore[misc]  # APScheduler 3 is untyped
    """An IntervalTrigger that, when it finds itself behind (a stall, or the wall clock stepped
    forward), goes straight to the current slot instead of walking every missed slot one by
    one: APScheduler's own walk is O(missed) per job, which after a clock step from 1970 hangs
    the process (APScheduler #35, #526, #1066; docs/operations.md, "Clock steps")."""

    # Like IntervalTrigger, no per-instance __dict__; one slot for the last answer.
    __slots__ = ("_last",)

    def __init__(self, **options: Any) -> None:
        self._last: tuple[datetime | None, datetime, datetime | None] | None = None
        super().__init__(**options)

    def __setstate__(self, state: dict[str, Any]) -> None:
        self._last = None
        super().__setstate__(state)

    def get_next_fire_time(self, previous: datetime | None, now: datetime) -> datetime | None:
        # A trigger is shared by every job of a phase group, and the scheduler asks it the same
        # question for each of them (twice: Job._get_run_times, then _process_jobs): answer
        # from the last call. One tuple swapped whole, so a caller in another thread (add_job)
        # sees either the old answer or the new one, each right for its own question.
        last = self._last
        if last is not None and last[0] == previous and last[1] == now:
            return last[2]
        following = self._following(previous, now)
        self._last = (previous, now, following)
        return following

    def _following(self, previous: datetime | None, now: datetime) -> datetime | None:
        following = super().get_next_fire_time(previous, now)
        if previous is not None and following is not None and following < now:
            following = super().get_next_fire_time(None, now)  # the first slot at/after now
        return following  # type: ignore[no-any-return]


@functools.lru_cache(maxsize=65_536)
def grid_trigger(interval: float, start: datetime) -> GridTrigger:
    """One trigger per (interval, phase slot), shared by every job on that slot: triggers are
    immutable, and with phase slots (plan.py) thousands of entries share a few hundred."""
    return GridTrigger(seconds=interval, timezone=UTC, start_date=start)


def trigger_of(entry: PublishConfig, slots: int = SLOTS_PER_PERIOD) -> GridTrigger | CronSlots:
    """The entry's shared trigger: its phase slot's grid (`slots` per period), or its cron
    expression's slots (no phase: a cron entry fires on the slots its expression names, as
    cron does)."""
    if entry.cron is not None:
        return cron_slots(entry.cron, entry.timezone)
    assert entry.interval is not None  # exactly one of the two (config/loader.py)
    return grid_trigger(entry.interval, grid_start(entry.id, entry.interval, slots))
