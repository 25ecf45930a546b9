"""Smoke test for the benchmark: `bench/run.py --quick` runs end to end and writes every section.

No timing assertions: the figures depend on the machine and its load. This only proves the
benchmark itself works (broker, subscriber, service, every scenario, the JSON report).
"""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.skipif(
    not (shutil.which("mosquitto") or Path("/usr/sbin/mosquitto").exists()),
    reason="needs Mosquitto")


def _numeric(section: dict[str, object], *keys: str) -> None:
    for key in keys:
        value = section[key]
        assert isinstance(value, int | float), (key, value)
        assert not isinstance(value, bool), (key, value)
        assert math.isfinite(value), (key, value)


def test_bench_quick_writes_every_section(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    proc = subprocess.run([sys.executable, str(REPO / "bench" / "run.py"), "--quick",
                           "--out", str(out)], capture_output=True, text=True, timeout=180,
                          check=False)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert "| figure | target | measured | verdict |" in proc.stdout
    result = json.loads(out.read_text())

    for qos in ("qos0", "qos1"):
        _numeric(result["bare"][qos], "publishes_per_s", "cpu_us_per_publish", "wall_s", "cpu_s")
    assert result["sustained"]
    for run in result["sustained"]:
        _numeric(run, "entries", "expected", "received", "delivered_pct", "missed_ticks",
                 "service_cpu_pct_of_core", "cpu_us_per_publish", "cost_ratio_vs_bare_qos0")
        _numeric(run["period_error_ms"], "p50", "p99", "max")
    _numeric(result["idle"], "entries", "idle_cpu_pct_of_core", "idle_window_s", "rss_kb")
    _numeric(result["memory"], "rss_small_kb", "rss_large_kb", "kb_per_entry")
    _numeric(result["startup"], "entries", "seconds")
    _numeric(result["reload"], "wire_latency_max_s", "applied_latency_max_s",
             "phase_moved_on_wire", "phase_compared_on_wire", "phase_moved_next_run_at",
             "phase_compared_next_run_at")
    assert len(result["table"]) >= 6
