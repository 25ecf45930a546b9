#!/usr/bin/env python3
"""Does TCP_NODELAY remove the ~40 ms stall seen once every keepalive interval? (issue 12)

    .venv/bin/python bench/nodelay.py [--entries 1000] [--seconds 30] [--keepalive 5]

Measurement only. It starts its own Mosquitto, then runs the same trial twice, with paho's
socket as paho leaves it (Nagle on) and with TCP_NODELAY set after CONNACK: a one-thread paho
loop (like `run.py --role loop`) publishes N entries at 1 s in phase groups, QoS 0, each
payload carrying its publish time, with a short keepalive so that many PINGREQs fall in the
trial. A subscriber in a second process reports every message's latency (arrival minus
publish time, same clock). The trial prints latency p50/p99/max, the messages later than
20 ms, and how long after the last PINGREQ each of those was published.
"""

from __future__ import annotations

import argparse
import bisect
import json
import math
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

from common import GRID_ANCHOR, Broker, grid_offset, pct

from scheduler_publisher.spread import auto_slots

LATE_MS = 20.0
AFTER_PING_S = 0.1  # a late publish this soon after a PINGREQ counts as the PINGREQ's stall


def publish_trial(port: int, prefix: str, n: int, seconds: float, keepalive: int,
                  nodelay: bool) -> list[float]:
    """Publishes for `seconds`; returns the times PINGREQs were sent."""
    import paho.mqtt.client as mqtt  # noqa: PLC0415
    from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion  # noqa: PLC0415

    pings: list[float] = []
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"nodelay-{uuid.uuid4().hex[:6]}",
                         protocol=MQTTProtocolVersion.MQTTv5)
    def on_log(_c: Any, _u: Any, _level: int, msg: str) -> None:
        if "PINGREQ" in msg:
            pings.append(time.time())

    client.on_log = on_log
    client.connect("127.0.0.1", port, keepalive=keepalive)
    while not client.is_connected():
        client.loop(0.05)
    sock = client.socket()
    if nodelay and isinstance(sock, socket.socket):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    groups: dict[float, list[str]] = {}
    for i in range(n):
        groups.setdefault(grid_offset(f"e{i:05d}", 1.0, auto_slots(n)), []).append(
            f"{prefix}/e{i:05d}")
    end = time.time() + seconds
    period = GRID_ANCHOR + math.ceil(time.time() - GRID_ANCHOR)
    while period < end:
        for offset, topics in sorted(groups.items()):
            while (wait := period + offset - time.time()) > 0:
                client.loop(wait)
            for topic in topics:
                client.publish(topic, json.dumps({"t": time.time()}), qos=0)
        period += 1.0
    client.disconnect()
    return pings


def role_sub(port: int, prefix: str) -> None:
    """Prints one JSON list of [publish time, arrival time] when stdin closes."""
    import paho.mqtt.client as mqtt  # noqa: PLC0415
    from paho.mqtt.enums import CallbackAPIVersion  # noqa: PLC0415

    pairs: list[tuple[float, float]] = []
    client = mqtt.Client(CallbackAPIVersion.VERSION2)
    client.on_message = lambda _c, _u, m: pairs.append((json.loads(m.payload)["t"], time.time()))
    client.on_connect = lambda c, *_a: c.subscribe(f"{prefix}/#")
    client.on_subscribe = lambda *_a: print("ready", flush=True)
    client.connect("127.0.0.1", port)
    client.loop_start()
    sys.stdin.read()
    client.loop_stop()
    print(json.dumps(pairs))


def trial(port: int, n: int, seconds: float, keepalive: int, nodelay: bool) -> dict[str, Any]:
    prefix = f"nodelay/{uuid.uuid4().hex[:6]}"
    sub = subprocess.Popen([sys.executable, __file__, "--sub", str(port), prefix],
                           stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert sub.stdout is not None
    if sub.stdout.readline().strip() != "ready":
        raise RuntimeError("subscriber did not start")
    pings = publish_trial(port, prefix, n, seconds, keepalive, nodelay)
    time.sleep(0.5)  # the last messages in flight
    out, _ = sub.communicate("", timeout=30)
    pairs = json.loads(out)
    lat = [(b - a) * 1e3 for a, b in pairs]
    late = [(a, (b - a) * 1e3) for a, b in pairs if (b - a) * 1e3 > LATE_MS]
    after_ping = [a for a, _ in late if _since_last(pings, a) <= AFTER_PING_S]
    return {
        "nodelay": nodelay, "messages": len(pairs), "pingreqs": len(pings),
        "latency_ms": {"p50": pct(lat, 50), "p99": pct(lat, 99), "max": max(lat, default=0)},
        f"late_over_{LATE_MS:g}ms": len(late),
        f"late_within_{AFTER_PING_S * 1e3:g}ms_after_pingreq": len(after_ping),
        "late_elsewhere": len(late) - len(after_ping),
        "pingreqs_followed_by_late": len({bisect.bisect_right(pings, a) for a in after_ping}),
        "worst_after_pingreq_ms": max((ms for a, ms in late if a in set(after_ping)), default=0),
    }


def _since_last(pings: list[float], t: float) -> float:
    k = bisect.bisect_right(pings, t)
    return t - pings[k - 1] if k else math.inf


def main() -> int:
    if len(sys.argv) == 4 and sys.argv[1] == "--sub":
        role_sub(int(sys.argv[2]), sys.argv[3])
        return 0
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--entries", type=int, default=1000)
    ap.add_argument("--seconds", type=float, default=30.0)
    ap.add_argument("--keepalive", type=int, default=5)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="sp-nodelay-") as tmp:
        broker = Broker(Path(tmp))
        broker.start()
        try:
            for nodelay in (False, True, False, True):
                res = trial(broker.port, args.entries, args.seconds, args.keepalive, nodelay)
                print(json.dumps(res), flush=True)
        finally:
            broker.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
