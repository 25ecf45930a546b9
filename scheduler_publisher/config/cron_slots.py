"""A cron entry's slots: `CronSlots`, the trigger shared by every entry with the same
expression and zone (`cron_slots`).

It lives beside the cron parser rather than with the scheduling adapter because validation
needs it too: `cron.check_fires` and `cron.cron_period` walk its slots. Imported only where
a cron expression is checked or scheduled, so that `validate` of a file without one does not
load APScheduler (docs/design.md, "Layers").
"""

from __future__ import annotations

import functools
from datetime import UTC, datetime, timedelta, tzinfo
from datetime import timezone as dt_timezone
from typing import Any

from apscheduler.triggers.cron import CronTrigger

from scheduler_publisher.config.cron import parse_cron, time_zone

# Cron slots counted one by one after a stall; beyond that, estimated from their mean gap.
MAX_COUNTED = 64
_TICK = timedelta(microseconds=1)


class CronSlots(CronTrigger):  # type: ignore[misc]  # APScheduler 3 is untyped
    """A CronTrigger that, when it finds itself behind (a stall, or the wall clock stepped
    forward), goes straight to the first slot at or after now instead of walking every missed
    slot, as GridTrigger does for intervals: the slots in between are counted as missed
    (`missed_between`), never replayed. Shared by every entry with the same expression and
    zone (`cron_slots`), so their jobs share a bucket of the job store, as a phase group does.

    Its slots are UTC datetimes (see `_after`; show them in the entry's zone with `local`).
    It also never goes back in time. In the hour an autumn DST change repeats, APScheduler
    3.11's CronTrigger answers a slot of the first pass again once the second pass has begun
    ("*/30 * * * *" in Europe/Berlin: 00:30, 01:00, then 00:30 UTC again), which would fire
    the job over and over. There the fields are read at the fixed UTC offset the zone has at
    that moment instead (`_after`)."""

    __slots__ = ("_fields", "_last", "_missed", "_twins")

    def __init__(self, fields: dict[str, str], zone: tzinfo) -> None:
        self._last: tuple[datetime | None, datetime, datetime | None] | None = None
        self._missed: tuple[tuple[datetime, datetime], int] | None = None
        self._fields = fields
        self._twins: dict[timedelta, CronTrigger] = {}  # by UTC offset, for DST folds
        super().__init__(**fields, timezone=zone)

    def __setstate__(self, state: dict[str, Any]) -> None:
        self._last = None
        self._missed = None
        self._twins = {}
        super().__setstate__(state)

    def get_next_fire_time(self, previous: datetime | None, now: datetime) -> datetime | None:
        # Shared by every job with the same expression and zone, and asked the same question
        # for each of them: answer from the last call (one tuple, swapped whole).
        last = self._last
        if last is not None and last[0] == previous and last[1] == now:
            return last[2]
        following = self._after(previous) if previous is not None else None
        if following is None or following < now:
            following = self._after(now - _TICK)  # the first slot at or after now
        self._last = (previous, now, following)
        return following

    def slot_after(self, when: datetime) -> datetime | None:
        """The first slot strictly after `when`, walked without the jump."""
        return self._after(when)

    def _after(self, when: datetime) -> datetime | None:
        # In UTC throughout: arithmetic and comparisons of two datetimes in the same zone are
        # done on wall time and ignore PEP 495's `fold`, which is how CronTrigger goes wrong.
        start = when.astimezone(UTC) + _TICK
        found = self._in_utc(super().get_next_fire_time(None, start))
        if found is None or found >= start:
            return found
        # Gone back (the DST fold above): read the fields at the zone's offset at `when`, and
        # if that slot lies past the next change of offset, at the offset there.
        offset = start.astimezone(self.timezone).utcoffset()
        for _ in range(2):
            found = self._in_utc(self._twin(offset).get_next_fire_time(None, start))
            if found is None:
                return None
            actual = found.astimezone(self.timezone).utcoffset()
            if actual == offset:
                break
            offset = actual
        return found

    @staticmethod
    def _in_utc(when: datetime | None) -> datetime | None:
        return None if when is None else when.astimezone(UTC)

    def _twin(self, offset: timedelta | None) -> CronTrigger:
        key = offset or timedelta(0)
        twin = self._twins.get(key)
        if twin is None:  # two threads may both build one: the same trigger either way
            twin = self._twins[key] = CronTrigger(**self._fields, timezone=dt_timezone(key))
        return twin

    def local(self, when: datetime) -> datetime:
        """`when` in the zone the expression is read in, for people."""
        return when.astimezone(self.timezone)

    def missed_between(self, first: datetime, now: datetime) -> int:
        """The slots after `first` up to `now`: exact up to MAX_COUNTED, then estimated from
        their mean gap (a clock step from 1970 would otherwise mean billions of steps)."""
        # Every job of the trigger's group asks after a stall, with the same first slot and a
        # `now` a few microseconds on: slots fall on whole seconds, so the whole second of
        # `now` gives the same count. One tuple, swapped whole, as `_last`.
        key = (first, now.replace(microsecond=0))
        memo = self._missed
        if memo is not None and memo[0] == key:
            return memo[1]
        count = self._count_after(first, key[1])
        self._missed = (key, count)
        return count

    def _count_after(self, first: datetime, now: datetime) -> int:
        count, slot = 0, first
        while count < MAX_COUNTED:
            following = self.slot_after(slot)
            if following is None or following > now:
                return count
            count, slot = count + 1, following
        mean_gap = (slot - first).total_seconds() / count
        return count + int((now - slot).total_seconds() // mean_gap)


@functools.lru_cache(maxsize=4096)
def cron_slots(expression: str, timezone: str) -> CronSlots:
    """The shared trigger of every entry with this (already validated) expression and zone."""
    return CronSlots(parse_cron(expression, timezone), time_zone(timezone))
