#!/usr/bin/env python3
"""Where the late phase groups are late: in the service, or after it.

    .venv/bin/python bench/experiments/late_groups.py [--entries 100] [--seconds 120]

Measurement only. Runs the service's CLI with its default settings at `--entries` x 1 s,
traced: each phase group's due time, when the group's run started and ended, and when each
`send()` of the main connection returned. A C subscriber (`mosquitto_sub`) stamps every
arrival. Each group whose last message arrived more than LATE_MS after the median group's
last arrival is put down to one of:

- "woke late": the group's run started late (the network thread's wake-up);
- "ran long": it started on time, and its last send left late (the run or its sends were
  held up inside the service);
- "after the service": its last send left on time and its messages still arrived late (the
  broker or the subscriber).

A group late for more than one reason is counted under the first that applies. A group late
by this much moves the period error of every entry in it, so at 100 entries in one group a
single late group in a 30 s window puts that window's p99 over the target (docs/design.md,
"Where a late group is late").

It then splits the p99 period error of each 30 s window (WINDOW) between the two legs a
message travels. A group's period is the time between its last message one second and the
next; it is the sum of the change in the service's leg (due time to the group's last send) and
the change in the leg after it (last send to last arrival: the broker and the subscriber). The
p99 of each leg on its own is the period error a subscriber would have seen if the other leg
had been perfectly steady: the after-the-service figure is what a publisher that always sent
on time would get here.

Meanwhile a thread of this process reads the host's steal (`/proc/stat`) every STEAL_SAMPLE_S,
and each group is checked for steal recorded within STEAL_MARGIN_S of it, from before its due
time to after its last arrival. The share of late groups with steal beside it, against the
share of the groups on time, says how many late groups the hypervisor explains (docs/design.md,
"Host steal in the windows").
"""

from __future__ import annotations

import argparse
import atexit
import bisect
import json
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # bench/: the shared harness

from common import Broker, Service, make_entries, pct, steal_ms

LATE_MS = 3.0  # beyond the median group's last arrival
WOKE_LATE_MS = 2.0  # a run that starts this much after the due time woke late
WARM_UP = 6.0  # seconds: the connect and its birth burst are not measured
WINDOW = 30.0  # seconds: as the benchmark's comparison windows
INTERVAL = 1.0  # every entry's interval, seconds
STEAL_SAMPLE_S = 0.005  # how often the host's steal is read
# /proc/stat counts steal in 10 ms ticks, so a pause shows at the first read after a tick ends
STEAL_MARGIN_S = 0.015


@dataclass(frozen=True, slots=True)
class Group:
    """One phase group as the service ran it and the subscriber saw it; ms after its due
    time."""

    due: float  # wall clock
    started_ms: float
    ended_ms: float
    last_send_ms: float
    first_arrival_ms: float
    last_arrival_ms: float


def trace_service(out: Path, cli_args: list[str]) -> None:
    """Run as the service process: the CLI, with its groups and sends recorded to `out` at
    exit. Wraps the executor's `run_group` and the client's `_sock_send`, nothing else."""
    from scheduler_publisher.cli.main import main  # noqa: PLC0415
    from scheduler_publisher.mqtt import client  # noqa: PLC0415
    from scheduler_publisher.scheduling import executor  # noqa: PLC0415

    groups: list[tuple[float, float, float, int]] = []
    sends: list[float] = []
    run_group = executor.InlineExecutor.run_group
    sock_send = client.ResetAwareClient._sock_send

    def traced_run_group(
        self: executor.InlineExecutor,
        jobs: list[Any],
        run_times: list[Any],
        missed: int,
        wanted: int,
    ) -> list[Any]:
        started = time.time()
        refused = run_group(self, jobs, run_times, missed, wanted)
        groups.append((run_times[-1].timestamp(), started, time.time(), len(jobs)))
        return refused

    def traced_send(self: client.ResetAwareClient, buf: bytes | bytearray) -> int:
        sent = sock_send(self, buf)
        sends.append(time.time())
        return sent

    executor.InlineExecutor.run_group = traced_run_group  # type: ignore[method-assign]
    client.ResetAwareClient._sock_send = traced_send  # type: ignore[method-assign]
    atexit.register(lambda: out.write_text(json.dumps({"groups": groups, "sends": sends})))
    sys.argv = [sys.argv[0], *cli_args]
    main()


def explain(
    groups: list[tuple[float, float, float, int]],
    sends: list[float],
    arrivals: list[float],
    smallest: int,
) -> list[Group]:
    """Match each traced group of at least `smallest` jobs with its sends (until its last
    arrival) and its arrivals (until the next group's due time)."""
    groups = sorted(g for g in groups if g[3] >= smallest)
    dues = [g[0] for g in groups]
    by_group: dict[int, list[float]] = {}
    for t in arrivals:
        i = bisect.bisect_right(dues, t) - 1
        if i >= 0:
            by_group.setdefault(i, []).append(t)
    found = []
    for i, (due, started, ended, _size) in enumerate(groups):
        seen = by_group.get(i)
        if not seen:
            continue
        last = max(seen)
        sent = sends[bisect.bisect_left(sends, started) : bisect.bisect_right(sends, last)]
        if not sent:
            continue
        found.append(
            Group(
                due,
                (started - due) * 1e3,
                (ended - due) * 1e3,
                (sent[-1] - due) * 1e3,
                (min(seen) - due) * 1e3,
                (last - due) * 1e3,
            )
        )
    return found


def classify(groups: list[Group]) -> dict[str, list[Group]]:
    """The late groups by where they were late (see the module's docstring)."""
    causes: dict[str, list[Group]] = {"woke late": [], "ran long": [], "after the service": []}
    if not groups:
        return causes
    arrival = statistics.median(g.last_arrival_ms for g in groups)
    start = statistics.median(g.started_ms for g in groups)
    send = statistics.median(g.last_send_ms for g in groups)
    for g in groups:
        if g.last_arrival_ms <= arrival + LATE_MS:
            continue
        if g.started_ms > start + WOKE_LATE_MS:
            causes["woke late"].append(g)
        elif g.last_send_ms > send + LATE_MS:
            causes["ran long"].append(g)
        else:
            causes["after the service"].append(g)
    return causes


class StealSampler:
    """The host's steal (ms, both CPUs), read every STEAL_SAMPLE_S by a thread of this process
    while in the `with` block: each increase, stamped with the wall clock of the read that saw
    it."""

    def __init__(self) -> None:
        self.increases: list[tuple[float, float]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="steal-sampler", daemon=True)

    def __enter__(self) -> StealSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        last = steal_ms()
        while not self._stop.wait(STEAL_SAMPLE_S):
            now = steal_ms()
            if now > last:
                self.increases.append((time.time(), now - last))
            last = now


def stolen_around(g: Group, increases: list[tuple[float, float]]) -> float:
    """The host's steal (ms) recorded from STEAL_MARGIN_S before the group's due time to
    STEAL_MARGIN_S after its last arrival. `increases`: (wall clock, ms), in time order."""
    times = [t for t, _ms in increases]
    lo = bisect.bisect_left(times, g.due - STEAL_MARGIN_S)
    hi = bisect.bisect_right(times, g.due + g.last_arrival_ms / 1e3 + STEAL_MARGIN_S)
    return sum(ms for _t, ms in increases[lo:hi])


def steal_shares(
    groups: list[Group],
    increases: list[tuple[float, float]],
) -> tuple[tuple[int, int], tuple[int, int]]:
    """(late groups with steal around them, late groups), (the same for the groups on time);
    late as in `classify`."""
    late = {g for found in classify(groups).values() for g in found}
    stolen = {g for g in groups if stolen_around(g, increases) > 0}
    on_time = [g for g in groups if g not in late]
    return (len(late & stolen), len(late)), (sum(g in stolen for g in on_time), len(on_time))


@dataclass(frozen=True, slots=True)
class Legs:
    """p99 period error (ms) of one window: measured per entry from the subscriber's stamps,
    and of each group's last message, whole and split between the two legs."""

    start: float  # wall clock
    per_entry: float
    last_message: float
    service_leg: float
    after_leg: float


def legs(groups: list[Group], periods: dict[float, list[float]], window: float) -> list[Legs]:
    """Each whole `window` from the first group on. `periods` are the entries' measured
    period errors (ms) by the arrival that ends them."""
    following = {round(g.due * 1e3): g for g in groups}
    pairs: list[tuple[float, float, float, float]] = []
    for g in groups:
        nxt = following.get(round((g.due + INTERVAL) * 1e3))
        if nxt is not None:
            sent = nxt.last_send_ms - g.last_send_ms
            whole = nxt.last_arrival_ms - g.last_arrival_ms
            pairs.append((nxt.due, abs(whole), abs(sent), abs(whole - sent)))
    found: list[Legs] = []
    if not pairs:
        return found
    start = min(g.due for g in groups)
    last_period_end = max(p[0] for p in pairs)
    while start + window <= last_period_end + INTERVAL:
        inside = [p for p in pairs if start <= p[0] < start + window]
        errors = [e for t, es in periods.items() if start <= t < start + window for e in es]
        if inside:
            found.append(
                Legs(start, pct(errors, 99), *(pct([p[i] for p in inside], 99) for i in (1, 2, 3)))
            )
        start += window
    return found


def period_errors(arrivals: list[tuple[float, str]]) -> dict[float, list[float]]:
    """Each entry's period errors (ms), filed under the second its period ended in."""
    last: dict[str, float] = {}
    errors: dict[float, list[float]] = {}
    for t, topic in sorted(arrivals):
        before = last.get(topic)
        if before is not None:
            errors.setdefault(float(int(t)), []).append(abs(t - before - INTERVAL) * 1e3)
        last[topic] = t
    return errors


def measure(
    entries: int,
    seconds: float,
) -> tuple[list[Group], list[Legs], list[tuple[float, float]]]:
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        broker = Broker(work)
        broker.start()
        prefix = f"bench/late/{uuid.uuid4().hex[:6]}"
        stamps = work / "arrivals.txt"  # not in the config's folder, which the watcher follows
        trace = work / "trace.json"
        with stamps.open("w") as sink:
            sub = subprocess.Popen(
                ["mosquitto_sub", "-p", str(broker.port), "-t", f"{prefix}/#", "-F", "%U %t"],
                stdout=sink,
            )
            service = _TracedService(
                work,
                broker.port,
                make_entries(entries, 1.0, prefix),
                "traced",
                defaults=True,
                trace=trace,
            )
            try:
                time.sleep(WARM_UP)
                with StealSampler() as steal:
                    begin = time.time()
                    time.sleep(seconds)
                    end = time.time()
            finally:
                service.stop()
                sub.terminate()
                sub.wait(5)
                broker.stop()
        recorded = json.loads(trace.read_text())
        stamped = [
            (float(t), topic)
            for t, topic in (line.split(" ", 1) for line in stamps.read_text().splitlines())
        ]
        arrivals = [t for t, _topic in stamped if begin <= t < end + 1.0]
        groups = [tuple(g) for g in recorded["groups"] if begin <= g[0] < end]
        found = explain(groups, recorded["sends"], arrivals, smallest=max(1, entries // 200))
        # periods that end inside the measured span (the first one starts in the warm-up)
        errors = period_errors([(t, topic) for t, topic in stamped if t < end + 1.0])
        periods = {t: e for t, e in errors.items() if begin + INTERVAL <= t}
        return found, legs(found, periods, WINDOW), steal.increases


class _TracedService(Service):
    """The CLI with default settings, started through `trace_service`."""

    def __init__(self, *args: Any, trace: Path, **kwargs: Any) -> None:
        self._trace = trace
        super().__init__(*args, **kwargs)

    def _default_cmd(self, workdir: Path, port: int, name: str) -> list[str]:
        python, _m, _module, *args = super()._default_cmd(workdir, port, name)
        return [python, __file__, "--trace", str(self._trace), "--", *args]


def report_legs(windows: list[Legs]) -> None:
    print(
        f"p99 period error in each {WINDOW:g} s window (ms): per entry | the groups' last "
        "message | from the service's leg alone | from the leg after the service alone"
    )
    for w in windows:
        print(
            f"  {w.per_entry:6.2f} | {w.last_message:6.2f} | {w.service_leg:6.2f} | "
            f"{w.after_leg:6.2f}"
        )


def report(groups: list[Group], seconds: float, increases: list[tuple[float, float]]) -> None:
    if not groups:
        print("no phase group was seen")
        return
    med = {
        name: statistics.median(getattr(g, name) for g in groups)
        for name in (
            "started_ms",
            "ended_ms",
            "last_send_ms",
            "first_arrival_ms",
            "last_arrival_ms",
        )
    }
    print(
        f"{len(groups)} phase groups in {seconds:g} s; medians after the due time: "
        f"run started {med['started_ms']:.2f} ms, ended {med['ended_ms']:.2f} ms, last send "
        f"{med['last_send_ms']:.2f} ms, first arrival {med['first_arrival_ms']:.2f} ms, last "
        f"arrival {med['last_arrival_ms']:.2f} ms"
    )
    causes = classify(groups)
    late = sum(len(v) for v in causes.values())
    print(
        f"late groups (last arrival > median + {LATE_MS:g} ms): {late} of {len(groups)}: "
        + ", ".join(f"{name} {len(v)}" for name, v in causes.items())
    )
    for name, late_groups in causes.items():
        for g in late_groups:
            print(
                f"  {name:17s} started {g.started_ms:6.2f}  ended {g.ended_ms:6.2f}  last send "
                f"{g.last_send_ms:6.2f}  arrivals {g.first_arrival_ms:6.2f}-"
                f"{g.last_arrival_ms:6.2f} ms  host steal {stolen_around(g, increases):.0f} ms"
            )
    (late_stolen, late_n), (on_time_stolen, on_time_n) = steal_shares(groups, increases)
    print(
        f"host steal within {STEAL_MARGIN_S * 1e3:g} ms of the group "
        f"({sum(ms for _t, ms in increases):.0f} ms in all): late groups {late_stolen} of "
        f"{late_n}, groups on time {on_time_stolen} of {on_time_n}"
    )


def main() -> None:
    if "--trace" in sys.argv:  # the service process
        at = sys.argv.index("--trace")
        trace_service(Path(sys.argv[at + 1]), sys.argv[at + 3 :])
        return
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--entries", type=int, default=100)
    parser.add_argument("--seconds", type=float, default=120.0)
    args = parser.parse_args()
    groups, windows, increases = measure(args.entries, args.seconds)
    report(groups, args.seconds, increases)
    report_legs(windows)


if __name__ == "__main__":
    main()
