"""An ordered failover list (`--broker a,b`) against two real Mosquittos: the service moves
every connection to the next broker after the main connection's failed attempts, says so in
its log, /status and metrics, gets births on the new broker, and does not flap back."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from scheduler_publisher.endpoints import Endpoint
from scheduler_publisher.mqtt.netloop import FAILOVER_ATTEMPTS
from tests.netproxy import NetProxy
from tests.support import (
    InProcessServices,
    Mosquitto,
    ServiceProcess,
    Subscriber,
    cli_args,
    entry,
    free_port,
    offline,
    online,
    request,
    unique_topic,
    wait_until,
    write_config,
)


@pytest.fixture
def brokers(tmp_path: Path) -> Iterator[tuple[Mosquitto, Mosquitto]]:
    first, second = Mosquitto(tmp_path), Mosquitto(tmp_path)
    first.start()
    second.start()
    yield first, second
    first.stop()
    second.stop()


class Watch:
    """Subscribers on both brokers to the test's topics, restarted with their broker."""

    def __init__(self, base: str, *ports: int) -> None:
        self.base = base
        self.subs: dict[int, Subscriber] = {}
        for port in ports:
            self.start(port)

    def start(self, port: int) -> Subscriber:
        self.subs[port] = Subscriber(port, [f"{self.base}/#"]).start()
        return self.subs[port]

    def stop(self) -> None:
        for sub in self.subs.values():
            sub.stop()


def url(port: int) -> str:
    return f"mqtt://127.0.0.1:{port}"


def launch(tmp_path: Path, base: str, brokers: str, http_port: int) -> ServiceProcess:
    """A plain entry every 0.3 s and an lwt entry whose only publish is its birth."""
    config = tmp_path / "config.json"
    write_config(
        config,
        [
            entry("plain", f"{base}/plain", 0.3, qos=1),
            entry("door", f"{base}/door", 3600, qos=1, lwt=True, data={"door": 1}),
        ],
    )
    args = cli_args(1, config, "--broker", brokers, backoff=(0.1, 0.3), http_port=http_port)
    at = args.index("--port")  # each broker of the list names its own port
    del args[at : at + 2]
    return ServiceProcess(args, cwd=tmp_path)


def switches(proc: ServiceProcess) -> list[dict[str, Any]]:
    return [e for e in proc.events() if e.get("message") == "mqtt_broker_switched"]


def broker_info(http_port: int) -> dict[str, float]:
    text = request(http_port, "GET", "/metrics").body.decode()
    found = re.findall(r'^scheduler_publisher_broker_info\{url="([^"]+)"\} (\S+)$', text, re.M)
    return {u: float(v) for u, v in found}


def test_losing_the_first_broker_moves_every_connection_to_the_second(
    tmp_path: Path, brokers: tuple[Mosquitto, Mosquitto]
) -> None:
    """Stop the first: after the failed attempts the service switches, logs from/to/why,
    publishes and the lwt entry's birth reach the second, /status and metrics name it; the
    first coming back does not draw it back, and losing the second wraps around to the first."""
    first, second = brokers
    base = unique_topic("failover")
    watch = Watch(base, first.port, second.port)
    http_port = free_port()
    proc = launch(tmp_path, base, f"127.0.0.1:{first.port}, {url(second.port)}", http_port)
    try:
        watch.subs[first.port].wait_for(f"{base}/door", where=online, timeout=30)
        watch.subs[first.port].wait_for(f"{base}/plain", count=2, timeout=30)
        status = request(http_port, "GET", "/status").json()["connection"]
        assert status["broker"] == url(first.port)
        assert status["brokers"] == [url(first.port), url(second.port)]

        watch.subs[first.port].stop()
        first.stop()
        switched = proc.wait_for_event("mqtt_broker_switched", timeout=60)
        assert (switched["from"], switched["to"]) == (url(first.port), url(second.port))
        assert f"{FAILOVER_ATTEMPTS} connection attempts failed" in switched["why"]
        on_second = watch.subs[second.port]
        on_second.wait_for(f"{base}/door", where=online, timeout=30)
        on_second.wait_for(f"{base}/plain", count=2, timeout=30)
        assert request(http_port, "GET", "/status").json()["connection"]["broker"] == url(
            second.port
        )
        assert broker_info(http_port) == {url(first.port): 0.0, url(second.port): 1.0}

        first.start()  # back: the service stays where it is
        on_first = watch.start(first.port)
        seen = len(on_second.on(f"{base}/plain"))
        on_second.wait_for(f"{base}/plain", count=seen + 5, timeout=30)
        assert not on_first.on(f"{base}/plain")
        assert len(switches(proc)) == 1

        on_second.stop()
        second.stop()  # the last of the list: wraps around to the first
        wait_until(lambda: len(switches(proc)) == 2, 60, message="a second switch")
        assert (switches(proc)[1]["from"], switches(proc)[1]["to"]) == (
            url(second.port),
            url(first.port),
        )
        on_first.wait_for(f"{base}/door", where=online, timeout=30)
        on_first.wait_for(f"{base}/plain", count=2, timeout=30)
    finally:
        proc.stop()
        watch.stop()


def test_a_list_whose_first_broker_is_down_at_start_reaches_the_second(
    tmp_path: Path, brokers: tuple[Mosquitto, Mosquitto]
) -> None:
    """The first broker never answers: the service moves on and publishes to the second."""
    _first, second = brokers
    base = unique_topic("failstart")
    watch = Watch(base, second.port)
    down = free_port()
    http_port = free_port()
    proc = launch(tmp_path, base, f"{url(down)},127.0.0.1:{second.port}", http_port)
    try:
        watch.subs[second.port].wait_for(f"{base}/door", where=online, timeout=60)
        watch.subs[second.port].wait_for(f"{base}/plain", count=2, timeout=30)
        assert [(e["from"], e["to"]) for e in switches(proc)] == [(url(down), url(second.port))]
        connected = [e for e in proc.events() if e.get("message") == "mqtt_connected"]
        assert [e["url.full"] for e in connected] == [url(second.port)]
    finally:
        proc.stop()
        watch.stop()


def test_a_move_while_the_old_broker_is_up_fires_the_wills_there_and_births_on_the_new(
    brokers: tuple[Mosquitto, Mosquitto], services: InProcessServices
) -> None:
    """The old broker turns the main connection away (a proxy closes it, and each new CONNECT
    of its client id, before CONNACK) while the lwt entry's own connection stays up on it: after
    the main connection's failed attempts, every connection moves, the lwt one leaving with its
    will, which the old broker publishes; the new broker gets the births."""
    first, second = brokers
    proxy = NetProxy(first.port).start()
    base = unique_topic("move")
    watch = Watch(base, first.port, second.port)
    endpoints = (
        Endpoint("mqtt", "127.0.0.1", proxy.port),
        Endpoint("mqtt", "127.0.0.1", second.port),
    )
    service = services.start(
        proxy.port,
        [entry("door", f"{base}/door", 3600, qos=1, lwt=True, data={"door": 1})],
        broker={
            "endpoints": endpoints,
            "status_topic": f"{base}/status",
            "backoff_min": 0.1,
            "backoff_max": 0.3,
        },
    )
    try:
        old, new = watch.subs[first.port], watch.subs[second.port]
        old.wait_for(f"{base}/door", where=online, timeout=30)
        old.wait_for(f"{base}/status", where=online, timeout=30)
        proxy.refuse_client(service.settings.broker.client_id)
        assert old.wait_for(f"{base}/door", where=offline, timeout=30)[-1].json() == {
            "online": 0,
            "door": 1,
        }
        new.wait_for(f"{base}/status", where=online, timeout=30)
        new.wait_for(f"{base}/door", where=online, timeout=30)
        assert service.connection.broker_urls()[0] == url(second.port)
        assert not [m for m in new.snapshot() if offline(m)]
    finally:
        watch.stop()
        proxy.stop()


def test_what_the_old_broker_lacked_is_forgotten_on_the_new_one(
    tmp_path: Path, services: InProcessServices
) -> None:
    """A first broker without QoS 2 (`max_qos 1`) makes the service publish a QoS 2 entry at
    QoS 1 there; after the move, the second broker, which has QoS 2, gets it at QoS 2."""
    first = Mosquitto(tmp_path, extra="max_qos 1")
    second = Mosquitto(tmp_path)
    first.start()
    second.start()
    base = unique_topic("limits")
    watch = Watch(base, first.port, second.port)
    endpoints = (
        Endpoint("mqtt", "127.0.0.1", first.port),
        Endpoint("mqtt", "127.0.0.1", second.port),
    )
    services.start(
        first.port,
        [entry("two", f"{base}/two", 0.3, qos=2)],
        broker={"endpoints": endpoints, "backoff_min": 0.1, "backoff_max": 0.3},
    )
    try:
        got = watch.subs[first.port].wait_for(f"{base}/two", count=2, timeout=30)
        assert {m.qos for m in got} == {1}
        watch.subs[first.port].stop()
        first.stop()
        got = watch.subs[second.port].wait_for(f"{base}/two", count=2, timeout=60)
        assert {m.qos for m in got} == {2}
    finally:
        watch.stop()
        services.close()
        first.stop()
        second.stop()
