"""plan.py: which entries run after a reload, what changes on the scheduler, grid phases."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import zlib
from datetime import timedelta
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from scheduler_publisher.config.loader import ConfigResult, PublishConfig, parse_config
from scheduler_publisher.scheduling.plan import (
    GRID_ANCHOR,
    Plan,
    applied,
    batches,
    diff,
    effective_entries,
    grid_start,
    phase_slot_ms,
)


def cfg(id_: str = "a", **fields: Any) -> PublishConfig:
    base: dict[str, Any] = {"topic": f"site/{id_}", "data": {"v": 1}, "interval": 5.0}
    return PublishConfig(id=id_, **{**base, **fields})


def by_id(*configs: PublishConfig) -> dict[str, PublishConfig]:
    return {c.id: c for c in configs}


def parse(*entries: dict[str, Any]) -> ConfigResult:
    return parse_config(json.dumps(list(entries)).encode())


def raw(id_: str, **fields: Any) -> dict[str, Any]:
    return {"id": id_, "topic": f"site/{id_}", "data": {"v": 1}, "interval": 5, **fields}


def ids(configs: tuple[PublishConfig, ...]) -> list[str]:
    return [c.id for c in configs]


def offset(entry_id: str, interval: float) -> float:
    return (grid_start(entry_id, interval) - GRID_ANCHOR).total_seconds()


# --- diff ------------------------------------------------------------------------------------


def test_identical_entries_give_an_empty_plan() -> None:
    """Comparing a set of entries with an equal copy of itself plans nothing."""
    old = by_id(cfg("a"), cfg("b"))
    plan = diff(old, by_id(cfg("a"), cfg("b")))
    assert plan.is_empty
    assert plan == Plan()


def test_added_and_removed_are_found_by_id() -> None:
    """An id only in the new file is added, an id only in the old one is removed."""
    plan = diff(by_id(cfg("a"), cfg("b")), by_id(cfg("b"), cfg("c")))
    assert ids(plan.added) == ["c"]
    assert ids(plan.removed) == ["a"]
    assert plan.rescheduled == plan.updated == ()


def test_interval_change_is_rescheduled_even_when_the_payload_changes_too() -> None:
    """A new interval reschedules the entry once; it is not also listed as updated."""
    new = cfg("a", interval=7, data={"v": 2})
    plan = diff(by_id(cfg("a")), by_id(new))
    assert plan.rescheduled == (new,)
    assert plan.updated == plan.added == plan.removed == ()


def test_wire_only_changes_are_updates_on_the_same_grid() -> None:
    """data, qos, retain, topic, lwt and properties changes are updates, never reschedules."""
    changes: list[dict[str, Any]] = [
        {"data": {"v": 2}},
        {"qos": 1},
        {"retain": True},
        {"topic": "site/moved"},
        {"lwt": True},
        {"properties": {"message_expiry": 60}},
    ]
    for change in changes:
        new = cfg("a", **change)
        plan = diff(by_id(cfg("a")), by_id(new))
        assert plan.updated == (new,), change
        assert plan.rescheduled == (), change


def test_changed_properties_are_an_update_and_equal_ones_are_no_change() -> None:
    """A changed property (even the order of user properties) is an update on the same grid;
    the same properties written again change nothing."""
    before = cfg("a", properties={"user_properties": {"x": "1", "y": "2"}})
    reordered = cfg("a", properties={"user_properties": {"y": "2", "x": "1"}})
    assert ids(diff(by_id(before), by_id(reordered)).updated) == ["a"]
    again = cfg("a", properties={"user_properties": {"x": "1", "y": "2"}})
    assert diff(by_id(before), by_id(again)).is_empty


def test_json_values_equal_in_python_but_not_on_the_wire_are_updates() -> None:
    """1, 1.0 and true compare equal in Python but render differently, so they are changes."""
    one = cfg("a", data={"v": 1})
    for other in ({"v": 1.0}, {"v": True}):
        plan = diff(by_id(one), by_id(cfg("a", data=other)))
        assert ids(plan.updated) == ["a"], other


def test_metadata_only_change_plans_nothing() -> None:
    """created_at, updated_at and version do not reach the wire, so changing them does nothing."""
    old = cfg("a", version=1, updated_at="2024-01-01T00:00:00Z")
    new = cfg("a", version=2, updated_at="2024-06-01T00:00:00Z")
    assert diff(by_id(old), by_id(new)).is_empty


def test_plan_lists_keep_the_new_files_order() -> None:
    """Ids in each list follow the order of the new file, not of the old one."""
    old = by_id(cfg("z"), cfg("y"), cfg("x"))
    new = by_id(cfg("x", qos=1), cfg("m"), cfg("z", qos=1), cfg("k"), cfg("y", qos=1))
    plan = diff(old, new)
    assert ids(plan.updated) == ["x", "z", "y"]
    assert ids(plan.added) == ["m", "k"]


def test_summary_names_every_id_per_kind() -> None:
    """The summary (what config_reloaded logs) lists ids per kind of change."""
    old = by_id(cfg("gone"), cfg("slow"), cfg("same"), cfg("data"))
    new = by_id(cfg("slow", interval=60), cfg("same"), cfg("data", data={"v": 9}), cfg("new"))
    assert diff(old, new, ("broken",)).summary() == {
        "added": ["new"],
        "removed": ["gone"],
        "rescheduled": ["slow"],
        "updated": ["data"],
        "kept_last_good": ["broken"],
    }


# --- effective_entries -----------------------------------------------------------------------


def test_valid_file_is_taken_as_it_is() -> None:
    """With no invalid entries the wanted set is exactly the file's entries."""
    result = parse(raw("a"), raw("b", interval=9))
    wanted, kept = effective_entries(by_id(cfg("a"), cfg("old")), result)
    assert wanted == by_id(*result.entries)
    assert kept == ()


def test_broken_running_entry_keeps_its_last_good_version() -> None:
    """An entry that became invalid keeps running as it was; the rest of the file applies."""
    running = by_id(cfg("a", data={"v": "good"}), cfg("b"))
    result = parse(raw("a", interval="fast"), raw("b", data={"v": 2}), raw("c"))
    wanted, kept = effective_entries(running, result)
    assert kept == ("a",)
    assert wanted["a"] is running["a"]
    assert wanted["b"].data == {"v": 2}
    assert sorted(wanted) == ["a", "b", "c"]
    plan = diff(running, wanted, kept)
    assert (ids(plan.added), ids(plan.updated), plan.removed) == (["c"], ["b"], ())
    assert plan.kept_last_good == ("a",)


def test_broken_new_entry_is_not_started() -> None:
    """An invalid entry that was not running before has no good version: it does not run."""
    wanted, kept = effective_entries(by_id(cfg("a")), parse(raw("a"), raw("b", qos=5)))
    assert sorted(wanted) == ["a"]
    assert kept == ()


def test_entry_gone_from_the_file_is_removed_not_kept() -> None:
    """Only ids still present (but broken) are kept; an id missing from the file is removed."""
    running = by_id(cfg("a"), cfg("b"))
    wanted, kept = effective_entries(running, parse(raw("a")))
    assert sorted(wanted) == ["a"]
    assert kept == ()
    assert ids(diff(running, wanted, kept).removed) == ["b"]


def test_rejected_duplicate_does_not_replace_the_first_occurrence() -> None:
    """A duplicate id is rejected; its first, valid occurrence is what runs."""
    result = parse(raw("a", data={"v": "first"}), raw("a", data={"v": "second"}))
    wanted, kept = effective_entries(by_id(cfg("a")), result)
    assert wanted["a"].data == {"v": "first"}
    assert kept == ()


# --- grid_start ------------------------------------------------------------------------------


@given(st.text(min_size=1, max_size=40), st.floats(min_value=0.1, max_value=86400))
def test_grid_start_lies_within_one_interval_of_the_anchor(entry_id: str, interval: float) -> None:
    """The first slot is the anchor plus an offset in [0, interval)."""
    start = grid_start(entry_id, interval)
    assert GRID_ANCHOR <= start < GRID_ANCHOR + timedelta(seconds=interval)


def test_grid_start_is_stable_for_an_id() -> None:
    """The same id and interval give the same first slot on every call."""
    assert grid_start("pump-7", 60) == grid_start("pump-7", 60.0)


def test_grid_start_is_stable_across_processes() -> None:
    """The phase survives a restart: another interpreter, with another hash seed, agrees."""
    code = (
        "from scheduler_publisher.scheduling.plan import grid_start;"
        "print(grid_start('pump-7', 60).isoformat(), grid_start('ü/x', 0.5).isoformat())"
    )
    outputs = set()
    for seed in ("1", "2"):
        env = {**os.environ, "PYTHONHASHSEED": seed}
        done = subprocess.run(
            [sys.executable, "-c", code], env=env, check=True, capture_output=True, text=True
        )
        outputs.add(done.stdout.strip())
    here = f"{grid_start('pump-7', 60).isoformat()} {grid_start('ü/x', 0.5).isoformat()}"
    assert outputs == {here}


def test_grid_start_spreads_entries_sharing_an_interval() -> None:
    """Many ids on the same interval spread over the period's phase slots (600 of 100 ms in a
    minute): 200 ids land in about as many distinct slots as chance allows, and cover the
    whole period."""
    offsets = [offset(f"sensor-{n}", 60) for n in range(200)]
    assert len(set(offsets)) > 160  # 600 x (1 - e^(-200/600)) = 170 expected
    assert max(offsets.count(o) for o in offsets) <= 4
    buckets = {int(o // 6) for o in offsets}  # ten 6-second slices of the minute
    assert buckets == set(range(10))


@pytest.mark.parametrize(
    ("interval", "slot_ms"),
    [
        (0.1, 1),
        (0.5, 5),
        (1, 10),
        (5, 50),
        (60, 100),
        (86400, 100),
    ],
)
def test_phases_are_whole_slots_of_about_a_hundredth_of_the_interval(
    interval: float, slot_ms: int
) -> None:
    """Phases are multiples of phase_slot_ms: ~1/100 of the interval, from 1 ms to 100 ms."""
    assert phase_slot_ms(interval) == slot_ms
    for n in range(300):
        offset_ms = round(offset(f"e{n}", interval) * 1000)
        assert offset_ms % slot_ms == 0
        assert 0 <= offset_ms < interval * 1000


@pytest.mark.parametrize(
    ("interval", "slots", "slot_ms"),
    [
        (1, 100, 10),
        (60, 100, 100),
        (1, 10, 100),
        (60, 10, 1000),
        (0.1, 10, 10),
        (1, 1, 1000),
        (60, 1, 10_000),
        (0.5, 7, 71),
    ],
)
def test_fewer_phase_slots_make_fewer_fuller_groups(
    interval: float, slots: int, slot_ms: int
) -> None:
    """`--phase-slots N`: phases are whole slots of 1/N of the interval, at most 10 s / N
    long, so entries sharing an interval fall into at most max(N, interval / (10 s / N))
    groups; each id's phase is still fixed (the same on every call)."""
    assert phase_slot_ms(interval, slots) == slot_ms
    phases = {grid_start(f"e{n}", interval, slots) for n in range(1000)}
    assert len(phases) <= max(slots, round(interval * 1000) // slot_ms)
    for n in range(200):
        start = grid_start(f"e{n}", interval, slots)
        assert start == grid_start(f"e{n}", interval, slots)
        offset_ms = round((start - GRID_ANCHOR).total_seconds() * 1000)
        assert offset_ms % slot_ms == 0
        assert 0 <= offset_ms < interval * 1000


def test_the_default_phase_slots_keep_every_phase_where_it_was() -> None:
    """100 slots, the default, are the phases of every release before the option: the slot
    rule of those releases (1/100 of the interval, 1 ms to 100 ms), computed here by hand."""
    for interval in (0.1, 0.5, 1, 2.5, 60, 3600):
        period_ms = round(interval * 1000)
        slot_ms = min(100, max(1, period_ms // 100))
        for n in range(100):
            entry_id = f"sensor/{n}"
            slot = zlib.crc32(entry_id.encode()) % (period_ms // slot_ms)
            assert offset(entry_id, interval) * 1000 == pytest.approx(slot * slot_ms)
            assert grid_start(entry_id, interval) == grid_start(entry_id, interval, 100)


def test_grid_start_spreads_sub_second_intervals() -> None:
    """Fast entries are spread at millisecond resolution within their short period."""
    offsets = {offset(f"fast-{n}", 0.1) for n in range(50)}
    assert len(offsets) > 20
    assert all(0 <= o < 0.1 for o in offsets)


# --- batches: a large plan applied in parts ------------------------------------------------------


def test_batches_cut_a_plan_into_parts_removals_first() -> None:
    """Every change lands in exactly one batch of at most `size`, removals before the rest,
    each kind in the plan's order."""
    old = by_id(*(cfg(f"r{i}") for i in range(3)), cfg("s", interval=5), cfg("u"))
    new = by_id(*(cfg(f"n{i}") for i in range(4)), cfg("s", interval=9), cfg("u", data={"v": 2}))
    plan = diff(old, new)
    parts = list(batches(plan, 3))
    assert [len(p.removed) + len(p.added) + len(p.rescheduled) + len(p.updated) for p in parts] == [
        3,
        3,
        3,
    ]
    order = [e.id for p in parts for e in (*p.removed, *p.added, *p.rescheduled, *p.updated)]
    assert order == ["r0", "r1", "r2", "n0", "n1", "n2", "n3", "s", "u"]
    assert list(batches(diff(old, old), 3)) == []


def test_applying_every_batch_gives_the_new_entries() -> None:
    """Applying the batches one after another ends exactly where the whole plan does; each
    step in between holds every entry at its old or its new version, never a mix."""
    old = by_id(*(cfg(f"k{i}", data={"v": 1}) for i in range(10)))
    new = by_id(
        *(cfg(f"k{i}", data={"v": 2}) for i in range(0, 10, 2)), *(cfg(f"n{i}") for i in range(5))
    )
    current: dict[str, PublishConfig] = dict(old)
    for part in batches(diff(old, new), 4):
        current = applied(current, part)
        assert all(current[i] in (old.get(i), new.get(i)) for i in current)
    assert current == new
