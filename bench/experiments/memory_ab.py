#!/usr/bin/env python3
"""RSS at 10 and at 10,000 entries of two versions of the service, run back to back (issue 30).

    git archive <commit> scheduler_publisher | tar -x -C /tmp/before
    .venv/bin/python bench/experiments/memory_ab.py --before /tmp/before \
        [--small 10] [--large 10000] [--repeats 2] [--runtime]

Measurement only, as `run.py`'s memory scenario: each run starts its own Mosquitto and the
service with N entries at 60 s and the lean settings (no HTTP, state DB, watcher or log file;
WARNING logs), waits until every topic arrived once (the start-up time, from just before the
process is spawned), then 5 s more, and reads `VmRSS`. KB per entry = (RSS at `--large` -
RSS at `--small`) / the difference in entries. Each repeat runs `--before` (a folder holding
an older `scheduler_publisher`, put first on PYTHONPATH) and this checkout's, in alternating
order. `--runtime` runs both in `run.py`'s runtime venv (this checkout's wheel and its runtime
dependencies only, as a gateway installs it); without it, in this venv, where structlog finds
the demo extra's `rich` (which this checkout no longer imports).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # bench/: the shared harness

from common import (
    Broker,
    Service,
    Sub,
    make_entries,
    proc_rss_kb,
    runtime_python,
    use_service_python,
)

SETTLE = 5.0  # seconds after every topic was seen once


def measure(source: str | None, entries: int) -> tuple[int, float]:
    """(RSS in kB, start-up in s) of one run; `source` None is this checkout's package."""
    os.environ.pop("PYTHONPATH", None)
    if source is not None:
        os.environ["PYTHONPATH"] = source  # the service's child process imports it first
    with tempfile.TemporaryDirectory(prefix="sp-mem-") as tmp:
        work = Path(tmp)
        broker = Broker(work)
        broker.start()
        prefix = f"bench/mab{entries}-{uuid.uuid4().hex[:6]}"
        sub = Sub(broker.port, prefix)
        svc = Service(work, broker.port, make_entries(entries, 60.0, prefix), f"mab-{entries}")
        try:
            seen = sub.wait_all_seen(entries, 120)
            if seen is None:
                raise RuntimeError("not every topic seen")
            svc.alive()
            time.sleep(SETTLE)
            return proc_rss_kb(svc.pid), seen - svc.started_at
        finally:
            svc.stop()
            sub.close()
            broker.stop()
            os.environ.pop("PYTHONPATH", None)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--before", required=True, help="folder holding the older package")
    ap.add_argument("--small", type=int, default=10)
    ap.add_argument("--large", type=int, default=10_000)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--runtime", action="store_true", help="run both in run.py's runtime venv")
    args = ap.parse_args()
    if args.runtime:
        use_service_python(runtime_python())
    variants: list[tuple[str, str | None]] = [("before", args.before), ("after", None)]
    for repeat in range(args.repeats):
        for name, source in variants if repeat % 2 == 0 else variants[::-1]:
            small, _ = measure(source, args.small)
            large, startup = measure(source, args.large)
            per_entry = (large - small) / (args.large - args.small)
            print(
                f"{name}: {small / 1024:.1f} MB at {args.small}, {large / 1024:.1f} MB at "
                f"{args.large} = {per_entry:.3f} KB per entry; start-up {startup:.2f} s at "
                f"{args.large}; load {os.getloadavg()[0]:.2f}",
                flush=True,
            )


if __name__ == "__main__":
    main()
