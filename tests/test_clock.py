"""Wall-clock steps: the pure guard and grid trigger, then a real service re-anchoring its jobs."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from apscheduler.schedulers.background import BackgroundScheduler
from structlog.testing import capture_logs

from scheduler_publisher.clock import JUMP_THRESHOLD, ClockGuard, clock_is_plausible
from scheduler_publisher.scheduling.executor import InlineExecutor
from scheduler_publisher.scheduling.plan import SLOTS_PER_PERIOD, grid_start
from scheduler_publisher.scheduling.scheduler import HEARTBEAT_JOB
from scheduler_publisher.scheduling.triggers import GridTrigger
from scheduler_publisher.service import PublisherService
from tests.clocks import ShiftedClock
from tests.support import (
    InProcessServices,
    Mosquitto,
    Subscriber,
    SubscriberFactory,
    entry,
    wait_until,
)

DAY = 86_400.0
NOW = datetime(2026, 6, 1, 12, 0, 0, 123_000, tzinfo=UTC)


# ---- ClockGuard and clock_is_plausible (pure) -------------------------------------------------
def test_first_observation_is_never_a_jump() -> None:
    """With nothing to compare against, the first reading reports no step."""
    assert ClockGuard().observe(1_800_000_000.0, 5.0) is None


def test_forward_step_is_reported_with_its_size() -> None:
    """Wall time gaining an hour on monotonic time is a +3600 s step."""
    guard = ClockGuard()
    guard.observe(1_800_000_000.0, 100.0)
    step = guard.observe(1_800_000_000.0 + 1 + 3600, 101.0)
    assert step == pytest.approx(3600.0)


def test_backward_step_is_reported_negative() -> None:
    """Wall time losing ten minutes against monotonic time is a -600 s step."""
    guard = ClockGuard()
    guard.observe(1_800_000_000.0, 100.0)
    assert guard.observe(1_800_000_000.0 + 1 - 600, 101.0) == pytest.approx(-600.0)


def test_step_from_1970_is_reported() -> None:
    """An NTP sync on a gateway that booted in 1970 is one huge forward step."""
    guard = ClockGuard()
    guard.observe(60.0, 60.0)
    assert guard.observe(1_800_000_000.0, 61.0) == pytest.approx(1_800_000_000.0 - 61.0)


@pytest.mark.parametrize(
    "drift", [0.0, 0.5, -0.5, JUMP_THRESHOLD - 0.01, -JUMP_THRESHOLD, JUMP_THRESHOLD]
)
def test_drift_within_the_threshold_is_ignored(drift: float) -> None:
    """NTP slewing and scheduling noise up to the threshold are not steps."""
    guard = ClockGuard()
    guard.observe(1_800_000_000.0, 100.0)
    assert guard.observe(1_800_000_000.0 + 1 + drift, 101.0) is None


def test_each_step_is_reported_once() -> None:
    """Readings are compared with the previous one: steady time after a step reports nothing."""
    guard = ClockGuard()
    guard.observe(1_800_000_000.0, 100.0)
    assert guard.observe(1_800_003_601.0, 101.0) is not None
    assert guard.observe(1_800_003_602.0, 102.0) is None
    assert guard.observe(1_800_003_603.5, 103.5) is None


def test_threshold_is_configurable() -> None:
    """A guard built with a 10 s threshold ignores a 5 s step and reports an 11 s one."""
    guard = ClockGuard(threshold=10.0)
    guard.observe(1_800_000_000.0, 0.0)
    assert guard.observe(1_800_000_006.0, 1.0) is None
    assert guard.observe(1_800_000_018.0, 2.0) == pytest.approx(11.0)


def test_clock_is_plausible_rejects_an_unset_clock() -> None:
    """1970 (no RTC) and a year before the build are implausible; the build year onwards is not."""
    assert not clock_is_plausible(0.0)
    assert not clock_is_plausible(
        datetime(2025, 12, 31, 23, 59, tzinfo=UTC).timestamp(), build_year=2026
    )
    assert clock_is_plausible(datetime(2026, 1, 1, tzinfo=UTC).timestamp(), build_year=2026)
    assert clock_is_plausible(time.time())


# ---- GridTrigger and InlineExecutor (pure) ----------------------------------------------------
def grid(interval: float, entry_id: str = "e") -> GridTrigger:
    return GridTrigger(seconds=interval, timezone=UTC, start_date=grid_start(entry_id, interval))


def on_grid(
    when: datetime, interval: float, entry_id: str = "e", slots: int = SLOTS_PER_PERIOD
) -> bool:
    offset_ms = round((when - grid_start(entry_id, interval, slots)).total_seconds() * 1000)
    return offset_ms % round(interval * 1000) == 0


def next_slot(trigger: GridTrigger, previous: datetime | None, now: datetime) -> datetime:
    """The trigger's next slot; a grid never runs out of slots, so None is a failure."""
    slot = trigger.get_next_fire_time(previous, now)
    assert slot is not None
    return slot


def run_times(trigger: GridTrigger, first: datetime, now: datetime) -> list[datetime]:
    """The slots due at `now`, walked exactly as APScheduler's Job._get_run_times walks them."""
    due = []
    slot: datetime | None = first
    while slot is not None and slot <= now:
        due.append(slot)
        slot = trigger.get_next_fire_time(slot, now)
    return due


def test_grid_trigger_steps_by_one_interval_when_on_time() -> None:
    """Not behind: the next slot is the previous one plus the interval."""
    trigger = grid(0.1)
    previous = next_slot(trigger, None, NOW)
    assert next_slot(trigger, previous, previous) == previous + timedelta(seconds=0.1)


def test_grid_trigger_first_slot_is_on_the_grid_at_or_after_now() -> None:
    """With no previous run, the first slot is the grid's first slot at or after now."""
    trigger = grid(0.3, "x")
    first = next_slot(trigger, None, NOW)
    assert NOW <= first < NOW + timedelta(seconds=0.3)
    assert on_grid(first, 0.3, "x")


def test_grid_trigger_jumps_a_day_to_the_current_slot() -> None:
    """A day behind on a 0.1 s grid: straight to the current slot, not 864,000 steps."""
    trigger = grid(0.1)
    last_run = next_slot(trigger, None, NOW - timedelta(days=1))
    started = time.monotonic()

    following = next_slot(trigger, last_run, NOW)
    walked = run_times(trigger, last_run, NOW)

    assert time.monotonic() - started < 2  # walking 864,000 slots takes far longer
    assert NOW <= following < NOW + timedelta(seconds=0.1)
    assert on_grid(following, 0.1)
    assert len(walked) <= 2  # the stale slot, and the current one if it is exactly now


def started_executor() -> InlineExecutor:
    """An executor as a scheduler starts it (its lock and its scheduler's listeners), without
    the scheduler's thread."""
    executor = InlineExecutor()
    executor.start(BackgroundScheduler(timezone=UTC), "default")
    return executor


def job_of(trigger: GridTrigger, func: Any) -> SimpleNamespace:
    return SimpleNamespace(
        id="e", func=func, args=("e",), trigger=trigger, max_instances=1, _jobstore_alias="entries"
    )


def test_inline_executor_counts_the_slots_a_day_long_jump_skipped() -> None:
    """One tick runs for the whole gap, and it reports every slot it stands in for as missed."""
    interval = 0.1
    trigger = grid(interval)
    now = datetime.now(UTC)
    first = next_slot(trigger, None, now - timedelta(days=1))
    due = run_times(trigger, first, now)
    calls: list[tuple[Any, ...]] = []
    job = job_of(trigger, lambda *a: calls.append(a))

    started_executor().submit_job(job, due)
    elapsed = (datetime.now(UTC) - first).total_seconds()

    ((entry_id, slot, missed),) = calls
    assert (entry_id, slot) == ("e", due[-1])
    lowest = int((now - first).total_seconds() // interval)
    assert lowest <= missed <= int(elapsed // interval)
    assert missed >= DAY / interval - 1


def test_inline_executor_reports_nothing_missed_on_time() -> None:
    """A tick run on its slot reports no missed slots."""
    trigger = grid(1.0)
    slot = next_slot(trigger, None, datetime.now(UTC) - timedelta(seconds=1))
    calls: list[tuple[Any, ...]] = []
    job = job_of(trigger, lambda *a: calls.append(a))

    started_executor().submit_job(job, [slot])

    assert calls == [("e", slot, 0)]


# ---- a real service seeing the wall clock step ------------------------------------------------
INTERVALS = {"fast": 0.2, "slow": 0.3}


Running = tuple[PublisherService, Subscriber, ShiftedClock]


@pytest.fixture
def running(
    tmp_path: Path, broker: Mosquitto, topic_base: str, subscriber_factory: SubscriberFactory
) -> Iterator[Running]:
    """A started in-process service with two entries on a clock the test can step, and a
    subscriber on both topics."""
    services = InProcessServices(tmp_path)
    sub = subscriber_factory(f"{topic_base}/#")
    clock = ShiftedClock()
    service = services.start(
        broker.port, [entry(i, f"{topic_base}/{i}", v) for i, v in INTERVALS.items()], clock=clock
    )
    for entry_id in INTERVALS:
        sub.wait_for(f"{topic_base}/{entry_id}", 2)
    yield service, sub, clock
    services.close()


def apscheduler(service: PublisherService) -> Any:
    """The APScheduler instance under the service. APScheduler reads the real clock, which no
    test may step, so the one way to show it a step is to move its jobs: no public API of the
    service should offer that."""
    return service._schedule._scheduler


def shift_every_job(service: PublisherService, by: timedelta) -> None:
    """What a wall-clock step looks like from the scheduler: every job's next run is `-by` away
    from where the new clock says it should be."""
    scheduler = apscheduler(service)
    now = datetime.now(UTC)
    for job in scheduler.get_jobs():
        scheduler.modify_job(job.id, next_run_time=now - by)


def assert_reanchored(service: PublisherService) -> None:
    now = datetime.now(UTC)
    for entry_id, interval in INTERVALS.items():
        next_run = service.next_run(entry_id)
        assert next_run is not None
        assert now - timedelta(seconds=0.5) <= next_run <= now + timedelta(seconds=interval + 0.5)
        assert on_grid(next_run, interval, entry_id, service.phase_slots(interval)), (
            entry_id,
            next_run,
        )
    heartbeat = apscheduler(service).get_job(HEARTBEAT_JOB).next_run_time
    assert heartbeat <= now + timedelta(seconds=1.5), "the heartbeat job is re-anchored too"


def received_since(sub: Subscriber, topic: str, mark: float) -> int:
    return sum(1 for m in sub.on(topic) if m.at >= mark)


def publishing_since(sub: Subscriber, topic: str, mark: float) -> Callable[[], bool]:
    """A wait_until predicate: `topic` got three messages after `mark`."""
    return lambda: received_since(sub, topic, mark) >= 3


def test_backward_step_reanchors_every_job_and_publishing_resumes(
    running: Running, topic_base: str
) -> None:
    """The clock stepped back an hour: the clock check re-anchors every job near now."""
    service, sub, clock = running
    with capture_logs() as logs:
        shift_every_job(service, timedelta(hours=-1))  # an hour ahead of the new clock
        clock.step_wall(-3600)  # the main loop's next clock check (every second) sees it
        jump = wait_until(
            lambda: next((e for e in logs if e["event"] == "clock_jump"), None),
            10,
            message="clock_jump",
        )
    assert jump["seconds"] == pytest.approx(-3600, abs=2)
    assert jump["reanchored"] == len(INTERVALS)

    assert_reanchored(service)
    mark = time.monotonic()
    for entry_id in INTERVALS:
        wait_until(
            publishing_since(sub, f"{topic_base}/{entry_id}", mark),
            10,
            message=f"{entry_id} publishing again",
        )
    assert service.health_problems() == []


def test_forward_step_runs_once_counts_missed_and_reanchors(
    running: Running, topic_base: str
) -> None:
    """The clock stepped forward a day: each job runs once, counts the skipped slots as missed,
    and the clock check leaves every job on its grid near now."""
    service, sub, clock = running
    with capture_logs() as logs:
        shift_every_job(service, timedelta(days=1))  # a day behind the new clock
        clock.step_wall(DAY)
        jump = wait_until(
            lambda: next((e for e in logs if e["event"] == "clock_jump"), None),
            10,
            message="clock_jump",
        )
    assert jump["seconds"] == pytest.approx(DAY, abs=2)
    assert jump["reanchored"] == len(INTERVALS)

    for entry_id, interval in INTERVALS.items():
        assert service.stats.entry(entry_id).missed >= DAY / interval - 10
        assert service.stats.entry(entry_id).lateness_max >= DAY - 10
    assert_reanchored(service)
    mark = time.monotonic()
    for entry_id in INTERVALS:
        wait_until(
            publishing_since(sub, f"{topic_base}/{entry_id}", mark),
            10,
            message=f"{entry_id} publishing again",
        )
    assert service.health_problems() == []
