"""Smoke test for bench/template_cost.py: it renders both kinds of entry and prints its table.

No timing assertions: only that the script still drives the service's publish-path code and
reports a figure per case.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parent.parent / "bench" / "template_cost.py"


def test_template_cost_bench_prints_static_templated_and_reference_figures() -> None:
    """Each payload shape gets a static, a templated and a json.dumps row with two figures."""
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--number", "200", "--repeats", "2"],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    rows = re.findall(
        r"^\| (.+?): (static|templated|reference)[^|]*\| ([\d.]+) \| ([\d.]+) \|$",
        done.stdout,
        re.MULTILINE,
    )
    assert [(shape, kind) for shape, kind, _, _ in rows] == [
        (shape, kind)
        for shape in ("5 fields, 2 placeholders", "40 readings, 2 placeholders")
        for kind in ("static", "templated", "reference")
    ]
