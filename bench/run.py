#!/usr/bin/env python3
# ruff: noqa: E501, RUF001
# (table strings are long and use a multiplication sign; preexec_fn only raises RLIMIT_NOFILE, and the parent
# starts its children from its only thread)
"""Performance benchmark for scheduler-publisher.

    .venv/bin/python bench/run.py [--quick] [--no-node-red] [--only-shards] [--only-status-page]
                                  [--out bench/results/latest.json]

One run starts its own Mosquitto (own config file, free 127.0.0.1 port) and measures, side by
side: the service beside Node-RED and a bare scheduled paho loop at 100, 1,000 and 5,000
entries x 1 s, interleaved (issue 12), the same at the largest size with one core kept busy,
then issue #6's figures: the bare paho ceiling, sustained scheduled publishing, idle cost,
memory, start-up, live reload and a short soak, and last issue 13's shards (2 shard processes
on one file, then one process, at 20,000 entries x 1 s; `--only-shards` runs just that), and
issue 28's open status page (10,000 entries x 1 s, without and with a page polling as page.js
does; `--only-status-page` runs just that). It prints the tables with the targets beside the measurements and writes JSON. See
bench/README.md for what every figure means.

The helper processes run as `run.py --role NAME` (bench/roles.py).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from datetime import datetime
from pathlib import Path
from typing import Any

import roles
import template_cost
import wake_cost
from common import (
    REPO,
    RUN,
    RUNTIME_VENV,
    Broker,
    Service,
    Sub,
    log,
    make_entries,
    proc_cpu_seconds,
    proc_rss_kb,
    raise_nofile,
    runtime_python,
    service_python,
    use_service_python,
    verdict_word,
    write_atomically,
)
from compare import (
    CompareParams,
    comparison_table,
    issue12_rows,
    issue30_rows,
    loaded_size,
    scenario_compare,
    scenario_loaded,
)
from peers import PEERS, install_node_red, node_red_unavailable, node_red_version
from shards import scenario_shards, shard_rows
from soak import sample, verdict
from status_page import scenario_status_page, status_page_rows

from tests.support import free_port  # the harness the tests use (common.py makes it importable)

SOAK_RSS_SLACK_KB = (
    1024  # RSS moves by a few pages as the allocator settles; growth shows above this
)


def run_bare(port: int, n: int, qos: int) -> dict[str, Any]:
    out = subprocess.run(
        [
            sys.executable,
            str(RUN),
            "--role",
            "bare",
            "--port",
            str(port),
            "--n",
            str(n),
            "--qos",
            str(qos),
        ],
        capture_output=True,
        text=True,
        timeout=600,
        check=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])  # type: ignore[no-any-return]


# ==== scenarios =====================================================================================
def scenario_sustained(
    work: Path, port: int, n: int, warmup: float, window: float, bare_us: float
) -> dict[str, Any]:
    prefix = f"bench/s{n}-{uuid.uuid4().hex[:6]}"
    entries = make_entries(n, 1.0, prefix)
    sub = Sub(port, prefix)
    svc = Service(work, port, entries, f"sustained-{n}")
    try:
        seen = sub.wait_all_seen(n, 60)
        svc.alive()
        if seen is None:
            raise RuntimeError(f"not every topic was seen within 60 s ({n} entries)")
        time.sleep(warmup)
        svc.alive()
        a = time.time()
        cpu0 = proc_cpu_seconds(svc.pid)
        sub_cpu0 = sub.ask(op="cpu")["cpu_s"]
        time.sleep(window)
        cpu1 = proc_cpu_seconds(svc.pid)
        b = time.time()
        sub_cpu1 = sub.ask(op="cpu")["cpu_s"]
        svc.alive()
        time.sleep(1.0)  # let the window's last messages arrive
        res = sub.ask(op="window", a=a, b=b, interval=1.0, topics=[e["topic"] for e in entries])
        cpu = cpu1 - cpu0
        res.update(
            {
                "entries": n,
                "interval_s": 1.0,
                "qos": 0,
                "window_s": b - a,
                "warmup_s": warmup,
                "service_cpu_s": cpu,
                "service_cpu_pct_of_core": 100 * cpu / (b - a),
                "cpu_us_per_publish": cpu * 1e6 / res["received"]
                if res["received"]
                else float("nan"),
                "subscriber_cpu_pct_of_core": 100 * (sub_cpu1 - sub_cpu0) / (b - a),
                "service_rss_kb": proc_rss_kb(svc.pid),
                "loadavg_1m": os.getloadavg()[0],
            }
        )
        res["cost_ratio_vs_bare_qos0"] = res["cpu_us_per_publish"] / bare_us
        return res
    finally:
        svc.stop()
        sub.close()


def scenario_idle_startup_memory(
    work: Path, port: int, n: int, settle: float, window: float
) -> dict[str, Any]:
    """n entries at 60 s: start-up (all n published once), RSS after settling, idle CPU."""
    prefix = f"bench/i{n}-{uuid.uuid4().hex[:6]}"
    sub = Sub(port, prefix)
    svc = Service(work, port, make_entries(n, 60.0, prefix), f"idle-{n}")
    try:
        seen = sub.wait_all_seen(n, 120)
        svc.alive()
        startup = None if seen is None else seen - svc.started_at
        time.sleep(settle)
        rss = proc_rss_kb(svc.pid)
        a = time.monotonic()
        cpu0 = proc_cpu_seconds(svc.pid)
        time.sleep(window)
        cpu1 = proc_cpu_seconds(svc.pid)
        b = time.monotonic()
        svc.alive()
        total = sub.ask(op="first_seen")["total"]
        return {
            "entries": n,
            "interval_s": 60.0,
            "startup_s": startup,
            "topics_seen": sub.ask(op="first_seen")["topics"],
            "rss_kb": rss,
            "rss_kb_end": proc_rss_kb(svc.pid),
            "idle_window_s": b - a,
            "idle_cpu_s": cpu1 - cpu0,
            "idle_cpu_pct_of_core": 100 * (cpu1 - cpu0) / (b - a),
            "messages_received_total": total,
            "loadavg_1m": os.getloadavg()[0],
        }
    finally:
        svc.stop()
        sub.close()


def scenario_memory_small(work: Path, port: int, n: int, settle: float) -> dict[str, Any]:
    prefix = f"bench/m{n}-{uuid.uuid4().hex[:6]}"
    sub = Sub(port, prefix)
    svc = Service(work, port, make_entries(n, 60.0, prefix), f"mem-{n}")
    try:
        seen = sub.wait_all_seen(n, 30)
        svc.alive()
        time.sleep(settle)
        return {
            "entries": n,
            "rss_kb": proc_rss_kb(svc.pid),
            "startup_s": None if seen is None else seen - svc.started_at,
        }
    finally:
        svc.stop()
        sub.close()


def scenario_reload(
    work: Path, port: int, n: int, interval: float, trials: int, phase_window: float
) -> dict[str, Any]:
    """Issue #6's reload: one entry's data changed `trials` times in a file of `n`; how soon
    each change is on the wire, and whether any other entry's phase moved (on the wire and
    in the scheduler's own `next_run_at`)."""
    prefix = f"bench/r{n}-{uuid.uuid4().hex[:6]}"
    entries = make_entries(n, interval, prefix)
    sub = Sub(port, prefix)
    svc = Service(work, port, entries, f"reload-{n}", http_port=free_port(), watch=True)
    try:
        if sub.wait_all_seen(n, 120) is None:
            raise RuntimeError("reload: not every topic seen")
        svc.alive()
        time.sleep(interval + 1)  # past the birth burst, onto the grid
        a0 = time.time()
        time.sleep(phase_window)
        b0 = time.time()
        status_before = svc.status()
        results = [_reload_trial(svc, sub, entries, trial, interval) for trial in range(trials)]
        changed = {r["entry"] for r in results}
        a1 = time.time() + 0.5
        time.sleep(phase_window + 0.5)
        b1 = time.time()
        status_after = svc.status()
        time.sleep(0.5)
        ph0 = sub.ask(op="phases", a=a0, b=b0, interval=interval)["phases"]
        ph1 = sub.ask(op="phases", a=a1, b=b1, interval=interval)["phases"]
        deltas, moved_wire = phases_moved_on_wire(ph0, ph1, changed, interval)
        compared, moved_sched = phases_moved_in_schedule(
            status_before["entries"], status_after["entries"], changed, interval
        )
        wire = [r["wire_latency_s"] for r in results if r["wire_latency_s"] is not None]
        applied = [r["applied_latency_s"] for r in results if r["applied_latency_s"] is not None]
        return {
            "entries": n,
            "interval_s": interval,
            "trials": results,
            "wire_latency_max_s": max(wire) if len(wire) == trials else None,
            "wire_latency_median_s": statistics.median(wire) if wire else None,
            "applied_latency_max_s": max(applied) if applied else None,
            "phase_compared_on_wire": len(deltas),
            "phase_moved_on_wire": moved_wire,
            "phase_delta_on_wire_max_ms": max(deltas, default=float("nan")) * 1e3,
            "phase_compared_next_run_at": compared,
            "phase_moved_next_run_at": moved_sched,
            "reloads_counted": status_after["statistics"].get("reloads"),
        }
    finally:
        svc.stop()
        sub.close()


def _reload_trial(
    svc: Service, sub: Sub, entries: list[dict[str, Any]], trial: int, interval: float
) -> dict[str, Any]:
    """Change one entry's data in the file (`entries` is updated too) and wait for the
    change on the wire: how long it took to arrive, and to be applied by the service."""
    idx = (trial * 7919 + 17) % len(entries)
    marker = f"changed-{trial}-{uuid.uuid4().hex[:6]}"
    entries[idx] = {**entries[idx], "data": {**entries[idx]["data"], "marker": marker}}
    time.sleep((trial * 0.37 * interval) % interval)  # vary where in the period it lands
    t_write = time.time()
    write_atomically(svc.config, entries)
    t_seen = None
    deadline = time.monotonic() + interval + 10
    while t_seen is None and time.monotonic() < deadline:
        changes = sub.ask(op="changes", topic=entries[idx]["topic"])["changes"]
        t_seen = next((t for t, payload in changes if marker in payload and t >= t_write), None)
        if t_seen is None:
            time.sleep(0.02)
    applied = svc.status()["config"]["last_reload_at"]
    svc.alive()
    return {
        "entry": entries[idx]["id"],
        "wire_latency_s": None if t_seen is None else t_seen - t_write,
        "applied_latency_s": None if applied is None else applied - t_write,
    }


def phases_moved_on_wire(
    before: dict[str, float], after: dict[str, float], changed: set[str], interval: float
) -> tuple[list[float], int]:
    """Each unchanged topic's phase shift on the wire (seconds, the shorter way round the
    period), and how many shifted more than 50 ms: well above the arrival jitter, far below
    a re-anchored phase. Topics seen in only one of the windows are left out."""
    deltas = []
    for topic, p0 in before.items():
        if topic.rsplit("/", 1)[1] in changed or topic not in after:
            continue
        deltas.append(abs((after[topic] - p0 + interval / 2) % interval - interval / 2))
    return deltas, sum(1 for d in deltas if d > 0.05)


def phases_moved_in_schedule(
    before: dict[str, Any], after: dict[str, Any], changed: set[str], interval: float
) -> tuple[int, int]:
    """The scheduler's own view from two `/status` entry maps: of the unchanged entries with
    a `next_run_at` in both, how many were compared and how many moved off their grid (the
    next run times differ by more than 1 ms modulo the interval)."""
    compared = moved = 0
    for eid, e0 in before.items():
        e1 = after.get(eid)
        if eid in changed or not e1 or not e0.get("next_run_at") or not e1.get("next_run_at"):
            continue
        t0 = datetime.fromisoformat(e0["next_run_at"]).timestamp()
        t1 = datetime.fromisoformat(e1["next_run_at"]).timestamp()
        compared += 1
        r = (t1 - t0) % interval
        if min(r, interval - r) > 1e-3:
            moved += 1
    return compared, moved


# ==== report ========================================================================================
def fmt(x: Any, spec: str = ",.1f") -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "n/a"
    return format(x, spec)


Row = tuple[str, str, str, str]  # figure, target, measured, verdict


def verdicts(r: dict[str, Any], quick: bool) -> list[Row]:
    """Issue #6's rows: the bare loop's ceiling, then each scenario against its target."""
    rows = [
        _row_bare(r["bare"]),
        *_rows_sustained(r),
        _row_idle(r["idle"]),
        _row_memory(r["memory"]),
        _row_startup(r["idle"]),
        _row_reload(r["reload"]),
    ]
    if quick:
        rows = [(a, b, c, "(quick)" if d in ("met", "MISSED") else d) for a, b, c, d in rows]
    return rows


def _row_bare(bare: dict[str, Any]) -> Row:
    q0, q1 = bare["qos0"], bare["qos1"]
    return (
        "ceiling (bare paho)",
        "reference",
        f"QoS 0: {fmt(q0['publishes_per_s'], ',.0f')}/s, {fmt(q0['cpu_us_per_publish'])} µs "
        f"CPU/publish; QoS 1: {fmt(q1['publishes_per_s'], ',.0f')}/s, "
        f"{fmt(q1['cpu_us_per_publish'])} µs",
        "-",
    )


def _rows_sustained(r: dict[str, Any]) -> list[Row]:
    """Every size sustained; the target's size also against the bare loop's cost."""
    target_n = r["params"]["target_sustained_n"]
    rows = []
    for s in r["sustained"]:
        pe = s["period_error_ms"]
        ok = s["delivered_pct"] >= 99.5 and pe["p99"] <= 20 and s["missed_ticks"] == 0
        is_target = s["entries"] == target_n
        rows.append(
            (
                f"sustained {s['entries']:,} at 1 s",
                "≥ 99.5 % delivered, p99 period error ≤ 20 ms, no missed ticks"
                if is_target
                else "(beyond target)",
                f"{fmt(s['delivered_pct'], '.2f')} % delivered, period error p50 "
                f"{fmt(pe['p50'])} / p99 {fmt(pe['p99'])} / "
                f"max {fmt(pe['max'])} ms, {s['missed_ticks']:,} missed ticks, "
                f"CPU {fmt(s['service_cpu_pct_of_core'])} % of a core",
                verdict_word(ok) if is_target else ("ok" if ok else "no"),
            )
        )
    bare_us = r["bare"]["qos0"]["cpu_us_per_publish"]
    rows += [
        (
            "cost per publish",
            "≤ 3× the bare paho loop's",
            f"{fmt(s['cpu_us_per_publish'])} µs vs {fmt(bare_us)}"
            f" µs = {fmt(s['cost_ratio_vs_bare_qos0'], '.2f')}× (at {s['entries']:,} entries)",
            verdict_word(s["cost_ratio_vs_bare_qos0"] <= 3),
        )
        for s in r["sustained"]
        if s["entries"] == target_n
    ]
    return rows


def _row_idle(idle: dict[str, Any]) -> Row:
    return (
        "idle",
        f"{idle['entries']:,} at 60 s: ≤ 5 % of one core",
        f"{fmt(idle['idle_cpu_pct_of_core'], '.2f')} % over {fmt(idle['idle_window_s'], '.0f')} s",
        verdict_word(idle["idle_cpu_pct_of_core"] <= 5),
    )


def _row_startup(idle: dict[str, Any]) -> Row:
    """The idle scenario's start: how soon every entry went out once."""
    st = idle["startup_s"]
    return (
        "start-up",
        f"{idle['entries']:,} entries all published once within 5 s",
        f"{fmt(st, '.2f')} s from process start",
        verdict_word(st is not None and st <= 5),
    )


def issue30_own_rows(r: dict[str, Any], quick: bool) -> list[Row]:
    """Issue 30's targets on issue #6's figures: memory and start-up."""
    rows = [_row_memory_issue30(r["memory"]), _row_startup_issue30(r["idle"])]
    if quick:
        rows = [(a, b, c, "(quick)" if d in ("met", "MISSED") else d) for a, b, c, d in rows]
    return rows


def _row_startup_issue30(idle: dict[str, Any]) -> Row:
    """Issue 30's start-up target, on the same run as issue 6's."""
    st = idle["startup_s"]
    return (
        "start-up (issue 30)",
        f"{idle['entries']:,} entries all published once within 3 s",
        f"{fmt(st, '.2f')} s from process start",
        verdict_word(st is not None and st <= 3),
    )


def _row_memory_issue30(mem: dict[str, Any]) -> Row:
    """Issue 30's memory target, on the same figures as issue 6's."""
    return (
        "memory (issue 30)",
        "≤ 40 MB RSS at 10 entries, ≤ 1.0 KB per additional entry",
        f"{fmt(mem['rss_small_kb'] / 1024)} MB at {mem['small_entries']}, "
        f"{fmt(mem['kb_per_entry'], '.2f')} KB/entry",
        verdict_word(mem["rss_small_kb"] <= 40 * 1024 and mem["kb_per_entry"] <= 1.0),
    )


def _row_memory(mem: dict[str, Any]) -> Row:
    return (
        "memory",
        "≤ 45 MB RSS at 10 entries, ≤ 1.5 KB per additional entry",
        f"{fmt(mem['rss_small_kb'] / 1024)} MB at {mem['small_entries']}, "
        f"{fmt(mem['rss_large_kb'] / 1024)} MB at {mem['large_entries']:,} → "
        f"{fmt(mem['kb_per_entry'], '.2f')} KB/entry",
        verdict_word(mem["rss_small_kb"] <= 45 * 1024 and mem["kb_per_entry"] <= 1.5),
    )


def _row_reload(rl: dict[str, Any]) -> Row:
    ok = (
        rl["wire_latency_max_s"] is not None
        and rl["wire_latency_max_s"] <= 1
        and rl["phase_moved_on_wire"] == 0
        and rl["phase_moved_next_run_at"] == 0
    )
    return (
        "reload",
        f"one-entry change in {rl['entries']:,} on the wire within 1 s, other phases untouched",
        f"on the wire after {fmt(rl['wire_latency_median_s'], '.2f')} s median / "
        f"{fmt(rl['wire_latency_max_s'], '.2f')} s max ({len(rl['trials'])} trials, interval "
        f"{fmt(rl['interval_s'], 'g')} s; reload applied ≤ {fmt(rl['applied_latency_max_s'], '.2f')} s); "
        f"phases moved: {rl['phase_moved_on_wire']}/{rl['phase_compared_on_wire']} on the wire, "
        f"{rl['phase_moved_next_run_at']}/{rl['phase_compared_next_run_at']} in next_run_at",
        verdict_word(ok),
    )


def print_table(rows: list[tuple[str, str, str, str]]) -> None:
    print("| figure | target | measured | verdict |")
    print("|---|---|---|---|")
    for row in rows:
        print("| " + " | ".join(row) + " |")


# ==== soak (issue #6) ===============================================================================
def scenario_soak(
    work: Path,
    port: int,
    n: int,
    interval: float,
    seconds: float,
    sample_every: float,
    reload_every: float,
) -> dict[str, Any]:
    """bench/soak.py's measurement, shortened: RSS, threads and fds sampled while the service
    publishes at a high rate and reloads now and then."""
    entries = make_entries(n, interval, f"bench/soak-{uuid.uuid4().hex[:6]}")
    svc = Service(work, port, entries, "soak", watch=True)
    pace = threading.Event()  # never set: wait() is the sampling pace, not a synchronisation
    samples: list[dict[str, Any]] = []
    started = time.monotonic()
    try:
        next_reload = started + reload_every
        while (now := time.monotonic()) < started + seconds:
            svc.alive()
            samples.append(sample(svc, started))
            if now >= next_reload:
                entries[0]["data"] = {**entries[0]["data"], "rev": int(time.time())}
                write_atomically(svc.config, entries)
                next_reload += reload_every
            pace.wait(sample_every)
        svc.alive()
        samples.append(sample(svc, started))
    finally:
        svc.stop()
    return {
        "entries": n,
        "interval_s": interval,
        "seconds": seconds,
        "samples": samples,
        **verdict(samples),
    }


def soak_row(soak: dict[str, Any]) -> tuple[str, str, str, str]:
    ok = (
        soak["threads_stable"]
        and soak["fds_stable"]
        and soak["rss_growth_second_half_kb"] <= SOAK_RSS_SLACK_KB
    )
    return (
        "soak",
        f"{soak['entries']:,} at {soak['interval_s']:g} s with reloads: RSS (± {SOAK_RSS_SLACK_KB // 1024} MB), threads and fds flat over the second half",
        f"{soak['seconds']:.0f} s: RSS {soak['rss_growth_second_half_kb']:+,} KB over the second half "
        f"({soak['rss_min_kb'] / 1024:.1f}-{soak['rss_max_kb'] / 1024:.1f} MB), threads "
        f"{'flat' if soak['threads_stable'] else 'CHANGED'}, fds {'flat' if soak['fds_stable'] else 'CHANGED'}",
        verdict_word(ok),
    )


# ==== main ==========================================================================================
def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--quick", action="store_true", help="tiny N, short windows (about a minute): CI smoke"
    )
    p.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "latest.json")
    p.add_argument(
        "--no-node-red", action="store_true", help="leave Node-RED out of the comparison"
    )
    p.add_argument(
        "--dev-python",
        action="store_true",
        help="run the service in this venv (with the test tools) instead of a venv "
        "holding only its wheel and runtime dependencies (the default, not in --quick)",
    )
    p.add_argument(
        "--sizes", help="comparison sizes, comma-separated (default 100,1000,5000,10000)"
    )
    p.add_argument("--rounds", type=int, help="windows per peer and size (default 2)")
    p.add_argument("--window", type=float, help="seconds per comparison window (default 30)")
    p.add_argument("--only-compare", action="store_true", help="skip issue #6's scenarios")
    p.add_argument(
        "--only-shards",
        action="store_true",
        help="run only the shard measurement (issue 13): 2 shard processes, then one process",
    )
    p.add_argument(
        "--shard-entries", type=int, help="entries of the shard measurement (default 20000)"
    )
    p.add_argument(
        "--only-status-page",
        action="store_true",
        help="run only what an open status page costs (issue 28): 10,000 entries x 1 s, "
        "windows without and with a page polling as page.js does",
    )
    p.add_argument(
        "--role",
        choices=("main", "bare", "loop", "sub", "spin"),
        default="main",
        help=argparse.SUPPRESS,
    )
    p.add_argument("--port", type=int, help=argparse.SUPPRESS)
    p.add_argument("--n", type=int, help=argparse.SUPPRESS)
    p.add_argument("--qos", type=int, help=argparse.SUPPRESS)
    p.add_argument("--prefix", help=argparse.SUPPRESS)
    p.add_argument("--seconds", type=float, help=argparse.SUPPRESS)
    return p.parse_args()


def make_params(args: argparse.Namespace) -> dict[str, Any]:
    q = args.quick
    sizes = (
        [int(s) for s in args.sizes.split(",")]
        if args.sizes
        else ([20, 100] if q else [100, 1_000, 5_000, 10_000])
    )
    return {
        "quick": q,
        "compare_sizes": sizes,
        "compare_rounds": args.rounds or (1 if q else 2),
        "compare_warmup_s": 0.5 if q else 5.0,
        "compare_window_s": args.window or (2.0 if q else 30.0),
        "bare_n": {0: 5_000 if q else 200_000, 1: 2_000 if q else 50_000},
        "sustained_n": [200] if q else [1_000, 5_000],
        "sustained_more": [] if q else [10_000, 20_000],
        "target_sustained_n": 200 if q else 5_000,
        "warmup_s": 1.0 if q else 5.0,
        "window_s": 3.0 if q else 20.0,
        "idle_n": 500 if q else 10_000,
        "idle_settle_s": 1.0 if q else 10.0,
        "idle_window_s": 3.0 if q else 30.0,
        "mem_small_n": 10,
        "mem_settle_s": 1.0 if q else 5.0,
        "reload_n": 300 if q else 10_000,
        "reload_interval_s": 1.0 if q else 5.0,
        "reload_trials": 1 if q else 3,
        "reload_phase_window_s": 2.0 if q else 10.0,
        "soak_n": 200 if q else 2_000,
        "soak_interval_s": 0.5,
        "soak_s": 4.0 if q else 120.0,
        "soak_sample_s": 1.0 if q else 10.0,
        "soak_reload_s": 2.0 if q else 30.0,
        "shard_n": args.shard_entries or (400 if q else 20_000),
        "shard_processes": 2,
        "shard_warmup_s": 1.0 if q else 5.0,
        "shard_window_s": args.window or (3.0 if q else 20.0),
        "page_n": 500 if q else 10_000,
        "page_settle_s": 1.0 if q else 10.0,
        "page_window_s": 3.0 if q else 30.0,
        "page_rounds": 1 if q else 3,
    }


def prepare_node_red(args: argparse.Namespace, result: dict[str, Any]) -> str | None:
    """Installs Node-RED when the run wants it and it can (first use), then records why it is
    skipped and the version that runs (read after the install: before it, a first use has
    none). Returns why it is skipped, or None."""
    only = next((f for f in ("shards", "status_page") if getattr(args, f"only_{f}", False)), None)
    nr_skip = f"--only-{only.replace('_', '-')} given" if only else node_red_peer(args)
    result["node_red_skipped"] = nr_skip
    result["machine"]["node_red"] = node_red_version()
    return nr_skip


def node_red_peer(args: argparse.Namespace) -> str | None:
    """Installs Node-RED when it can; returns why it is skipped, or None."""
    if args.no_node_red:
        return "--no-node-red given"
    reason = node_red_unavailable()
    if reason is None:
        try:
            install_node_red(log)
        except (subprocess.SubprocessError, OSError) as exc:
            reason = f"npm install failed: {exc}"
    return reason


def run_compare(
    result: dict[str, Any], work: Path, port: int, params: dict[str, Any], nr_skip: str | None
) -> None:
    cp = CompareParams(
        sizes=tuple(params["compare_sizes"]),
        peers=tuple(peer for peer in PEERS if not (nr_skip and peer == "node-red")),
        rounds=params["compare_rounds"],
        warmup_s=params["compare_warmup_s"],
        window_s=params["compare_window_s"],
        loaded_n=loaded_size(tuple(params["compare_sizes"])),
    )
    result["compare"] = scenario_compare(work, port, cp)
    result["loaded"] = scenario_loaded(work, port, cp)


def run_issue6(result: dict[str, Any], work: Path, port: int, params: dict[str, Any]) -> None:
    log("bare paho loop")
    result["bare"] = {f"qos{qos}": run_bare(port, params["bare_n"][qos], qos) for qos in (0, 1)}
    bare_us = result["bare"]["qos0"]["cpu_us_per_publish"]
    result["sustained"] = []
    for n in params["sustained_n"] + params["sustained_more"]:
        if n in params["sustained_more"]:
            prev = result["sustained"][-1]
            if prev["delivered_pct"] < 99.5 or prev["missed_ticks"] > 0:
                log(f"stopping the sustained ladder: {prev['entries']} did not keep up")
                break
        log(f"sustained {n} entries at 1 s")
        result["sustained"].append(
            scenario_sustained(work, port, n, params["warmup_s"], params["window_s"], bare_us)
        )
    log(f"idle / start-up / memory with {params['idle_n']} entries at 60 s")
    big = result["idle"] = scenario_idle_startup_memory(
        work, port, params["idle_n"], params["idle_settle_s"], params["idle_window_s"]
    )
    log(f"memory with {params['mem_small_n']} entries")
    small = scenario_memory_small(work, port, params["mem_small_n"], params["mem_settle_s"])
    result["memory"] = {
        "small_entries": small["entries"],
        "rss_small_kb": small["rss_kb"],
        "large_entries": big["entries"],
        "rss_large_kb": big["rss_kb"],
        "kb_per_entry": (big["rss_kb"] - small["rss_kb"]) / (big["entries"] - small["entries"]),
    }
    result["startup"] = {
        "entries": big["entries"],
        "seconds": big["startup_s"],
        "small_entries": small["entries"],
        "small_seconds": small["startup_s"],
    }
    log(f"reload in {params['reload_n']} entries at {params['reload_interval_s']} s")
    result["reload"] = scenario_reload(
        work,
        port,
        params["reload_n"],
        params["reload_interval_s"],
        params["reload_trials"],
        params["reload_phase_window_s"],
    )
    log(
        f"soak: {params['soak_n']} entries at {params['soak_interval_s']} s for {params['soak_s']:.0f} s"
    )
    result["soak"] = scenario_soak(
        work,
        port,
        params["soak_n"],
        params["soak_interval_s"],
        params["soak_s"],
        params["soak_sample_s"],
        params["soak_reload_s"],
    )


def run_shards(result: dict[str, Any], work: Path, port: int, params: dict[str, Any]) -> None:
    result["shards"] = scenario_shards(
        work,
        port,
        params["shard_n"],
        params["shard_processes"],
        params["shard_warmup_s"],
        params["shard_window_s"],
    )


def run_status_page(result: dict[str, Any], work: Path, port: int, params: dict[str, Any]) -> None:
    log(
        f"status page: {params['page_n']:,} entries at 1 s, {params['page_rounds']} open windows "
        f"of {params['page_window_s']:.0f} s, each between two closed ones"
    )
    result["status_page"] = scenario_status_page(
        work,
        port,
        params["page_n"],
        params["page_settle_s"],
        params["page_window_s"],
        params["page_rounds"],
    )


def machine() -> dict[str, Any]:
    return {
        "cpus": os.cpu_count(),
        "loadavg_at_start": os.getloadavg(),
        "python": sys.version.split()[0],
        "service_python": service_python(),
    }


def report(result: dict[str, Any], quick: bool, nr_skip: str | None) -> None:
    if nr_skip:
        print(f"Node-RED: skipped ({nr_skip})")
    rows: list[tuple[str, str, str, str]] = []
    if "compare" in result:
        print("\n".join(comparison_table(result["compare"])))
        print()
        rows += issue12_rows(result["compare"], result.get("loaded"), nr_skip, quick)
        rows += issue30_rows(result["compare"], nr_skip, quick)
        if "timer_floor" in result:
            rows.append(
                (
                    "this machine: a sleeping thread's wake-up lateness at 10 deadlines a second",
                    "(the floor under every p99; not a target)",
                    wake_cost.describe_lateness(result["timer_floor"]),
                    "info",
                )
            )
    if "soak" in result:
        rows += verdicts(result, quick)
        rows += issue30_own_rows(result, quick)
        soak = soak_row(result["soak"])
        rows.append(soak if not quick else (*soak[:3], "(quick)"))
    if "shards" in result:
        rows += shard_rows(result["shards"], quick)
    if "status_page" in result:
        rows += status_page_rows(result["status_page"], quick)
    result["table"] = [
        dict(zip(("figure", "target", "measured", "verdict"), r, strict=True)) for r in rows
    ]
    print_table(rows)
    if "template_cost" in result:
        print()
        template_cost.report(result["template_cost"])
    print(f"\nthe service ran under {result['machine']['service_python']}")
    print(
        f"{'quick mode: tiny N, verdicts not meaningful; ' if quick else ''}"
        f"elapsed {result['elapsed_s']:.0f} s, load average at start "
        f"{result['machine']['loadavg_at_start'][0]:.2f}, at end {result['machine']['loadavg_at_end'][0]:.2f}"
    )


def main() -> int:
    args = parse_args()
    if args.role != "main":
        getattr(roles, f"role_{args.role}")(args)
        return 0
    raise_nofile()
    if not (args.quick or args.dev_python):
        log(f"the service as a gateway installs it: the checkout's wheel in {RUNTIME_VENV}")
        use_service_python(runtime_python())
    params = make_params(args)
    started = time.time()
    result: dict[str, Any] = {
        "started_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(started)),
        "machine": machine(),
        "params": {
            k: ({str(kk): vv for kk, vv in v.items()} if isinstance(v, dict) else v)
            for k, v in params.items()
        },
    }
    nr_skip = prepare_node_red(args, result)
    if nr_skip:
        log(f"Node-RED: skipped ({nr_skip})")
    log("templated entry: payload cost per publish, next to a static one")
    result["template_cost"] = template_cost.measure(
        2_000 if args.quick else 20_000, 3 if args.quick else 5
    )
    if not (args.only_shards or args.only_status_page):
        log("this machine's floor: how late a sleeping thread wakes at its deadlines")
        result["timer_floor"] = wake_cost.lateness(1.0 if args.quick else 30.0, 0.1)
    work = Path(tempfile.mkdtemp(prefix="sp-bench-"))
    broker = Broker(work)
    broker.start()
    result["machine"]["mosquitto_port"] = broker.port
    try:
        only_one = args.only_compare or args.only_shards or args.only_status_page
        if not (args.only_shards or args.only_status_page):
            run_compare(result, work, broker.port, params, nr_skip)
        if not only_one:
            run_issue6(result, work, broker.port, params)
        if not (args.only_compare or args.only_status_page):
            run_shards(result, work, broker.port, params)
        if not (args.only_compare or args.only_shards):
            run_status_page(result, work, broker.port, params)
    finally:
        broker.stop()
        result["elapsed_s"] = time.time() - started
        result["machine"]["loadavg_at_end"] = os.getloadavg()
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2, default=str) + "\n")
        shutil.rmtree(work, ignore_errors=True)
    report(result, args.quick, nr_skip)
    args.out.write_text(json.dumps(result, indent=2, default=str) + "\n")
    print(f"JSON: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
