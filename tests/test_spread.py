"""spread.py: how many phase groups each interval's entries are spread over."""

from __future__ import annotations

import itertools

import pytest

from scheduler_publisher.config.loader import PublishConfig
from scheduler_publisher.scheduling.plan import MAX_SLOTS
from scheduler_publisher.scheduling.spread import PhaseSpread, Respread, auto_slots


def entries(count: int, interval: float = 1.0, prefix: str = "e") -> list[PublishConfig]:
    return [
        PublishConfig(id=f"{prefix}{n}", topic=f"t/{prefix}{n}", data={}, interval=interval)
        for n in range(count)
    ]


@pytest.mark.parametrize(
    ("count", "slots"),
    [
        (0, 1),
        (1, 1),
        (100, 1),
        (199, 1),
        (200, 2),
        (999, 9),
        (1000, 10),
        (1500, 22),
        (2000, 40),
        (3000, 60),
        (4999, 99),
        (5000, 100),
        (10_000, 100),
        (1_000_000, 100),
    ],
)
def test_auto_gives_groups_of_100_up_to_1000_entries_then_of_50_from_1_to_100(
    count: int, slots: int
) -> None:
    assert auto_slots(count) == slots


def test_auto_never_gives_fewer_groups_to_more_entries() -> None:
    counts = range(0, 12_000, 7)
    assert all(auto_slots(a) <= auto_slots(b) for a, b in itertools.pairwise(counts))


def test_each_interval_is_sized_from_its_own_entries() -> None:
    spread = PhaseSpread()
    assert spread.size([*entries(1000, 1.0), *entries(150, 60.0, "m")]) == []
    assert (spread.slots(1.0), spread.slots(60.0)) == (10, 1)


def test_a_fixed_count_applies_to_every_interval_and_never_respreads() -> None:
    spread = PhaseSpread(fixed=7)
    assert spread.size(entries(5)) == []
    assert spread.size(entries(100_000)) == []
    assert (spread.slots(1.0), spread.slots(3600.0)) == (7, 7)


def test_growth_below_four_times_keeps_the_groups_and_four_times_respreads() -> None:
    spread = PhaseSpread()
    spread.size(entries(1000))
    assert spread.size(entries(1999)) == []  # 39 groups wanted, < 4 x 10
    assert spread.slots(1.0) == 10
    assert spread.size(entries(2000)) == [Respread(1.0, 10, 40, 2000)]
    assert spread.slots(1.0) == 40
    assert spread.size(entries(10)) == []  # shrinking never moves a phase
    assert spread.slots(1.0) == 40


def test_an_interval_without_entries_is_forgotten_and_sized_afresh() -> None:
    spread = PhaseSpread()
    spread.size(entries(5000, 2.0))
    assert spread.slots(2.0) == 100
    spread.size(entries(3, 1.0))  # no entry at 2 s any more
    spread.size([*entries(3, 1.0), *entries(3, 2.0, "x")])
    assert spread.slots(2.0) == 1


def test_cron_entries_are_not_counted_and_unsized_intervals_get_the_widest_spread() -> None:
    spread = PhaseSpread()
    crons = [
        PublishConfig(id=f"c{n}", topic=f"t/c{n}", data={}, cron="* * * * *") for n in range(500)
    ]
    assert spread.size(crons) == []
    assert spread.slots(1.0) == MAX_SLOTS
