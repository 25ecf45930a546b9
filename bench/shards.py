"""Issue 13: one entries file split across shard processes (`--shard K/N`) on this machine.

The same load twice, one after the other: N entries at 1 s, QoS 0, first run by `shards`
processes (`--shard 1/2`, `--shard 2/2` on one file), then by one process. Each phase has its
own topics and subscriber, and is measured like the sustained scenario: after every topic has
been seen once and a warm-up, a window in which `delivered_pct` = arrivals / grid slots
(bench/README.md). CPU is the processes' sum.

At 20,000 messages a second the subscriber that measures arrivals (`mosquitto_sub` and the
process that reads its lines) needs about half a core itself, on the two cores the publishers
use. So the broker's own count of the PUBLISH packets it received
(`$SYS/broker/publish/messages/received`, sampled every second) is reported beside it:
`broker_received_pct`, what the publishers got to the broker per slot, which is what the
target is checked on.
"""

from __future__ import annotations

import os
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
from common import Service, Sub, log, make_entries, proc_cpu_seconds, proc_rss_kb, verdict_word
from paho.mqtt.enums import CallbackAPIVersion

TARGET_PCT = 99.5
RECEIVED_COUNTER = "$SYS/broker/publish/messages/received"


class BrokerCount:
    """The broker's running count of PUBLISH packets received, with when each sample came."""

    def __init__(self, port: int) -> None:
        self.samples: list[tuple[float, int]] = []
        self._lock = threading.Lock()
        self._client = mqtt.Client(
            CallbackAPIVersion.VERSION2, client_id=f"bench-count-{uuid.uuid4().hex[:6]}"
        )
        self._client.on_message = self._on_message
        self._client.connect("127.0.0.1", port)
        self._client.subscribe(RECEIVED_COUNTER)
        self._client.loop_start()

    def _on_message(self, _client: mqtt.Client, _userdata: Any, message: mqtt.MQTTMessage) -> None:
        with self._lock:
            self.samples.append((time.time(), int(message.payload)))

    def rate(self, a: float, b: float) -> float | None:
        """PUBLISH packets received per second between the first and last sample in [a, b]."""
        with self._lock:
            inside = [s for s in self.samples if a <= s[0] <= b]
        if len(inside) < 2:
            return None
        (t0, v0), (t1, v1) = inside[0], inside[-1]
        return (v1 - v0) / (t1 - t0)

    def close(self) -> None:
        self._client.loop_stop()
        self._client.disconnect()


def scenario_shards(
    work: Path, port: int, n: int, shards: int, warmup: float, window: float
) -> dict[str, Any]:
    """`shards` processes, then one, each delivering n entries x 1 s."""
    log(f"shards: {n:,} entries at 1 s in {shards} shard processes")
    split = measure(work, port, n, shards, warmup, window)
    log(f"shards: the same {n:,} entries in one process")
    single = measure(work, port, n, 1, warmup, window)
    return {
        "entries": n,
        "interval_s": 1.0,
        "shards": shards,
        "sharded": split,
        "one_process": single,
    }


def measure(
    work: Path, port: int, n: int, processes: int, warmup: float, window: float
) -> dict[str, Any]:
    prefix = f"bench/shard{processes}-{n}-{uuid.uuid4().hex[:6]}"
    entries = make_entries(n, 1.0, prefix)
    sub = Sub(port, prefix)
    counter = BrokerCount(port)
    config = f"shards-{processes}-{n}"
    services = [
        Service(
            work,
            port,
            entries,
            f"{config}-{k}",
            config_name=config,
            shard=f"{k}/{processes}" if processes > 1 else None,
        )
        for k in range(1, processes + 1)
    ]
    try:
        seen = sub.wait_all_seen(n, 120)
        alive(services)
        if seen is None:
            raise RuntimeError(
                f"not every topic was seen within 120 s ({n} entries, {processes} processes)"
            )
        time.sleep(warmup)
        alive(services)
        a = time.time()
        cpu0 = [proc_cpu_seconds(s.pid) for s in services]
        sub_cpu0 = sub.ask(op="cpu")["cpu_s"]
        time.sleep(window)
        cpu1 = [proc_cpu_seconds(s.pid) for s in services]
        b = time.time()
        sub_cpu1 = sub.ask(op="cpu")["cpu_s"]
        alive(services)
        time.sleep(1.0)  # let the window's last messages arrive
        res = sub.ask(op="window", a=a, b=b, interval=1.0, topics=[e["topic"] for e in entries])
        cpu = [after - before for before, after in zip(cpu0, cpu1, strict=True)]
        received = counter.rate(a, b)
        res.update(
            {
                "broker_received_pct": None if received is None else 100 * received / n,
                "processes": processes,
                "window_s": b - a,
                "warmup_s": warmup,
                "startup_s": seen - min(s.started_at for s in services),
                "cpu_pct_of_core_each": [100 * c / (b - a) for c in cpu],
                "cpu_pct_of_core_total": 100 * sum(cpu) / (b - a),
                # whether the one subscriber process, not the publishers, was the bottleneck
                "subscriber_cpu_pct_of_core": 100 * (sub_cpu1 - sub_cpu0) / (b - a),
                "rss_kb_each": [proc_rss_kb(s.pid) for s in services],
                "loadavg_1m": os.getloadavg()[0],
            }
        )
        return res
    finally:
        for service in services:
            service.stop()
        sub.close()
        counter.close()


def alive(services: list[Service]) -> None:
    for service in services:
        service.alive()


def _figures(m: dict[str, Any]) -> str:
    # `extra`: arrivals beyond an entry's slots, which two shards running one entry would add
    twice = f", {m['extra']:,} extra arrivals" if m["extra"] else ""
    received = m.get("broker_received_pct")
    at_broker = "n/a" if received is None else f"{received:.2f} %"
    return (
        f"{at_broker} of the slots received by the broker; the subscriber saw "
        f"{m['delivered_pct']:.2f} %{twice}, {m['missed_ticks']:,} missed ticks, "
        f"period error p99 {m['period_error_ms']['p99']:.1f} ms, CPU "
        f"{m['cpu_pct_of_core_total']:.0f} % of a core in all (subscriber "
        f"{m['subscriber_cpu_pct_of_core']:.0f} %)"
    )


def shard_rows(result: dict[str, Any], quick: bool) -> list[tuple[str, str, str, str]]:
    """The table's rows: the shards against the target, one process beside them."""
    n, shards = result["entries"], result["shards"]
    split, single = result["sharded"], result["one_process"]
    # At the broker: the subscriber is the bottleneck at this rate on two cores (docstring).
    received = split.get("broker_received_pct")
    ok = received is not None and received >= TARGET_PCT and split["extra"] == 0
    return [
        (
            f"{shards} shards, {n:,} at 1 s",
            f"≥ {TARGET_PCT} % delivered to the broker, no entry twice",
            _figures(split),
            "(quick)" if quick else verdict_word(ok),
        ),
        (f"1 process, {n:,} at 1 s", "reference (same load, no shards)", _figures(single), "-"),
    ]
