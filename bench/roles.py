# ruff: noqa: E501
# (lines moved from run.py are long)
"""The benchmark's helper processes, each run as `bench/run.py --role NAME` so that its CPU
and memory are its own: the bare paho ceiling, the bare scheduled loop, the counting
subscriber and the CPU spinner of the loaded-machine case."""

from __future__ import annotations

import argparse
import bisect
import itertools
import json
import math
import resource
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterable
from typing import Any

from common import GRID_ANCHOR, grid_offset, make_entries, payload_for, pct, proc_cpu_seconds

from scheduler_publisher.scheduling.spread import auto_slots


# ==== role: bare paho loop (own process, so its CPU is its own) ===================================
def role_bare(args: argparse.Namespace) -> None:
    import paho.mqtt.client as mqtt  # noqa: PLC0415
    from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion  # noqa: PLC0415

    connected = threading.Event()
    client = mqtt.Client(
        CallbackAPIVersion.VERSION2,
        client_id=f"bench-bare-{uuid.uuid4().hex[:8]}",
        protocol=MQTTProtocolVersion.MQTTv5,
    )  # the service's default protocol
    client.max_inflight_messages_set(100)  # the service's default
    client.max_queued_messages_set(0)
    client.on_connect = lambda *_a: connected.set()
    client.connect("127.0.0.1", args.port, keepalive=30)
    client.loop_start()
    if not connected.wait(10):
        raise SystemExit("bare: no CONNACK")
    payload = payload_for(0)
    topic = f"bench/bare/{uuid.uuid4().hex[:6]}"
    # warm-up, not measured
    for _ in range(min(1000, args.n)):
        info = client.publish(topic, payload, qos=args.qos)
    info.wait_for_publish(30)
    c0, w0 = time.process_time(), time.perf_counter()
    for _ in range(args.n):
        info = client.publish(topic, payload, qos=args.qos)
    info.wait_for_publish(120)  # QoS 0: written to the socket; QoS 1: PUBACK received
    w1, c1 = time.perf_counter(), time.process_time()
    ru = resource.getrusage(resource.RUSAGE_SELF)
    client.disconnect()
    client.loop_stop()
    print(
        json.dumps(
            {
                "n": args.n,
                "qos": args.qos,
                "wall_s": w1 - w0,
                "cpu_s": c1 - c0,
                "publishes_per_s": args.n / (w1 - w0),
                "cpu_us_per_publish": (c1 - c0) * 1e6 / args.n,
                "max_rss_kb": ru.ru_maxrss,
                "payload_bytes": len(payload),
            }
        )
    )


# ==== role: subscriber (own process) ================================================================
PROBE = ".probe"  # the topic under the prefix that shows the subscription is in place


def role_sub(args: argparse.Namespace) -> None:
    """Counts every message under the prefix with its arrival time, and answers JSON commands on
    stdin, one per line, with one JSON line on stdout.

    The arrivals are stamped by a C subscriber, `mosquitto_sub -F "%U %t %x"`, when its
    callback gets the message (CLOCK_REALTIME, the clock of time.time()); this process only
    reads its lines. A Python subscriber stamped them itself before: it needs about 20 µs per
    message, so the last stamp of a 100-message group depended on how its own process was
    scheduled through the burst, and at 1,000 messages a second it took a tenth of one of
    the machine's two cores from the processes it measured (docs/design.md, "The measuring
    subscriber")."""
    arrivals = Arrivals(probe=f"{args.prefix}/{PROBE}")
    stamper = subprocess.Popen(
        [
            "mosquitto_sub",
            "-p",
            str(args.port),
            "-t",
            f"{args.prefix}/#",
            "-F",
            "%U %t %x",
            "-i",
            f"bench-sub-{uuid.uuid4().hex[:8]}",
        ],
        stdout=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
    )
    assert stamper.stdout is not None
    threading.Thread(target=arrivals.read, args=(stamper.stdout,), daemon=True).start()
    try:
        _wait_subscribed(args.port, arrivals, stamper)
        _reply({"ready": True})
        _answer_commands(arrivals, stamper)
    finally:
        stamper.terminate()
        stamper.wait(5)


class Arrivals:
    """Every arrival under the prefix, by topic, and each topic's payload changes. Filled by the
    thread that reads the stamper's lines; read by the command loop."""

    def __init__(self, probe: str) -> None:
        self._lock = threading.Lock()
        self._times: dict[str, list[float]] = {}
        self._last: dict[str, str] = {}  # each topic's latest payload, hex
        self._changes: dict[str, list[tuple[float, str]]] = {}
        self.probe = probe
        self.probed = threading.Event()

    def read(self, lines: Iterable[bytes]) -> None:
        for line in lines:
            self.add(*parse_arrival(line))

    def add(self, t: float, topic: str, hex_payload: str) -> None:
        if topic == self.probe:
            self.probed.set()
            return
        with self._lock:
            times = self._times.get(topic)
            if times is None:
                self._times[topic] = [t]
                self._last[topic] = hex_payload
                return
            times.append(t)
            if hex_payload != self._last[topic]:
                self._last[topic] = hex_payload
                text = bytes.fromhex(hex_payload).decode("utf-8", "replace")
                self._changes.setdefault(topic, []).append((t, text))

    def first_seen(self, prefix: str) -> dict[str, Any]:
        """How many topics were seen, and when the last of them was first seen."""
        with self._lock:
            seen = [times for topic, times in self._times.items() if topic.startswith(prefix)]
            firsts = [times[0] for times in seen]
            total = sum(len(times) for times in seen)
        return {"topics": len(firsts), "last_first": max(firsts, default=None), "total": total}

    def between(self, a: float, b: float) -> dict[str, list[float]]:
        with self._lock:
            items = list(self._times.items())
        return {
            topic: times[bisect.bisect_left(times, a) : bisect.bisect_left(times, b)]
            for topic, times in items
        }

    def changes(self, topic: str) -> list[tuple[float, str]]:
        with self._lock:
            return list(self._changes.get(topic, []))


def _wait_subscribed(port: int, arrivals: Arrivals, stamper: subprocess.Popen[bytes]) -> None:
    """mosquitto_sub does not say when its SUBACK came: publish a probe until it shows up."""
    import paho.mqtt.client as mqtt  # noqa: PLC0415
    from paho.mqtt.enums import CallbackAPIVersion  # noqa: PLC0415

    prober = mqtt.Client(
        CallbackAPIVersion.VERSION2, client_id=f"bench-probe-{uuid.uuid4().hex[:8]}"
    )
    prober.connect("127.0.0.1", port, keepalive=60)
    prober.loop_start()
    try:
        deadline = time.monotonic() + 10
        while not arrivals.probed.is_set():
            if time.monotonic() > deadline or stamper.poll() is not None:
                raise SystemExit("sub: mosquitto_sub did not subscribe")
            prober.publish(arrivals.probe, b"", qos=0)
            arrivals.probed.wait(0.1)
    finally:
        prober.disconnect()
        prober.loop_stop()


def _answer_commands(arrivals: Arrivals, stamper: subprocess.Popen[bytes]) -> None:
    for line in sys.stdin:
        cmd = json.loads(line)
        op = cmd["op"]
        if op == "quit":
            return
        if op == "first_seen":
            reply = arrivals.first_seen(cmd.get("prefix", ""))
        elif op == "window":
            reply = analyse_window(
                arrivals.between(cmd["a"], cmd["b"]),
                cmd["a"],
                cmd["b"],
                cmd["interval"],
                cmd["topics"],
                slots=cmd.get("slots"),
            )
        elif op == "phases":
            reply = {
                "phases": {
                    t: circ_phase(v, cmd["interval"])
                    for t, v in arrivals.between(cmd["a"], cmd["b"]).items()
                    if v
                }
            }
        elif op == "changes":
            reply = {"changes": arrivals.changes(cmd["topic"])}
        elif op == "cpu":  # the stamper's and this reader's
            reply = {"cpu_s": time.process_time() + proc_cpu_seconds(stamper.pid)}
        else:
            reply = {"error": f"unknown op {op}"}
        _reply(reply)


def _reply(reply: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(reply) + "\n")
    sys.stdout.flush()


def parse_arrival(line: bytes) -> tuple[float, str, str]:
    """One line of `mosquitto_sub -F "%U %t %x"`: (arrival, topic, payload in hex). The
    payload is hex so that spaces and newlines in it cannot split the line; topics under the
    benchmark's prefixes have no spaces."""
    stamp, topic, hex_payload = line.rstrip(b"\n").split(b" ", 2)
    return float(stamp), topic.decode(), hex_payload.decode()


def circ_phase(ts: list[float], interval: float) -> float:
    """Circular mean of t mod interval (robust at the wrap-around)."""
    s = sum(math.sin(2 * math.pi * ((t - GRID_ANCHOR) % interval) / interval) for t in ts)
    c = sum(math.cos(2 * math.pi * ((t - GRID_ANCHOR) % interval) / interval) for t in ts)
    return (math.atan2(s, c) / (2 * math.pi) * interval) % interval


def analyse_window(
    snap: dict[str, list[float]],
    a: float,
    b: float,
    interval: float,
    topics: list[str],
    *,
    slots: int | None,
) -> dict[str, Any]:
    """Delivery and period error of `topics` over [a, b). Expected slots come from each
    entry's grid phase (`on_grid`: the service and the bare loop), or else from the phase its
    own arrivals show (Node-RED, whose timers start when the flow is deployed)."""
    errors: list[float] = []
    received = expected = missed = extra = entries_missing = 0
    lateness: list[float] = []
    for topic_i, topic in enumerate(topics):
        ts = snap.get(topic, [])
        entry_id = topic.rsplit("/", 1)[1]
        if slots is not None:
            off = grid_offset(entry_id, interval, slots)
        else:  # the circular mean of its arrival phases in the window
            off = circ_phase(ts, interval) if ts else 0.0
        exp = _expected_slots(a, b, interval, off, on_grid=slots is not None)
        expected += exp
        received += len(ts)
        if not ts:
            entries_missing += 1
            missed += exp
            continue
        missed += _periods(ts, a, b, interval, errors)
        extra += max(0, len(ts) - exp - 1)
        if topic_i % 10 == 0:  # end-to-end lateness against the ideal grid slot, sampled
            lateness += [
                ((t - GRID_ANCHOR - off) % interval + interval / 2) % interval - interval / 2
                for t in ts
            ]
    return {
        "expected": expected,
        "received": received,
        "delivered_pct": 100.0 * received / expected if expected else float("nan"),
        "missed_ticks": missed,
        "entries_never_seen": entries_missing,
        "extra": extra,
        "period_error_ms": {
            "p50": pct(errors, 50) * 1e3,
            "p99": pct(errors, 99) * 1e3,
            "max": max(errors, default=float("nan")) * 1e3,
            "samples": len(errors),
        },
        "lateness_vs_grid_ms": {
            "p50": pct(lateness, 50) * 1e3,
            "p99": pct(lateness, 99) * 1e3,
            "samples": len(lateness),
        },
    }


def _expected_slots(a: float, b: float, interval: float, off: float, *, on_grid: bool) -> int:
    """The slots of an entry at phase `off` that fall in [a, b): the slot arriving just after a
    boundary is counted by arrival. Off the grid, a drifting phase makes the count at the
    edges uncertain; the window holds round(length / interval) periods whatever the phase."""
    if not on_grid:
        return round((b - a) / interval)
    k0 = math.ceil((a - GRID_ANCHOR - off) / interval)
    k1 = math.ceil((b - GRID_ANCHOR - off) / interval)
    return k1 - k0


def _periods(ts: list[float], a: float, b: float, interval: float, errors: list[float]) -> int:
    """Append each period's error (|gap - interval|) of one entry's arrivals `ts` in [a, b)
    to `errors`; return the slots it missed, in the gaps and at the window's edges."""
    missed = 0
    for x, y in itertools.pairwise(ts):
        d = y - x
        errors.append(abs(d - interval))
        missed += max(0, round(d / interval) - 1)
    missed += max(0, math.floor((ts[0] - a) / interval - 0.5))
    missed += max(0, math.floor((b - ts[-1]) / interval - 0.5))
    return missed


# ==== role: bare scheduled loop (the issue-12 peer) ================================================
def loop_groups(
    n: int, prefix: str, interval: float
) -> list[tuple[float, list[tuple[str, bytes]]]]:
    """The n entries grouped by their grid phase, as the service groups them by default
    (phase slots sized from the entries), earliest first: (offset in the period, [(topic,
    payload)])."""
    groups: dict[float, list[tuple[str, bytes]]] = {}
    for e in make_entries(n, interval, prefix):
        groups.setdefault(grid_offset(e["id"], interval, auto_slots(n)), []).append(
            (e["topic"], payload_for(int(e["id"][1:])))
        )
    return sorted(groups.items())


def role_loop(args: argparse.Namespace) -> None:
    """The simplest scheduled publisher paho allows: one thread, `client.loop()` between
    ticks, each phase group published with `client.publish()` when it falls due (paho writes
    to the socket at once when no loop thread runs). What the service costs beyond this is the
    cost of its features."""
    import paho.mqtt.client as mqtt  # noqa: PLC0415
    from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion  # noqa: PLC0415

    interval = 1.0
    groups = loop_groups(args.n, args.prefix, interval)
    client = mqtt.Client(
        CallbackAPIVersion.VERSION2,
        client_id=f"bench-loop-{uuid.uuid4().hex[:8]}",
        protocol=MQTTProtocolVersion.MQTTv5,
    )  # the service's default protocol
    client.connect("127.0.0.1", args.port, keepalive=30)  # the service's default keepalive
    deadline = time.monotonic() + 10
    while not client.is_connected():
        if time.monotonic() > deadline:
            raise SystemExit("loop: no CONNACK")
        client.loop(0.05)
    now = time.time()
    period = GRID_ANCHOR + math.floor((now - GRID_ANCHOR) / interval) * interval
    while True:
        for offset, messages in groups:
            due = period + offset
            while (wait := due - time.time()) > 0:
                client.loop(wait)
            if due < now:  # the first period's groups already past: start on the next slot
                continue
            for topic, payload in messages:
                client.publish(topic, payload, qos=0)
        period += interval


# ==== role: spinner (the loaded-machine case) =======================================================
def role_spin(args: argparse.Namespace) -> None:
    """Keeps one core busy for `--seconds`, then exits by itself."""
    end = time.monotonic() + args.seconds
    while time.monotonic() < end:
        pass
