"""Cron schedules: an entry's `cron` and `timezone` as an APScheduler 3 CronTrigger.

APScheduler parses the fields; nothing here parses cron syntax beyond splitting the
expression into its fields and renumbering the weekday field. Two differences from crontab(5)
are handled here rather than left to surprise the operator (docs/entries.md, "Cron schedules"):
- Day of week: crontab counts 0 (and 7) as Sunday, APScheduler 3 counts 0 as Monday, and its
  `from_crontab` keeps that numbering ("a historical mistake", agronholm/apscheduler#286).
  Numbers, names, ranges and steps in the weekday field are therefore expanded in crontab's
  numbering (sun = 0, and 7 as a range's end: `sat-sun` is 6-7) and handed over as weekday
  names, one by one, which mean the same to both. A range that wraps past Sunday (`fri-mon`)
  is refused, as crontab refuses `5-1`, with the split form to write instead.
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
_WEEKDAY_NUMBERS: Final = {name: day for day, name in enumerate(_WEEKDAYS[:7])}
# One item of the weekday field: *, a day, or a range of days, each with an optional step; a
# day is a number or a name ("mon", any case).
_WEEKDAY_ITEM: Final = re.compile(r"(\*|([0-9]+|[A-Za-z]+)(?:-([0-9]+|[A-Za-z]+))?)(?:/([0-9]+))?")
# What each field takes, for the message about a number far beyond it.
_FIELD_RANGES: Final = {
    "second": "0-59",
    "minute": "0-59",
    "hour": "0-23",
    "day": "1-31",
    "month": "1-12",
    "day_of_week": "0-7",
}
# More digits than any field needs (59 is the largest value): refused before int() sees them,
# whose limit (4,300 digits) would surface as Python's own message.
_LONG_NUMBER: Final = re.compile(r"[0-9]{5,}")
# crontab's syntax is ASCII, its fields separated by spaces or tabs; str.split() would also
# split at other blanks, and int() would read other scripts' digits.
_NOT_CRON_TEXT: Final = re.compile(r"[^\t\x20-\x7e]")
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


def _weekday(text: str, after: int | None = None) -> int:
    """A day of the weekday field in crontab's numbering; a range's end (`after` its start)
    named "sun" is 7, so that `sat-sun` runs forwards as crontab's 6-7 does."""
    if text.isdigit():
        number = int(text)
        if number > 7:  # 7 is crontab's second Sunday
            raise CronError(
                f"day_of_week: {number} is not a weekday number (0-7, 0 and 7 are Sunday)"
            )
        return number
    named = _WEEKDAY_NUMBERS.get(text.lower())
    if named is None:
        raise CronError(f"day_of_week: {text!r} is not a weekday (sun-sat or 0-7)")
    return 7 if named == 0 and after else named


def _weekday_names(token: str) -> str:
    """One comma-separated item of the weekday field in crontab numbering, as names."""
    found = _WEEKDAY_ITEM.fullmatch(token)
    if found is None:
        return token  # something APScheduler will explain
    whole, first, last, step = found.groups()
    if whole == "*":
        low, high = 0, 6
    else:
        low = _weekday(first)
        high = low if last is None else _weekday(last, after=low)
    if low > high:
        raise CronError(f"day_of_week: the range {token!r} runs backwards{_wrapped(token)}")
    every = int(step) if step is not None else 1
    if every < 1:
        raise CronError(f"day_of_week: the step in {token!r} must be at least 1")
    days = dict.fromkeys(_WEEKDAYS[day] for day in range(low, high + 1, every))
    return ",".join(days)


def _wrapped(token: str) -> str:
    """How to write a range that wraps past Sunday, split there (`fri-mon`: `fri-sun,mon`)."""
    first, _, last = token.partition("-")
    if "/" in last:  # a step over two pieces would restart in the second: no one answer
        return " (a range cannot wrap past Sunday)"
    named = not first.isdigit()
    head = f"{first}-{'sun' if named else '7'}"
    end = _weekday(last)
    tail = "" if end == 0 else f",{last}" if end == 1 else f",{'mon' if named else '1'}-{last}"
    return f" (a range cannot wrap past Sunday: write {head + tail!r})"


def crontab_weekdays(field: str) -> str:
    """crontab's day-of-week field as APScheduler 3 reads it (names instead of numbers)."""
    if field == "*":
        return field
    return ",".join(_weekday_names(token) for token in field.split(","))


def _check_text(expression: str) -> None:
    """Characters CronTrigger would misread: str.split() splits at U+0085, int() reads U+0661."""
    odd = _NOT_CRON_TEXT.search(expression)
    if odd is not None:
        raise CronError(
            f"U+{ord(odd.group()):04X} at character {odd.start() + 1}: an expression is "
            f"printable ASCII, its fields separated by spaces or tabs"
        )


def _check_numbers(fields: dict[str, str]) -> None:
    """Numbers so long that int() would answer with Python's internals, refused first."""
    for name, value in fields.items():
        long = _LONG_NUMBER.search(value)
        if long is not None:
            digits = long.group()
            shown = digits if len(digits) <= 12 else digits[:12] + "…"
            raise CronError(
                f"{name}: {shown} has {len(digits)} digits; {name} is {_FIELD_RANGES[name]}"
            )


def parse_cron(expression: str, timezone: str = "UTC") -> dict[str, str]:
    """CronTrigger's keyword arguments for `expression`; raises CronError naming the field."""
    _check_text(expression)
    values = expression.split()
    if len(values) not in (5, 6):
        raise CronError(
            f"expected 5 fields (minute hour day month day_of_week) or 6 (seconds "
            f"first), got {len(values)}"
        )
    if len(values) == 5:  # crontab's own form: on the minute
        values.insert(0, "0")
    fields = dict(zip(FIELDS, values, strict=True))
    _check_numbers(fields)
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
