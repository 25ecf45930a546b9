"""Smoke test for bench/wake_cost.py: it runs and prints its figures (no timing assertions)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parent.parent / "bench" / "wake_cost.py"


def test_wake_cost_bench_reports_cpu_per_wakeup() -> None:
    """Half a second of 10 ms sleeps gives a figure per wake-up and the rate it woke at."""
    done = subprocess.run([sys.executable, str(SCRIPT), "--seconds", "0.5", "--period-ms", "10"],
                          capture_output=True, text=True, timeout=60, check=True)
    found = re.search(r"an empty wake-up every 10 ms: ([\d.]+) µs of CPU each \(median\), "
                      r"([\d.]+) wake-ups a second, ([\d.]+) % of a core", done.stdout)
    assert found is not None, done.stdout
    assert 0 < float(found.group(2)) <= 101  # at most one wake-up per 10 ms (and the last)
