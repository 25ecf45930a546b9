"""The APScheduler adapter: one job per entry (an interval grid or a cron expression), all
calling one shared tick function.

Settings, and why (read in APScheduler 3.11's triggers/interval.py and executors/base.py;
docs/design.md, "Why an inline executor" and "Phase slots: spread, but in groups"):
- Each job's trigger (triggers.py): its phase slot's grid, or its cron expression's slots.
- `misfire_grace_time=None` (the default of 1 s silently drops runs).
- `coalesce=False`, so the executor sees every slot that came due at once: it publishes once
  and counts the rest as missed, instead of losing them silently.
- An inline executor: the tick only queues a packet and never blocks, so it runs on the
  scheduler's thread itself, without a thread pool hop per run. It keeps
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
import functools
import inspect
import math
import time
from collections.abc import Callable, Iterable
from datetime import UTC, datetime, timedelta
from threading import TIMEOUT_MAX
from traceback import format_tb
from typing import Any, Protocol

from apscheduler.events import (
    EVENT_JOB_ERROR,
    EVENT_JOB_EXECUTED,
    EVENT_JOB_MAX_INSTANCES,
    EVENT_JOB_MISSED,
    EVENT_JOB_SUBMITTED,
    JobExecutionEvent,
    JobSubmissionEvent,
    SchedulerEvent,
)
from apscheduler.executors.base import BaseExecutor, MaxInstancesReachedError
from apscheduler.jobstores.base import JobLookupError
from apscheduler.schedulers.base import STATE_PAUSED, STATE_STOPPED, BaseScheduler

from scheduler_publisher.config import PublishConfig
from scheduler_publisher.jobstore import GroupedJobStore
from scheduler_publisher.logs import get_logger
from scheduler_publisher.plan import SLOTS_PER_PERIOD
from scheduler_publisher.spread import PhaseSpread
from scheduler_publisher.triggers import CronSlots, GridTrigger, trigger_of

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
# entry id, scheduled slot, slots missed before it (the last two defaulted: APScheduler checks
# the callable's signature against the args given to add_job)
Tick = Callable[[str, datetime | None, int], None]


class InlineExecutor(BaseExecutor):  # type: ignore[misc]  # APScheduler 3 is untyped
    """Runs each due job directly on the scheduler's thread (the network thread), with
    APScheduler's executor contract: `max_instances` is enforced, and listeners get
    EVENT_JOB_EXECUTED or EVENT_JOB_ERROR for the run and EVENT_JOB_MISSED for every earlier
    slot handed over with it. The job is called once with the latest slot and the number of
    slots missed before it."""

    def submit_job(self, job: Any, run_times: list[datetime]) -> None:
        # BaseExecutor.submit_job counts the instance only once _do_submit_job has returned:
        # right for a pool, but an inline run has finished by then, so its count would go
        # -1 then 0 and a job re-entering the scheduler from its own run would pass the check.
        # Count before running, under the same lock, and release through _run_job_success.
        assert self._lock is not None, "This executor has not been started yet"
        with self._lock:
            if self._instances[job.id] >= job.max_instances:
                raise MaxInstancesReachedError(job)
            self._instances[job.id] += 1
        self._do_submit_job(job, run_times)

    def _do_submit_job(self, job: Any, run_times: list[datetime]) -> None:
        # As APScheduler's DebugExecutor, with _run for run_job: whatever happens, the
        # instance is released, or the job would never run again.
        try:
            events = self._run(job, run_times)
        except BaseException as exc:  # noqa: BLE001 - logged by _run_job_error, as in APScheduler
            self._run_job_error(job.id, exc, exc.__traceback__)
        else:
            self._run_job_success(job.id, events)

    def run_group(self, jobs: list[Any], run_times: list[datetime], missed: int,
                  wanted: int) -> list[Any]:
        """Run the jobs of one phase group, due at the same `run_times` of one trigger, with
        the contract of `submit_job` for each: `max_instances` enforced, the instance released
        whatever the run does, and for every job its EVENT_JOB_MISSED (each earlier slot),
        then EVENT_JOB_EXECUTED or EVENT_JOB_ERROR, dispatched as it finishes. What all the
        jobs share is worked out once: the slot, the missed count, which events anybody
        listens to. Returns the jobs refused for `max_instances`, for the scheduler to report
        as it does for `submit_job`'s refusals."""
        assert self._lock is not None, "This executor has not been started yet"
        refused = []
        slot = run_times[-1]
        instances = self._instances
        dispatch = self._scheduler._dispatch_event
        for job in jobs:
            job_id = job.id
            with self._lock:  # as submit_job: counted before running
                running = instances.get(job_id, 0)
                if running >= job.max_instances:
                    refused.append(job)
                    continue
                instances[job_id] = running + 1
            alias = job._jobstore_alias
            failure: BaseException | None = None
            try:
                job.func(*job.args, slot, missed)
            except BaseException as exc:  # like apscheduler.executors.base.run_job
                failure = exc
                log.exception("tick_failed", entry_id=job_id)  # and the other jobs run
            with self._lock:
                left = instances[job_id] - 1
                if left:
                    instances[job_id] = left
                else:
                    del instances[job_id]
            if wanted:
                for event in self._events(job_id, alias, run_times, failure, wanted):
                    dispatch(event)
        return refused

    @staticmethod
    def _events(job_id: str, alias: str, run_times: list[datetime],
                failure: BaseException | None, wanted: int,
                retval: Any = None) -> list[JobExecutionEvent]:
        """A run's events that somebody listens to (events nobody listens to are not built: at
        thousands of runs a second their objects and dispatch cost about a fifth of the
        bookkeeping, docs/design.md): MISSED for each earlier slot, then EXECUTED or ERROR."""
        slot = run_times[-1]
        events = [JobExecutionEvent(EVENT_JOB_MISSED, job_id, alias, run_time)
                  for run_time in run_times[:-1]] if wanted & EVENT_JOB_MISSED else []
        if failure is not None:
            if wanted & EVENT_JOB_ERROR:
                events.append(JobExecutionEvent(
                    EVENT_JOB_ERROR, job_id, alias, slot, exception=failure,
                    traceback="".join(format_tb(failure.__traceback__))))
        elif wanted & EVENT_JOB_EXECUTED:
            events.append(JobExecutionEvent(EVENT_JOB_EXECUTED, job_id, alias, slot,
                                            retval=retval))
        return events

    def _run(self, job: Any, run_times: list[datetime]) -> list[JobExecutionEvent]:
        wanted = self._wanted_events()
        missed = missed_slots(job.trigger, run_times)  # a failure here: _run_job_error's
        failure: BaseException | None = None
        retval = None
        try:
            retval = job.func(*job.args, run_times[-1], missed)
        except BaseException as exc:  # like apscheduler.executors.base.run_job: report it
            failure = exc
            log.exception("tick_failed", entry_id=job.id)  # and let the other jobs run
        return self._events(job.id, job._jobstore_alias, run_times, failure, wanted, retval)

    def _wanted_events(self) -> int:
        return _listened(self._scheduler)


def missed_slots(trigger: Any, run_times: list[datetime]) -> int:
    """The slots handed over and those the trigger jumped (GridTrigger, CronSlots): every slot
    from the first due one to now, bar the one being run. Any other trigger (none of the
    service's) jumps nothing: the slots handed over, bar the one being run."""
    kind = type(trigger)  # not isinstance: the triggers' ABCMeta makes that slow
    if kind is GridTrigger:
        return int((time.time() - run_times[0].timestamp()) // trigger.interval_length)
    if kind is CronSlots:
        return int(trigger.missed_between(run_times[0], datetime.now(UTC)))
    return len(run_times) - 1


def _group_missed(executor: BaseExecutor, trigger: Any, run_times: list[datetime]) -> int | None:
    """The missed count a group's jobs share, when the inline executor runs them together;
    None sends each job through `submit_job` instead: another executor (none of the
    service's), or a slot the trigger cannot place, which APScheduler's contract logs and
    releases job by job (`InlineExecutor._do_submit_job`)."""
    if not isinstance(executor, InlineExecutor):
        return None
    try:
        return missed_slots(trigger, run_times)
    except Exception:  # noqa: BLE001 - reported per job by the executor's own path
        return None


def _listened(scheduler: BaseScheduler) -> int:
    """The event codes some listener of `scheduler` asked for."""
    wanted = 0
    # Read without the scheduler's listener lock: only the scheduler's thread calls this, and a
    # listener added meanwhile gets events from the next run on, as with the lock.
    for _callback, mask in scheduler._listeners:
        wanted |= mask
    return wanted


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
        wanted = _listened(self)
        events: list[SchedulerEvent] = []
        next_wakeup: datetime | None = None
        with self._jobstores_lock:
            for alias, store in self._jobstores.items():
                try:
                    due = store.get_due_jobs(now)
                except Exception as exc:  # noqa: BLE001 - as APScheduler: retry later
                    self._logger.warning("Error getting due jobs from job store %r: %s",
                                         alias, exc)
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

    def _run_due_jobs(self, alias: str, store: Any, due: list[Any], now: datetime,
                      wanted: int, events: list[SchedulerEvent]) -> None:
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
                    self._logger.error('Executor lookup ("%s") failed for job "%s" -- '
                                       "removing it from the job store", job.executor, job)
                    self.remove_job(job.id, alias)
            else:
                self._run_group(executor, alias, store, jobs, now, wanted, events)

    def _run_group(self, executor: BaseExecutor, alias: str, store: Any, jobs: list[Any],
                   now: datetime, wanted: int, events: list[SchedulerEvent]) -> None:
        first = jobs[0]
        run_times = first._get_run_times(now)
        if run_times and first.coalesce:
            run_times = run_times[-1:]
        if not run_times:
            return
        following = first.trigger.get_next_fire_time(run_times[-1], now)
        missed = _group_missed(executor, first.trigger, run_times)
        if missed is None:
            for job in jobs:
                self._submit(executor, job, alias, run_times, wanted, events)
        else:
            assert isinstance(executor, InlineExecutor)
            refused = executor.run_group(jobs, run_times, missed, wanted)
            for job in refused:
                self._refused(job, alias, run_times, wanted, events)
            if wanted & EVENT_JOB_SUBMITTED:
                events.extend(JobSubmissionEvent(EVENT_JOB_SUBMITTED, job.id, alias, run_times)
                              for job in jobs if job not in refused)
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

    def _refused(self, job: Any, alias: str, run_times: list[datetime], wanted: int,
                 events: list[SchedulerEvent]) -> None:
        self._logger.warning('Execution of job "%s" skipped: maximum number of running '
                             "instances reached (%d)", job, job.max_instances)
        if wanted & EVENT_JOB_MAX_INSTANCES:
            events.append(JobSubmissionEvent(EVENT_JOB_MAX_INSTANCES, job.id, alias, run_times))

    def _submit(self, executor: BaseExecutor, job: Any, alias: str, run_times: list[datetime],
                wanted: int, events: list[SchedulerEvent]) -> None:
        try:
            executor.submit_job(job, run_times)
        except MaxInstancesReachedError:
            self._refused(job, alias, run_times, wanted, events)
        except BaseException:  # as APScheduler: logged, the other jobs run
            self._logger.exception('Error submitting job "%s" to executor "%s"', job,
                                   job.executor)
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
        # job (~100 B each), which only pickling job stores need; ours lives in memory.
        self._tick = functools.partial(tick)
        # add_job checks the job's args against the callable's signature, and inspect builds
        # that signature anew each time: about half of adding a job at start-up. The one
        # callable's signature, computed once, is what inspect.signature returns first.
        self._tick.__signature__ = inspect.signature(self._tick)  # type: ignore[attr-defined]
        self.heartbeat = time.monotonic()
        self._host = host
        self._scheduler = LoopScheduler(
            host,
            timezone=UTC,
            jobstores={ENTRY_JOBS: GroupedJobStore(), INTERNAL_JOBS: GroupedJobStore()},
            executors={"default": InlineExecutor()},
            job_defaults={"coalesce": False, "max_instances": 1, "misfire_grace_time": None},
        )

    def start(self) -> None:
        self._add_heartbeat()
        self._scheduler.start()

    def _add_heartbeat(self) -> None:
        self._scheduler.add_job(self._beat, GridTrigger(seconds=1, timezone=UTC),
                                id=HEARTBEAT_JOB, args=(), replace_existing=True,
                                jobstore=INTERNAL_JOBS)

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
        self._scheduler.add_job(self._tick, trigger, id=entry.id, args=(entry.id,),
                                name=JOB_NAME, replace_existing=True, jobstore=ENTRY_JOBS)

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

