"""bench/experiments/late_groups.py: its classification of late phase groups, and a short real run.

No timing assertions: which groups are late depends on the machine. The run only proves the
tool traces the real service and matches its groups with what a subscriber received.
"""

from __future__ import annotations

import importlib
import re
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "bench" / "experiments" / "late_groups.py"


@pytest.fixture
def late_groups(monkeypatch: pytest.MonkeyPatch) -> ModuleType:
    """bench/experiments/late_groups.py, imported as it runs (bench/ on the path)."""
    monkeypatch.syspath_prepend(str(REPO / "bench" / "experiments"))
    return importlib.import_module("late_groups")


def test_each_late_group_is_put_down_to_where_it_was_late(late_groups: ModuleType) -> None:
    """On time everywhere but for one stage: the group is counted under that stage, and a
    group late in no stage is not counted."""
    group = late_groups.Group
    on_time = [group(float(i), 0.4, 1.8, 2.2, 3.2, 5.2) for i in range(20)]
    woke = group(100.0, 4.5, 5.9, 6.3, 7.3, 9.3)
    ran_long = group(101.0, 0.4, 8.0, 8.4, 3.3, 10.4)
    after = group(102.0, 0.5, 1.9, 2.3, 3.4, 12.0)
    slightly = group(103.0, 0.4, 1.8, 2.2, 3.2, 7.0)  # late by less than LATE_MS
    causes = late_groups.classify([*on_time, woke, ran_long, after, slightly])
    assert causes == {"woke late": [woke], "ran long": [ran_long], "after the service": [after]}
    assert late_groups.classify([]) == {"woke late": [], "ran long": [], "after the service": []}


def test_groups_are_matched_with_their_sends_and_arrivals(late_groups: ModuleType) -> None:
    """Arrivals belong to the group due last before them; a send counts until the group's last
    arrival; groups smaller than asked for are left out."""
    groups = [(10.0, 10.0005, 10.002, 100), (11.0, 11.004, 11.006, 100), (11.5, 11.5, 11.5, 1)]
    sends = [10.001, 10.0025, 11.0065, 11.5001]
    arrivals = [10.003, 10.005, 11.008, 11.009]
    found = late_groups.explain(groups, sends, arrivals, smallest=10)
    assert [g.due for g in found] == [10.0, 11.0]
    first, second = found
    assert first.started_ms == pytest.approx(0.5)
    assert first.last_send_ms == pytest.approx(2.5)
    assert (first.first_arrival_ms, first.last_arrival_ms) == (pytest.approx(3), pytest.approx(5))
    assert second.started_ms == pytest.approx(4)
    assert second.last_send_ms == pytest.approx(6.5)
    assert second.last_arrival_ms == pytest.approx(9)


def test_a_short_run_traces_the_service_and_reports_every_group() -> None:
    """Four seconds at 20 entries: about four groups of 20, each matched with its arrivals,
    and the late ones counted by cause."""
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--entries", "20", "--seconds", "4"],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    summary = re.search(
        r"(\d+) phase groups in 4 s; medians after the due time: run started "
        r"(-?[\d.]+) ms, ended (-?[\d.]+) ms, last send (-?[\d.]+) ms, first "
        r"arrival (-?[\d.]+) ms, last arrival (-?[\d.]+) ms",
        done.stdout,
    )
    assert summary is not None, done.stdout + done.stderr
    assert 3 <= int(summary.group(1)) <= 5
    started, ended, _sent, first, last = (float(summary.group(i)) for i in range(2, 7))
    assert started <= ended
    assert first <= last
    late = re.search(
        r"late groups \(last arrival > median \+ 3 ms\): (\d+) of (\d+): woke late "
        r"(\d+), ran long (\d+), after the service (\d+)",
        done.stdout,
    )
    assert late is not None, done.stdout
    assert int(late.group(1)) == sum(int(late.group(i)) for i in (3, 4, 5))
    assert late.group(2) == summary.group(1)
    assert "from the leg after the service alone" in done.stdout
    steal = re.search(
        r"host steal within 15 ms of the group \((\d+) ms in all\): late groups "
        r"(\d+) of (\d+), groups on time (\d+) of (\d+)",
        done.stdout,
    )
    assert steal is not None, done.stdout
    assert int(steal.group(3)) == int(late.group(1))
    assert int(steal.group(3)) + int(steal.group(5)) == int(summary.group(1))
    assert int(steal.group(2)) <= int(steal.group(3))
    assert int(steal.group(4)) <= int(steal.group(5))


def test_steal_counts_around_a_group_from_before_its_due_time_to_after_its_last_arrival(
    late_groups: ModuleType,
) -> None:
    """A group due at 100 s whose last message arrived 6 ms later: steal read from 15 ms before
    the due time to 15 ms after that arrival is counted, steal read outside is not."""
    g = late_groups.Group(100.0, 0.5, 2.0, 2.5, 3.0, 6.0)
    increases = [(99.980, 10.0), (99.986, 20.0), (100.003, 10.0), (100.020, 30.0), (100.022, 40.0)]
    assert late_groups.stolen_around(g, increases) == pytest.approx(60.0)
    assert late_groups.stolen_around(g, []) == 0


def test_the_late_groups_and_the_ones_on_time_are_counted_with_steal_around_them(
    late_groups: ModuleType,
) -> None:
    """Of two late groups (as `classify` has them) one had steal around it; of 20 on time one
    did. Steal between the groups counts for neither."""
    group = late_groups.Group
    on_time = [group(float(i), 0.4, 1.8, 2.2, 3.2, 5.2) for i in range(20)]
    woke, after = group(100.0, 4.5, 5.9, 6.3, 7.3, 9.3), group(101.0, 0.5, 1.9, 2.3, 3.4, 12.0)
    increases = [(3.001, 10.0), (10.5, 20.0), (100.004, 30.0)]
    shares = late_groups.steal_shares([*on_time, woke, after], increases)
    assert shares == ((1, 2), (1, 20))


def test_a_windows_period_error_is_split_between_the_service_and_what_follows(
    late_groups: ModuleType,
) -> None:
    """A group whose messages left late moves the service's leg; one whose messages left on
    time and arrived late moves the leg after it. Each leg's p99 sees only its own delay, and
    the per-entry figure is the measured periods' p99 in the same window."""
    group = late_groups.Group
    groups = [group(float(i), 0.4, 1.8, 2.2, 3.2, 5.2) for i in range(60)]
    groups[10] = group(10.0, 0.4, 1.8, 2.2, 3.2, 13.2)  # left on time, arrived 8 ms late
    groups[40] = group(40.0, 6.4, 7.8, 8.2, 9.2, 11.2)  # woke 6 ms late, arrived as late
    periods = {float(t): [0.5, 0.25 if t != 41 else 6.0] for t in range(1, 60)}
    first, second = late_groups.legs(groups, periods, 30.0)
    assert (first.start, second.start) == (0.0, 30.0)
    assert first.last_message == pytest.approx(8.0)
    assert first.after_leg == pytest.approx(8.0)
    assert first.service_leg == pytest.approx(0.0)
    assert first.per_entry == pytest.approx(0.5)
    assert second.last_message == pytest.approx(6.0)
    assert second.service_leg == pytest.approx(6.0)
    assert second.after_leg == pytest.approx(0.0)
    assert second.per_entry == pytest.approx(6.0)
    assert late_groups.legs([], {}, 30.0) == []


def test_period_errors_are_filed_under_the_second_their_period_ended_in(
    late_groups: ModuleType,
) -> None:
    arrivals = [(100.010, "a"), (101.012, "a"), (100.5, "b"), (102.010, "a"), (101.49, "b")]
    errors = late_groups.period_errors(arrivals)
    assert errors.keys() == {101.0, 102.0}
    assert sorted(errors[101.0]) == [pytest.approx(2.0), pytest.approx(10.0)]
    assert errors[102.0] == [pytest.approx(2.0)]
