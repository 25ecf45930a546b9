"""The publisher service against a real Mosquitto: payloads, timing, outages, status.

Most tests run `PublisherService` in-process (fast, and its counters are at hand); the few
that are about the process itself (exit codes) run the real CLI.
"""

from __future__ import annotations

import json
import statistics
import time
from collections.abc import Callable, Iterator
from itertools import pairwise
from pathlib import Path
from typing import Any

import pytest
from structlog.testing import capture_logs

from scheduler_publisher.scheduling.plan import GRID_ANCHOR, SLOTS_PER_PERIOD, grid_start
from scheduler_publisher.service import PublisherService
from tests.netproxy import NetProxy
from tests.support import (
    InProcessServices,
    Mosquitto,
    Received,
    ServiceProcess,
    Subscriber,
    SubscriberFactory,
    barrier,
    cli_args,
    entry,
    free_port,
    json_has,
    wait_until,
    write_config,
)

StartService = Callable[..., PublisherService]


@pytest.fixture
def start_service(tmp_path: Path) -> Iterator[StartService]:
    """Starts in-process services on 127.0.0.1 (no HTTP, no watcher); stopped at teardown.

    Request it after the broker fixtures, so that teardown stops the service first."""
    services = InProcessServices(tmp_path)

    def start(
        port: int,
        entries: list[dict[str, Any]],
        *,
        broker: dict[str, Any] | None = None,
        **settings: Any,
    ) -> PublisherService:
        state_db = tmp_path / f"state-{len(services.started)}.db"
        return services.start(
            port,
            entries,
            broker={"backoff_min": 0.2, "backoff_max": 1.0, **(broker or {})},
            **{"state_db": state_db, "watch": False, **settings},
        )

    yield start
    services.close()


@pytest.fixture
def cold_broker(tmp_path: Path) -> Iterator[Mosquitto]:
    """A Mosquitto with a port reserved but not started; the test starts it."""
    b = Mosquitto(tmp_path)
    yield b
    b.stop()


def expected_payload(data: dict[str, Any]) -> bytes:
    return json.dumps({"online": 1, **data}, separators=(",", ":"), ensure_ascii=False).encode(
        "utf-8"
    )


def entry_stats(service: PublisherService, entry_id: str) -> dict[str, Any]:
    found: dict[str, Any] = service.get_status()["entries"].get(entry_id, {})
    return found


def wall_clock(messages: list[Received]) -> list[float]:
    """Arrival times as unix time (Received.at is monotonic)."""
    offset = time.time() - time.monotonic()
    return [m.at + offset for m in messages]


def phase_error(wall: float, entry_id: str, interval: float, slots: int) -> float:
    """How far after the entry's nearest grid slot `wall` lies, in [-interval/2, interval/2),
    with its interval spread over `slots` phase groups (PublisherService.phase_slots)."""
    anchor = grid_start(entry_id, interval, slots).timestamp()
    return (wall - anchor + interval / 2) % interval - interval / 2


def slots_between(entry_id: str, interval: float, slots: int, start: float, end: float) -> int:
    """How many of the entry's grid slots fall in the wall-clock window [start, end]."""
    anchor = grid_start(entry_id, interval, slots).timestamp()
    first = -(-(start - anchor) // interval)  # ceil
    last = (end - anchor) // interval
    return max(0, int(last - first) + 1)


# ---- what goes on the wire ------------------------------------------------------------------


def test_payload_qos_and_retain_reach_subscribers_as_configured(
    broker: Mosquitto,
    subscriber_factory: SubscriberFactory,
    start_service: StartService,
    topic_base: str,
) -> None:
    """Entries arrive as compact UTF-8 {"online": 1, ...data} at their QoS; retained ones stay."""
    data = {"unit": "°C", "value": 21.5, "label": "plant room", "nested": {"a": [1, None, True]}}
    topics = {q: f"{topic_base}/q{q}" for q in (0, 1, 2)}
    entries = [
        entry(f"q{q}", topics[q], interval=3600, qos=q, retain=q == 1, data=data) for q in (0, 1, 2)
    ]
    live = subscriber_factory(f"{topic_base}/#", qos=2)

    start_service(broker.port, entries)

    for q, topic in topics.items():
        message = live.wait_for(topic)[0]
        assert message.payload == expected_payload(data)
        assert message.payload.startswith(b'{"online":1,"unit":"\xc2\xb0C",')
        assert message.qos == q
    late = subscriber_factory(f"{topic_base}/#", qos=2)
    barrier(broker.port, late, f"{topic_base}/marker")
    retained = [m for m in late.snapshot() if m.topic != f"{topic_base}/marker"]
    assert [(m.topic, m.retain, m.qos) for m in retained] == [(topics[1], True, 1)]
    assert retained[0].payload == expected_payload(data)


def test_every_entry_publishes_once_as_soon_as_the_connection_is_up(
    broker: Mosquitto,
    subscriber_factory: SubscriberFactory,
    start_service: StartService,
    topic_base: str,
) -> None:
    """On connect every entry publishes once within 2 s, not one interval later."""
    slow = [
        entry(f"slow-{i}", f"{topic_base}/slow-{i}", interval=3600, qos=i % 3, lwt=i == 3)
        for i in range(4)
    ]
    clock = f"{topic_base}/clock"
    sub = subscriber_factory(f"{topic_base}/#")

    service = start_service(broker.port, [*slow, entry("clock", clock, interval=0.2)])
    wait_until(service.is_connected, 10, message="the service to connect")
    connected_at = time.monotonic()

    for e in slow:
        first = sub.wait_for(e["topic"], timeout=5)[0]
        assert first.at - connected_at < 2.0
    sub.wait_for(clock, count=6)  # a second of ticks later, still one message each
    assert [len(sub.on(e["topic"])) for e in slow] == [1, 1, 1, 1]


def test_fixed_rate_entry_publishes_window_over_interval_times_on_its_grid(
    broker: Mosquitto,
    subscriber_factory: SubscriberFactory,
    start_service: StartService,
    topic_base: str,
) -> None:
    """A 0.2 s entry publishes window/interval ±2 times, on its fixed grid (no drift)."""
    interval, window = 0.2, 4.0
    topic = f"{topic_base}/rate"
    sub = subscriber_factory(topic)
    service = start_service(broker.port, [entry("rate", topic, interval=interval)])

    first_tick = sub.wait_for(topic, count=2)[1]  # the first message is the publish on connect
    start = first_tick.at
    sub.wait_for(topic, where=lambda m: m.at > start + window + interval, timeout=window + 10)

    ticks = [m for m in sub.on(topic) if start <= m.at < start + window]
    assert abs(len(ticks) - window / interval) <= 2
    slots = service.phase_slots(interval)
    errors = [phase_error(w, "rate", interval, slots) for w in wall_clock(ticks)]
    # Ticks land just after their grid slot, at the start of the window as at its end.
    assert -0.02 < statistics.median(errors[:5]) < 0.08
    assert -0.02 < statistics.median(errors[-5:]) < 0.08


def spread_out_ids(interval: float, count: int, min_gap: float) -> list[str]:
    """Ids whose phases are at least `min_gap` apart, so that a scheduler stall of a few ms at
    start-up cannot make two of them arrive in the same millisecond by accident."""
    chosen: list[str] = []
    phases: list[float] = []
    for n in range(1000):
        candidate = f"spread-{n}"
        phase = (grid_start(candidate, interval) - GRID_ANCHOR).total_seconds()
        if all(min(abs(phase - p), interval - abs(phase - p)) >= min_gap for p in phases):
            chosen.append(candidate)
            phases.append(phase)
        if len(chosen) == count:
            return chosen
    raise AssertionError("no ids spread that far apart")


def test_entries_sharing_an_interval_are_spread_over_the_period(
    broker: Mosquitto,
    subscriber_factory: SubscriberFactory,
    start_service: StartService,
    topic_base: str,
) -> None:
    """With 100 phase groups (`--phase-slots 100`; auto gives an interval that many from
    10,000 entries on), entries with the same interval tick at their own phases, not all in
    the same millisecond."""
    interval = 0.5
    ids = spread_out_ids(interval, count=5, min_gap=0.05)
    offsets = sorted((grid_start(i, interval) - GRID_ANCHOR).total_seconds() for i in ids)
    largest_gap = max([b - a for a, b in pairwise(offsets)] + [interval - offsets[-1] + offsets[0]])
    sub = subscriber_factory(f"{topic_base}/#")

    start_service(
        broker.port,
        [entry(i, f"{topic_base}/{i}", interval=interval) for i in ids],
        phase_slots=SLOTS_PER_PERIOD,
    )

    # Each entry's second message is its first tick after the publish on connect; those all
    # fall within one period, at the entries' own phases.
    ticks = sorted(sub.wait_for(f"{topic_base}/{i}", count=2)[1].at for i in ids)
    assert ticks[-1] - ticks[0] > (interval - largest_gap) - 0.1
    assert len({round(t, 3) for t in ticks}) == len(ids)


@pytest.mark.parametrize("phase_slots", [None, 1], ids=["auto", "fixed-1"])
def test_one_phase_slot_publishes_every_entry_of_an_interval_together(
    broker: Mosquitto,
    subscriber_factory: SubscriberFactory,
    start_service: StartService,
    topic_base: str,
    phase_slots: int | None,
) -> None:
    """`--phase-slots 1`, and auto (the default) below 200 entries at an interval: the entries
    that share an interval are one phase group, so they tick at the same instant on the grid of
    slot 0 (as Node-RED's inject nodes would), and keep it after a reload that changes one of
    them."""
    interval = 0.5
    ids = spread_out_ids(interval, count=5, min_gap=0.05)  # apart with 100 groups
    sub = subscriber_factory(f"{topic_base}/#")
    entries = [entry(i, f"{topic_base}/{i}", interval=interval) for i in ids]
    service = start_service(broker.port, entries, phase_slots=phase_slots)
    assert service.phase_slots(interval) == 1
    ticks = [sub.wait_for(f"{topic_base}/{i}", count=2)[1].at for i in ids]
    assert max(ticks) - min(ticks) < 0.05, ticks
    slots = {service.next_run(i) for i in ids}
    assert len(slots) == 1
    (slot,) = slots
    assert slot is not None
    assert round((slot - GRID_ANCHOR).total_seconds() * 1000) % round(interval * 1000) == 0
    entries[0]["data"] = {"changed": 1}
    write_config(service.settings.config_path, entries)
    assert service.reload_config(timeout=10)
    sub.wait_for(f"{topic_base}/{ids[0]}", count=1, where=json_has(changed=1))
    assert len({service.next_run(i) for i in ids}) == 1


# ---- the broker comes and goes --------------------------------------------------------------


def test_broker_down_at_start_is_retried_and_publishing_starts_when_it_comes_up(
    cold_broker: Mosquitto, start_service: StartService, topic_base: str
) -> None:
    """A broker down at start is retried with backoff; publishing starts once it is up."""
    topic = f"{topic_base}/early"
    service = start_service(cold_broker.port, [entry("early", topic, interval=0.5, qos=1)])
    wait_until(
        lambda: service.get_status()["connection"]["last_error"],
        10,
        message="a failed connection attempt",
    )
    assert not service.is_connected()

    cold_broker.start()
    sub = Subscriber(cold_broker.port, [topic]).start()
    try:
        wait_until(service.is_connected, 10, message="the service to connect")
        message = sub.wait_for(topic, timeout=10)[0]
    finally:
        sub.stop()
    assert message.json() == {"online": 1, "sensor": "early"}
    # A QoS 1 publish counts once its PUBACK is back, which can trail the subscriber's copy.
    wait_until(
        lambda: service.get_status()["statistics"]["total_published"] >= 1,
        10,
        message="the acknowledged publish to be counted",
    )


def test_publishing_resumes_after_a_broker_restart(
    broker: Mosquitto,
    subscriber_factory: SubscriberFactory,
    start_service: StartService,
    topic_base: str,
) -> None:
    """After the broker restarts, the service reconnects by itself and publishing resumes."""
    topic = f"{topic_base}/r"
    before = subscriber_factory(topic)
    service = start_service(broker.port, [entry("r", topic, interval=0.3, qos=1)])
    before.wait_for(topic, count=2)

    broker.restart()
    after = subscriber_factory(topic)

    after.wait_for(topic, count=3, timeout=15)
    assert service.is_connected()
    assert service.get_status()["statistics"]["reconnects"] >= 1


def test_outage_sends_only_the_newest_qos1_message_on_reconnect_and_drops_qos0_ticks(
    broker: Mosquitto,
    subscriber_factory: SubscriberFactory,
    start_service: StartService,
    topic_base: str,
) -> None:
    """In an outage QoS 1 sends one message on reconnect, not a backlog; QoS 0 ticks are dropped."""
    interval = 0.25
    keep, drop = f"{topic_base}/keep", f"{topic_base}/drop"
    # A long first retry (3-6 s after the loss) leaves time to have a subscriber in place
    # before the service comes back.
    service = start_service(
        broker.port,
        [
            entry("keep", keep, interval=interval, qos=1),
            entry("drop", drop, interval=interval, qos=0),
        ],
        broker={"backoff_min": 6.0, "backoff_max": 6.0},
    )
    status_topic = service.settings.broker.effective_status_topic
    subscriber_factory(keep).wait_for(keep, count=2)
    # Stop the broker right after a PUBACK, so that no QoS 1 message is in flight (those are
    # retransmitted on reconnect, as MQTT requires).
    acked = entry_stats(service, "keep")["published"]
    wait_until(lambda: entry_stats(service, "keep")["published"] > acked, 5, interval=0.005)
    broker.stop()
    wait_until(lambda: not service.is_connected(), 5, message="the loss to be noticed")

    wait_until(lambda: entry_stats(service, "keep")["deferred"] >= 4, 10, message="deferred")
    wait_until(lambda: entry_stats(service, "drop")["dropped"] >= 4, 10, message="dropped")
    broker.start()
    sub = subscriber_factory(keep, status_topic)
    assert not service.is_connected(), "the service reconnected before the subscriber was ready"

    online = sub.wait_for(status_topic, timeout=15)[0]
    sub.wait_for(keep, count=3, where=lambda m: m.at >= online.at)  # the burst is long over

    burst = [m for m in sub.on(keep) if m.at - online.at < 0.05]
    (online_wall,) = wall_clock([online])
    # A regular tick may fall due in the very same moment; a replayed backlog would be >= 4.
    coinciding = slots_between(
        "keep", interval, service.phase_slots(interval), online_wall - 0.1, online_wall + 0.05
    )
    assert 1 <= len(burst) <= 1 + coinciding
    assert burst[0].json() == {"online": 1, "sensor": "keep"}
    assert burst[0].qos == 1
    keep_stats, drop_stats = entry_stats(service, "keep"), entry_stats(service, "drop")
    assert keep_stats["dropped"] == 0
    assert drop_stats["deferred"] == 0
    assert service.get_status()["statistics"]["total_dropped"] >= drop_stats["dropped"] >= 4


# ---- config problems and status -------------------------------------------------------------


def test_invalid_entries_are_logged_with_where_and_what_while_valid_ones_publish(
    broker: Mosquitto,
    subscriber_factory: SubscriberFactory,
    start_service: StartService,
    topic_base: str,
) -> None:
    """Invalid entries are skipped and logged with position, id and field; valid ones run."""
    entries = [
        entry("good-1", f"{topic_base}/good-1", interval=3600),
        entry("bad-qos", f"{topic_base}/bad-qos", interval=1, qos=7),
        entry("bad-interval", f"{topic_base}/bad-interval", interval=0),
        entry("good-2", f"{topic_base}/good-2", interval=3600),
    ]
    sub = subscriber_factory(f"{topic_base}/#")

    with capture_logs() as logs:
        service = start_service(broker.port, entries)
        sub.wait_for(f"{topic_base}/good-1")
        sub.wait_for(f"{topic_base}/good-2")

    invalid = [e for e in logs if e["event"] == "config_entry_invalid"]
    assert [(e["log_level"], e["entry_position"], e["entry_id"], e["field"]) for e in invalid] == [
        ("error", 2, "bad-qos", "qos"),
        ("error", 3, "bad-interval", "interval"),
    ]
    assert 'entry 2 (id "bad-qos"): qos must be 0, 1 or 2, got 7' in invalid[0]["error"]
    assert "interval must be between 0.1 and 86400, got 0" in invalid[1]["error"]
    # Each names the line and column of its field in the file, as `validate` does.
    lines = service.settings.config_path.read_text().splitlines()
    for event, key in zip(invalid, ('"qos"', '"interval"'), strict=True):
        assert lines[event["line"] - 1][event["column"] - 1 :].startswith(key)
    status = service.get_status()
    assert status["active_configs"] == 2
    assert sorted(status["entries"]) == ["good-1", "good-2"]
    barrier(broker.port, sub, f"{topic_base}/marker")
    assert not sub.on(f"{topic_base}/bad-qos")
    assert not sub.on(f"{topic_base}/bad-interval")


def test_get_status_reports_configs_connection_totals_and_per_entry_counters(
    broker: Mosquitto,
    subscriber_factory: SubscriberFactory,
    start_service: StartService,
    topic_base: str,
) -> None:
    """get_status() has active_configs, connected, statistics totals and per-entry counters."""
    fast, slow = f"{topic_base}/fast", f"{topic_base}/slow"
    sub = subscriber_factory(f"{topic_base}/#")
    service = start_service(
        broker.port,
        [entry("fast", fast, interval=0.2, qos=1), entry("slow", slow, interval=3600, retain=True)],
    )
    sub.wait_for(fast, count=3)
    wait_until(lambda: entry_stats(service, "fast").get("published", 0) >= 3, 10)

    status = service.get_status()

    assert status["active_configs"] == 2
    assert status["connected"] is True
    totals = status["statistics"]
    assert totals["total_published"] >= 4
    assert totals["total_errors"] == 0
    assert isinstance(totals["uptime_seconds"], float)
    assert 0 < totals["uptime_seconds"] < 60
    fast_status = status["entries"]["fast"]
    assert (
        fast_status["topic"],
        fast_status["interval"],
        fast_status["qos"],
        fast_status["retain"],
        fast_status["lwt"],
    ) == (fast, 0.2, 1, False, False)
    assert fast_status["published"] >= 3
    assert (fast_status["errors"], fast_status["dropped"]) == (0, 0)
    # A QoS 1 tick that finds the connection still in its handshake, or four messages still
    # unacknowledged (a loaded machine), is deferred to the next one, not lost.
    assert 0 <= fast_status["deferred"] < fast_status["published"]
    assert abs(fast_status["last_published_at"] - time.time()) < 30
    assert fast_status["next_run_at"] is not None
    assert status["entries"]["slow"]["retain"] is True
    json.dumps(status)  # served as-is by GET /status


def test_max_retries_gives_up_with_exit_code_4(tmp_path: Path, topic_base: str) -> None:
    """With --max-retries 2 and nothing listening, the real process gives up and exits 4."""
    config = tmp_path / "config.json"
    write_config(config, [entry("x", f"{topic_base}/x")])
    proc = ServiceProcess(
        cli_args(
            free_port(),
            config,
            "--max-retries",
            "2",
            state_db=tmp_path / "state.db",
            log_file=tmp_path / "service.log",
            backoff=(0.1, 0.2),
        ),
        cwd=tmp_path,
    )
    try:
        assert proc.wait(30) == 4
    finally:
        proc.stop()
    gave_up = [e for e in proc.events() if e["message"] == "mqtt_gave_up"]
    assert len(gave_up) == 1
    assert gave_up[0]["reason"] == "connection refused"
    assert gave_up[0]["max_retries"] == 2


def test_mqtt_311_mode_publishes(
    broker: Mosquitto,
    subscriber_factory: SubscriberFactory,
    start_service: StartService,
    topic_base: str,
) -> None:
    """With mqtt_version 3.1.1 the service connects with MQTT 3.1.1 and publishes."""
    topic = f"{topic_base}/v311"
    sub = subscriber_factory(topic)
    service = start_service(
        broker.port, [entry("v311", topic, interval=3600, qos=1)], broker={"protocol": "3.1.1"}
    )

    message = sub.wait_for(topic)[0]

    assert message.json() == {"online": 1, "sensor": "v311"}
    assert message.qos == 1
    client_id = service.settings.broker.client_id
    # Mosquitto's notice line: "New client connected from ... as <id> (p2, ...)"; p2 is 3.1.1.
    assert f" as {client_id} (p2," in broker.log.read_text(errors="replace")


def test_no_entry_publishes_twice_within_half_its_interval_after_a_connect(
    broker: Mosquitto,
    subscriber_factory: SubscriberFactory,
    start_service: StartService,
    topic_base: str,
) -> None:
    """The publish on connect and the entry's next grid slot are at least half an interval
    apart, at start and after a reconnect (eight entries on different phases: some slot falls
    just after the connect)."""
    interval = 3.0
    entries = [entry(f"e{i}", f"{topic_base}/e{i}", interval) for i in range(8)]
    sub = subscriber_factory(f"{topic_base}/#")
    proxy = NetProxy(broker.port).start()
    try:
        service = start_service(proxy.port, entries)

        def first_two_gaps(since: float) -> list[float]:
            gaps = []
            for e in entries:
                after = sub.wait_for(
                    e["topic"], count=2, timeout=3 * interval, where=lambda m: m.at > since
                )
                gaps.append(after[1].at - after[0].at)
            return gaps

        assert min(first_two_gaps(0.0)) >= interval / 2 - 0.1
        severed = time.monotonic()
        proxy.sever()
        proxy.resume()
        wait_until(lambda: service.stats.reconnects >= 1, 10, message="a reconnect")
        assert min(first_two_gaps(severed)) >= interval / 2 - 0.1
    finally:
        proxy.stop()
