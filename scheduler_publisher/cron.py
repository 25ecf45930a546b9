"""Cron schedules: an entry's `cron` and `timezone` as an APScheduler 3 CronTrigger.

APScheduler parses the fields; nothing here parses cron syntax beyond splitting the
expression into its fields and renumbering the weekday field. Two differences from crontab(5)
are handled here rather than left to surprise the operator (README, "Cron schedules"):
- Day of week: crontab counts 0 (and 7) as Sunday, APScheduler 3 counts 0 as Monday, and its
  `from_crontab` keeps that numbering ("a historical mistake", agronholm/apscheduler#286).
  Numbers, ranges and steps in the weekday field are therefore expanded in crontab's numbering
  and handed over as weekday names, which mean the same to both.
- Six fields: the leading one is seconds ("*/10 * * * * *"), which `from_crontab` refuses.
What stays APScheduler's: a restricted day of month AND a restricted day of week must both
match (crontab fires when either does), and daylight-saving gaps and repeats behave as
CronTrigger defines them.

Triggers are shared: every entry with the same expression and time zone gets the same
`CronSlots` object, so the entries' job store files them together (jobstore.py) and the next
slot is computed once per group.
"""

from __future__ import annotations

import functools
import re
from datetime import UTC, datetime, timedelta, tzinfo
from datetime import timezone as dt_timezone
from typing import Any, Final
from zoneinfo import ZoneInfo

from apscheduler.triggers.cron import CronTrigger

__all__ = ["CronError", "CronSlots", "cron_period", "cron_slots", "parse_cron", "time_zone"]

# The fields of a 6-field expression, in order; a 5-field one has no seconds.
FIELDS: Final = ("second", "minute", "hour", "day", "month", "day_of_week")
# crontab's weekday numbers (0 and 7: Sunday) as names, which APScheduler reads the same way.
_WEEKDAYS: Final = ("sun", "mon", "tue", "wed", "thu", "fri", "sat", "sun")
_NUMERIC_WEEKDAYS: Final = re.compile(r"(\*|(\d+)(?:-(\d+))?)(?:/(\d+))?")
# Slots counted one by one after a stall; beyond that, estimated from their mean gap.
MAX_COUNTED: Final = 64
# Slots sampled for an expression's shortest gap (cron_period).
_PERIOD_SAMPLES: Final = 64
_SAMPLE_FROM: Final = datetime(2024, 1, 1, tzinfo=UTC)
_TICK: Final = timedelta(microseconds=1)


class CronError(ValueError):
    """A cron expression or time zone CronTrigger cannot use; says which field and why."""


def time_zone(name: str) -> tzinfo:
    """The IANA time zone `name` ("Europe/Berlin"); raises CronError if there is none."""
    try:
        return ZoneInfo(name)
    except (KeyError, ValueError, OSError) as exc:  # ZoneInfoNotFoundError is a KeyError
        raise CronError(f"no IANA time zone is called {name!r}") from exc


def _weekday_names(token: str) -> str:
    """One comma-separated item of the weekday field in crontab numbering, as names."""
    found = _NUMERIC_WEEKDAYS.fullmatch(token)
    if found is None:
        return token  # names ("mon-fri"), or something APScheduler will explain
    whole, first, last, step = found.groups()
    low, high = (0, 6) if whole == "*" else (int(first), int(last or first))
    if high > 7:  # 7 is crontab's second Sunday
        raise CronError(f"day_of_week: {high} is not a weekday number (0-7, 0 and 7 are Sunday)")
    if low > high:
        raise CronError(f"day_of_week: the range {token!r} runs backwards")
    every = int(step) if step is not None else 1
    if every < 1:
        raise CronError(f"day_of_week: the step in {token!r} must be at least 1")
    days = dict.fromkeys(_WEEKDAYS[day] for day in range(low, high + 1, every))
    return ",".join(days)


def crontab_weekdays(field: str) -> str:
    """crontab's day-of-week field as APScheduler 3 reads it (names instead of numbers)."""
    if field == "*":
        return field
    return ",".join(_weekday_names(token) for token in field.split(","))


def parse_cron(expression: str, timezone: str = "UTC") -> dict[str, str]:
    """CronTrigger's keyword arguments for `expression`; raises CronError naming the field."""
    values = expression.split()
    if len(values) not in (5, 6):
        raise CronError(f"expected 5 fields (minute hour day month day_of_week) or 6 (seconds "
                        f"first), got {len(values)}")
    if len(values) == 5:  # crontab's own form: on the minute
        values.insert(0, "0")
    fields = dict(zip(FIELDS, values, strict=True))
    fields["day_of_week"] = crontab_weekdays(fields["day_of_week"])
    for name, value in fields.items():
        try:  # one field at a time, so that the message can say which one is wrong
            CronTrigger(**{name: value}, timezone=UTC)
        except ValueError as exc:
            raise CronError(f"{name}: {exc}") from None
    time_zone(timezone)
    return fields


class CronSlots(CronTrigger):  # type: ignore[misc]  # APScheduler 3 is untyped
    """A CronTrigger that, when it finds itself behind (a stall, or the wall clock stepped
    forward), goes straight to the first slot at or after now instead of walking every missed
    slot, as GridTrigger does for intervals (scheduling.py): the slots in between are counted
    as missed (`missed_between`), never replayed.

    Its slots are UTC datetimes (see `_after`; show them in the entry's zone with `local`).
    It also never goes back in time. In the hour an autumn DST change repeats, APScheduler
    3.11's CronTrigger answers a slot of the first pass again once the second pass has begun
    ("*/30 * * * *" in Europe/Berlin: 00:30, 01:00, then 00:30 UTC again), which would fire
    the job over and over. There the fields are read at the fixed UTC offset the zone has at
    that moment instead (`_after`)."""

    __slots__ = ("_fields", "_last", "_twins")

    def __init__(self, fields: dict[str, str], zone: tzinfo) -> None:
        self._last: tuple[datetime | None, datetime, datetime | None] | None = None
        self._fields = fields
        self._twins: dict[timedelta, CronTrigger] = {}  # by UTC offset, for DST folds
        super().__init__(**fields, timezone=zone)

    def __setstate__(self, state: dict[str, Any]) -> None:
        self._last = None
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
        if twin is None:
            twin = self._twins[key] = CronTrigger(**self._fields, timezone=dt_timezone(key))
        return twin

    def local(self, when: datetime) -> datetime:
        """`when` in the zone the expression is read in, for people."""
        return when.astimezone(self.timezone)

    def missed_between(self, first: datetime, now: datetime) -> int:
        """The slots after `first` up to `now`: exact up to MAX_COUNTED, then estimated from
        their mean gap (a clock step from 1970 would otherwise mean billions of steps)."""
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


@functools.lru_cache(maxsize=4096)
def cron_period(expression: str, timezone: str) -> float:
    """The shortest gap, in seconds, between consecutive slots sampled from a fixed date: what
    stands for an interval where only a rough period is needed (connection.py's birth burst)."""
    trigger = cron_slots(expression, timezone)
    slot = trigger.slot_after(_SAMPLE_FROM)
    shortest: float | None = None
    for _ in range(_PERIOD_SAMPLES):
        following = trigger.slot_after(slot) if slot is not None else None
        if following is None or slot is None:
            break
        gap = (following - slot).total_seconds()
        shortest = gap if shortest is None else min(shortest, gap)
        slot = following
    return shortest if shortest is not None else timedelta(days=1).total_seconds()
