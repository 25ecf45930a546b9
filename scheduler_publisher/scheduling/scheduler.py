"""The APScheduler adapter: one job per entry (an interval grid or a cron expression), all
calling one shared tick function.

Settings, and why (read in APScheduler 3.11's triggers/interval.py and executors/base.py;
docs/design.md, "Why an inline executor" and "Phase slots: spread, but in groups"):
- Each job's trigger (triggers.py): its phase slot's grid, or its cron expression's slots.
- `misfire_grace_time=None` (the default of 1 s silently drops runs).
- `coalesce=False`, so the executor sees every slot that came due at once: it publishes once
  and counts the rest as missed, instead of losing them silently.
- An inline executor (executor.py): the tick only queues a packet and never blocks, so it
  runs on the scheduler's thread itself, without a thread pool hop per run. It keeps
  APScheduler's executor contract (max_instances, job events for listeners).
- Many jobs, few distinct run times: entries sit in phase groups, so the entries' job store
  (jobstore.py) files jobs by run time, and the scheduler works out a group's run times,
  next slot and missed count once for all its jobs, runs them in one executor call and moves
  them in one job store call (docs/design.md, "A phase group run as one").
- The scheduler has no thread of its own: it runs on the network thread's event loop
  (LoopScheduler), so a phase group's ticks queue their packets where they are written, and
  the group reaches the socket in one `send()`.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Iterable
from datetime import UTC, datetime, timedelta
from threading import TIMEOUT_MAX
from typing import Any, Protocol

from apscheduler.events import (
    EVENT_JOB_MAX_INSTANCES,
    EVENT_JOB_SUBMITTED,
    JobSubmissionEvent,
    SchedulerEvent,
)
from apscheduler.executors.base import BaseExecutor, MaxInstancesReachedError
from apscheduler.jobstores.base import JobLookupError
from apscheduler.schedulers.base import STATE_PAUSED, STATE_STOPPED, BaseScheduler

from scheduler_publisher.config.loader import PublishConfig
from scheduler_publisher.logs.setup import get_logger
from scheduler_publisher.scheduling.executor import (
    CalledWithJobId,
    InlineExecutor,
    group_missed,
    listened,
    without_first_parameter,
)
from scheduler_publisher.scheduling.jobstore import GroupedJobStore
from scheduler_publisher.scheduling.plan import SLOTS_PER_PERIOD
from scheduler_publisher.scheduling.spread import PhaseSpread
from scheduler_publisher.scheduling.triggers import GridTrigger, trigger_of

log = get_logger("scheduler_publisher.scheduling")

# Entries' jobs and the service's own live in separate job stores, so that no entry id can
# name an internal job (an entry called "__heartbeat__" once replaced the heartbeat, issue 11
# #9). Every call that names a job names its store too.
ENTRY_JOBS = "entries"
# APScheduler adds a MemoryJobStore named "default" at start unless there is one: the internal
# store takes that name, so that no third store is asked for due jobs at every wake-up.
INTERNAL_JOBS = "default"
HEARTBEAT_JOB = "heartbeat"
JOB_NAME = "publish"
# entry id (the job's id, which the executor passes), scheduled slot, slots missed before it
# (the last two defaulted: APScheduler checks the callable's signature against the args given
# to add_job)
Tick = Callable[[str, datetime | None, int], None]


RETRY_AFTER_FAILURE = 1.0  # seconds until the scheduler looks again after _process_jobs raised


class Host(Protocol):
    """The event loop the scheduler runs on: the network thread's (netloop.NetworkLoop)."""

    def call_soon(self, fn: Callable[[], None]) -> None: ...  # any thread
    def call_at(self, when: float, fn: Callable[[], None]) -> None: ...  # its own thread
    def is_alive(self) -> bool: ...


class LoopScheduler(BaseScheduler):  # type: ignore[misc]  # APScheduler 3 is untyped
    """APScheduler driven by the network thread's event loop, as AsyncIOScheduler is by
    asyncio's: the loop's one timer (`Host.call_at`) runs `_process_jobs` when the next job is
    due, and `wakeup()` (a job added, changed or removed, from any thread) asks the loop to
    look again. A phase group's ticks then run on the thread that writes their packets, in the
    loop turn that writes them in one `send()`: no thread of its own waking per group, no
    hand-over of each tick, no GIL passed back and forth (docs/design.md, "One thread")."""

    def __init__(self, host: Host, **options: Any) -> None:
        self._host = host
        self._wakeup_queued = False
        super().__init__(**options)

    def shutdown(self, wait: bool = True) -> None:
        super().shutdown(wait)
        self._host.call_soon(self._run_due)  # which, stopped, cancels the timer

    def wakeup(self) -> None:
        # Any thread. One queued look at a time: while a look waits for the loop (busy with a
        # group, say), more adds, changes and removals queue nothing more.
        if not self._wakeup_queued:
            self._wakeup_queued = True
            self._host.call_soon(self._run_due)

    def _process_jobs(self) -> float | None:
        """APScheduler 3.11's `BaseScheduler._process_jobs`, shaped for phase groups: the jobs
        due at one instant share a trigger, so their run times and next slot are worked out
        once per (trigger, run time), not once per job. Each job is still submitted to its
        executor, moved to its next slot and reported to the listeners, as there; events no
        listener asks for are not built, and its debug lines are left out. Run cold (once per
        phase group, ~60 times a second at 100 entries) the original cost ~250 µs a wake-up
        here (docs/design.md, "One thread")."""
        if self.state == STATE_PAUSED:
            return None
        now = datetime.now(self.timezone)
        wanted = listened(self)
        events: list[SchedulerEvent] = []
        next_wakeup: datetime | None = None
        with self._jobstores_lock:
            for alias, store in self._jobstores.items():
                try:
                    due = store.get_due_jobs(now)
                except Exception as exc:  # noqa: BLE001 - as APScheduler: retry later
                    self._logger.warning("Error getting due jobs from job store %r: %s", alias, exc)
                    retry = now + timedelta(seconds=self.jobstore_retry_interval)
                    next_wakeup = retry if next_wakeup is None else min(next_wakeup, retry)
                    continue
                self._run_due_jobs(alias, store, due, now, wanted, events)
                store_next = store.get_next_run_time()
                if store_next and (next_wakeup is None or store_next < next_wakeup):
                    next_wakeup = store_next.astimezone(self.timezone)
        for event in events:
            self._dispatch_event(event)
        if self.state == STATE_PAUSED or next_wakeup is None:
            return None
        now = datetime.now(self.timezone)
        return min(max(next_wakeup.timestamp() - now.timestamp(), 0.0), TIMEOUT_MAX)

    def _run_due_jobs(
        self,
        alias: str,
        store: Any,
        due: list[Any],
        now: datetime,
        wanted: int,
        events: list[SchedulerEvent],
    ) -> None:
        # The jobs of a phase group share a trigger, a run time and an executor: each group's
        # run times, next slot and missed count are worked out once, its jobs run in one call
        # of the inline executor, and the job store moves them to their next slot together.
        groups: dict[tuple[int, datetime, bool, str], list[Any]] = {}
        for job in due:
            key = (id(job.trigger), job.next_run_time, job.coalesce, job.executor)
            group = groups.get(key)
            if group is None:
                groups[key] = [job]
            else:
                group.append(job)
        for jobs in groups.values():
            executor = self._executors.get(jobs[0].executor)
            if executor is None:
                for job in jobs:
                    self._logger.error(
                        'Executor lookup ("%s") failed for job "%s" -- '
                        "removing it from the job store",
                        job.executor,
                        job,
                    )
                    self.remove_job(job.id, alias)
            else:
                self._run_group(executor, alias, store, jobs, now, wanted, events)

    def _run_group(
        self,
        executor: BaseExecutor,
        alias: str,
        store: Any,
        jobs: list[Any],
        now: datetime,
        wanted: int,
        events: list[SchedulerEvent],
    ) -> None:
        first = jobs[0]
        run_times = first._get_run_times(now)
        if run_times and first.coalesce:
            run_times = run_times[-1:]
        if not run_times:
            return
        following = first.trigger.get_next_fire_time(run_times[-1], now)
        missed = group_missed(executor, first.trigger, run_times)
        if missed is None:
            for job in jobs:
                self._submit(executor, job, alias, run_times, wanted, events)
        else:
            assert isinstance(executor, InlineExecutor)
            refused = executor.run_group(jobs, run_times, missed, wanted)
            for job in refused:
                self._refused(job, alias, run_times, wanted, events)
            if wanted & EVENT_JOB_SUBMITTED:
                events.extend(
                    JobSubmissionEvent(EVENT_JOB_SUBMITTED, job.id, alias, run_times)
                    for job in jobs
                    if job not in refused
                )
        if following:
            self._move(store, jobs, following)
        else:
            for job in jobs:
                self.remove_job(job.id, alias)

    @staticmethod
    def _move(store: Any, jobs: list[Any], following: datetime) -> None:
        """The group's jobs to their next slot (what Job._modify does with it), in one call to
        a GroupedJobStore; any other store (none of the service's) is told job by job."""
        for job in jobs:
            job.next_run_time = following
        if isinstance(store, GroupedJobStore):
            store.update_jobs(jobs)
        else:
            for job in jobs:
                store.update_job(job)

    def _refused(
        self,
        job: Any,
        alias: str,
        run_times: list[datetime],
        wanted: int,
        events: list[SchedulerEvent],
    ) -> None:
        self._logger.warning(
            'Execution of job "%s" skipped: maximum number of running instances reached (%d)',
            job,
            job.max_instances,
        )
        if wanted & EVENT_JOB_MAX_INSTANCES:
            events.append(JobSubmissionEvent(EVENT_JOB_MAX_INSTANCES, job.id, alias, run_times))

    def _submit(
        self,
        executor: BaseExecutor,
        job: Any,
        alias: str,
        run_times: list[datetime],
        wanted: int,
        events: list[SchedulerEvent],
    ) -> None:
        try:
            executor.submit_job(job, run_times)
        except MaxInstancesReachedError:
            self._refused(job, alias, run_times, wanted, events)
        except BaseException:  # as APScheduler: logged, the other jobs run
            self._logger.exception('Error submitting job "%s" to executor "%s"', job, job.executor)
        else:
            if wanted & EVENT_JOB_SUBMITTED:
                events.append(JobSubmissionEvent(EVENT_JOB_SUBMITTED, job.id, alias, run_times))

    def _run_due(self) -> None:
        """The host's thread: run the due jobs, then set the timer for the next one."""
        self._wakeup_queued = False  # before the look: a wakeup() from now on queues another
        if self.state == STATE_STOPPED:
            self._host.call_at(math.inf, self._run_due)
            return
        try:
            wait = self._process_jobs()
        except Exception:  # a bug, or a job store that failed: look again soon, never stop
            log.exception("scheduler_failed", retry_in=RETRY_AFTER_FAILURE)
            wait = RETRY_AFTER_FAILURE
        when = math.inf if wait is None else time.monotonic() + wait
        self._host.call_at(when, self._run_due)


class Schedule:
    def __init__(self, tick: Tick, host: Host, spread: PhaseSpread | None = None) -> None:
        """`tick` is called for every due slot of every entry, on `host`'s thread; interval
        entries are spread over the phase groups `spread` gives their interval (plan.grid_start;
        by default 100 per period)."""
        self.spread = PhaseSpread(SLOTS_PER_PERIOD) if spread is None else spread
        # Wrapped in a partial: APScheduler then keeps no "module:qualname" reference string per
        # job (~100 B each), which only pickling job stores need; ours lives in memory. The
        # executor calls it with the job's id, the entry's, so a job keeps no args tuple.
        self._tick = CalledWithJobId(tick)
        # add_job checks the job's args against the callable's signature, and inspect builds
        # that signature anew each time: about half of adding a job at start-up. The one
        # callable's signature, computed once, is what inspect.signature returns first: the
        # tick's without the entry id, which the executor passes.
        self._tick.__signature__ = without_first_parameter(self._tick)  # type: ignore[attr-defined]
        self.heartbeat = time.monotonic()
        self._host = host
        self._scheduler = LoopScheduler(
            host,
            timezone=UTC,
            jobstores={ENTRY_JOBS: GroupedJobStore(), INTERNAL_JOBS: GroupedJobStore()},
            executors={"default": InlineExecutor()},
            job_defaults={"coalesce": False, "max_instances": 1, "misfire_grace_time": None},
        )

    @property
    def scheduler(self) -> LoopScheduler:
        """The APScheduler underneath, for what only its own API offers (listeners, get_job)."""
        return self._scheduler

    def start(self) -> None:
        self._add_heartbeat()
        self._scheduler.start()

    def _add_heartbeat(self) -> None:
        self._scheduler.add_job(
            self._beat,
            GridTrigger(seconds=1, timezone=UTC),
            id=HEARTBEAT_JOB,
            args=(),
            replace_existing=True,
            jobstore=INTERNAL_JOBS,
        )

    def shutdown(self) -> None:
        if self._scheduler.running:
            self._scheduler.shutdown(wait=True)

    def _beat(self, _slot: datetime | None = None, _missed: int = 0) -> None:
        self.heartbeat = time.monotonic()

    def is_alive(self, max_silence: float = 10.0) -> bool:
        return self._host.is_alive() and time.monotonic() - self.heartbeat < max_silence

    def add(self, entry: PublishConfig) -> None:
        """Add, or replace with a new schedule: the next slot of the entry's grid (not now +
        interval), or of its cron expression."""
        slots = self.spread.slots(entry.interval) if entry.interval is not None else 1
        trigger = trigger_of(entry, slots)
        # A shared name: APScheduler would otherwise build the same string for every job.
        self._scheduler.add_job(
            self._tick,
            trigger,
            id=entry.id,
            args=(),
            name=JOB_NAME,
            replace_existing=True,
            jobstore=ENTRY_JOBS,
        )

    def remove(self, entry_id: str) -> None:
        # Never scheduled (it was invalid from the start): nothing to remove.
        with contextlib.suppress(JobLookupError):
            self._scheduler.remove_job(entry_id, jobstore=ENTRY_JOBS)

    def rebuild(self, entries: Iterable[PublishConfig]) -> None:
        """Re-anchor every job on its grid from the current clock (after a wall-clock step)."""
        # The heartbeat too: after a backward step it would otherwise stay silent for the size
        # of the step, and health_problems() would withhold the systemd watchdog ping.
        self._add_heartbeat()
        for entry in entries:
            self.add(entry)

    def job_ids(self) -> set[str]:
        return {job.id for job in self._scheduler.get_jobs(jobstore=ENTRY_JOBS)}

    def next_run(self, entry_id: str) -> datetime | None:
        job = self._scheduler.get_job(entry_id, jobstore=ENTRY_JOBS)
        return None if job is None else job.next_run_time

    def next_runs(self) -> dict[str, datetime | None]:
        """Every entry job's next run by id: one pass under the scheduler's lock, for a sort
        by next run (next_run() per entry takes the lock once each)."""
        return {job.id: job.next_run_time for job in self._scheduler.get_jobs(jobstore=ENTRY_JOBS)}
