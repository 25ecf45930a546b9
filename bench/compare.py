# ruff: noqa: E501, RUF001
# (table rows are long and use a multiplication sign)
"""Issue 12: the service beside Node-RED and the bare scheduled paho loop, interleaved windows
at each size, the loaded-machine case, and which of the issue's targets are met."""

from __future__ import annotations

import math
import os
import statistics
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from common import Sub, log, proc_cpu_seconds, proc_rss_kb, steal_ms, verdict_word
from peers import Peer, Spinner, start_peer

FIGURES = (
    "cpu_us_per_msg",
    "cpu_pct_of_core",
    "rss_kb",
    "delivered_pct",
    "p50_ms",
    "p99_ms",
    "max_ms",
    "startup_s",
    "missed_ticks",
    "steal_ms",
)


LARGE_SIZE = 5_000  # issue 12: from here on, the target is the bare loop, not Node-RED


def loaded_size(sizes: tuple[int, ...]) -> int:
    """The size of the loaded-machine case: issue 12's 5,000 when it is compared, else the
    largest."""
    return LARGE_SIZE if LARGE_SIZE in sizes else max(sizes)


@dataclass(frozen=True)
class CompareParams:
    sizes: tuple[int, ...]
    peers: tuple[str, ...]
    rounds: int
    warmup_s: float
    window_s: float
    loaded_n: int
    startup_timeout_s: float = 120.0


def measure_peer(
    work: Path,
    port: int,
    sub: Sub,
    peer_name: str,
    n: int,
    prefix: str,
    p: CompareParams,
    *,
    started: Callable[[int], None] | None = None,
) -> dict[str, Any]:
    """One window of one peer: start it, wait until every topic arrived once (start-up), warm
    up, then count CPU over the window and ask the subscriber for delivery and period error.
    `started` is called with the peer's pid once it is publishing, before the warm-up (for an
    experiment that changes how the process is run)."""
    tag = f"{peer_name}-{n}-{uuid.uuid4().hex[:4]}"
    peer = start_peer(peer_name, work, port, n, prefix, tag)
    try:
        return _measure(peer, sub, n, prefix, p, started)
    finally:
        peer.stop()


def _measure(
    peer: Peer,
    sub: Sub,
    n: int,
    prefix: str,
    p: CompareParams,
    started: Callable[[int], None] | None,
) -> dict[str, Any]:
    seen = sub.wait_all_seen(n, p.startup_timeout_s, prefix=prefix + "/")
    peer.alive()
    if seen is None:
        raise RuntimeError(f"{peer.name}: not every topic seen within {p.startup_timeout_s} s")
    if started is not None:
        started(peer.pid)
    time.sleep(p.warmup_s)
    peer.alive()
    a, cpu0, steal0 = time.time(), proc_cpu_seconds(peer.pid), steal_ms()
    time.sleep(p.window_s)
    cpu1, b, steal1 = proc_cpu_seconds(peer.pid), time.time(), steal_ms()
    rss = proc_rss_kb(peer.pid)
    peer.alive()
    time.sleep(1.0)  # let the window's last messages arrive
    topics = [f"{prefix}/e{i:05d}" for i in range(n)]
    w = sub.ask(op="window", a=a, b=b, interval=1.0, topics=topics, slots=peer.phase_slots)
    cpu = cpu1 - cpu0
    pe = w["period_error_ms"]
    return {
        "peer": peer.name,
        "entries": n,
        "window_s": b - a,
        "startup_s": seen - peer.started_at,
        "cpu_s": cpu,
        "cpu_pct_of_core": 100 * cpu / (b - a),
        "cpu_us_per_msg": cpu * 1e6 / w["received"] if w["received"] else math.nan,
        "rss_kb": rss,
        "delivered_pct": w["delivered_pct"],
        "expected": w["expected"],
        "received": w["received"],
        "missed_ticks": w["missed_ticks"],
        "p50_ms": pe["p50"],
        "p99_ms": pe["p99"],
        "max_ms": pe["max"],
        "loadavg_1m": os.getloadavg()[0],
        "steal_ms": steal1 - steal0,  # the host's, over the window, both CPUs
    }


def scenario_compare(work: Path, port: int, p: CompareParams) -> dict[str, Any]:
    """Every size: rounds of one window per peer, the peers' order rotated every round so
    that none always runs first; one subscriber per size counts them all."""
    windows: list[dict[str, Any]] = []
    for n in p.sizes:
        prefix = f"bench/c{n}-{uuid.uuid4().hex[:6]}"
        sub = Sub(port, prefix)
        try:
            for r in range(p.rounds):
                order = p.peers[r % len(p.peers) :] + p.peers[: r % len(p.peers)]
                for name in order:
                    log(f"compare: {name}, {n:,} entries × 1 s, round {r + 1}/{p.rounds}")
                    windows.append(
                        measure_peer(work, port, sub, name, n, f"{prefix}/{name}-{r}", p)
                    )
        finally:
            sub.close()
    return {"windows": windows, "summary": summarise(windows)}


def summarise(windows: list[dict[str, Any]]) -> dict[str, dict[str, dict[str, Any]]]:
    """{entries: {peer: {figure: {median, min, max}}}} over the rounds."""
    out: dict[str, dict[str, dict[str, Any]]] = {}
    for w in windows:
        out.setdefault(str(w["entries"]), {}).setdefault(w["peer"], {"rounds": 0})["rounds"] += 1
    for n, peers in out.items():
        for peer, summary in peers.items():
            for fig in FIGURES:
                vals = [v for v in by_round(windows, int(n), peer, fig) if not math.isnan(v)]
                summary[fig] = (
                    {"median": statistics.median(vals), "min": min(vals), "max": max(vals)}
                    if vals
                    else None
                )
    return out


def scenario_loaded(work: Path, port: int, p: CompareParams) -> dict[str, Any]:
    """The service at the largest size while a spinning child process keeps one core busy."""
    n = p.loaded_n
    prefix = f"bench/l{n}-{uuid.uuid4().hex[:6]}"
    sub = Sub(port, prefix)
    # bounded: start-up, warm-up, window and the tail, with margin; stopped early in `finally`
    spinner = Spinner(p.startup_timeout_s + p.warmup_s + p.window_s + 30)
    try:
        log(f"loaded: service, {n:,} entries × 1 s, one core kept busy")
        t0, c0 = time.time(), proc_cpu_seconds(spinner.pid)
        res = measure_peer(work, port, sub, "service", n, f"{prefix}/service", p)
        # proof that the core really was busy throughout
        res["spinner_cpu_pct_of_core"] = (
            100 * (proc_cpu_seconds(spinner.pid) - c0) / (time.time() - t0)
        )
        return res
    finally:
        spinner.stop()
        sub.close()


# ==== verdicts ======================================================================================
def _median(summary: dict[str, Any], n: int, peer: str, fig: str) -> float | None:
    s = summary.get(str(n), {}).get(peer, {}).get(fig)
    return None if s is None else float(s["median"])


def _f(x: float | None, spec: str = ".1f") -> str:
    return "n/a" if x is None or math.isnan(x) else format(x, spec)


def _mb(kb: float | None) -> float | None:
    return None if kb is None else kb / 1024


def _ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None or b == 0 else a / b


def by_round(windows: list[dict[str, Any]], n: int, peer: str, fig: str) -> list[float]:
    """One peer's figure at one size, window by window in the order of the rounds (a figure
    the window lacks, as results written before it was measured: none)."""
    return [float(w[fig]) for w in windows if w["entries"] == n and w["peer"] == peer and fig in w]


def _p99_rounds(windows: list[dict[str, Any]], n: int) -> str:
    """The service's p99 in each round beside the bare loop's in the same round: the loop does
    nothing but publish on the same grid, so a window that both miss shows the machine's noise.
    Then the host's steal in each of the service's windows: a window the host took the CPUs
    from is late for a reason outside every peer."""
    service, loop = (
        ", ".join(f"{v:.2f}" for v in by_round(windows, n, peer, "p99_ms"))
        for peer in ("service", "loop")
    )
    steal = ", ".join(f"{v:.0f}" for v in by_round(windows, n, "service", "steal_ms"))
    return (
        f"; by round: service {service}"
        + (f", bare loop {loop}" if loop else "")
        + (f"; host steal in the service's windows {steal} ms" if steal else "")
    )


def _rows_small(
    summary: dict[str, Any], windows: list[dict[str, Any]], n: int, nr_skip: str | None
) -> list[tuple[str, str, str, str]]:
    svc_cpu, nr_cpu = (
        _median(summary, n, "service", "cpu_us_per_msg"),
        _median(summary, n, "node-red", "cpu_us_per_msg"),
    )
    svc_rss, nr_rss = (
        _median(summary, n, "service", "rss_kb"),
        _median(summary, n, "node-red", "rss_kb"),
    )
    svc_p99, nr_p99 = (
        _median(summary, n, "service", "p99_ms"),
        _median(summary, n, "node-red", "p99_ms"),
    )
    delivered = _median(summary, n, "service", "delivered_pct")
    cpu_ratio, rss_ratio = _ratio(svc_cpu, nr_cpu), _ratio(svc_rss, nr_rss)
    skipped = f"skipped: {nr_skip}" if nr_skip else None
    p99_ok = None if svc_p99 is None else svc_p99 <= 5 and (nr_p99 is None or svc_p99 <= nr_p99)
    return [
        (
            f"{n:,} × 1 s: CPU per delivered message",
            "≤ Node-RED's, same run",
            f"{_f(svc_cpu)} µs vs {_f(nr_cpu)} µs = {_f(cpu_ratio, '.2f')}×",
            skipped or verdict_word(None if cpu_ratio is None else cpu_ratio <= 1),
        ),
        (
            f"{n:,} × 1 s: RSS",
            "≤ 40 % of Node-RED's",
            f"{_f(_mb(svc_rss))} MB vs {_f(_mb(nr_rss))} MB = {_f(rss_ratio and 100 * rss_ratio, '.0f')} %",
            skipped or verdict_word(None if rss_ratio is None else rss_ratio <= 0.4),
        ),
        (
            f"{n:,} × 1 s: p99 period error",
            "≤ Node-RED's and ≤ 5 ms",
            f"{_f(svc_p99, '.2f')} ms vs {_f(nr_p99, '.2f')} ms{_p99_rounds(windows, n)}",
            verdict_word(p99_ok) + (" (≤ 5 ms only: Node-RED skipped)" if nr_skip else ""),
        ),
        (
            f"{n:,} × 1 s: delivered",
            "≥ 99.5 %",
            f"{_f(delivered, '.2f')} %",
            verdict_word(None if delivered is None else delivered >= 99.5),
        ),
        *_rows_opt_in(summary, n, nr_cpu),
    ]


def _rows_opt_in(
    summary: dict[str, Any], n: int, nr_cpu: float | None
) -> list[tuple[str, str, str, str]]:
    """`--phase-slots 100` (the spread before auto became the default) beside Node-RED:
    shown, not a target."""
    few = _median(summary, n, "service-100-slots", "cpu_us_per_msg")
    if few is None:
        return []
    p99 = _median(summary, n, "service-100-slots", "p99_ms")
    return [
        (
            f"{n:,} × 1 s, --phase-slots 100: CPU per message",
            "(not a target)",
            f"{_f(few)} µs vs Node-RED's {_f(nr_cpu)} µs = {_f(_ratio(few, nr_cpu), '.2f')}×; "
            f"p99 {_f(p99, '.2f')} ms",
            "info",
        )
    ]


def _rows_large(
    summary: dict[str, Any], n: int, loaded: dict[str, Any] | None
) -> list[tuple[str, str, str, str]]:
    svc_cpu, loop_cpu = (
        _median(summary, n, "service", "cpu_us_per_msg"),
        _median(summary, n, "loop", "cpu_us_per_msg"),
    )
    svc_p99 = _median(summary, n, "service", "p99_ms")
    ratio = _ratio(svc_cpu, loop_cpu)
    rows = [
        (
            f"{n:,} × 1 s: CPU per message",
            "≤ 1.0× the bare loop's, same run",
            f"{_f(svc_cpu)} µs vs {_f(loop_cpu)} µs = {_f(ratio, '.2f')}×",
            verdict_word(None if ratio is None else ratio <= 1),
        ),
        (
            f"{n:,} × 1 s: p99 period error",
            "≤ 20 ms",
            f"{_f(svc_p99, '.2f')} ms",
            verdict_word(None if svc_p99 is None else svc_p99 <= 20),
        ),
    ]
    if loaded is not None:
        ok = loaded["p99_ms"] <= 50 and loaded["missed_ticks"] == 0
        rows.append(
            (
                f"{loaded['entries']:,} × 1 s, one core busy",
                "p99 ≤ 50 ms, nothing missed",
                f"p99 {_f(loaded['p99_ms'], '.2f')} ms, max {_f(loaded['max_ms'], '.1f')} ms, "
                f"{loaded['missed_ticks']:,} missed, {_f(loaded['delivered_pct'], '.2f')} % delivered",
                verdict_word(ok),
            )
        )
    return rows


def issue12_rows(
    compare: dict[str, Any], loaded: dict[str, Any] | None, nr_skip: str | None, quick: bool
) -> list[tuple[str, str, str, str]]:
    """The issue's targets: the smaller sizes against Node-RED, the largest against the bare
    loop and on a loaded machine."""
    summary = compare["summary"]
    sizes = sorted(int(n) for n in summary)
    # 5,000 and up against the bare loop (issue 30 added 10,000), else the largest size
    large = [n for n in sizes if n >= LARGE_SIZE] or sizes[-1:]
    small = [n for n in sizes if n not in large]
    rows = [r for n in small for r in _rows_small(summary, compare["windows"], n, nr_skip)]
    for n in large:
        rows += _rows_large(summary, n, loaded if n == large[-1] else None)
    if quick:
        rows = [(a, b, c, "(quick)" if d in ("met", "MISSED") else d) for a, b, c, d in rows]
    return rows


def issue30_rows(
    compare: dict[str, Any], nr_skip: str | None, quick: bool
) -> list[tuple[str, str, str, str]]:
    """Issue 30's targets, at every size against Node-RED in the same run: CPU per delivered
    message ≤ 0.5 times and RSS ≤ 30 % of Node-RED's, p99 ≤ Node-RED's and ≤ 5 ms up to 1,000
    entries (≤ 20 ms above), ≥ 99.5 % delivered."""
    summary = compare["summary"]
    rows = [r for n in sorted(int(n) for n in summary) for r in _rows_issue30(summary, n, nr_skip)]
    if quick:
        rows = [(a, b, c, "(quick)" if d in ("met", "MISSED") else d) for a, b, c, d in rows]
    return rows


def _rows_issue30(
    summary: dict[str, Any], n: int, nr_skip: str | None
) -> list[tuple[str, str, str, str]]:
    def both(fig: str) -> tuple[float | None, float | None]:
        return _median(summary, n, "service", fig), _median(summary, n, "node-red", fig)

    (svc_cpu, nr_cpu), (svc_rss, nr_rss), (svc_p99, nr_p99) = (
        both("cpu_us_per_msg"),
        both("rss_kb"),
        both("p99_ms"),
    )
    delivered = _median(summary, n, "service", "delivered_pct")
    cpu_ratio, rss_ratio = _ratio(svc_cpu, nr_cpu), _ratio(svc_rss, nr_rss)
    limit = 5 if n <= 1_000 else 20
    p99_ok = None if svc_p99 is None else svc_p99 <= limit and (nr_p99 is None or svc_p99 <= nr_p99)
    skipped = f"skipped: {nr_skip}" if nr_skip else None
    return [
        (
            f"issue 30, {n:,} × 1 s: CPU per delivered message",
            "≤ 0.5× Node-RED's, same run",
            f"{_f(svc_cpu)} µs vs {_f(nr_cpu)} µs = {_f(cpu_ratio, '.2f')}×",
            skipped or verdict_word(None if cpu_ratio is None else cpu_ratio <= 0.5),
        ),
        (
            f"issue 30, {n:,} × 1 s: RSS",
            "≤ 30 % of Node-RED's",
            f"{_f(_mb(svc_rss))} MB vs {_f(_mb(nr_rss))} MB = {_f(rss_ratio and 100 * rss_ratio, '.0f')} %",
            skipped or verdict_word(None if rss_ratio is None else rss_ratio <= 0.3),
        ),
        (
            f"issue 30, {n:,} × 1 s: p99 period error",
            f"≤ Node-RED's and ≤ {limit} ms",
            f"{_f(svc_p99, '.2f')} ms vs {_f(nr_p99, '.2f')} ms",
            verdict_word(p99_ok) + (f" (≤ {limit} ms only: Node-RED skipped)" if nr_skip else ""),
        ),
        (
            f"issue 30, {n:,} × 1 s: delivered",
            "≥ 99.5 %",
            f"{_f(delivered, '.2f')} %",
            verdict_word(None if delivered is None else delivered >= 99.5),
        ),
    ]


def _cell(s: dict[str, Any] | None, spec: str, scale: float = 1.0) -> str:
    if s is None:
        return "n/a"
    lo, med, hi = (s[k] * scale for k in ("min", "median", "max"))
    if lo == hi:
        return format(med, spec)
    return f"{format(med, spec)} ({format(lo, spec)}-{format(hi, spec)})"


def comparison_table(compare: dict[str, Any]) -> list[str]:
    """Markdown: one row per size and peer; median over the rounds (min-max in brackets)."""
    lines = [
        "| entries × 1 s | peer | CPU µs per delivered msg | % of a core | RSS MB | "
        "delivered % | period error p50 / p99 / max ms | start-up s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for n, peers in sorted(compare["summary"].items(), key=lambda kv: int(kv[0])):
        for peer, s in peers.items():
            lines.append(
                f"| {int(n):,} | {peer} | {_cell(s['cpu_us_per_msg'], '.1f')} | "
                f"{_cell(s['cpu_pct_of_core'], '.2f')} | {_cell(s['rss_kb'], '.1f', 1 / 1024)} | "
                f"{_cell(s['delivered_pct'], '.2f')} | {_cell(s['p50_ms'], '.2f')} / "
                f"{_cell(s['p99_ms'], '.2f')} / {_cell(s['max_ms'], '.1f')} | "
                f"{_cell(s['startup_s'], '.2f')} |"
            )
    return lines
