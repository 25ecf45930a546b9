"""How many phase groups the entries of each interval are spread over (docs/design.md,
"Phase slots: spread, but in groups").

Every phase group costs the service a wake-up, whatever it publishes, so a group should be
full enough to be worth one, and small enough that it does not leave as a burst the broker and
the period error notice. `--phase-slots N` fixes N groups per period for every interval. By
default (`auto`) each interval gets groups of about `ENTRIES_PER_GROUP` of its entries up to
1,000 entries, shrinking to `SMALLEST_GROUP` from 2,000 on, and 1 to 100 groups: 100 entries
at 1 s publish together, as Node-RED's inject nodes do; 1,000 in 10 groups; 2,000 in 40;
5,000 and more over 100.

The count is chosen when an interval first has entries (at start, or in the reload that
brings its first entry) and then kept, so a reload never moves a running entry's phase. Only
when a reload brings an interval `RESPREAD_FACTOR` times the groups it was sized for are its
entries spread again, all of them once (the service logs `phases_respread`). A restart sizes
every interval afresh from the file. Pure: nothing here touches the scheduler or the clock.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass

from scheduler_publisher.config.loader import PublishConfig
from scheduler_publisher.scheduling.plan import MAX_SLOTS, MIN_SLOTS

AUTO = "auto"  # --phase-slots auto: sized from the entries
ENTRIES_PER_GROUP = 100  # up to 1,000 entries: a wake-up is worth about 100 messages
SMALLEST_GROUP = 50  # from 2,000 entries on: bursts matter more than wake-ups there
GROUP_BUDGET = 100_000  # entries x group size: where the groups shrink between the two
RESPREAD_FACTOR = 4


def auto_slots(entries: int) -> int:
    """The phase groups per period for `entries` entries that share an interval."""
    group = max(SMALLEST_GROUP, min(ENTRIES_PER_GROUP, GROUP_BUDGET // max(1, entries)))
    return max(MIN_SLOTS, min(MAX_SLOTS, entries // group))


def period_ms(interval: float) -> int:
    """The key of an interval, as plan.grid_start rounds it."""
    return max(1, round(interval * 1000))


@dataclass(frozen=True, slots=True)
class Respread:
    """An interval whose entries are spread over more groups from now on."""

    interval: float
    slots_before: int
    slots_after: int
    entries: int


class PhaseSpread:
    """The phase groups per period of each interval: fixed (`--phase-slots N`), or sized from
    the entries (`fixed` None). Used from one thread (the service's)."""

    def __init__(self, fixed: int | None = None) -> None:
        self.fixed = fixed
        self._slots: dict[int, int] = {}  # period in ms: groups per period

    def slots(self, interval: float) -> int:
        if self.fixed is not None:
            return self.fixed
        # An interval size() has not seen (a caller that schedules without sizing first):
        # the widest spread, never a burst.
        return self._slots.get(period_ms(interval), MAX_SLOTS)

    def size(self, entries: Iterable[PublishConfig]) -> list[Respread]:
        """Size the intervals of `entries` (every entry that will run) before they are
        scheduled: a new interval gets auto_slots of its entries, and one that grew to
        RESPREAD_FACTOR times its groups is sized again and returned (its running entries
        must be scheduled again). Intervals no entry uses any more are forgotten."""
        if self.fixed is not None:
            return []
        counts: Counter[int] = Counter()
        intervals: dict[int, float] = {}
        for entry in entries:
            if entry.interval is not None:  # cron entries have no phase
                key = period_ms(entry.interval)
                counts[key] += 1
                intervals.setdefault(key, entry.interval)
        respread: list[Respread] = []
        for key, count in counts.items():
            wanted, have = auto_slots(count), self._slots.get(key)
            if have is None:
                self._slots[key] = wanted
            elif wanted >= RESPREAD_FACTOR * have:
                self._slots[key] = wanted
                respread.append(Respread(intervals[key], have, wanted, count))
        for key in [k for k in self._slots if k not in counts]:
            del self._slots[key]
        return respread
