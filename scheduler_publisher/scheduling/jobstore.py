"""A job store for many jobs that share a few hundred run times.

APScheduler's MemoryJobStore keeps one list sorted by (next run time, id) and, for every job
run, finds the job by bisection, deletes it and re-inserts it further on: two bisections, two
list shifts and two `datetime_to_utc_timestamp` calls per run (docs/design.md, "CPU per
message: profile"). Here the entries' jobs sit in phase groups (plan.grid_start), so thousands
of jobs come due at the same few hundred instants. This store files each job under its next
run time, in one bucket per instant, so that moving a job to its next slot is a few dict
operations, and the sorted list it keeps is one of instants (a few hundred), not of jobs.

The jobs are APScheduler's own `Job` objects, added, updated and removed through the standard
BaseJobStore interface: nothing outside this module can tell it from MemoryJobStore, except
that jobs due at the same instant come out in the order they were filed there instead of by
id (get_all_jobs still breaks ties by id, as MemoryJobStore does).

Thread safety: the scheduler calls every method under its own job store lock.
"""

from __future__ import annotations

import bisect
from datetime import UTC, datetime
from typing import Any

from apscheduler.jobstores.base import BaseJobStore, ConflictingIdError, JobLookupError

# A Job is untyped in APScheduler 3; only its id, next_run_time and kwargs are touched here.
Job = Any
# What jobs without keyword arguments share: APScheduler gives each job its own empty dict
# (64 B), and none of it ever writes to one (Job._modify replaces kwargs, never edits it).
_NO_KWARGS: dict[str, Any] = {}


class GroupedJobStore(BaseJobStore):  # type: ignore[misc]  # APScheduler 3 is untyped
    """In memory, like MemoryJobStore, with jobs bucketed by next run time."""

    def __init__(self) -> None:
        super().__init__()
        # The run time each job is filed under: the scheduler changes job.next_run_time in
        # place (Job._modify) before it calls update_job, so the job itself no longer says.
        # Also the one index of the jobs by id: a job is found in its bucket (or among the
        # paused), so no second dict of every job is kept (20 B an entry).
        self._filed: dict[str, datetime | None] = {}
        self._buckets: dict[datetime, dict[str, Job]] = {}
        self._times: list[datetime] = []  # the buckets' keys, ascending
        self._paused: dict[str, Job] = {}  # next_run_time None: listed last

    def lookup_job(self, job_id: str) -> Job | None:
        return self._job(job_id) if job_id in self._filed else None

    def get_due_jobs(self, now: datetime) -> list[Job]:
        due: list[Job] = []
        for when in self._times:
            if when > now:
                break
            due.extend(self._buckets[when].values())
        return due

    def get_next_run_time(self) -> datetime | None:
        return self._times[0] if self._times else None

    def get_all_jobs(self) -> list[Job]:
        jobs: list[Job] = []
        for when in self._times:
            bucket = self._buckets[when]
            jobs.extend(bucket[job_id] for job_id in sorted(bucket))
        jobs.extend(self._paused[job_id] for job_id in sorted(self._paused))
        return jobs

    def add_job(self, job: Job) -> None:
        if job.id in self._filed:
            raise ConflictingIdError(job.id)
        if not job.kwargs:
            job.kwargs = _NO_KWARGS
        self._file(job)

    def update_job(self, job: Job) -> None:
        if job.id not in self._filed:
            raise JobLookupError(job.id)
        self._unfile(job.id)
        self._file(job)

    def update_jobs(self, jobs: list[Job]) -> None:
        """`update_job` for each of `jobs`, which the scheduler has just run and moved to
        their next run time: a phase group leaves its bucket for one other bucket, looked up
        once for all the jobs given the same run time. A job that is no longer here as this
        object (its run removed or replaced it) is left alone; one listed twice moves once."""
        if self._move_bucket(jobs):
            return
        given: datetime | None = None  # the run time the last bucket was found for
        shared: datetime | None = None  # that bucket's instant, which its jobs share
        bucket: dict[str, Job] = {}
        moved: set[str] = set()  # a job listed twice is moved once
        for job in jobs:
            job_id = job.id
            if job_id in moved or job_id not in self._filed or self._job(job_id) is not job:
                continue
            moved.add(job_id)
            self._unfile(job_id)
            when = job.next_run_time
            if when is not None and when is given:
                job.next_run_time = shared
                self._filed[job_id] = shared
                bucket[job_id] = job
                continue
            self._file(job)
            filed = self._filed[job_id]
            if filed is not None and job.next_run_time is filed:  # UTC, as the grid's
                given, shared, bucket = when, filed, self._buckets[filed]
            else:  # paused, or another zone's time (a cron entry's): filed one by one
                given = None

    def _move_bucket(self, jobs: list[Job]) -> bool:
        """The usual case of `update_jobs`, cheaply: `jobs` are every job of one bucket, all
        moved to one later UTC run time. The bucket's dict moves whole (merged into the one
        already at that time, if any), and each job is only re-filed: about three operations a
        job instead of a dozen, at thousands of jobs a second. False, having changed nothing,
        for anything else (a run removed, replaced or added a job; a cron job's zone)."""
        if not jobs:
            return False
        when = jobs[0].next_run_time
        filed = self._filed.get(jobs[0].id)
        if when is None or when.tzinfo is not UTC or filed is None or not when > filed:
            return False
        bucket = self._buckets[filed]
        if len(bucket) != len(jobs):
            return False
        for job in jobs:
            found: Job = bucket.get(job.id)
            if found is not job or job.next_run_time is not when:
                return False
        if len({job.id for job in jobs}) != len(bucket):  # a job twice: another one left out
            return False
        del self._buckets[filed]
        del self._times[bisect.bisect_left(self._times, filed)]
        shared = self._rebucket(bucket, when)
        filing = self._filed
        for job in jobs:
            job.next_run_time = shared
            filing[job.id] = shared
        return True

    def _rebucket(self, bucket: dict[str, Job], when: datetime) -> datetime:
        """Files `bucket`'s jobs under `when`; returns the instant they share there."""
        there = self._buckets.get(when)
        if there is None:
            self._buckets[when] = bucket
            bisect.insort(self._times, when)
            return when
        there.update(bucket)
        return self._times[bisect.bisect_left(self._times, when)]

    def remove_job(self, job_id: str) -> None:
        if job_id not in self._filed:
            raise JobLookupError(job_id)
        self._unfile(job_id)

    def remove_all_jobs(self) -> None:
        self._filed.clear()
        self._buckets.clear()
        self._times.clear()
        self._paused.clear()

    def shutdown(self) -> None:
        self.remove_all_jobs()  # as MemoryJobStore does

    def _job(self, job_id: str) -> Job:
        """The job filed under `job_id`, which must be here."""
        when = self._filed[job_id]
        return self._paused[job_id] if when is None else self._buckets[when][job_id]

    def _file(self, job: Job) -> None:
        when: datetime | None = job.next_run_time
        if when is not None and when.tzinfo is not UTC:
            # A cron job's run time is in its own zone. Filed in UTC: during a repeated hour
            # an aware datetime never equals one of another zone (PEP 495), which would split
            # one instant into two buckets and confuse the bisection that removes them.
            when = when.astimezone(UTC)
        if when is None:
            self._filed[job.id] = None
            self._paused[job.id] = job
            return
        bucket = self._buckets.get(when)
        if bucket is None:
            bucket = self._buckets[when] = {}
            bisect.insort(self._times, when)
        else:
            when = self._times[bisect.bisect_left(self._times, when)]  # the bucket's instant
            if job.next_run_time.tzinfo is UTC:
                # Equal to the job's own: the jobs of a group share one datetime (45 B each).
                job.next_run_time = when
        self._filed[job.id] = when
        bucket[job.id] = job

    def _unfile(self, job_id: str) -> None:
        when = self._filed.pop(job_id)
        if when is None:
            del self._paused[job_id]
            return
        bucket = self._buckets[when]
        del bucket[job_id]
        if not bucket:
            del self._buckets[when]
            del self._times[bisect.bisect_left(self._times, when)]
