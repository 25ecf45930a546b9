"""Schedule: one APScheduler job per entry, all calling the one shared tick function, and
carrying as little per job as APScheduler allows (10,000 entries means 10,000 jobs)."""

from __future__ import annotations

import math
import queue
import random
import threading
import time
from datetime import UTC, datetime, timedelta
from types import SimpleNamespace
from typing import Any

import apscheduler.schedulers.base as aps_base
import pytest
from apscheduler.events import (
    EVENT_ALL,
    EVENT_JOB_ERROR,
    EVENT_JOB_EXECUTED,
    EVENT_JOB_MAX_INSTANCES,
    JobEvent,
)
from apscheduler.executors.base import MaxInstancesReachedError
from apscheduler.schedulers.background import BackgroundScheduler
from apscheduler.schedulers.base import STATE_PAUSED, STATE_RUNNING, BaseScheduler
from structlog.testing import capture_logs

from scheduler_publisher.config.loader import PublishConfig
from scheduler_publisher.mqtt.netloop import NetworkLoop
from scheduler_publisher.scheduling import scheduler as scheduling
from scheduler_publisher.scheduling.executor import InlineExecutor
from scheduler_publisher.scheduling.plan import grid_start
from scheduler_publisher.scheduling.scheduler import ENTRY_JOBS, Schedule
from scheduler_publisher.scheduling.triggers import grid_trigger
from tests.support import group_ids, wait_until


def test_jobs_share_one_tick_and_keep_no_per_job_strings(loop: NetworkLoop) -> None:
    ticked: list[str] = []
    lock = threading.Lock()

    def tick(entry_id: str, _slot: datetime | None = None, _missed: int = 0) -> None:
        with lock:
            ticked.append(entry_id)

    schedule = Schedule(tick, loop)
    schedule.start()
    try:
        for i in range(3):
            schedule.add(PublishConfig(id=f"e{i}", topic=f"t/{i}", data={}, interval=0.1))
        jobs = [schedule.scheduler.get_job(f"e{i}") for i in range(3)]
        assert schedule.job_ids() == {"e0", "e1", "e2"}
        assert len({id(job.func) for job in jobs}) == 1, "one shared publish function"
        # No args tuple per job either: the executor passes the job's id, the entry's.
        assert [job.args for job in jobs] == [(), (), ()]
        # No "module:qualname" string per job (only pickling job stores need it) and one
        # shared name string.
        assert [job.func_ref for job in jobs] == [None, None, None]
        assert len({id(job.name) for job in jobs}) == 1
        wait_until(lambda: {"e0", "e1", "e2"} <= set(ticked), 10, message="every job ticks")
    finally:
        schedule.shutdown()


def test_entries_named_like_internal_jobs_leave_the_heartbeat_alone(loop: NetworkLoop) -> None:
    """Entries whose ids equal internal job ids, added and removed, neither replace nor remove
    the scheduler's heartbeat: it keeps beating, and job_ids() lists entries only."""
    schedule = Schedule(lambda *_: None, loop)
    schedule.start()
    try:
        for name in ("__heartbeat__", "heartbeat"):
            schedule.add(PublishConfig(id=name, topic="t/x", data={}, interval=60))
        assert schedule.job_ids() == {"__heartbeat__", "heartbeat"}
        beat = schedule.heartbeat
        wait_until(lambda: schedule.heartbeat > beat, 5, message="a beat while they run")
        for name in ("__heartbeat__", "heartbeat"):
            schedule.remove(name)
        assert schedule.job_ids() == set()
        beat = schedule.heartbeat
        wait_until(lambda: schedule.heartbeat > beat, 5, message="a beat after their removal")
        assert schedule.is_alive()
    finally:
        schedule.shutdown()


def on_grid(when: datetime, entry_id: str, interval: float) -> bool:
    offset_ms = round((when - grid_start(entry_id, interval)).total_seconds() * 1000)
    return offset_ms % round(interval * 1000) == 0


def entry_events(events: queue.Queue[JobEvent], wanted: int, until: Any) -> list[Any]:
    """Entries' job events of the codes in `wanted`, gathered until `until(gathered)` holds."""
    gathered: list[Any] = []
    while not until(gathered):
        event = events.get(timeout=10)
        if event.jobstore == ENTRY_JOBS and event.code & wanted:
            gathered.append(event)
    return gathered


def test_listeners_hear_every_run_on_its_grid_slot_and_every_failure(loop: NetworkLoop) -> None:
    """EVENT_JOB_EXECUTED for each run, at the slot the tick was given, on the entry's grid;
    EVENT_JOB_ERROR with the exception when a tick raises, while the other entry keeps running."""
    slots: list[datetime | None] = []

    def tick(entry_id: str, slot: datetime | None = None, _missed: int = 0) -> None:
        if entry_id == "bad":
            raise RuntimeError("boom")
        slots.append(slot)

    events: queue.Queue[JobEvent] = queue.Queue()
    schedule = Schedule(tick, loop)
    schedule.scheduler.add_listener(events.put, EVENT_JOB_EXECUTED | EVENT_JOB_ERROR)
    schedule.start()
    try:
        for name in ("good", "bad"):
            schedule.add(PublishConfig(id=name, topic=f"t/{name}", data={}, interval=0.1))
        gathered = entry_events(
            events,
            EVENT_JOB_EXECUTED | EVENT_JOB_ERROR,
            lambda got: (
                sum(e.code == EVENT_JOB_EXECUTED for e in got) >= 3
                and any(e.code == EVENT_JOB_ERROR for e in got)
            ),
        )
    finally:
        schedule.shutdown()
    executed = [e for e in gathered if e.code == EVENT_JOB_EXECUTED]
    assert {e.job_id for e in executed} == {"good"}
    assert [e.scheduled_run_time for e in executed] == slots[: len(executed)]
    assert all(on_grid(e.scheduled_run_time, "good", 0.1) for e in executed)
    failed = next(e for e in gathered if e.code == EVENT_JOB_ERROR)
    assert failed.job_id == "bad"
    assert isinstance(failed.exception, RuntimeError)
    assert "boom" in str(failed.exception)
    assert "raise RuntimeError" in failed.traceback
    assert on_grid(failed.scheduled_run_time, "bad", 0.1)


def test_a_job_still_running_is_not_started_again() -> None:
    """max_instances=1: a second submission while the run is going raises
    MaxInstancesReachedError; once it has finished the job runs again, and no count is left."""
    executor = InlineExecutor()
    executor.start(BackgroundScheduler(timezone=UTC), "default")
    running, release = threading.Event(), threading.Event()
    calls: list[str] = []

    def tick(entry_id: str, _slot: datetime | None = None, _missed: int = 0) -> None:
        calls.append(entry_id)
        running.set()
        release.wait(10)

    trigger = grid_trigger(1.0, grid_start("e", 1.0))
    job = SimpleNamespace(
        id="e", func=tick, args=("e",), trigger=trigger, max_instances=1, _jobstore_alias=ENTRY_JOBS
    )
    slot = trigger.get_next_fire_time(None, datetime.now(UTC) - timedelta(seconds=1))
    assert slot is not None
    first = threading.Thread(target=executor.submit_job, args=(job, [slot]))
    first.start()
    assert running.wait(10)
    with pytest.raises(MaxInstancesReachedError):
        executor.submit_job(job, [slot])
    release.set()
    first.join(10)
    executor.submit_job(job, [slot])
    assert calls == ["e", "e"]
    assert "e" not in executor._instances


def test_a_run_the_executor_itself_fails_on_is_released(caplog: pytest.LogCaptureFixture) -> None:
    """A job the executor fails on before its tick (here: a grid trigger whose slot it cannot
    place) is logged as APScheduler logs it, and its instance is released: it is not refused
    next time. A trigger of another kind runs, with the slots handed over as the missed ones."""
    executor = InlineExecutor()
    executor.start(BackgroundScheduler(timezone=UTC), "default")
    calls: list[tuple[str, int]] = []
    job = SimpleNamespace(
        id="e",
        func=lambda entry_id, _slot, missed: calls.append((entry_id, missed)),
        args=("e",),
        trigger=grid_trigger(1.0, grid_start("e", 1.0)),
        max_instances=1,
        _jobstore_alias=ENTRY_JOBS,
    )
    slot = datetime.now(UTC)
    executor.submit_job(job, ["not a slot"])  # type: ignore[list-item]
    assert "Error running job e" in caplog.text
    assert calls == []
    executor.submit_job(job, [slot])
    assert calls == [("e", 0)]
    job.trigger = None
    executor.submit_job(job, [slot - timedelta(seconds=2), slot - timedelta(seconds=1), slot])
    assert calls == [("e", 0), ("e", 2)]


def test_a_run_reentering_the_scheduler_reports_max_instances(loop: NetworkLoop) -> None:
    """A tick that makes the scheduler look at due jobs again, before its own run is over, is
    not run a second time for that slot: listeners get EVENT_JOB_MAX_INSTANCES instead."""
    slots: list[datetime | None] = []

    def tick(_entry_id: str, slot: datetime | None = None, _missed: int = 0) -> None:
        slots.append(slot)
        if len(slots) == 1:
            schedule.scheduler._process_jobs()  # re-enters: this job is still due and running

    schedule = Schedule(tick, loop)
    events: queue.Queue[JobEvent] = queue.Queue()
    schedule.scheduler.add_listener(events.put, EVENT_JOB_MAX_INSTANCES)
    schedule.start()
    try:
        schedule.add(PublishConfig(id="e", topic="t/e", data={}, interval=0.2))
        (refused,) = entry_events(events, EVENT_JOB_MAX_INSTANCES, lambda got: len(got) >= 1)
    finally:
        schedule.shutdown()
    assert refused.job_id == "e"
    assert refused.scheduled_run_times == [slots[0]]
    assert slots.count(slots[0]) == 1, "the slot ran once"


def test_a_rescheduled_job_keeps_its_phase(loop: NetworkLoop) -> None:
    """Replacing an entry's job (a reload) keeps it on its own grid; a new interval moves it
    to the grid of that interval; the next run is never more than one interval away."""
    schedule = Schedule(lambda *_: None, loop)
    schedule.start()
    try:
        for interval in (1.0, 1.0, 0.5):
            schedule.add(PublishConfig(id="e", topic="t/e", data={}, interval=interval))
            next_run = schedule.next_run("e")
            assert next_run is not None
            assert on_grid(next_run, "e", interval)
            assert next_run - datetime.now(UTC) <= timedelta(seconds=interval)
        assert schedule.job_ids() == {"e"}
    finally:
        schedule.shutdown()


def test_a_shared_trigger_answers_each_question_for_itself() -> None:
    """The shared trigger remembers its last answer, yet asked in turn about other slots and
    other times (on time, behind, no previous run) it answers each as a fresh trigger would."""
    start = grid_start("e", 1.0)
    shared = grid_trigger(1.0, start)
    now = datetime.now(UTC)
    slot = shared.get_next_fire_time(None, now)
    assert slot is not None
    questions: list[tuple[datetime | None, datetime]] = [
        (None, now),
        (slot, slot),
        (slot, slot),
        (slot, slot + timedelta(hours=1)),
        (None, now),
        (slot + timedelta(seconds=1), slot + timedelta(seconds=1)),
    ]
    for previous, when in questions * 2:
        fresh = type(shared)(seconds=1.0, timezone=UTC, start_date=start)
        assert shared.get_next_fire_time(previous, when) == fresh.get_next_fire_time(previous, when)


def test_a_phase_group_runs_on_the_loop_thread_in_one_turn(loop: NetworkLoop) -> None:
    """The scheduler has no thread of its own: every tick runs on the network loop's thread,
    and a phase group's ticks run in one turn of that loop (the turn that then writes their
    packets in one send()), never spread over several."""
    interval = 0.2
    ids = group_ids(5, interval)
    runs: list[tuple[str, str, float]] = []  # (entry, thread, the loop turn's start)

    def tick(entry_id: str, _slot: datetime | None = None, _missed: int = 0) -> None:
        runs.append((entry_id, threading.current_thread().name, loop.heartbeat))

    schedule = Schedule(tick, loop)
    schedule.start()
    try:
        assert not [t.name for t in threading.enumerate() if t.name.startswith("APScheduler")]
        for entry_id in ids:
            schedule.add(
                PublishConfig(id=entry_id, topic=f"t/{entry_id}", data={}, interval=interval)
            )
        wait_until(lambda: len(runs) >= 4 * len(ids), 10, message="four rounds of the group")
    finally:
        schedule.shutdown()
    assert {thread for _, thread, _ in runs} == {"mqtt-network"}
    turns: dict[float, list[str]] = {}
    for entry_id, _, turn in runs:
        turns.setdefault(turn, []).append(entry_id)
    # The first turn may have run only the jobs added by then; every later one the whole group.
    whole = [sorted(group) == sorted(ids) for group in turns.values()]
    assert all(whole[1:]), list(turns.values())


def test_a_burst_of_job_changes_makes_one_look_not_one_each(loop: NetworkLoop) -> None:
    """Every job added, changed or removed calls the scheduler's wakeup(); from another thread,
    while the loop is busy, they are folded into the one look already queued, so a reload of
    2,000 entries during a busy turn queues one look at the job store, not 2,000."""
    schedule = Schedule(lambda *_: None, loop)
    scheduler = schedule.scheduler
    looks = [0]
    real = scheduler._process_jobs

    def counted() -> float | None:
        looks[0] += 1
        return real()

    scheduler._process_jobs = counted  # type: ignore[method-assign]
    busy, release = threading.Event(), threading.Event()
    schedule.start()
    try:
        wait_until(lambda: looks[0] >= 1, 5, message="the look at start")
        before = looks[0]

        def hold() -> None:
            busy.set()
            release.wait(10)

        loop.call_soon(hold)  # the loop's thread is busy until released
        assert busy.wait(5)
        for i in range(2000):
            schedule.add(PublishConfig(id=f"e{i}", topic=f"t/{i}", data={}, interval=3600))
        assert loop.queued == 1, "one queued look"
        release.set()
        settled = threading.Event()
        loop.call_soon(settled.set)  # queued behind the look
        assert settled.wait(5)
        assert looks[0] - before == 1
        assert len(schedule.job_ids()) == 2000
    finally:
        release.set()
        schedule.shutdown()


def test_after_shutdown_nothing_runs_and_the_timer_is_gone(loop: NetworkLoop) -> None:
    """Shutdown stops the ticks and clears the loop's timer; the scheduler's liveness follows
    the loop's thread."""
    ticks = [0]

    def tick(_entry_id: str, _slot: datetime | None = None, _missed: int = 0) -> None:
        ticks[0] += 1

    schedule = Schedule(tick, loop)
    schedule.start()
    schedule.add(PublishConfig(id="e", topic="t/e", data={}, interval=0.1))
    wait_until(lambda: ticks[0] >= 2, 5, message="ticking")
    assert schedule.is_alive()
    schedule.shutdown()
    settled = threading.Event()
    loop.call_soon(settled.set)
    assert settled.wait(5)
    assert loop.timer_due == math.inf
    count = ticks[0]
    marks = threading.Event()
    loop.call_soon(marks.set)  # one more full turn of the loop: still no tick
    assert marks.wait(5)
    assert ticks[0] == count
    loop.stop(5)
    assert not schedule.is_alive()


def test_a_failing_look_at_the_jobs_is_logged_and_the_scheduler_goes_on(
    loop: NetworkLoop, monkeypatch: pytest.MonkeyPatch
) -> None:
    """If looking for due jobs raises (a bug, a job store gone wrong), the error is logged as
    `scheduler_failed` and the scheduler looks again a moment later: ticks go on."""
    monkeypatch.setattr(scheduling, "RETRY_AFTER_FAILURE", 0.05)
    ticks = [0]

    def tick(_entry_id: str, _slot: datetime | None = None, _missed: int = 0) -> None:
        ticks[0] += 1

    schedule = Schedule(tick, loop)
    scheduler = schedule.scheduler
    real = scheduler._process_jobs
    failures = [0]

    def flaky() -> float | None:
        if failures[0] < 3:
            failures[0] += 1
            raise RuntimeError("job store gone wrong")
        return real()

    with capture_logs() as logs:
        scheduler._process_jobs = flaky  # type: ignore[method-assign]
        schedule.start()
        try:
            schedule.add(PublishConfig(id="e", topic="t/e", data={}, interval=0.1))
            wait_until(lambda: ticks[0] >= 2, 10, message="ticks after the failures")
        finally:
            schedule.shutdown()
    failed = [e for e in logs if e["event"] == "scheduler_failed"]
    assert len(failed) == 3
    assert failed[0]["retry_in"] == 0.05
    assert failed[0]["log_level"] == "error"


class FrozenClock:
    """`datetime` where the schedulers read the time, stopped at one instant."""

    current = datetime.now(UTC)

    @classmethod
    def now(cls, tz: Any = None) -> datetime:
        return cls.current if tz is None else cls.current.astimezone(tz)


Outcome = tuple[list[Any], list[Any], dict[str, datetime | None], float | None]


def process_on_a_twin(
    loop: NetworkLoop, own: bool, frozen: datetime, interval: float, behind: dict[str, float]
) -> Outcome:
    """Build a Schedule with the entries of `behind`, each due that many seconds before
    `frozen` (0: due now), plus a one-shot job and one with an unknown executor; run one
    `_process_jobs`, ours (`own`) or APScheduler's; return the ticks, the events, the jobs
    left with their next run times, and the wait."""
    ticks: list[Any] = []
    events: list[Any] = []

    def tick(entry_id: str, slot: datetime | None = None, missed: int = 0) -> None:
        ticks.append((entry_id, slot, missed))

    def heard(ev: Any) -> None:
        runs = getattr(ev, "scheduled_run_times", None) or getattr(ev, "scheduled_run_time", None)
        events.append((ev.code, getattr(ev, "job_id", None), runs))

    schedule = Schedule(tick, loop)
    scheduler = schedule.scheduler
    scheduler.add_listener(heard, EVENT_ALL)
    scheduler.start(paused=True)  # the jobs go into the stores; nothing runs on its own
    for entry_id, late in behind.items():
        schedule.add(
            PublishConfig(
                id=entry_id,
                topic=f"t/{entry_id}",
                data={},
                interval=interval if entry_id != "other" else 3.0,
            )
        )
        job = scheduler.get_job(entry_id, ENTRY_JOBS)
        due = job.trigger.get_next_fire_time(None, frozen - timedelta(seconds=late))
        scheduler.modify_job(entry_id, ENTRY_JOBS, next_run_time=min(due, frozen))
    scheduler.add_job(tick, "date", run_date=frozen, args=("once",), id="once", jobstore=ENTRY_JOBS)
    scheduler.add_job(
        tick,
        "date",
        run_date=frozen,
        args=("lost",),
        id="lost",
        jobstore=ENTRY_JOBS,
        executor="nowhere",
    )
    scheduler.state = STATE_RUNNING
    events.clear()
    wait = scheduler._process_jobs() if own else BaseScheduler._process_jobs(scheduler)
    left = {job.id: job.next_run_time for job in scheduler.get_jobs(ENTRY_JOBS)}
    scheduler.state = STATE_PAUSED
    schedule.shutdown()
    return sorted(ticks, key=repr), sorted(events, key=repr), left, wait


def test_processing_due_jobs_does_what_apschedulers_own_loop_does(
    loop: NetworkLoop, monkeypatch: pytest.MonkeyPatch
) -> None:
    """LoopScheduler._process_jobs (worked out once per group) against APScheduler's own
    BaseScheduler._process_jobs, on twin schedulers at one frozen instant: the same ticks with
    the same slots and missed counts, the same events, the same next run times, the same jobs
    left (a one-shot job removed, a job with an unknown executor dropped), the same wait."""
    frozen = datetime.now(UTC).replace(microsecond=500_000)
    FrozenClock.current = frozen
    monkeypatch.setattr(aps_base, "datetime", FrozenClock)
    monkeypatch.setattr(scheduling, "datetime", FrozenClock)
    interval = 10.0
    group = group_ids(4, interval)
    # The group shares one trigger: on time, one slot and several slots behind.
    behind = {group[0]: 0.0, group[1]: 0.0, group[2]: 10.0, group[3]: 35.0, "other": 2.0}
    ours = process_on_a_twin(loop, True, frozen, interval, behind)
    theirs = process_on_a_twin(loop, False, frozen, interval, behind)
    assert ours == theirs
    ticks, _events, left, _wait = ours
    assert {t[0] for t in ticks} >= {*group, "other", "once"}
    assert "once" not in left
    assert "lost" not in left
    assert any(t[2] > 0 for t in ticks), "some ran behind: slots counted as missed"


def test_the_loops_timer_never_fires_early_and_fires_every_time(loop: NetworkLoop) -> None:
    """NetworkLoop.call_at, the scheduler's timer: epoll is woken a millisecond early and the
    rest is slept, so a timer runs at or after its deadline, never before, and each one runs
    (200 in a row, deadlines 0 to 5 ms ahead, some below epoll's millisecond)."""
    rng = random.Random(7)
    fired: list[tuple[float, float]] = []  # (deadline, when it ran)
    done = threading.Event()

    def arm() -> None:
        deadline = time.monotonic() + rng.uniform(0, 0.005)

        def run() -> None:
            fired.append((deadline, time.monotonic()))
            if len(fired) < 200:
                arm()
            else:
                done.set()

        loop.call_at(deadline, run)

    loop.call_soon(arm)
    assert done.wait(30)
    assert len(fired) == 200
    assert all(ran >= deadline for deadline, ran in fired)
