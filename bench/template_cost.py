#!/usr/bin/env python3
"""What a templated entry costs per publish, next to a static one (issue 13, part 2).

    .venv/bin/python bench/template_cost.py [--number 20000] [--repeats 5]

Times the step of the publish path that differs between the two kinds of entry, on the
network thread's own code (MQTTConnectionManager._send's branch): a static entry hands over
the payload bytes rendered at load time; a templated one takes its next {{seq}}, reads the
clock and joins its compiled chunks. For reference it also times a json.dumps of the same
data, which is what rendering without the compiled template would cost. No broker, no
network: the figures are CPU microseconds per publish in this process (median and minimum
of the repeats); the socket write that follows is the same for both kinds.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from scheduler_publisher.config.loader import PublishConfig
from scheduler_publisher.mqtt.connection import MQTTConnectionManager
from scheduler_publisher.settings import BrokerSettings

SMALL = {"sensor": "pump-7", "ts": "{{now_unix_ms}}", "seq": "{{seq}}", "unit": "bar", "value": 4.2}
LARGE = {
    "site": "gw-01",
    "sent": "{{now}}",
    "seq": "{{seq}}",
    "readings": [{"channel": i, "value": i * 0.5, "unit": "°C", "ok": True} for i in range(40)],
}


@dataclass(frozen=True)
class Link:
    """The one attribute of a connection that a render reads."""

    client_id: str = "bench-client"


def time_per_call(call: Callable[[], Any], number: int, repeats: int) -> list[float]:
    """CPU microseconds per call, one figure per repeat."""
    figures = []
    for _ in range(repeats):
        started = time.process_time()
        for _ in range(number):
            call()
        figures.append((time.process_time() - started) / number * 1e6)
    return figures


def cases(
    manager: MQTTConnectionManager, data: dict[str, Any], label: str
) -> dict[str, Callable[[], Any]]:
    static = PublishConfig(id=f"{label}-static", topic="bench/s", data=data, interval=1)
    templated = PublishConfig(
        id=f"{label}-template", topic="bench/t", data=data, interval=1, template=True
    )
    manager.stats.add_entry(templated.id)
    link: Any = Link()

    # The expression MQTTConnectionManager._send evaluates, for each kind of entry.
    def static_payload() -> bytes:
        return static.payload if static.renderer is None else b""

    def templated_payload() -> bytes:
        renderer = templated.renderer
        return (
            templated.payload
            if renderer is None
            else manager._rendered(link, templated.id, renderer)
        )

    plain = dict(data)
    return {
        f"{label}: static (pre-rendered bytes)": static_payload,
        f"{label}: templated (render)": templated_payload,
        f"{label}: reference, json.dumps of the data": lambda: json.dumps(
            plain, separators=(",", ":"), ensure_ascii=False
        ).encode(),
    }


def measure(number: int, repeats: int) -> dict[str, dict[str, float]]:
    manager = MQTTConnectionManager(BrokerSettings())  # never connected: nothing starts
    results: dict[str, dict[str, float]] = {}
    for label, data in (
        ("5 fields, 2 placeholders", SMALL),
        ("40 readings, 2 placeholders", LARGE),
    ):
        for name, call in cases(manager, data, label).items():
            figures = time_per_call(call, number, repeats)
            results[name] = {"median_us": statistics.median(figures), "min_us": min(figures)}
    return results


def report(results: dict[str, dict[str, float]]) -> None:
    print("| payload per publish | µs CPU, median | min |")
    print("|---|---|---|")
    for name, figure in results.items():
        print(f"| {name} | {figure['median_us']:.3f} | {figure['min_us']:.3f} |")


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--number", type=int, default=20_000, help="calls per repeat")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    report(measure(args.number, args.repeats))
    return 0


if __name__ == "__main__":
    sys.exit(main())
