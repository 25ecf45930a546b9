"""Out of file descriptors (issue 27 #8): lwt connections never take the descriptors that HTTP,
the entries file, the state database and the log file need. The budget alone (pure, with a
counted number of open descriptors), then the real service under a low `ulimit -n` with 100
lwt entries against a real Mosquitto."""

from __future__ import annotations

import resource
from collections.abc import Callable
from pathlib import Path
from typing import Any

from scheduler_publisher.mqtt.descriptors import (
    RECOUNT_PERIOD,
    RESERVE_MAX,
    RESERVE_MIN,
    DescriptorBudget,
    reserve_for,
)
from tests.support import (
    Mosquitto,
    ServiceProcess,
    SubscriberFactory,
    call,
    cli_args,
    entry,
    free_port,
    wait_until,
    write_config,
)

LWT_ENTRIES = 100
WAITING = "waiting for a file descriptor"


# ---- the budget -----------------------------------------------------------------------------


def test_the_reserve_is_an_eighth_of_the_limit_within_its_bounds() -> None:
    """32 descriptors at the least, 64 at the most, an eighth of the limit in between."""
    assert [reserve_for(n) for n in (64, 256, 400, 512, 1024, 65536)] == [32, 32, 50, 64, 64, 64]
    assert (RESERVE_MIN, RESERVE_MAX) == (32, 64)


def test_links_get_descriptors_only_beyond_the_reserve() -> None:
    """With 64 allowed and 20 open, links may take 64 - 32 - 20 = 12; the 13th waits, and is
    admitted once a count a period later finds descriptors freed, never sooner."""
    open_now = [20]
    counts: list[float] = []

    def count() -> int:
        counts.append(0)
        return open_now[0]

    budget = DescriptorBudget(lambda: 64, count=count)
    assert [budget.admit(0.0) for _ in range(13)] == [True] * 12 + [False]
    open_now[0] = 30  # 2 links gone, and 20 + 12 - 2 open
    assert not budget.admit(RECOUNT_PERIOD / 2)  # no recount yet: the last one is fresh
    assert budget.admit(RECOUNT_PERIOD)
    assert budget.admit(RECOUNT_PERIOD)
    assert not budget.admit(RECOUNT_PERIOD)
    budget.refund()  # taken, then not used (the connect rate said no)
    assert budget.admit(RECOUNT_PERIOD)
    assert len(counts) == 2  # a count per period at the most, and none while spare is plenty


def test_no_limit_means_no_budget() -> None:
    """An unlimited RLIMIT_NOFILE (or a system without /proc/self/fd) gates nothing."""
    budget = DescriptorBudget(lambda: None, count=lambda: 10**6)
    assert all(budget.admit(0.0) for _ in range(1000))
    assert DescriptorBudget(lambda: 64, count=lambda: None).admit(0.0)


def test_a_limit_raised_while_running_lets_the_waiting_links_in() -> None:
    """The limit is read again at each count: raised from 64 to 128 (prlimit), the next
    count a period later finds room for more links."""
    limit = [64]
    budget = DescriptorBudget(lambda: limit[0], count=lambda: 32)
    assert not budget.admit(0.0)  # 64 - 32 reserve - 32 open: nothing to spare
    limit[0] = 128
    assert not budget.admit(RECOUNT_PERIOD / 2)
    assert budget.admit(RECOUNT_PERIOD)  # 128 - 32 - 32 = 64 to spare
    assert (budget.limit, budget.reserve) == (128, 32)


# ---- the real service under a low ulimit -n ---------------------------------------------------


def nofile(soft: int, hard: int) -> Callable[[], None]:
    """A before_exec hook: the child's RLIMIT_NOFILE."""
    return lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def lwt_entries(topic_base: str, count: int = LWT_ENTRIES) -> list[dict[str, Any]]:
    return [entry(f"lwt-{n}", f"{topic_base}/lwt-{n}", 5, lwt=True) for n in range(count)]


def answers(port: int, path: str) -> dict[str, Any] | None:
    """The JSON of `path` when it answers within 5 s; None when it does not (yet)."""
    try:
        reply = call(port, path, timeout=5)
    except OSError:
        return None
    if reply.status not in (200, 503):
        return None
    result: dict[str, Any] = reply.json()
    return result


def gauge(port: int, name: str) -> float | None:
    reply = call(port, "/metrics", timeout=5)
    for line in reply.body.decode().splitlines():
        if line.startswith(f"{name} "):
            return float(line.split()[1])
    return None


def events(proc: ServiceProcess, name: str) -> list[dict[str, Any]]:
    return [e for e in proc.events() if e.get("message") == name]


def test_lwt_links_beyond_the_descriptors_wait_and_the_service_stays_usable(
    broker: Mosquitto,
    subscriber_factory: SubscriberFactory,
    processes: list[ServiceProcess],
    tmp_path: Path,
    topic_base: str,
) -> None:
    """`ulimit -n 64` (soft and hard) and 100 lwt entries: some links connect, the rest wait
    for a descriptor and are reported as such (/status, /metrics, one log event); /health
    and /status answer, and an edit of the entries file is applied. Once entries are
    removed, the links that waited connect."""
    config = tmp_path / "entries.json"
    write_config(config, lwt_entries(topic_base))
    port = free_port()
    proc = ServiceProcess(
        cli_args(broker.port, config, http_port=port, state_db=tmp_path / "state.db"),
        tmp_path,
        before_exec=nofile(64, 64),
    )
    processes.append(proc)
    proc.wait_for_event("service_started")
    proc.wait_for_event("descriptors_short", timeout=60)  # every link has had its turn

    replies = [(answers(port, "/health"), answers(port, "/status")) for _ in range(5)]
    assert all(h is not None and h["ok"] and s is not None for h, s in replies), replies
    health, status = replies[-1]
    assert health is not None
    assert status is not None
    assert any(WAITING in w for w in health["warnings"]), health
    assert status["descriptors"]["limit"] == 64
    assert status["descriptors"]["reserve"] == 32
    assert 0 < status["descriptors"]["links_waiting"] < LWT_ENTRIES
    links = status["connection"]
    assert links["connected"]
    assert links["connections_up"] > 1  # the main one, and lwt links within the budget
    reasons = links["entries_without_connection"]["lwt_entries"].values()
    assert any(WAITING in reason for reason in reasons), reasons

    def gauge_agrees() -> bool:
        shown = gauge(port, "scheduler_publisher_connections_waiting_for_descriptor")
        now = answers(port, "/status")
        return bool(shown and now and shown == now["descriptors"]["links_waiting"])

    wait_until(gauge_agrees, 20, interval=0.5, message="the gauge equal to /status")
    assert len(events(proc, "descriptors_short")) == 1

    fresh = f"{topic_base}/fresh"
    sub = subscriber_factory(fresh)
    write_config(config, [*lwt_entries(topic_base), entry("fresh", fresh, 1)])
    sub.wait_for(fresh, timeout=30)

    kept = lwt_entries(topic_base, 3)
    write_config(config, [*kept, entry("fresh", fresh, 1)])

    def all_up() -> bool:
        status = answers(port, "/status")
        return bool(
            status
            and status["active_configs"] == len(kept) + 1
            and status["descriptors"]["links_waiting"] == 0
            and status["connection"]["connections_up"] == len(kept) + 1
        )

    wait_until(all_up, 60, interval=0.5, message="every kept lwt link up")
    proc.wait_for_event("descriptors_available", timeout=10)
    assert len(events(proc, "descriptors_short")) == 1
    assert proc.proc.poll() is None


def test_the_soft_limit_is_raised_to_the_hard_one_at_start(
    broker: Mosquitto, processes: list[ServiceProcess], tmp_path: Path, topic_base: str
) -> None:
    """Soft 64, hard 4096: the service raises its soft limit to 4096 and says so, and then
    every one of the 100 lwt links connects."""
    config = tmp_path / "entries.json"
    write_config(config, lwt_entries(topic_base))
    port = free_port()
    proc = ServiceProcess(
        cli_args(broker.port, config, http_port=port), tmp_path, before_exec=nofile(64, 4096)
    )
    processes.append(proc)
    raised = proc.wait_for_event("open_files_limit_raised")
    assert (raised["before"], raised["after"]) == (64, 4096)

    def every_link_up() -> dict[str, Any] | None:
        status = answers(port, "/status")
        if status is None or status["connection"]["connections_up"] != LWT_ENTRIES + 1:
            return None
        return status

    status = wait_until(every_link_up, 60, interval=0.5, message="every lwt link up")
    assert status["descriptors"] == {"limit": 4096, "reserve": 64, "links_waiting": 0}
    assert not events(proc, "descriptors_short")
