"""Smoke test for bench/experiments/scheduler_cost.py: it runs end to end in each mode and
prints its figure.

No timing assertions: only that the script still drives the real Schedule and reports.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parent.parent / "bench" / "experiments" / "scheduler_cost.py"


@pytest.mark.parametrize("mode", [[], ["--listen"], ["--profile"]])
def test_scheduler_cost_bench_runs_every_job_and_reports(mode: list[str]) -> None:
    """On the fake clock, 50 entries x 1 s for 2 s run 100 times, and a CPU figure is printed
    (with --profile, cProfile's table too)."""
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--entries", "50", "--seconds", "2", "--repeats", "2", *mode],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    assert "(100 runs in " in done.stdout
    assert re.search(
        r"µs CPU per run \[[\d.]+(, [\d.]+)?\], median [\d.]+, min [\d.]+", done.stdout
    )
    if mode == ["--profile"]:
        assert "function calls" in done.stdout
