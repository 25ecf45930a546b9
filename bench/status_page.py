"""Issue 28: what an open status page costs the service at 10,000 entries.

The service runs N entries at 1 s, QoS 0, with its default settings (HTTP on, as a gateway
runs it). Its CPU (utime + stime from `/proc/<pid>/stat`, all threads) is read over windows
with no page open and windows with one open, alternated and closed at both ends (closed, open,
closed, ..., open, closed). "Open" is a client that polls exactly as
`scheduler_publisher/ops/web/page.js` does: `GET status?offset=0&limit=50&sort=id&order=asc`
(the page's first view), then the next one 2 s after the answer came. Each open window is
compared with the mean of the closed windows on either side of it, so that the machine's drift
(other work on a shared machine) falls on both alike; the figure is the median of those
differences, in % of one core. On a shared machine that difference is within the noise of
the windows once the page is cheap, so a last window also polls back to back (the next request
as soon as an answer came): its CPU above the closed median, per request, is what one poll
costs (`cpu_ms_per_poll`), and that per 2 s is the page's cost read another way.
"""

from __future__ import annotations

import http.client
import json
import os
import statistics
import threading
import time
import uuid
from pathlib import Path
from typing import Any

from common import Service, make_entries, proc_cpu_seconds, verdict_word

TARGET_PCT_OF_CORE = 1.0
POLL_S = 2.0  # page.js POLL_MS
PAGE_QUERY = "/status?offset=0&limit=50&sort=id&order=asc"  # page.js query(), first view


class PagePoller:
    """One open status page: a thread that polls as page.js does until stopped."""

    def __init__(self, port: int, period: float = POLL_S) -> None:
        self.port = port
        self.period = period
        self.polls = 0
        self.failures = 0
        self.seconds: list[float] = []  # each answer's wall time, request to parsed body
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="page-poller", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            started = time.monotonic()
            try:
                self._poll()
                self.seconds.append(time.monotonic() - started)
            except (OSError, http.client.HTTPException, ValueError, KeyError):
                self.failures += 1  # the page shows an error and polls on
            self.polls += 1
            self._stop.wait(self.period)  # page.js: setTimeout(poll, POLL_MS) after the answer

    def _poll(self) -> None:
        # One connection per request: the server answers HTTP/1.0 and closes.
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
        try:
            conn.request("GET", PAGE_QUERY, headers={"Cache-Control": "no-store"})
            reply = conn.getresponse()
            body = json.loads(reply.read())
            if reply.status != 200 or len(body["page"]["ids"]) != 50:
                raise ValueError(f"unexpected answer {reply.status}")
        finally:
            conn.close()

    def close(self) -> None:
        self._stop.set()
        self._thread.join(35)


def scenario_status_page(
    work: Path, port: int, n: int, settle: float, window: float, rounds: int
) -> dict[str, Any]:
    """n entries at 1 s; `rounds` windows with an open page, each between two without; then
    one window polling back to back."""
    prefix = f"bench/page{n}-{uuid.uuid4().hex[:6]}"
    svc = Service(work, port, make_entries(n, 1.0, prefix), f"page-{n}", defaults=True)
    try:
        wait_published_once(svc, n, 120)
        time.sleep(settle)
        closed = [cpu_pct(svc, window)]
        opened: list[dict[str, Any]] = []
        for _ in range(rounds):
            poller = PagePoller(svc.http_port)
            try:
                pct = cpu_pct(svc, window)
            finally:
                poller.close()
            opened.append(poll_figures(pct, poller))
            closed.append(cpu_pct(svc, window))
        burst = PagePoller(svc.http_port, period=0)
        try:
            burst_pct = cpu_pct(svc, window)
        finally:
            burst.close()
        per_poll = per_poll_ms(burst_pct - statistics.median(closed), window, burst.polls)
        return {**summary(n, window, closed, opened), "cpu_ms_per_poll": per_poll}
    finally:
        svc.stop()


def wait_published_once(svc: Service, n: int, timeout: float) -> None:
    """Until the service has published every entry once (asked through a 1-entry page)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        svc.alive()
        try:
            conn = http.client.HTTPConnection("127.0.0.1", svc.http_port, timeout=30)
            conn.request("GET", "/status?limit=1")
            status = json.loads(conn.getresponse().read())
            conn.close()
            if status["statistics"]["published_this_run"] >= n:
                return
        except (OSError, http.client.HTTPException, ValueError, KeyError):
            pass  # not listening yet
        time.sleep(0.5)  # polling a condition against a deadline
    raise RuntimeError(f"the service did not publish its {n} entries within {timeout} s")


def cpu_pct(svc: Service, window: float) -> float:
    a = time.monotonic()
    cpu0 = proc_cpu_seconds(svc.pid)
    time.sleep(window)
    cpu1 = proc_cpu_seconds(svc.pid)
    b = time.monotonic()
    svc.alive()
    return 100 * (cpu1 - cpu0) / (b - a)


def per_poll_ms(extra_pct: float, window: float, polls: int) -> float:
    """CPU milliseconds per poll from a back-to-back window's CPU above the closed median."""
    return 10 * extra_pct * window / max(polls, 1)


def poll_figures(pct: float, poller: PagePoller) -> dict[str, Any]:
    answered = sorted(poller.seconds)
    return {
        "cpu_pct_of_core": pct,
        "polls": poller.polls,
        "failed_polls": poller.failures,
        "answer_ms_median": 1000 * statistics.median(answered) if answered else None,
    }


def summary(
    n: int, window: float, closed: list[float], opened: list[dict[str, Any]]
) -> dict[str, Any]:
    """`closed` has one window more than `opened`: one before and one after each open one."""
    costs = [
        w["cpu_pct_of_core"] - (before + after) / 2
        for w, before, after in zip(opened, closed, closed[1:], strict=False)
    ]
    return {
        "entries": n,
        "interval_s": 1.0,
        "qos": 0,
        "query": PAGE_QUERY,
        "poll_s": POLL_S,
        "window_s": window,
        "closed_cpu_pct_of_core": closed,
        "open_windows": opened,
        "closed_median_pct_of_core": statistics.median(closed),
        "open_median_pct_of_core": statistics.median(w["cpu_pct_of_core"] for w in opened),
        "open_page_costs_pct_of_core": costs,
        "open_page_cost_pct_of_core": statistics.median(costs),
        "loadavg_1m": os.getloadavg()[0],
    }


def status_page_rows(result: dict[str, Any], quick: bool) -> list[tuple[str, str, str, str]]:
    cost = result["open_page_cost_pct_of_core"]
    polls = sum(w["polls"] for w in result["open_windows"])
    failed = sum(w["failed_polls"] for w in result["open_windows"])
    measured = (
        f"{cost:+.2f} % of a core ({result['closed_median_pct_of_core']:.1f} % closed, "
        f"{result['open_median_pct_of_core']:.1f} % open; {polls} polls, {failed} failed)"
    )
    per_poll = result["cpu_ms_per_poll"]
    period = result["poll_s"]
    measured += (
        f"; back to back: {per_poll:.2f} ms of CPU per poll, "
        f"{per_poll / (10 * period):.2f} % of a core at one poll per {period:g} s"
    )
    ok = cost <= TARGET_PCT_OF_CORE and failed == 0
    return [
        (
            f"status page open at {result['entries']:,} entries x 1 s",
            f"≤ {TARGET_PCT_OF_CORE:g} % of a core more than with no page open",
            measured,
            "(quick)" if quick else verdict_word(ok),
        )
    ]
