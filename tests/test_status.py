"""The typed status snapshot and the /status document it renders (pure, no broker)."""

from __future__ import annotations

import dataclasses
import json
from datetime import UTC, datetime
from typing import Any

import pytest

from scheduler_publisher.config.loader import PublishConfig
from scheduler_publisher.ops.status import (
    ConfigStatus,
    ConnectionStatus,
    EntryStatus,
    HealthStatus,
    ServiceStatus,
    StatisticsStatus,
)
from scheduler_publisher.stats import Stats

CONNECTION_VIEW: dict[str, Any] = {
    "connected": True,
    "connections": 2,
    "connections_up": 1,
    "broker": "mqtts://b.example:8883",
    "brokers": ["mqtts://a.example:8883", "mqtts://b.example:8883"],
    "protocol": "5",
    "client_id": "sp-1",
    "last_error": None,
    "client_id_conflict": None,
    "entries_without_connection": {
        "count": 1,
        "main_connection_down": False,
        "lwt_entries": {"b": "connecting"},
        "lwt_entries_total": 1,
    },
    "quarantined_entries": {"c": "the broker dropped the connection"},
}
NEXT = datetime(2026, 6, 1, 12, 0, 5, tzinfo=UTC)


def clocks() -> tuple[Any, Any]:
    return (lambda: 1_800_000_000.0), (lambda: 100.0)


def snapshot(stats: Stats) -> ServiceStatus:
    a = PublishConfig("a", "t/a", {"v": 1}, 5.0, qos=1, retain=True)
    b = PublishConfig("b", "t/b", {"v": 2}, 2.5, lwt=True)
    return ServiceStatus(
        statistics=StatisticsStatus.of(stats),
        connection=ConnectionStatus.of(CONNECTION_VIEW),
        health=HealthStatus(problems=(), warnings=("1 lwt entries have no connection: b",)),
        config=ConfigStatus(
            path="/etc/c.json",
            digest="ab12",
            last_reload_at=1.5,
            last_error=None,
            watcher="inotify",
        ),
        entries={
            "a": EntryStatus.of(
                a, quarantined=None, next_run_at=NEXT, stats=stats.entries.get("a")
            ),
            "b": EntryStatus.of(
                b, quarantined="dropped", next_run_at=None, stats=stats.entries.get("b")
            ),
        },
    )


def counted_stats() -> Stats:
    wall, monotonic = clocks()
    stats = Stats(wall=wall, monotonic=monotonic)
    stats.add_entry("a")
    stats.record_published("a")
    stats.record_tick("a", 0.004, 2)
    stats.reloads = 3
    return stats


def test_to_json_is_the_status_document() -> None:
    """Every key /status has always had, with the same values and nesting."""
    assert snapshot(counted_stats()).to_json() == {
        "active_configs": 2,
        "connected": True,
        "statistics": {
            "total_published": 1,
            "total_errors": 0,
            "total_dropped": 0,
            "reconnects": 0,
            "uptime_seconds": 0.0,
            "lifetime_uptime_seconds": 0.0,
            "published_this_run": 1,
            "reloads": 3,
            "config_errors": 0,
            "checkpoint_failures": 0,
            "checkpoint_error": None,
        },
        "connection": CONNECTION_VIEW,
        "health": {"ok": True, "problems": [], "warnings": ["1 lwt entries have no connection: b"]},
        "config": {
            "path": "/etc/c.json",
            "digest": "ab12",
            "last_reload_at": 1.5,
            "last_error": None,
            "watcher": "inotify",
            "errors": [],
            "errors_total": 0,
            "skipped_entries": [],
            "skipped_total": 0,
            "held_back_entries": [],
            "held_back_total": 0,
        },
        "entries": {
            "a": {
                "topic": "t/a",
                "interval": 5.0,
                "qos": 1,
                "retain": True,
                "lwt": False,
                "quarantined": None,
                "next_run_at": "2026-06-01T12:00:05+00:00",
                "published": 1,
                "errors": 0,
                "dropped": 0,
                "deferred": 0,
                "missed": 2,
                "last_published_at": 1_800_000_000.0,
                "last_error": None,
                "lateness": {"count": 1, "mean_ms": 4.0, "max_ms": 4.0},
            },
            "b": {
                "topic": "t/b",
                "interval": 2.5,
                "qos": 0,
                "retain": False,
                "lwt": True,
                "quarantined": "dropped",
                "next_run_at": None,
            },
        },
    }


def test_statistics_and_entry_counters_match_what_stats_reports() -> None:
    """The snapshot's figures are those of Stats.summary() and EntryStats.as_dict()."""
    stats = counted_stats()
    status = snapshot(stats).to_json()
    assert status["statistics"] == stats.summary()
    counters = {k: v for k, v in status["entries"]["a"].items() if k in stats.entry("a").as_dict()}
    assert counters == stats.entry("a").as_dict()


def test_snapshot_does_not_move_with_the_counters() -> None:
    """Counters written after the snapshot was taken do not show in it."""
    stats = counted_stats()
    status = snapshot(stats)
    stats.record_published("a")
    stats.reloads += 1
    stats.entries["a"].last_error = "later"
    assert status.statistics.total_published == 1
    assert status.statistics.reloads == 3
    counters = status.entries["a"].counters
    assert counters is not None
    assert (counters.published, counters.last_error) == (1, None)


def test_snapshot_is_frozen_and_serialisable() -> None:
    """Readers on other threads cannot change it, and its document is plain JSON."""
    status = snapshot(counted_stats())
    with pytest.raises(dataclasses.FrozenInstanceError):
        status.config = status.config  # type: ignore[misc]
    with pytest.raises(TypeError):
        status.connection.quarantined_entries["x"] = "y"  # type: ignore[index]
    assert json.loads(json.dumps(status.to_json())) == status.to_json()


def test_health_ok_follows_the_problems() -> None:
    """ok is false as soon as there is one liveness problem; warnings do not count."""
    assert HealthStatus(problems=(), warnings=("w",)).ok
    assert not HealthStatus(problems=("scheduler not running",), warnings=()).to_json()["ok"]
