"""Live config reload: real files, a real watcher, a real Mosquitto, the real service."""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import random
import shutil
import signal
import subprocess
import threading
import time
import uuid
from collections.abc import Callable, Iterator, MutableMapping
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import structlog
from watchdog.events import FileSystemEvent, FileSystemEventHandler
from watchdog.observers import Observer

from scheduler_publisher.clock import Clock
from scheduler_publisher.mailbox import Trigger
from scheduler_publisher.scheduling.plan import grid_start
from scheduler_publisher.service import PublisherService
from scheduler_publisher.watcher import _Handler
from tests.clocks import ShiftedClock
from tests.support import (
    InProcessServices,
    Mosquitto,
    Received,
    ServiceProcess,
    Subscriber,
    cli_args,
    entry,
    payload_is,
    wait_until,
    write_config,
)

Entries = list[dict[str, Any]]
StartService = Callable[..., PublisherService]
MakeSubscriber = Callable[..., Subscriber]
LogEvents = list[MutableMapping[str, Any]]  # what capture_logs() collects


# --- ways of saving a file ---------------------------------------------------------------------


def dump(entries: Entries) -> str:
    return json.dumps(entries, indent=2)


def save_in_place(path: Path, text: str) -> None:
    """Truncate and write the same inode, as `echo > file` or most simple editors do."""
    with path.open("w") as stream:
        stream.write(text)


def save_atomically(path: Path, text: str) -> None:
    """Write a temporary file beside it and rename it over the original (Ansible, Salt)."""
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def save_in_two_steps(path: Path, text: str, pause: float = 0.0) -> None:
    """Truncate, write half, write the rest, with `pause` after each step: a reader can see the
    empty file and the half-written one."""
    half = len(text) // 2
    with path.open("w") as stream:
        stream.flush()  # step 1, the truncation, happened on open
        for part in (text[:half], text[half:]):
            if pause:
                threading.Event().wait(pause)  # part of the scenario: a slow writer, not a sync
            stream.write(part)
            stream.flush()


SAVE_STYLES = (save_in_place, save_atomically, save_in_two_steps)


# --- what the service did ----------------------------------------------------------------------


def events(logs: LogEvents, name: str) -> LogEvents:
    return [e for e in list(logs) if e.get("event") == name]


def wait_for_event(logs: LogEvents, name: str, count: int = 1, timeout: float = 5) -> LogEvents:
    found: LogEvents = wait_until(
        lambda: len(events(logs, name)) >= count and events(logs, name),
        timeout,
        message=f"{count} {name!r} event(s)",
    )
    return found


def job_ids(service: PublisherService) -> set[str]:
    return service.scheduled_ids


def next_run(service: PublisherService, entry_id: str) -> datetime:
    when = service.next_run(entry_id)
    assert when is not None, f"no job for {entry_id}"
    return when


def intervals(service: PublisherService) -> dict[str, float]:
    return {i: e["interval"] for i, e in service.get_status()["entries"].items()}


def wait_for_file_reload(service: PublisherService, timeout: float = 5) -> None:
    """The watcher noticed the last edit and the main loop has re-read the file since.

    The debounce keeps the change pending for 0.3 s, so polling every 5 ms cannot miss it. The
    loop takes the change just before it re-reads, so a manual reload (queued behind the
    re-read in the same loop) is the barrier that says the re-read has finished."""
    wait_until(
        lambda: service.file_change_pending,
        timeout,
        interval=0.005,
        message="the watcher to notice the edit",
    )
    wait_until(
        lambda: not service.file_change_pending,
        timeout,
        interval=0.005,
        message="the debounced re-read",
    )
    service.reload_config(timeout)


def wait_for_jobs(service: PublisherService, expected: set[str]) -> None:
    wait_until(lambda: job_ids(service) == expected, 3, message=f"jobs {sorted(expected)}")


def payloads(messages: list[Received]) -> list[Any]:
    return [m.json() for m in messages]


def wire(data: dict[str, Any]) -> dict[str, Any]:
    return {"online": 1, **data}


def latest(sub: Subscriber, topic: str, n: int) -> list[Any]:
    return payloads(sub.on(topic)[-n:])


def latest_are(sub: Subscriber, topic: str, expected: list[Any]) -> Callable[[], bool]:
    """A wait_until predicate: the last payloads on `topic` are `expected`."""
    return lambda: latest(sub, topic, len(expected)) == expected


def count_on(sub: Subscriber, topic: str) -> int:
    return len(sub.on(topic))


class JobSampler:
    """Samples the scheduler's job set from a thread, to show it never lost a running entry."""

    def __init__(self, service: PublisherService, must_run: set[str]) -> None:
        self._service = service
        self._must_run = must_run
        self._stop = threading.Event()
        self.samples = 0
        self.missing: list[set[str]] = []
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> JobSampler:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join(5)
        assert self.samples > 0
        assert self.missing == [], f"running entries went missing: {self.missing[:3]}"

    def _run(self) -> None:
        while not self._stop.wait(0.005):
            lacking = self._must_run - job_ids(self._service)
            self.samples += 1
            if lacking:
                self.missing.append(lacking)


# --- fixtures ----------------------------------------------------------------------------------


@pytest.fixture
def config(tmp_path: Path) -> Path:
    """The config file, alone in its folder (the broker's files live elsewhere)."""
    folder = tmp_path / "conf"
    folder.mkdir()
    return folder / "publish.json"


@pytest.fixture
def logs() -> Iterator[LogEvents]:
    with structlog.testing.capture_logs() as captured:
        yield captured


@pytest.fixture
def start_service(tmp_path: Path, broker: Mosquitto, config: Path) -> Iterator[StartService]:
    services = InProcessServices(tmp_path)

    def start(
        entries: Entries | None = None,
        *,
        loop: bool = True,
        clock: Clock | None = None,
        **overrides: Any,
    ) -> PublisherService:
        """`loop=False`: the test thread drives the main loop with service.step()."""
        service = services.start(
            broker.port,
            entries,
            config=config,
            loop=loop,
            clock=clock,
            broker={"backoff_min": 0.2, "backoff_max": 1},
            **{"state_db": tmp_path / "s.db", **overrides},
        )
        wait_until(service.is_connected, 10, message="the service's connection")
        return service

    yield start
    services.close()


@pytest.fixture
def subscribe(subscriber_factory: MakeSubscriber, topic_base: str) -> Callable[[], Subscriber]:
    return lambda: subscriber_factory(f"{topic_base}/#")


# --- added, removed, rescheduled, updated -------------------------------------------------------


def test_added_entry_publishes_promptly_before_its_first_slot(
    start_service: StartService,
    subscribe: Callable[[], Subscriber],
    config: Path,
    topic_base: str,
    logs: LogEvents,
) -> None:
    """A new hourly entry gets a job and publishes within 2 s, not at its first grid slot."""
    a = entry("a", f"{topic_base}/a", 3600)
    sub = subscribe()
    service = start_service([a])
    sub.wait_for(a["topic"])
    b = entry("b", f"{topic_base}/b", 3600, data={"fresh": True})
    written = time.monotonic()
    write_config(config, [a, b])
    (got,) = sub.wait_for(b["topic"], timeout=2)
    assert got.at - written < 2
    assert got.json() == wire({"fresh": True})
    # The network thread learns an entry before its job exists: the log line comes last.
    (reloaded,) = wait_for_event(logs, "config_reloaded")
    assert reloaded["added"] == ["b"]
    assert job_ids(service) == {"a", "b"}
    assert next_run(service, "b") > datetime.now(UTC)  # the first slot is still to come
    assert count_on(sub, a["topic"]) == 1  # the unchanged hourly entry did not publish again


def test_removed_entry_loses_its_job_and_publishes_no_more(
    start_service: StartService, subscribe: Callable[[], Subscriber], config: Path, topic_base: str
) -> None:
    """A removed entry's job goes and its topic stays silent while the others keep publishing."""
    keep = entry("keep", f"{topic_base}/keep", 0.2)
    gone = entry("gone", f"{topic_base}/gone", 0.2)
    sub = subscribe()
    service = start_service([keep, gone])
    sub.wait_for(gone["topic"], count=3)
    write_config(config, [keep])
    wait_until(lambda: job_ids(service) == {"keep"}, 3, message="the job to be removed")
    # The kept entry is the clock: a few of its ticks flush anything already in flight...
    sub.wait_for(keep["topic"], count=count_on(sub, keep["topic"]) + 3)
    silent_from = count_on(sub, gone["topic"])
    # ...and ten more ticks later the removed one must still be silent.
    sub.wait_for(keep["topic"], count=count_on(sub, keep["topic"]) + 10)
    assert count_on(sub, gone["topic"]) == silent_from
    assert "gone" not in service.get_status()["entries"]


def test_removed_retained_entry_is_cleared_when_configured(
    start_service: StartService, subscriber_factory: MakeSubscriber, config: Path, topic_base: str
) -> None:
    """With clear_retained_on_remove a removed entry's retained message is wiped from the broker."""
    keep = entry("keep", f"{topic_base}/keep", 3600, retain=True)
    gone = entry("gone", f"{topic_base}/gone", 3600, retain=True)
    live = subscriber_factory(f"{topic_base}/#")
    start_service([keep, gone], clear_retained_on_remove=True)
    live.wait_for(gone["topic"])
    write_config(config, [keep])
    live.wait_for(gone["topic"], where=lambda m: m.payload == b"", timeout=3)
    # A newcomer gets every retained message of the tree at once: the kept one, not the gone one.
    late = subscriber_factory(f"{topic_base}/#")
    late.wait_for(keep["topic"])
    assert late.on(gone["topic"]) == []


def test_interval_change_reschedules_the_job(
    start_service: StartService,
    subscribe: Callable[[], Subscriber],
    config: Path,
    topic_base: str,
    logs: LogEvents,
) -> None:
    """An hourly entry made fast is rescheduled onto its new grid and starts ticking at once."""
    a = entry("a", f"{topic_base}/a", 3600)
    sub = subscribe()
    service = start_service([a])
    sub.wait_for(a["topic"])
    hourly_next = next_run(service, "a")
    write_config(config, [{**a, "interval": 0.25}])
    sub.wait_for(a["topic"], count=5, timeout=3)
    assert next_run(service, "a") < hourly_next
    slots = service.phase_slots(0.25)
    phase = (next_run(service, "a") - grid_start("a", 0.25, slots)).total_seconds() % 0.25
    assert min(phase, 0.25 - phase) < 1e-3  # on the new grid
    assert intervals(service) == {"a": 0.25}
    (reloaded,) = wait_for_event(logs, "config_reloaded")
    assert (reloaded["rescheduled"], reloaded["updated"]) == (["a"], [])


def test_auto_spread_keeps_phases_until_an_interval_outgrows_it_four_times(
    start_service: StartService, config: Path, topic_base: str, logs: LogEvents
) -> None:
    """`--phase-slots auto`: an interval's phase groups are sized when it first has entries and
    kept by reloads that add to it, so no running entry's phase moves; a reload that brings it
    four times the groups it was sized for spreads its entries again, once, logged."""
    interval = 3600.0
    first = [entry(f"old-{n}", f"{topic_base}/old-{n}", interval) for n in range(5)]
    service = start_service(first)
    assert service.phase_slots(interval) == 1  # 5 entries: one group

    def phases(ids: list[str]) -> dict[str, datetime | None]:
        return {i: next_run(service, i) for i in ids}

    def on_grid(entry_id: str, slots: int) -> bool:
        offset = next_run(service, entry_id) - grid_start(entry_id, interval, slots)
        return offset.total_seconds() % interval == 0

    old_ids = [e["id"] for e in first]
    before = phases(old_ids)
    assert all(on_grid(i, 1) for i in old_ids)
    more = [entry(f"new-{n}", f"{topic_base}/new-{n}", interval) for n in range(394)]
    write_config(config, first + more)  # 399 entries: auto would give 3 groups, < 4 x 1
    assert service.reload_config(timeout=20)
    assert service.phase_slots(interval) == 1
    assert phases(old_ids) == before  # nothing moved
    assert events(logs, "phases_respread") == []

    write_config(config, [*first, *more, entry("last", f"{topic_base}/last", interval)])
    assert service.reload_config(timeout=20)  # 400 entries: 4 groups, 4 x what it was sized for
    assert service.phase_slots(interval) == 4
    everyone = [*old_ids, *(e["id"] for e in more), "last"]
    assert all(on_grid(i, 4) for i in everyone)
    assert phases(old_ids) != before
    (respread,) = events(logs, "phases_respread")
    assert (respread["interval"], respread["entries"]) == (interval, 400)
    assert (respread["phase_groups_before"], respread["phase_groups"]) == (1, 4)
    # The reload's own summary names what the file changed, not the entries that moved.
    reloads = events(logs, "config_reloaded")
    assert (reloads[-1]["added"], reloads[-1]["rescheduled"]) == (["last"], [])


def test_payload_qos_retain_change_uses_new_values_on_the_same_phase(
    start_service: StartService,
    subscriber_factory: MakeSubscriber,
    config: Path,
    topic_base: str,
    logs: LogEvents,
) -> None:
    """data/qos/retain-only changes reach the wire at once and on every tick; phases are kept."""
    fast = entry("fast", f"{topic_base}/fast", 1, data={"v": "old"})
    hourly = entry("hourly", f"{topic_base}/hourly", 3600, data={"v": "old"})
    sub = subscriber_factory(f"{topic_base}/#")
    service = start_service([fast, hourly])
    sub.wait_for(fast["topic"], count=2)
    hourly_next = next_run(service, "hourly")
    written = time.monotonic()
    write_config(
        config,
        [
            {**fast, "data": {"v": "new"}, "qos": 1, "retain": True},
            {**hourly, "data": {"v": "new"}},
        ],
    )
    (edited,) = sub.wait_for(hourly["topic"], where=lambda m: m.json()["v"] == "new", timeout=2)
    assert edited.at - written < 2  # an hourly entry's edit does not wait for its next slot
    fresh = sub.wait_for(fast["topic"], count=2, where=lambda m: m.json()["v"] == "new", timeout=3)
    assert {m.qos for m in fresh} == {1}
    # the phase was not reset: the same hourly slot, or a later one if that slot came meanwhile
    assert (next_run(service, "hourly") - hourly_next) % timedelta(hours=1) == timedelta(0)
    slots = service.phase_slots(1)
    phase = (next_run(service, "fast") - grid_start("fast", 1, slots)).total_seconds() % 1
    assert min(phase, 1 - phase) < 1e-3
    (reloaded,) = wait_for_event(logs, "config_reloaded")
    assert sorted(reloaded["updated"]) == ["fast", "hourly"]
    assert reloaded["rescheduled"] == reloaded["added"] == []
    newcomer = subscriber_factory(fast["topic"])
    (kept, *_) = newcomer.wait_for(fast["topic"], where=lambda m: m.retain)
    assert kept.json() == wire({"v": "new"})  # retained now
    assert len(sub.on(hourly["topic"])) == 2  # start-up and the edit: no tick in between


def test_reload_leaves_unchanged_entries_next_run_untouched(
    start_service: StartService, config: Path, topic_base: str, logs: LogEvents
) -> None:
    """Adding, removing and rescheduling other entries does not move an unchanged job."""
    still = entry("still", f"{topic_base}/still", 3600)
    other = entry("other", f"{topic_base}/other", 3600)
    gone = entry("gone", f"{topic_base}/gone", 3600)
    service = start_service([still, other, gone])
    before = next_run(service, "still")
    write_config(
        config,
        [
            still,
            {**other, "interval": 1800, "data": {"x": 1}},
            entry("new", f"{topic_base}/new", 3600),
        ],
    )
    wait_for_event(logs, "config_reloaded")
    assert job_ids(service) == {"still", "other", "new"}
    assert next_run(service, "still") == before
    assert service.get_status()["entries"]["still"]["next_run_at"] == before.isoformat()
    assert intervals(service) == {"still": 3600, "other": 1800, "new": 3600}


# --- the watcher -------------------------------------------------------------------------------


def test_burst_of_saves_is_debounced_into_one_reload(
    start_service: StartService, config: Path, topic_base: str, logs: LogEvents
) -> None:
    """Five saves in quick succession give one reload of the last version."""
    base = [entry("a", f"{topic_base}/a", 60)]
    service = start_service(base)
    added = [entry(f"n{n}", f"{topic_base}/n{n}", 60) for n in range(5)]
    for n in range(1, 6):
        save_atomically(config, dump(base + added[:n]))
    (reloaded,) = wait_for_event(logs, "config_reloaded")
    assert reloaded["added"] == [f"n{n}" for n in range(5)]
    # A later, separate edit is the second reload: nothing else came between.
    save_atomically(config, dump(base))
    assert [e["removed"] for e in wait_for_event(logs, "config_reloaded", 2)][1] == [
        f"n{n}" for n in range(5)
    ]
    assert len(events(logs, "config_reloaded")) == 2
    assert job_ids(service) == {"a"}


def test_edit_made_during_a_reload_is_not_lost(
    start_service: StartService, subscribe: Callable[[], Subscriber], config: Path, topic_base: str
) -> None:
    """A save that lands while the loop is still parsing the previous one is applied after it."""
    a = entry("a", f"{topic_base}/a", 3600, data={"v": 0})
    sub = subscribe()
    service = start_service([a])
    blob = list(range(150_000))  # about 1 MB: parsing it keeps the reload busy for a while
    save_atomically(config, dump([{**a, "data": {"v": 1, "blob": blob}}]))
    wait_until(
        lambda: service.file_change_pending,
        5,
        interval=0.005,
        message="the watcher to notice the first save",
    )
    # The loop takes the change as it starts re-reading; the debounce says when that is due.
    due = time.monotonic() + service.settings.reload_debounce.quiet + 0.05
    wait_until(
        lambda: not service.file_change_pending or time.monotonic() >= due,
        5,
        interval=0.001,
        message="the first reload to begin",
    )
    save_atomically(config, dump([{**a, "data": {"v": 2}}]))
    sub.wait_for(a["topic"], where=lambda m: m.json()["v"] == 2, timeout=5)
    assert (
        service.get_status()["config"]["digest"] == hashlib.sha256(config.read_bytes()).hexdigest()
    )


@pytest.mark.parametrize("force_polling", [False, True], ids=["inotify", "polling"])
def test_touch_and_identical_rewrite_are_not_reloads(
    start_service: StartService, config: Path, topic_base: str, logs: LogEvents, force_polling: bool
) -> None:
    """Touching or rewriting the same bytes re-reads the file but reloads nothing."""
    # An hour's interval: no regular slot falls inside the test and moves next_run by itself.
    a = entry("a", f"{topic_base}/a", 3600)
    service = start_service([a], force_polling=force_polling)
    before = (next_run(service, "a"), service.get_status()["config"]["digest"])
    os.utime(config)
    save_in_place(config, dump([a]))
    wait_for_file_reload(service)
    save_atomically(config, dump([a]))
    wait_for_file_reload(service)
    assert events(logs, "config_reloaded") == []
    assert service.stats.reloads == 0
    assert (next_run(service, "a"), service.get_status()["config"]["digest"]) == before
    # The watcher is still alive and a real change still applies.
    save_in_place(config, dump([{**a, "interval": 3000}]))
    wait_for_event(logs, "config_reloaded")
    assert intervals(service) == {"a": 3000}


def test_polling_fallback_applies_edits(
    start_service: StartService, subscribe: Callable[[], Subscriber], config: Path, topic_base: str
) -> None:
    """With force_polling the polling observer picks up in-place and atomic saves."""
    a = entry("a", f"{topic_base}/a", 3600)
    sub = subscribe()
    service = start_service([a], force_polling=True)
    assert service.get_status()["config"]["watcher"] == "polling"
    b = entry("b", f"{topic_base}/b", 3600)
    save_in_place(config, dump([a, b]))
    sub.wait_for(b["topic"], timeout=3)
    c = entry("c", f"{topic_base}/c", 3600)
    save_atomically(config, dump([a, c]))
    sub.wait_for(c["topic"], timeout=3)
    wait_for_jobs(service, {"a", "c"})


def test_safety_reread_applies_an_edit_without_any_watcher(
    start_service: StartService, subscribe: Callable[[], Subscriber], config: Path, topic_base: str
) -> None:
    """With no watcher, the periodic safety re-read still finds and applies an edit."""
    a = entry("a", f"{topic_base}/a", 3600)
    sub = subscribe()
    service = start_service([a], watch=False, safety_check_interval=0.5)
    assert service.get_status()["config"]["watcher"] == "none"
    b = entry("b", f"{topic_base}/b", 3600)
    save_in_place(config, dump([a, b]))
    sub.wait_for(b["topic"], timeout=3)
    wait_for_jobs(service, {"a", "b"})


def test_safety_reread_runs_when_its_interval_has_passed_on_the_service_clock(
    start_service: StartService, config: Path, topic_base: str
) -> None:
    """Without a watcher, an edit waits for the safety re-read, which the main loop runs at
    the first turn after its interval has passed on the service's clock, not before."""
    clock = ShiftedClock()
    a = entry("a", f"{topic_base}/a", 3600)
    service = start_service([a], watch=False, loop=False, clock=clock)
    save_in_place(config, dump([a, entry("b", f"{topic_base}/b", 3600)]))
    service.step()
    clock.advance(service.settings.safety_check_interval - 1)
    service.step()
    assert job_ids(service) == {"a"}, "the safety re-read is not due yet"
    clock.advance(1)
    service.step()
    assert job_ids(service) == {"a", "b"}
    assert service.stats.reloads == 1


def test_a_stepped_service_shuts_down_at_the_step_after_a_stop_request(
    start_service: StartService, topic_base: str, logs: LogEvents
) -> None:
    """With the loop left to the caller, a stop request is carried out by the next step,
    which then says the service is no longer running."""
    service = start_service([entry("a", f"{topic_base}/a", 3600)], loop=False)
    assert service.step() is True
    service.request_stop()
    assert events(logs, "service_stopped") == []
    assert service.step() is False
    assert len(events(logs, "service_stopped")) == 1
    assert service.step() is False  # and it stays stopped, shut down once


class _Recorder(FileSystemEventHandler):
    """Feeds every raw event to the watcher's real filter and remembers which ones poked."""

    def __init__(self, path: Path) -> None:
        self.seen: list[FileSystemEvent] = []
        self.poked: list[FileSystemEvent] = []
        self.write_ended: list[bool] = []  # for each poke: whether it ended a write
        self._filter = _Handler((str(path),), self._poke)

    def _poke(self, write_ended: bool) -> None:
        self.poked.append(self.seen[-1])
        self.write_ended.append(write_ended)

    def on_any_event(self, event: FileSystemEvent) -> None:
        self.seen.append(event)
        self._filter.on_any_event(event)


def test_watcher_filter_pokes_only_for_the_config_file(config: Path) -> None:
    """Swap, backup and temp files never poke; the file itself and a move onto it do."""
    config.write_text("[]")
    recorder = _Recorder(config.resolve())
    observer = Observer()
    observer.schedule(recorder, str(config.parent.resolve()), recursive=False)
    observer.start()
    try:
        swap = config.with_name(f".{config.name}.swp")
        for n in range(5):
            swap.write_text(f"swap {n}")
        config.with_name("4913").write_text("")  # vim's can-I-create probe
        config.with_name("4913").unlink()
        swap.unlink()
        save_atomically(config, "[ ]")
        wait_until(lambda: recorder.poked, 5, message="a poke for the config file")
        moved_in = [e for e in recorder.poked if e.event_type == "moved"]
        assert [os.fsdecode(e.dest_path) for e in moved_in] == [str(config.resolve())]
        save_in_place(config, "[  ]")
        wait_until(
            lambda: {"modified", "closed"} <= {e.event_type for e in recorder.poked},
            5,
            message="the pokes of an in-place write and of its close",
        )
    finally:
        observer.stop()
        observer.join(5)
    target = str(config.resolve())
    assert all(
        target in (os.fsdecode(e.src_path), os.fsdecode(e.dest_path)) for e in recorder.poked
    )
    assert len(recorder.seen) > len(recorder.poked)  # the churn was seen, and filtered out
    # A rename onto the file and its close after writing end a write; the rest may not.
    ended = {
        (e.event_type, flag) for e, flag in zip(recorder.poked, recorder.write_ended, strict=True)
    }
    assert {("moved", True), ("modified", False), ("closed", True)} <= ended
    assert all(flag == (kind in ("moved", "closed")) for kind, flag in ended)


# --- how files get saved -----------------------------------------------------------------------


def assert_edit_applied(
    service: PublisherService, sub: Subscriber, topic_base: str, logs: LogEvents
) -> None:
    """The edit made by each save-pattern test: a's payload v1 -> v2, b added."""
    sub.wait_for(f"{topic_base}/b", timeout=2)
    sub.wait_for(f"{topic_base}/a", where=lambda m: m.json()["v"] == 2, timeout=3)
    # The network thread learns an entry before its job exists: the log line comes last.
    wait_until(
        lambda: any(e["added"] == ["b"] for e in events(logs, "config_reloaded")),
        3,
        message="the config_reloaded event",
    )
    assert job_ids(service) == {"a", "b"}


def before_and_after(topic_base: str) -> tuple[Entries, Entries]:
    a = entry("a", f"{topic_base}/a", 0.5, data={"v": 1})
    b = entry("b", f"{topic_base}/b", 3600)
    return [a], [{**a, "data": {"v": 2}}, b]


def test_save_in_place(
    start_service: StartService,
    subscribe: Callable[[], Subscriber],
    config: Path,
    topic_base: str,
    logs: LogEvents,
) -> None:
    """Truncating and rewriting the same inode is applied."""
    old, new = before_and_after(topic_base)
    sub = subscribe()
    service = start_service(old)
    save_in_place(config, dump(new))
    assert_edit_applied(service, sub, topic_base, logs)


def test_save_atomic_rename(
    start_service: StartService,
    subscribe: Callable[[], Subscriber],
    config: Path,
    topic_base: str,
    logs: LogEvents,
) -> None:
    """A temporary file os.replace()d over the config (Ansible, Salt) is applied."""
    old, new = before_and_after(topic_base)
    sub = subscribe()
    service = start_service(old)
    save_atomically(config, dump(new))
    assert_edit_applied(service, sub, topic_base, logs)
    assert len(events(logs, "config_reloaded")) == 1


def test_save_with_sed_in_place(
    start_service: StartService,
    subscribe: Callable[[], Subscriber],
    config: Path,
    topic_base: str,
    logs: LogEvents,
) -> None:
    """The real `sed -i` (a temp file in the folder, renamed over the config) is applied."""
    old, new = before_and_after(topic_base)
    sub = subscribe()
    service = start_service(old)
    sed = shutil.which("sed") or "/usr/bin/sed"
    append_b = f"s|^]$|, {json.dumps(new[1])}]|"
    subprocess.run([sed, "-i", "-e", 's/"v": 1/"v": 2/', "-e", append_b, str(config)], check=True)
    assert json.loads(config.read_text()) == new
    assert_edit_applied(service, sub, topic_base, logs)
    assert len(events(logs, "config_reloaded")) == 1


def test_save_vim_style_with_backup_and_swap_churn(
    start_service: StartService,
    subscribe: Callable[[], Subscriber],
    config: Path,
    topic_base: str,
    logs: LogEvents,
) -> None:
    """vim's save (rename to `~` backup, write new, delete backup) amid .swp churn is applied."""
    old, new = before_and_after(topic_base)
    sub = subscribe()
    service = start_service(old)
    swap = config.with_name(f".{config.name}.swp")
    with JobSampler(service, {"a"}):
        for n in range(20):
            swap.write_text(f"swap {n}")
        backup = config.with_name(config.name + "~")
        config.rename(backup)
        save_in_place(config, dump(new))
        swap.write_text("swap final")
        backup.unlink()
        swap.unlink()
        assert_edit_applied(service, sub, topic_base, logs)
    assert len(events(logs, "config_reloaded")) == 1


def test_save_truncate_then_write_after_a_pause(
    start_service: StartService,
    subscribe: Callable[[], Subscriber],
    config: Path,
    topic_base: str,
    logs: LogEvents,
) -> None:
    """A writer that truncates, then writes in two steps 0.4 s apart never takes entries down."""
    old, new = before_and_after(topic_base)
    sub = subscribe()
    service = start_service(old)
    with JobSampler(service, {"a"}):
        save_in_two_steps(config, dump(new), pause=0.4)
        assert_edit_applied(service, sub, topic_base, logs)
    # The empty and the half-written file, each at most once (if a re-read caught it).
    assert len(events(logs, "config_reload_failed")) <= 2
    assert service.get_status()["config"]["last_error"] is None


def test_save_delete_then_recreate(
    start_service: StartService,
    subscribe: Callable[[], Subscriber],
    config: Path,
    topic_base: str,
    logs: LogEvents,
) -> None:
    """Deleting the file keeps everything running (logged once); recreating it is applied."""
    old, new = before_and_after(topic_base)
    sub = subscribe()
    service = start_service(old)
    with JobSampler(service, {"a"}):
        config.unlink()
        (failed,) = wait_for_event(logs, "config_reload_failed")
        assert "No such file" in failed["error"]
        sub.wait_for(f"{topic_base}/a", count=count_on(sub, f"{topic_base}/a") + 2)
        config.write_text(dump(new))
        assert_edit_applied(service, sub, topic_base, logs)
    assert len(events(logs, "config_reload_failed")) == 1


# --- bad edits ---------------------------------------------------------------------------------


def break_file(path: Path, how: str, good: str) -> None:
    if how == "half-written":
        save_in_place(path, good[: len(good) // 2])
    elif how == "empty":
        save_in_place(path, "")
    else:
        path.unlink()


@pytest.mark.parametrize("how", ["half-written", "empty", "deleted"])
def test_unusable_file_keeps_everything_running_and_is_logged_once(
    start_service: StartService,
    subscribe: Callable[[], Subscriber],
    config: Path,
    topic_base: str,
    logs: LogEvents,
    how: str,
) -> None:
    """A file that cannot be parsed changes nothing, is logged once, and the next good one wins."""
    a = entry("a", f"{topic_base}/a", 0.3, data={"v": 1})
    sub = subscribe()
    service = start_service([a])
    good = dump([a])
    with JobSampler(service, {"a"}):
        break_file(config, how, good)
        wait_for_event(logs, "config_reload_failed")
        for _ in range(3):  # the same problem again, by every route: still one log line
            if how != "deleted":
                save_in_place(config, config.read_text())
                wait_for_file_reload(service)
            assert service.reload_config() is False
        assert len(events(logs, "config_reload_failed")) == 1
        assert service.stats.config_errors == 1
        assert service.get_status()["config"]["last_error"]
        sub.wait_for(a["topic"], count=count_on(sub, a["topic"]) + 3)  # still publishing
        assert job_ids(service) == {"a"}
        save_atomically(config, dump([{**a, "data": {"v": 2}}]))
        sub.wait_for(a["topic"], where=lambda m: m.json()["v"] == 2, timeout=3)
    assert service.get_status()["config"]["last_error"] is None
    assert len(events(logs, "config_reloaded")) == 1


def test_distinct_problems_are_each_logged_once(
    start_service: StartService, config: Path, topic_base: str, logs: LogEvents
) -> None:
    """Each different problem is logged once however often it is seen; a repeat after a good
    version is a new report."""
    a = entry("a", f"{topic_base}/a", 30)
    service = start_service([a])
    for text in ("[{", "[{", "{}", "{}", "[{"):
        save_in_place(config, text)
        wait_for_file_reload(service)
    errors = [e["error"] for e in events(logs, "config_reload_failed")]
    assert len(errors) == 3
    assert errors[0] == errors[2] != errors[1]
    assert "not valid JSON" in errors[0]
    assert "must be a JSON array of entries, got object" in errors[1]
    save_in_place(config, dump([a]))  # the same bytes as the running version: nothing to apply
    wait_for_file_reload(service)
    assert service.get_status()["config"]["last_error"] is None
    save_in_place(config, "[{")
    wait_for_file_reload(service)
    assert len(events(logs, "config_reload_failed")) == 4
    assert job_ids(service) == {"a"}


@pytest.mark.parametrize("refused", ["Infinity", "9" * 5000, '{"k": ' * 70 + "1" + "}" * 70])
def test_entry_json_refuses_keeps_its_last_good_version_and_the_rest_applies(
    start_service: StartService,
    subscribe: Callable[[], Subscriber],
    config: Path,
    topic_base: str,
    logs: LogEvents,
    refused: str,
) -> None:
    """One Infinity, one 5,000-digit integer or one data nested 70 deep no longer makes the
    whole file unusable: that entry is reported by id and line, keeps publishing its last good
    version, and the other entry's edit reaches the wire."""
    a = entry("a", f"{topic_base}/a", 0.3, data={"v": 1})
    b = entry("b", f"{topic_base}/b", 0.3, data={"v": 1})
    sub = subscribe()
    service = start_service([a, b], watch=False)
    good_b = json.dumps({**b, "data": {"v": 2}})
    save_in_place(config, f'[\n{good_b},\n{json.dumps(a)[:-1]}, "extra": {refused}}}\n]')
    assert service.reload_config() is True
    (invalid,) = events(logs, "config_entry_invalid")
    assert (invalid["entry_position"], invalid["entry_id"]) == (2, "a")
    assert invalid["error"].endswith("(line 3, column 1)")
    assert events(logs, "config_reload_failed") == []
    sub.wait_for(b["topic"], where=lambda m: m.json()["v"] == 2, timeout=3)
    sub.wait_for(a["topic"], count=count_on(sub, a["topic"]) + 2)  # the last good a
    assert job_ids(service) == {"a", "b"}


def test_invalid_entry_keeps_its_last_good_version(
    start_service: StartService,
    subscribe: Callable[[], Subscriber],
    config: Path,
    topic_base: str,
    logs: LogEvents,
) -> None:
    """An entry made invalid keeps publishing its old version; the rest of the file applies."""
    a = entry("a", f"{topic_base}/a", 0.3, data={"v": 1})
    b = entry("b", f"{topic_base}/b", 0.3, data={"v": 1})
    sub = subscribe()
    service = start_service([a, b])
    sub.wait_for(a["topic"])
    c = entry("c", f"{topic_base}/c", 3600)
    broken_a = {**a, "data": {"v": 2}, "interval": "fast"}
    write_config(config, [broken_a, {**b, "data": {"v": 2}}, c])
    sub.wait_for(c["topic"], timeout=2)
    sub.wait_for(b["topic"], where=lambda m: m.json()["v"] == 2, timeout=3)
    (invalid,) = wait_for_event(logs, "config_entry_invalid")
    assert (invalid["entry_id"], invalid["field"]) == ("a", "interval")
    (reloaded,) = wait_for_event(logs, "config_reloaded")
    assert reloaded["kept_last_good"] == ["a"]
    assert (reloaded["added"], reloaded["updated"]) == (["c"], ["b"])
    seen = count_on(sub, a["topic"])
    sub.wait_for(a["topic"], count=seen + 4)
    assert {m.json()["v"] for m in sub.on(a["topic"])} == {1}
    assert job_ids(service) == {"a", "b", "c"}
    assert intervals(service)["a"] == 0.3
    write_config(config, [{**a, "data": {"v": 3}}, b, c])  # fixed: the new version runs
    sub.wait_for(a["topic"], where=lambda m: m.json()["v"] == 3, timeout=3)


# --- many random edits -------------------------------------------------------------------------


def random_entries(rng: random.Random, current: Entries, topic_base: str) -> Entries:
    """The next version of the file: some entries added, removed or modified."""
    entries = {e["id"]: e for e in current}
    for _ in range(rng.randint(1, 3)):
        action = rng.choice(["add", "remove", "modify", "modify"])
        if action == "add" or not entries:
            id_ = f"e{rng.randrange(14)}"
            entries[id_] = entry(
                id_,
                f"{topic_base}/{id_}",
                rng.choice([0.5, 1, 2]),
                data={"n": rng.randrange(10**6)},
            )
        elif action == "remove":
            entries.pop(rng.choice(sorted(entries)))
        else:
            id_ = rng.choice(sorted(entries))
            field = rng.choice(["interval", "data", "qos"])
            value = {
                "interval": rng.choice([0.5, 1, 2]),
                "data": {"n": rng.randrange(10**6)},
                "qos": rng.choice([0, 1]),
            }[field]
            entries[id_] = {**entries[id_], field: value}
    return list(entries.values())


def test_random_rapid_edits_converge_to_the_final_file(
    start_service: StartService,
    subscribe: Callable[[], Subscriber],
    config: Path,
    topic_base: str,
    logs: LogEvents,
) -> None:
    """300 random edits in mixed save styles end with exactly the last file's entries running."""
    rng = random.Random(20240601)
    current = [entry("e0", f"{topic_base}/e0", 1, data={"n": 0})]
    sub = subscribe()
    service = start_service(current)
    for _ in range(300):
        current = random_entries(rng, current, topic_base)
        save = rng.choice(SAVE_STYLES)
        save(config, dump(current))
        if rng.random() < 0.06:  # now and then a pause long enough for a reload to happen
            threading.Event().wait(rng.uniform(0.2, 0.45))
    final = {e["id"]: e for e in current}
    wait_until(
        lambda: (
            job_ids(service) == set(final)
            and intervals(service) == {i: e["interval"] for i, e in final.items()}
        ),
        2,
        message="the final file's entries and intervals",
    )
    assert len(events(logs, "config_reloaded")) > 5  # reloads happened along the way, too
    for e in final.values():
        sub.wait_for(e["topic"], where=payload_is(wire(e["data"])), timeout=5)
    newest = {i: latest(sub, e["topic"], 1) for i, e in final.items()}
    assert newest == {i: [wire(e["data"])] for i, e in final.items()}


# --- manual triggers ---------------------------------------------------------------------------


def test_reload_config_reports_whether_it_applied(
    start_service: StartService, config: Path, topic_base: str, logs: LogEvents
) -> None:
    """reload_config() applies the file before returning True, and returns False when unusable."""
    a = entry("a", f"{topic_base}/a", 30)
    service = start_service([a], watch=False)
    b = entry("b", f"{topic_base}/b", 30)
    save_in_place(config, dump([a, b]))
    assert service.reload_config() is True
    assert job_ids(service) == {"a", "b"}
    save_in_place(config, '[{"id": ')
    assert service.reload_config() is False
    assert job_ids(service) == {"a", "b"}
    assert service.reload_config() is False
    assert len(events(logs, "config_reload_failed")) == 1
    save_in_place(config, dump([b]))
    assert service.reload_config() is True
    assert job_ids(service) == {"b"}


def test_one_config_reloaded_event_lists_every_change(
    start_service: StartService, config: Path, topic_base: str, logs: LogEvents
) -> None:
    """One applied reload logs one config_reloaded naming the added/removed/rescheduled/updated."""
    old = [entry(i, f"{topic_base}/{i}", 30) for i in ("same", "gone", "slow", "data")]
    service = start_service(old, watch=False)
    new = [
        old[0],
        {**old[2], "interval": 60},
        {**old[3], "data": {"x": 1}},
        entry("new", f"{topic_base}/new", 30),
    ]
    save_in_place(config, dump(new))
    assert service.reload_config() is True
    (reloaded,) = events(logs, "config_reloaded")
    assert {k: reloaded[k] for k in ("added", "removed", "rescheduled", "updated")} == {
        "added": ["new"],
        "removed": ["gone"],
        "rescheduled": ["slow"],
        "updated": ["data"],
    }
    assert reloaded["active_configs"] == 4
    assert service.reload_config() is True  # unchanged: applied nothing, logged nothing
    assert len(events(logs, "config_reloaded")) == 1


def test_recovery_from_a_broken_file_is_logged_with_the_problem_and_its_duration(
    start_service: StartService, config: Path, topic_base: str, logs: LogEvents
) -> None:
    """A good version applied after an unusable file logs one config_recovered naming what
    was broken and for how long; a later good reload logs no second one."""
    a = entry("a", f"{topic_base}/a", 30)
    service = start_service([a], watch=False)
    save_in_place(config, "[{")
    assert service.reload_config() is False
    started = time.monotonic()
    assert service.reload_config() is False  # the same problem again: one broken spell
    wait_until(lambda: time.monotonic() - started >= 0.2, 1, message="a measurable spell")
    b = entry("b", f"{topic_base}/b", 30)
    save_in_place(config, dump([a, b]))
    assert service.reload_config() is True
    (recovered,) = events(logs, "config_recovered")
    assert "not valid JSON" in recovered["problem"]
    assert recovered["broken_seconds"] >= 0.2
    assert recovered["log_level"] == "info"
    save_in_place(config, dump([b]))
    assert service.reload_config() is True
    assert len(events(logs, "config_recovered")) == 1


def test_restoring_the_running_version_after_a_problem_is_a_recovery(
    start_service: StartService, config: Path, topic_base: str, logs: LogEvents
) -> None:
    """Putting back the exact bytes that were running (chmod 000 then 644, a revert) ends the
    broken spell too, though nothing needs applying."""
    a = entry("a", f"{topic_base}/a", 30)
    service = start_service([a], watch=False)
    text = config.read_text()
    save_in_place(config, "{}")
    assert service.reload_config() is False
    save_in_place(config, text)
    assert service.reload_config() is True
    (recovered,) = events(logs, "config_recovered")
    assert "must be a JSON array of entries, got object" in recovered["problem"]
    assert events(logs, "config_reloaded") == []


def test_recovery_from_an_invalid_entry_is_logged(
    start_service: StartService, config: Path, topic_base: str, logs: LogEvents
) -> None:
    """An entry-level error (its last good version kept) that a later save fixes ends with a
    config_recovered naming the entry."""
    a = entry("a", f"{topic_base}/a", 30)
    service = start_service([a], watch=False)
    save_in_place(config, dump([{**a, "interval": 0}]))
    assert service.reload_config() is True  # applied in part: `a` keeps its last good version
    assert service.reload_config() is True  # re-read unchanged: the entry is still broken
    assert events(logs, "config_recovered") == []
    save_in_place(config, dump([{**a, "interval": 60}]))
    assert service.reload_config() is True
    (recovered,) = events(logs, "config_recovered")
    assert recovered["problem"].startswith('entry 1 (id "a"): interval must be between')


@pytest.mark.parametrize("trigger", ["api", "http"])
def test_manual_reload_that_finds_nothing_changed_logs_at_info(
    start_service: StartService, config: Path, topic_base: str, logs: LogEvents, trigger: Trigger
) -> None:
    """A manual reload of an unchanged file says so at info, with who asked; the watcher's and
    the safety re-read's unchanged reads stay silent."""
    clock = ShiftedClock()
    service = start_service([entry("a", f"{topic_base}/a", 30)], loop=False, clock=clock)
    assert service.reload_config(trigger=trigger) is True  # answered by this thread: the loop
    (unchanged,) = events(logs, "config_unchanged")
    assert (unchanged["trigger"], unchanged["log_level"], unchanged["active_configs"]) == (
        trigger,
        "info",
        1,
    )
    os.utime(config)  # the watcher sees it, and re-reads after the debounce
    wait_until(lambda: service.file_change_pending, 5, message="the watcher to notice the touch")
    clock.advance(service.settings.reload_debounce.quiet)
    service.step()
    assert not service.file_change_pending, "the debounced re-read was taken"
    clock.advance(service.settings.safety_check_interval)
    service.step()  # the safety re-read
    assert service.reload_config(trigger=trigger) is True
    assert len(events(logs, "config_unchanged")) == 2


def test_a_save_by_rename_is_read_after_the_short_debounce_a_touch_after_the_long_one(
    start_service: StartService, config: Path, topic_base: str
) -> None:
    """A rename onto the file ends a write: it is re-read once the path has been quiet for
    `write_ended`. A touch may be the first of several changes: it waits for `quiet`."""
    clock = ShiftedClock()
    a = entry("a", f"{topic_base}/a", 30)
    service = start_service([a], loop=False, clock=clock)
    debounce = service.settings.reload_debounce
    assert debounce.write_ended < debounce.quiet

    def digest() -> object:
        return service.get_status()["config"]["digest"]

    def pending() -> bool:  # read afresh: mypy would keep an earlier assert's narrowing
        return service.file_change_pending

    save_atomically(config, dump([{**a, "data": {"v": 2}}]))
    wait_until(pending, 5, message="the watcher to see the save")
    clock.advance(debounce.write_ended)
    service.step()
    assert not pending(), "the save was taken after the short debounce"
    assert digest() == hashlib.sha256(config.read_bytes()).hexdigest()

    os.utime(config)
    wait_until(pending, 5, message="the watcher to see the touch")
    clock.advance(debounce.write_ended)
    service.step()
    assert pending(), "a touch waits for the full debounce"
    clock.advance(debounce.quiet - debounce.write_ended)
    service.step()
    assert not pending()


def test_request_methods_do_not_claim_signal_handler_safety() -> None:
    """request_stop and request_reload take locks, which is why cli/main.py calls them from a
    thread; their docstrings say that instead of calling them signal-handler safe."""
    for method in (PublisherService.request_stop, PublisherService.request_reload):
        doc = " ".join((method.__doc__ or "").split())
        assert "signal-handler safe" not in doc.lower()
        assert "signal handler" in doc


def test_sighup_reloads_the_real_process(
    broker: Mosquitto,
    tmp_path: Path,
    config: Path,
    subscriber_factory: MakeSubscriber,
    topic_base: str,
) -> None:
    """SIGHUP makes the real CLI process, running without a watcher, apply the edited file; a
    second SIGHUP with nothing changed logs config_unchanged."""
    a = entry("a", f"{topic_base}/a", 3600)
    write_config(config, [a])
    sub = subscriber_factory(f"{topic_base}/#")
    proc = ServiceProcess(
        cli_args(broker.port, config, "--no-watch", "--backoff-min", "0.2"), cwd=tmp_path
    )
    try:
        assert proc.wait_for_event("service_started")["watcher"] == "none"
        sub.wait_for(a["topic"])
        b = entry("b", f"{topic_base}/b", 3600)
        write_config(config, [a, b])
        assert [e for e in proc.events() if e.get("message") == "config_reloaded"] == []
        proc.signal(signal.SIGHUP)
        reloaded = proc.wait_for_event("config_reloaded")
        assert (reloaded["added"], reloaded["removed"]) == (["b"], [])
        sub.wait_for(b["topic"], timeout=3)
        proc.signal(signal.SIGHUP)  # nothing changed since: said at info, naming the signal
        unchanged = proc.wait_for_event("config_unchanged")
        assert (unchanged["trigger"], unchanged["log.level"]) == ("signal", "info")
        proc.signal(signal.SIGTERM)
        assert proc.wait(10) == 0
    finally:
        proc.stop()
    assert len([e for e in proc.events() if e.get("message") == "config_reloaded"]) == 1


# --- thread safety -----------------------------------------------------------------------------


def test_payload_change_under_fast_publishing_is_never_mixed(
    start_service: StartService, subscribe: Callable[[], Subscriber], config: Path, topic_base: str
) -> None:
    """While a 0.1 s entry publishes, every message is wholly the old or wholly the new payload."""
    old = {"v": "old", "blob": "o" * 4000}
    new = {"v": "new", "blob": "n" * 4000}
    fast = entry("fast", f"{topic_base}/fast", 0.1, data=old)
    sub = subscribe()
    start_service([fast])
    sub.wait_for(fast["topic"], count=5)
    for data in [new, old, new, old, new]:
        save_atomically(config, dump([{**fast, "data": data}]))
        wait_until(
            latest_are(sub, fast["topic"], [wire(data)] * 3),
            3,
            message="three ticks of the new payload",
        )
    received = payloads(sub.on(fast["topic"]))
    assert set(map(json.dumps, received)) == {json.dumps(wire(old)), json.dumps(wire(new))}
    flips = sum(1 for x, y in itertools.pairwise(received) if x != y)
    assert flips == 5  # old* new* old* ...: each change switched once and for good
