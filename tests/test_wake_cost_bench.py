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
    done = subprocess.run([sys.executable, str(SCRIPT), "--seconds", "0.5", "--period-ms", "10"],
                          capture_output=True, text=True, timeout=60, check=True)
    found = re.search(r"an empty wake-up every 10 ms: ([\d.]+) µs of CPU each \(median\), "
                      r"([\d.]+) wake-ups a second, ([\d.]+) % of a core", done.stdout)
    assert found is not None, done.stdout
    assert 0 < float(found.group(2)) <= 101  # at most one wake-up per 10 ms (and the last)


def test_wake_cost_bench_reports_how_late_a_thread_wakes_at_its_deadlines() -> None:
    """The lateness line: percentiles, the worst and the count over 5 ms, for as many
    wake-ups as the run holds deadlines."""
    done = subprocess.run([sys.executable, str(SCRIPT), "--seconds", "0.5", "--period-ms", "10"],
                          capture_output=True, text=True, timeout=60, check=True)
    found = re.search(r"woken at a deadline every 10 ms: lateness p50 ([\d.]+) / p99 ([\d.]+) / "
                      r"max ([\d.]+) ms over (\d+) wake-ups, (\d+) more than 5 ms late",
                      done.stdout)
    assert found is not None, done.stdout
    p50, p99, worst = (float(found.group(i)) for i in (1, 2, 3))
    assert 0 <= p50 <= p99 <= worst
    assert int(found.group(4)) == 50
    assert int(found.group(5)) <= 50


def test_the_lateness_line_never_shows_a_p99_above_the_worst(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A p99 just under the worst wake-up (4.236 and 4.24 ms) reads as at most the worst: the
    line rounds them alike (the worst, once rounded coarser, read 4.2 under a p99 of 4.24)."""
    monkeypatch.syspath_prepend(str(SCRIPT.parent))
    wake_cost = importlib.import_module("wake_cost")
    line = wake_cost.describe_lateness({"p50_ms": 0.15, "p99_ms": 4.236, "max_ms": 4.24,
                                        "wakeups": 300, "over_5ms": 0})
    found = re.search(r"p99 ([\d.]+) / max ([\d.]+) ms", line)
    assert found is not None, line
    assert float(found.group(1)) <= float(found.group(2))
