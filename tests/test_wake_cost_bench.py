"""Smoke test for bench/wake_cost.py: it runs and prints its figures (no timing assertions)."""

from __future__ import annotations

import importlib
import re
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parent.parent / "bench" / "wake_cost.py"


def test_wake_cost_bench_reports_cpu_per_wakeup() -> None:
    """Half a second of 10 ms sleeps gives a figure per wake-up and the rate it woke at."""
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--seconds", "0.5", "--period-ms", "10"],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    found = re.search(
        r"an empty wake-up every 10 ms: ([\d.]+) µs of CPU each \(median\), "
        r"([\d.]+) wake-ups a second, ([\d.]+) % of a core",
        done.stdout,
    )
    assert found is not None, done.stdout
    assert 0 < float(found.group(2)) <= 101  # at most one wake-up per 10 ms (and the last)


def test_wake_cost_bench_reports_how_late_a_thread_wakes_at_its_deadlines() -> None:
    """The lateness line: percentiles, the worst and the count over 5 ms, for as many
    wake-ups as the run holds deadlines."""
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--seconds", "0.5", "--period-ms", "10"],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    found = re.search(
        r"woken at a deadline every 10 ms: lateness p50 ([\d.]+) / p99 ([\d.]+) / "
        r"max ([\d.]+) ms over (\d+) wake-ups, (\d+) more than 5 ms late",
        done.stdout,
    )
    assert found is not None, done.stdout
    p50, p99, worst = (float(found.group(i)) for i in (1, 2, 3))
    assert 0 <= p50 <= p99 <= worst
    assert int(found.group(4)) == 50
    assert int(found.group(5)) <= 50


def test_the_lateness_line_never_shows_a_p99_above_the_worst(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A p99 just under the worst wake-up (4.236 and 4.24 ms) reads as at most the worst: the
    line rounds them alike (the worst, once rounded coarser, read 4.2 under a p99 of 4.24)."""
    monkeypatch.syspath_prepend(str(SCRIPT.parent))
    wake_cost = importlib.import_module("wake_cost")
    line = wake_cost.describe_lateness(
        {"p50_ms": 0.15, "p99_ms": 4.236, "max_ms": 4.24, "wakeups": 300, "over_5ms": 0}
    )
    found = re.search(r"p99 ([\d.]+) / max ([\d.]+) ms", line)
    assert found is not None, line
    assert float(found.group(1)) <= float(found.group(2))


def test_the_lateness_line_gives_the_hosts_steal_when_it_was_measured(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A floor measured with the host's steal says how much the host took meanwhile; one from a
    result written before steal was measured reads as it did."""
    monkeypatch.syspath_prepend(str(SCRIPT.parent))
    wake_cost = importlib.import_module("wake_cost")
    floor = {"p50_ms": 0.15, "p99_ms": 2.6, "max_ms": 5.4, "wakeups": 300, "over_5ms": 1}
    assert wake_cost.describe_lateness(floor).endswith("1 more than 5 ms late")
    line = wake_cost.describe_lateness({**floor, "steal_ms": 40.0})
    assert line.endswith("1 more than 5 ms late; host steal meanwhile 40 ms"), line
    measured = wake_cost.lateness(0.2, 0.05)
    assert measured["wakeups"] == 4
    assert measured["steal_ms"] >= 0


def test_wake_cost_bench_compares_a_timerfd_wake_up_with_the_loops(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """`--timerfd` adds a line for the same deadlines met by one wake-up on a timerfd, and both
    lines give the host's steal and the CPU per deadline. A timerfd that woke the thread at the
    wrong time would show in the count (one wake-up per deadline) or in a lateness of a whole
    period."""
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--seconds", "0.5", "--period-ms", "10", "--timerfd"],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    lines = [
        re.search(
            r"woken at a deadline every 10 ms(?P<how> by a timerfd)?: lateness "
            r"p50 (?P<p50>[\d.]+) / p99 [\d.]+ / max [\d.]+ ms over (?P<n>\d+) "
            r"wake-ups, \d+ more than 5 ms late; host steal meanwhile \d+ ms; "
            r"(?P<cpu>\d+) µs of CPU per deadline",
            line,
        )
        for line in done.stdout.splitlines()
    ]
    found = [m for m in lines if m is not None]
    assert [bool(m.group("how")) for m in found] == [False, True], done.stdout
    for m in found:
        assert int(m.group("n")) == 50
        assert 0 <= float(m.group("p50")) < 10
        assert int(m.group("cpu")) > 0
    monkeypatch.syspath_prepend(str(SCRIPT.parent))
    wake_cost = importlib.import_module("wake_cost")
    timer = wake_cost.TimerFd()
    try:
        timer.arm(wake_cost.time.monotonic() - 1)  # in the past: expired at once
        assert int.from_bytes(wake_cost.os.read(timer.fd, 8), "little") == 1
        timer.arm(41.9999999999)  # rounds up to a whole second: still a valid timespec
        assert int.from_bytes(wake_cost.os.read(timer.fd, 8), "little") == 1
    finally:
        timer.close()
