"""The counters: who writes them, and that a removed entry's counters stay gone."""

from __future__ import annotations

from pathlib import Path

from scheduler_publisher.statestore import EntryCounters, SavedState, StateStore, Totals
from scheduler_publisher.stats import Stats
from tests.netproxy import NetProxy
from tests.support import (
    InProcessServices,
    Mosquitto,
    SubscriberFactory,
    call,
    entry,
    free_port,
    wait_until,
    write_config,
)


def test_a_late_acknowledgement_does_not_bring_a_removed_entry_back(
    tmp_path: Path,
    broker: Mosquitto,
    proxy: NetProxy,
    subscriber_factory: SubscriberFactory,
    topic_base: str,
) -> None:
    """A QoS 1 entry removed while its PUBACKs are held up stays gone once they arrive: not in
    the counters, not in /metrics, not in the state database."""
    config = tmp_path / "config.json"
    gone = entry("gone", f"{topic_base}/gone", 0.3, qos=1)
    stay = entry("stay", f"{topic_base}/stay", 0.3, qos=1)
    write_config(config, [gone, stay])
    http_port = free_port()
    sub = subscriber_factory(f"{topic_base}/#")
    services = InProcessServices(tmp_path)
    service = services.start(
        proxy.port, config=config, watch=False, http_port=http_port, state_db=tmp_path / "state.db"
    )
    try:
        wait_until(lambda: service.stats.entry("gone").published >= 1, 10, message="a PUBACK")
        proxy.blackhole()  # PUBLISHes wait in the proxy; no PUBACK comes back
        wait_until(
            lambda: service.stats.entry("gone").deferred >= 1,
            10,
            message="the entry's messages held up",
        )
        held = len(sub.on(gone["topic"]))
        write_config(config, [stay])
        assert service.reload_config()
        wait_until(lambda: "gone" not in service.stats.entries, 5, message="counters removed")
        at_resume = service.stats.entry("stay").published
        proxy.resume()
        sub.wait_for(gone["topic"], count=held + 1)  # the held messages reached the broker
        # PUBACKs come back in order on the one connection: once acknowledgements of messages
        # sent after the resume are counted, those of the removed entry have been handled.
        wait_until(
            lambda: service.stats.entry("stay").published >= at_resume + 6,
            15,
            message="acknowledgements after the resume",
        )
        assert "gone" not in service.stats.entries
        assert "gone" not in service.get_status()["entries"]
        metrics = call(http_port, "/metrics", timeout=5).body.decode()
        assert 'entry="stay"' in metrics
        assert 'entry="gone"' not in metrics
    finally:
        services.close()
    store = StateStore(tmp_path / "state.db")
    saved = store.open()
    store.close()
    assert set(saved.entries) == {"stay"}


def test_counters_are_created_only_for_added_entries() -> None:
    """Recording for an entry that was never added, or was removed, counts in the totals but
    creates no per-entry counters; restored counters come back when the entry is added."""
    stats = Stats()
    stats.record_published("ghost")
    stats.record_error("ghost", "x")
    stats.record_dropped("ghost")
    stats.record_deferred("ghost")
    stats.record_tick("ghost", 0.01, 0)
    assert stats.entries == {}
    assert (stats.published, stats.errors, stats.dropped) == (1, 1, 1)
    stats.restore(
        SavedState(
            Totals(), {"real": EntryCounters(published=5), "old": EntryCounters(published=7)}
        )
    )
    stats.add_entry("real")
    stats.record_published("real")
    assert stats.entry("real").published == 6
    assert set(stats.saved_state().entries) == {"real"}  # "old" is no longer configured
    stats.remove_entry("real")
    stats.record_published("real")
    assert stats.entries == {}


def test_packets_written_together_count_as_published_at_one_moment() -> None:
    """record_written (one send() of pre-encoded packets) counts like record_published for each
    entry, an entry twice if it was written twice, ghosts in the totals only, and stamps every
    entry with the one moment of the write."""
    moments = iter([1000.0, 2000.0])
    stats = Stats(wall=lambda: next(moments))
    for entry_id in ("a", "b"):
        stats.add_entry(entry_id)
    stats.record_written(["a", "b", "ghost", "a"])
    assert stats.published == 4
    assert (stats.entry("a").published, stats.entry("b").published) == (2, 1)
    assert stats.entry("a").last_published_at == stats.entry("b").last_published_at == 1000.0
    assert "ghost" not in stats.entries
    stats.record_written(["b"])
    assert (stats.entry("b").published, stats.entry("b").last_published_at) == (2, 2000.0)
