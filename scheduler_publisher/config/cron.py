"""Cron schedules: an entry's `cron` and `timezone` as an APScheduler 3 CronTrigger.

APScheduler parses the fields; nothing here parses cron syntax beyond splitting the
expression into its fields and renumbering the weekday field. Two differences from crontab(5)
are handled here rather than left to surprise the operator (docs/entries.md, "Cron schedules"):
- Day of week: crontab counts 0 (and 7) as Sunday, APScheduler 3 counts 0 as Monday, and its
  `from_crontab` keeps that numbering ("a historical mistake", agronholm/apscheduler#286).
  Numbers, ranges and steps in the weekday field are therefore expanded in crontab's numbering
  and handed over as weekday names, which mean the same to both.
- Six fields: the leading one is seconds ("*/10 * * * * *"), which `from_crontab` refuses.
What stays APScheduler's: a restricted day of month AND a restricted day of week must both
match (crontab fires when either does), and daylight-saving gaps and repeats behave as
CronTrigger defines them (except that its slots never go back in the repeated hour, which is
CronTrigger's bug: cron_slots.CronSlots).

The trigger itself (`CronSlots`) is in cron_slots.py, beside this parser. APScheduler is
imported only when a cron expression is checked: `validate` of a file without one, and the
CLI's start, load no scheduler (tests/test_cli.py).
"""

from __future__ import annotations

import functools
import re
from datetime import UTC, datetime, timedelta, tzinfo
from typing import Final
from zoneinfo import ZoneInfo

__all__ = ["CronError", "check_fires", "cron_period", "crontab_weekdays", "parse_cron", "time_zone"]

# The fields of a 6-field expression, in order; a 5-field one has no seconds.
FIELDS: Final = ("second", "minute", "hour", "day", "month", "day_of_week")
# crontab's weekday numbers (0 and 7: Sunday) as names, which APScheduler reads the same way.
_WEEKDAYS: Final = ("sun", "mon", "tue", "wed", "thu", "fri", "sat", "sun")
_NUMERIC_WEEKDAYS: Final = re.compile(r"(\*|(\d+)(?:-(\d+))?)(?:/(\d+))?")
# Slots sampled for an expression's shortest gap (cron_period).
_PERIOD_SAMPLES: Final = 64
_SAMPLE_FROM: Final = datetime(2024, 1, 1, tzinfo=UTC)


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
        raise CronError(
            f"expected 5 fields (minute hour day month day_of_week) or 6 (seconds "
            f"first), got {len(values)}"
        )
    if len(values) == 5:  # crontab's own form: on the minute
        values.insert(0, "0")
    fields = dict(zip(FIELDS, values, strict=True))
    fields["day_of_week"] = crontab_weekdays(fields["day_of_week"])
    from apscheduler.triggers.cron import CronTrigger  # noqa: PLC0415 - see the module doc

    for name, value in fields.items():
        try:  # one field at a time, so that the message can say which one is wrong
            CronTrigger(**{name: value}, timezone=UTC)
        except ValueError as exc:
            raise CronError(f"{name}: {exc}") from None
    time_zone(timezone)
    return fields


def check_fires(expression: str) -> None:
    """Raises CronError when a valid expression names no time that exists ("0 0 30 2 *"):
    such an entry would never publish on schedule."""
    from scheduler_publisher.config.cron_slots import cron_slots  # noqa: PLC0415 - see the module doc

    if cron_slots(expression, "UTC").slot_after(_SAMPLE_FROM) is None:
        raise CronError("names no date that exists (such as 30 February), so it never fires")


@functools.lru_cache(maxsize=4096)
def cron_period(expression: str, timezone: str) -> float:
    """The shortest gap, in seconds, between consecutive slots sampled from a fixed date: what
    stands for an interval where only a rough period is needed (connection.py's birth burst)."""
    from scheduler_publisher.config.cron_slots import cron_slots  # noqa: PLC0415 - see the module doc

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
