"""Pure decisions about a config change: which entries run, and what to do to the running jobs.

Nothing here touches the scheduler, the network or the clock.
"""

from __future__ import annotations

import zlib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from scheduler_publisher.config.loader import ConfigResult, PublishConfig
from scheduler_publisher.config.shard import Shard

# Every entry's grid is anchored here, so a restart or a reschedule lands on the same slots.
GRID_ANCHOR = datetime(2024, 1, 1, tzinfo=UTC)

Entries = Mapping[str, PublishConfig]


@dataclass(frozen=True, slots=True)
class Plan:
    """What a reload does. Ids in each tuple keep the order of the new file."""

    added: tuple[PublishConfig, ...] = ()
    removed: tuple[PublishConfig, ...] = ()
    rescheduled: tuple[PublishConfig, ...] = ()  # interval, cron or timezone changed
    updated: tuple[PublishConfig, ...] = ()  # payload/qos/retain/topic/lwt changed: same grid
    kept_last_good: tuple[str, ...] = ()  # invalid in the new file, the old version keeps running

    @property
    def is_empty(self) -> bool:
        return not (self.added or self.removed or self.rescheduled or self.updated)

    def summary(self) -> dict[str, list[str]]:
        return {
            "added": [e.id for e in self.added],
            "removed": [e.id for e in self.removed],
            "rescheduled": [e.id for e in self.rescheduled],
            "updated": [e.id for e in self.updated],
            "kept_last_good": list(self.kept_last_good),
        }


def batches(plan: Plan, size: int) -> Iterator[Plan]:
    """The plan cut into plans of at most `size` changes each, removals first (they free
    connections), then additions, reschedules and updates, each in file order. A large reload
    is applied one batch at a time (docs/design.md); an empty plan gives no batch."""
    kinds = ("removed", "added", "rescheduled", "updated")
    changes = [(kind, entry) for kind in kinds for entry in getattr(plan, kind)]
    for start in range(0, len(changes), size):
        chunk = changes[start : start + size]
        yield Plan(**{kind: tuple(e for k, e in chunk if k == kind) for kind in kinds})


def applied(entries: Entries, plan: Plan) -> dict[str, PublishConfig]:
    """`entries` with `plan`'s changes made: what runs once that plan (or batch) is applied."""
    result = dict(entries)
    for entry in plan.removed:
        result.pop(entry.id, None)
    for entry in (*plan.added, *plan.rescheduled, *plan.updated):
        result[entry.id] = entry
    return result


def effective_entries(
    running: Entries, result: ConfigResult, shard: Shard | None = None
) -> tuple[dict[str, PublishConfig], tuple[str, ...]]:
    """The entries that should run after `result` is applied, and the ids kept at their last good
    version because the new file made them invalid. An id that vanished from the file is removed;
    an id that is still there but broken keeps running as it was. With a `shard`, only the
    entries it owns run; `running` already holds only those, so no other shard's entry is kept."""
    entries = result.entries if shard is None else shard.select(result.entries, _entry_id)
    wanted = {e.id: e for e in entries}
    kept = tuple(i for i in sorted(result.invalid_ids) if i in running and i not in wanted)
    for entry_id in kept:
        wanted[entry_id] = running[entry_id]
    return wanted, kept


def _entry_id(entry: PublishConfig) -> str:
    return entry.id


def diff(old: Entries, new: Entries, kept_last_good: tuple[str, ...] = ()) -> Plan:
    """Compare by id; only what changed is touched."""
    added = tuple(e for i, e in new.items() if i not in old)
    removed = tuple(e for i, e in old.items() if i not in new)
    rescheduled = []
    updated = []
    for entry_id, entry in new.items():
        before = old.get(entry_id)
        if before is None or before == entry:
            continue
        if not before.same_schedule(entry):
            rescheduled.append(entry)
        elif not before.same_wire(entry):
            updated.append(entry)
        # else: only metadata (created_at, updated_at, version) changed: nothing to do on the wire
    return Plan(added, removed, tuple(rescheduled), tuple(updated), kept_last_good)


# Phases are multiples of a slot: 1/slots of the interval (100 slots unless the operator chose
# fewer, `--phase-slots`), at least 1 ms and at most 10 s / slots (100 ms by default).
SLOTS_PER_PERIOD = 100
MIN_SLOTS, MAX_SLOTS = 1, SLOTS_PER_PERIOD
SLOT_CAP_MS = 10_000  # divided by the slots: the longest slot


def phase_slot_ms(interval: float, slots: int = SLOTS_PER_PERIOD) -> int:
    """The granularity of phases for an interval (10 ms for a 1 s interval by default)."""
    period_ms = max(1, round(interval * 1000))
    return min(SLOT_CAP_MS // slots, max(1, period_ms // slots))


def grid_start(entry_id: str, interval: float, slots: int = SLOTS_PER_PERIOD) -> datetime:
    """The first slot of an entry's fixed-rate grid.

    A deterministic per-id offset inside one interval spreads entries that share an interval
    across the period, and keeps each entry's phase stable across restarts and reloads. The
    offset is a whole number of phase slots (`phase_slot_ms`), so entries that share an
    interval fall into about `slots` groups per period: the scheduler wakes once per group,
    not once per entry, which more than halves the CPU per publish (docs/design.md), while the
    load is still spread across the whole period. Fewer slots mean fewer, fuller groups: less
    CPU, burstier load on the broker, and different phases (docs/design.md, "Phase slots")."""
    period_ms = max(1, round(interval * 1000))
    slot_ms = phase_slot_ms(interval, slots)
    slot = zlib.crc32(entry_id.encode("utf-8")) % max(1, period_ms // slot_ms)
    return GRID_ANCHOR + timedelta(milliseconds=slot * slot_ms)
