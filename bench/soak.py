#!/usr/bin/env python3
"""Soak: run the service at a high publish rate for a long time and watch RSS and threads.

    .venv/bin/python bench/soak.py [--minutes 10] [--entries 2000] [--interval 0.5]
                                   [--reloads-every 30] [--out bench/results/soak.json]

It starts its own Mosquitto, runs the real CLI, optionally rewrites the config every few
seconds (a reload under load), and samples the process's RSS, thread count and open file
descriptors every 10 s. It prints the samples and a verdict on stability: RSS growth over the
second half of the run (after warm-up) and whether the thread and fd counts stayed flat. It is a
benchmark-style script, not part of the test suite, and it asserts nothing itself.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import Broker, Service, make_entries, proc_cpu_seconds, proc_rss_kb, write_atomically

SAMPLE_EVERY = 10.0


def threads_and_fds(pid: int) -> tuple[int, int]:
    with open(f"/proc/{pid}/status") as f:
        threads = next(int(line.split()[1]) for line in f if line.startswith("Threads:"))
    return threads, len(os.listdir(f"/proc/{pid}/fd"))


def sample(service: Service, started: float) -> dict[str, Any]:
    threads, fds = threads_and_fds(service.pid)
    return {
        "t": round(time.monotonic() - started, 1),
        "rss_kb": proc_rss_kb(service.pid),
        "threads": threads,
        "fds": fds,
        "cpu_s": round(proc_cpu_seconds(service.pid), 2),
    }


def verdict(samples: list[dict[str, Any]]) -> dict[str, Any]:
    half = samples[len(samples) // 2 :]
    growth = half[-1]["rss_kb"] - half[0]["rss_kb"] if len(half) > 1 else 0
    return {
        "rss_growth_second_half_kb": growth,
        "rss_min_kb": min(s["rss_kb"] for s in half),
        "rss_max_kb": max(s["rss_kb"] for s in half),
        "threads_stable": len({s["threads"] for s in half}) == 1,
        "fds_stable": len({s["fds"] for s in half}) == 1,
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--minutes", type=float, default=10.0)
    ap.add_argument("--entries", type=int, default=2000)
    ap.add_argument("--interval", type=float, default=0.5)
    ap.add_argument(
        "--reloads-every",
        type=float,
        default=30.0,
        help="rewrite one entry every N seconds (0: never)",
    )
    ap.add_argument("--out", type=Path, default=Path("bench/results/soak.json"))
    args = ap.parse_args()
    rate = args.entries / args.interval
    print(
        f"soak: {args.entries} entries at {args.interval} s ({rate:,.0f} publishes/s) "
        f"for {args.minutes} min",
        flush=True,
    )
    with tempfile.TemporaryDirectory(prefix="sp-soak-") as tmp:
        work = Path(tmp)
        broker = Broker(work)
        broker.start()
        entries = make_entries(args.entries, args.interval, "soak")
        service = Service(work, broker.port, entries, "soak", watch=args.reloads_every > 0)
        stop = threading.Event()
        samples: list[dict[str, Any]] = []
        started = time.monotonic()
        try:
            next_reload = started + args.reloads_every if args.reloads_every else float("inf")
            end = started + args.minutes * 60
            while time.monotonic() < end:
                service.alive()
                samples.append(sample(service, started))
                print(json.dumps(samples[-1]), flush=True)
                while time.monotonic() < min(end, samples[-1]["t"] + started + SAMPLE_EVERY):
                    if time.monotonic() >= next_reload:
                        entries[0]["data"] = {**entries[0]["data"], "rev": int(time.time())}
                        write_atomically(service.config, entries)
                        next_reload += args.reloads_every
                    stop.wait(0.5)  # a pacing step of the load script, not a synchronisation
        finally:
            service.stop()
            broker.stop()
    result = {
        "settings": vars(args) | {"out": str(args.out)},
        "samples": samples,
        "verdict": verdict(samples),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(json.dumps(result["verdict"], indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
