"""The inline executor: APScheduler's executor contract, run on the scheduler's own thread.

Each due job runs directly on the thread that runs the scheduler (the network thread,
scheduling.LoopScheduler): the tick only queues a packet and never blocks, so there is no
thread pool hop per run. It keeps APScheduler's executor contract (`max_instances`, job
events for listeners), job by job through `submit_job`, or a phase group at a time through
`run_group` (docs/design.md, "Why an inline executor", "A phase group run as one").
"""

from __future__ import annotations

import functools
import inspect
import time
from datetime import UTC, datetime
from traceback import format_tb
from typing import Any

from apscheduler.events import (
    EVENT_JOB_ERROR,
    EVENT_JOB_EXECUTED,
    EVENT_JOB_MISSED,
    JobExecutionEvent,
)
from apscheduler.executors.base import BaseExecutor, MaxInstancesReachedError
from apscheduler.schedulers.base import BaseScheduler

from scheduler_publisher.config.cron_slots import CronSlots
from scheduler_publisher.logs.setup import get_logger
from scheduler_publisher.scheduling.triggers import GridTrigger

log = get_logger("scheduler_publisher.scheduling")


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

    def run_group(
        self, jobs: list[Any], run_times: list[datetime], missed: int, wanted: int
    ) -> list[Any]:
        """Run the jobs of one phase group, due at the same `run_times` of one trigger, with
        the contract of `submit_job` for each: `max_instances` enforced, the instance released
        whatever the run does, and for every job its EVENT_JOB_MISSED (each earlier slot),
        then EVENT_JOB_EXECUTED or EVENT_JOB_ERROR, dispatched as it finishes. What all the
        jobs share is worked out once: the slot, the missed count, which events anybody
        listens to; the instances are counted in and out under one lock a group. Returns the
        jobs refused for `max_instances`, for the scheduler to report as it does for
        `submit_job`'s refusals."""
        assert self._lock is not None, "This executor has not been started yet"
        slot = run_times[-1]
        dispatch = self._scheduler._dispatch_event
        runnable, refused = self._count_in(jobs)
        try:
            for job in runnable:
                _retval, failure = _call(job, slot, missed)
                if wanted:
                    for event in self._events(
                        job.id, job._jobstore_alias, run_times, failure, wanted
                    ):
                        dispatch(event)
        finally:
            self._count_out(runnable)
        return refused

    def _count_in(self, jobs: list[Any]) -> tuple[list[Any], list[Any]]:
        """Counts an instance of each of `jobs` that may run, under one lock for the group (as
        submit_job, before running: a job re-entering the scheduler from its own run is
        refused); returns those to run and those refused for `max_instances`."""
        runnable, refused = [], []
        instances = self._instances
        assert self._lock is not None
        with self._lock:
            for job in jobs:
                job_id = job.id
                running = instances.get(job_id, 0)
                if running >= job.max_instances:
                    refused.append(job)
                    continue
                instances[job_id] = running + 1
                runnable.append(job)
        return runnable, refused

    def _count_out(self, jobs: list[Any]) -> None:
        """Releases the instances `_count_in` counted, whatever the runs did."""
        instances = self._instances
        assert self._lock is not None
        with self._lock:
            for job in jobs:
                job_id = job.id
                left = instances[job_id] - 1
                if left:
                    instances[job_id] = left
                else:
                    del instances[job_id]

    @staticmethod
    def _events(
        job_id: str,
        alias: str,
        run_times: list[datetime],
        failure: BaseException | None,
        wanted: int,
        retval: Any = None,
    ) -> list[JobExecutionEvent]:
        """A run's events that somebody listens to (events nobody listens to are not built: at
        thousands of runs a second their objects and dispatch cost about a fifth of the
        bookkeeping, docs/design.md): MISSED for each earlier slot, then EXECUTED or ERROR."""
        slot = run_times[-1]
        events = (
            [
                JobExecutionEvent(EVENT_JOB_MISSED, job_id, alias, run_time)
                for run_time in run_times[:-1]
            ]
            if wanted & EVENT_JOB_MISSED
            else []
        )
        if failure is not None:
            if wanted & EVENT_JOB_ERROR:
                events.append(
                    JobExecutionEvent(
                        EVENT_JOB_ERROR,
                        job_id,
                        alias,
                        slot,
                        exception=failure,
                        traceback="".join(format_tb(failure.__traceback__)),
                    )
                )
        elif wanted & EVENT_JOB_EXECUTED:
            events.append(JobExecutionEvent(EVENT_JOB_EXECUTED, job_id, alias, slot, retval=retval))
        return events

    def _run(self, job: Any, run_times: list[datetime]) -> list[JobExecutionEvent]:
        wanted = self._wanted_events()
        missed = missed_slots(job.trigger, run_times)  # a failure here: _run_job_error's
        retval, failure = _call(job, run_times[-1], missed)
        return self._events(job.id, job._jobstore_alias, run_times, failure, wanted, retval)

    def _wanted_events(self) -> int:
        return listened(self._scheduler)


class CalledWithJobId(functools.partial[Any]):
    """A job function that this executor calls with the job's own id first, then its args:
    an entry's job is named after its entry, so it needs no args tuple of its own (48 B a
    job at 10,000 entries). APScheduler checks a job's args against its function's signature,
    so give it the signature without that first parameter (`without_first_parameter`)."""


def without_first_parameter(func: CalledWithJobId) -> inspect.Signature:
    """The signature APScheduler should check a CalledWithJobId job's args against."""
    signature = inspect.signature(func)
    return signature.replace(parameters=list(signature.parameters.values())[1:])


def _call(job: Any, slot: datetime, missed: int) -> tuple[Any, BaseException | None]:
    """Run the job's tick: its return value, or the exception it raised, logged (like
    apscheduler.executors.base.run_job), so that the other jobs run."""
    try:
        func = job.func
        if type(func) is CalledWithJobId:
            return func(job.id, *job.args, slot, missed), None
        return func(*job.args, slot, missed), None
    except BaseException as exc:  # reported as EVENT_JOB_ERROR by the caller
        log.exception("tick_failed", entry_id=job.id)
        return None, exc


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


def group_missed(executor: BaseExecutor, trigger: Any, run_times: list[datetime]) -> int | None:
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


def listened(scheduler: BaseScheduler) -> int:
    """The event codes some listener of `scheduler` asked for."""
    wanted = 0
    # Read without the scheduler's listener lock: only the scheduler's thread calls this, and a
    # listener added meanwhile gets events from the next run on, as with the lock.
    for _callback, mask in scheduler._listeners:
        wanted |= mask
    return wanted
