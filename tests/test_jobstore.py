"""GroupedJobStore keeps APScheduler's job store contract, and answers like MemoryJobStore."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from apscheduler.job import Job
from apscheduler.jobstores.base import BaseJobStore, ConflictingIdError, JobLookupError
from apscheduler.jobstores.memory import MemoryJobStore
from apscheduler.schedulers.background import BackgroundScheduler
from hypothesis import given, settings
from hypothesis import strategies as st

from scheduler_publisher.scheduling.jobstore import GroupedJobStore
from scheduler_publisher.scheduling.triggers import grid_trigger

T0 = datetime(2026, 6, 1, 12, 0, tzinfo=UTC)
SCHEDULER = BackgroundScheduler(timezone=UTC)  # never started: Job() only reads its timezone
TRIGGER = grid_trigger(1.0, T0)


def tick(*_args: Any) -> None:
    pass


def job(job_id: str, offset: float | None) -> Any:
    """A real APScheduler Job due `offset` seconds after T0, or paused (None)."""
    when = None if offset is None else T0 + timedelta(seconds=offset)
    return Job(
        SCHEDULER,
        id=job_id,
        func=tick,
        args=(),
        kwargs={},
        trigger=TRIGGER,
        executor="default",
        name="publish",
        misfire_grace_time=None,
        coalesce=False,
        max_instances=1,
        next_run_time=when,
    )


def move(store: BaseJobStore, moved: Any, offset: float | None) -> None:
    """What the scheduler does: change the job in place, then tell the store."""
    moved._modify(next_run_time=None if offset is None else T0 + timedelta(seconds=offset))
    store.update_job(moved)


def filed_job(store: BaseJobStore, job_id: str) -> Any:
    found = store.lookup_job(job_id)
    assert found is not None, job_id
    return found


def ids(jobs: list[Any]) -> list[str]:
    return [j.id for j in jobs]


@pytest.fixture
def store() -> GroupedJobStore:
    return GroupedJobStore()


def test_added_jobs_are_found_by_id_and_unknown_ids_are_not(store: GroupedJobStore) -> None:
    """lookup_job returns the very Job added, and None for an id never added."""
    added = job("a", 1)
    store.add_job(added)
    assert store.lookup_job("a") is added
    assert store.lookup_job("b") is None


def test_adding_an_existing_id_raises_conflicting_id(store: GroupedJobStore) -> None:
    """A second job with the same id is refused, even at another run time, and the first stays."""
    first = job("a", 1)
    store.add_job(first)
    with pytest.raises(ConflictingIdError):
        store.add_job(job("a", 5))
    assert store.lookup_job("a") is first
    assert ids(store.get_all_jobs()) == ["a"]


def test_updating_or_removing_an_unknown_id_raises_job_lookup(store: GroupedJobStore) -> None:
    """update_job and remove_job of an id not in the store raise JobLookupError."""
    with pytest.raises(JobLookupError):
        store.update_job(job("ghost", 1))
    with pytest.raises(JobLookupError):
        store.remove_job("ghost")
    store.add_job(job("a", 1))
    store.remove_job("a")
    with pytest.raises(JobLookupError):
        store.remove_job("a")


def test_due_jobs_are_those_at_or_before_now_in_run_time_order(store: GroupedJobStore) -> None:
    """get_due_jobs: every job due at or before now, earliest first; later and paused ones not."""
    for job_id, offset in (
        ("late", 3),
        ("b", 1),
        ("a", 1),
        ("early", 0),
        ("paused", None),
        ("future", 10),
    ):
        store.add_job(job(job_id, offset))
    due = store.get_due_jobs(T0 + timedelta(seconds=3))
    assert [j.next_run_time for j in due] == sorted(j.next_run_time for j in due)
    assert set(ids(due)) == {"early", "a", "b", "late"}
    assert ids(due)[0] == "early"
    assert ids(due)[-1] == "late"
    assert store.get_due_jobs(T0 - timedelta(seconds=1)) == []


def test_next_run_time_is_the_earliest_and_none_when_nothing_runs(store: GroupedJobStore) -> None:
    """get_next_run_time: the earliest job's run time; None when empty or only paused jobs."""
    assert store.get_next_run_time() is None
    store.add_job(job("paused", None))
    assert store.get_next_run_time() is None
    store.add_job(job("b", 5))
    store.add_job(job("a", 2))
    assert store.get_next_run_time() == T0 + timedelta(seconds=2)


def test_all_jobs_by_run_time_then_id_with_paused_last(store: GroupedJobStore) -> None:
    """get_all_jobs sorts like MemoryJobStore: run time, then id; paused jobs last."""
    for job_id, offset in (("z", None), ("c", 2), ("b", 1), ("a", 2), ("y", None)):
        store.add_job(job(job_id, offset))
    assert ids(store.get_all_jobs()) == ["b", "a", "c", "y", "z"]


def test_an_updated_job_moves_to_its_new_run_time(store: GroupedJobStore) -> None:
    """After update_job the job is due at its new time only; an emptied instant disappears."""
    a, b = job("a", 1), job("b", 1)
    store.add_job(a)
    store.add_job(b)
    move(store, a, 2)
    assert ids(store.get_due_jobs(T0 + timedelta(seconds=1))) == ["b"]
    move(store, b, 2)
    assert store.get_next_run_time() == T0 + timedelta(seconds=2)
    assert set(ids(store.get_due_jobs(T0 + timedelta(seconds=2)))) == {"a", "b"}
    move(store, a, None)  # paused
    assert ids(store.get_all_jobs()) == ["b", "a"]
    assert store.lookup_job("a") is a


def test_remove_all_and_shutdown_empty_the_store(store: GroupedJobStore) -> None:
    """remove_all_jobs and shutdown leave nothing, and the ids can be added again."""
    store.add_job(job("a", 1))
    store.add_job(job("p", None))
    store.remove_all_jobs()
    assert store.get_all_jobs() == []
    assert store.get_next_run_time() is None
    store.add_job(job("a", 1))
    store.shutdown()
    assert store.get_all_jobs() == []
    assert store.lookup_job("a") is None


OFFSETS = st.one_of(st.none(), st.integers(0, 6).map(float))
OPS = st.lists(
    st.tuples(
        st.sampled_from(["add", "update", "remove"]),
        st.sampled_from(["a", "b", "c", "d", "e"]),
        OFFSETS,
    ),
    max_size=40,
)


@settings(max_examples=200, deadline=None)
@given(OPS, st.integers(0, 7))
def test_answers_like_memory_job_store(
    ops: list[tuple[str, str, float | None]], now_offset: int
) -> None:
    """Any sequence of add/update/remove gives the same answers and errors as MemoryJobStore
    (due jobs compared as (run time, id) pairs: ties may come out in another order)."""
    ours, theirs = GroupedJobStore(), MemoryJobStore()
    for op, job_id, offset in ops:
        outcomes: list[type[Exception] | None] = []
        for target in (ours, theirs):
            try:
                if op == "add":
                    target.add_job(job(job_id, offset))
                elif op == "update":
                    move(target, job(job_id, offset), offset)
                else:
                    target.remove_job(job_id)
                outcomes.append(None)
            except (ConflictingIdError, JobLookupError) as exc:
                outcomes.append(type(exc))
        assert outcomes[0] == outcomes[1], (op, job_id)
    assert ids(ours.get_all_jobs()) == ids(theirs.get_all_jobs())
    assert ours.get_next_run_time() == theirs.get_next_run_time()
    now = T0 + timedelta(seconds=now_offset)
    assert sorted((j.next_run_time, j.id) for j in ours.get_due_jobs(now)) == [
        (j.next_run_time, j.id) for j in theirs.get_due_jobs(now)
    ]
    assert [j.next_run_time for j in ours.get_due_jobs(now)] == [
        j.next_run_time for j in theirs.get_due_jobs(now)
    ]
    for job_id in "abcde":
        found, expected = ours.lookup_job(job_id), theirs.lookup_job(job_id)
        assert (found is None) == (expected is None)
        assert found is None or found.next_run_time == expected.next_run_time


def test_the_jobs_of_a_group_share_one_run_time_and_one_empty_kwargs() -> None:
    """Jobs filed at one instant hold one datetime between them, and jobs without keyword
    arguments one empty dict, so a job costs no more for them; a job moved on gets its new
    run time, equal to what the scheduler set."""
    store = GroupedJobStore()
    a, b, c = job("a", 1), job("b", 1), job("c", 2)
    for filed in (a, b, c):
        store.add_job(filed)
    assert a.next_run_time is b.next_run_time
    assert a.next_run_time == T0 + timedelta(seconds=1)
    assert a.kwargs is b.kwargs is c.kwargs
    assert a.kwargs == {}
    move(store, b, 2)
    assert b.next_run_time is c.next_run_time
    assert b.next_run_time == T0 + timedelta(seconds=2)
    assert [j.id for j in store.get_due_jobs(T0 + timedelta(seconds=1))] == ["a"]


@settings(max_examples=200, deadline=None)
@given(
    st.dictionaries(st.sampled_from("abcdefgh"), OFFSETS, min_size=1),
    st.lists(st.sampled_from("abcdefgh"), unique=True),
    OFFSETS,
    st.integers(0, 7),
)
def test_a_group_moved_at_once_answers_like_its_jobs_moved_one_by_one(
    filed: dict[str, float | None], moved: list[str], offset: float | None, now_offset: int
) -> None:
    """update_jobs (the scheduler moving a phase group to its next slot, every job given the
    same run time object) leaves the store as update_job job by job leaves MemoryJobStore, and
    the moved jobs share the run time of the jobs already filed there."""
    ours, theirs = GroupedJobStore(), MemoryJobStore()
    for target in (ours, theirs):
        for job_id, at in filed.items():
            target.add_job(job(job_id, at))
    when = None if offset is None else T0 + timedelta(seconds=offset)
    group = [filed_job(ours, job_id) for job_id in moved if job_id in filed]
    for moving in group:
        moving.next_run_time = when
    ours.update_jobs(group)
    for moving in group:
        move(theirs, filed_job(theirs, moving.id), offset)
    assert ids(ours.get_all_jobs()) == ids(theirs.get_all_jobs())
    assert ours.get_next_run_time() == theirs.get_next_run_time()
    now = T0 + timedelta(seconds=now_offset)
    assert sorted((j.next_run_time, j.id) for j in ours.get_due_jobs(now)) == [
        (j.next_run_time, j.id) for j in theirs.get_due_jobs(now)
    ]
    for job_id in filed:
        assert filed_job(ours, job_id).next_run_time == filed_job(theirs, job_id).next_run_time
    instants = {
        id(j.next_run_time)
        for j in ours.get_all_jobs()
        if j.next_run_time == when and when is not None
    }
    assert len(instants) <= 1


def test_a_group_move_leaves_alone_a_job_its_run_removed_or_replaced() -> None:
    """A job removed, or replaced by another Job under its id, while its group ran is not
    filed again by the group's move: the replacement keeps its own run time."""
    store = GroupedJobStore()
    a, b, c = job("a", 1), job("b", 1), job("c", 1)
    for filed in (a, b, c):
        store.add_job(filed)
    store.remove_job("b")
    store.remove_job("c")
    replacement = job("c", 5)
    store.add_job(replacement)
    following = T0 + timedelta(seconds=2)
    for moving in (a, b, c):
        moving.next_run_time = following
    store.update_jobs([a, b, c])
    assert store.lookup_job("a") is a
    assert store.lookup_job("b") is None
    assert replacement.next_run_time == T0 + timedelta(seconds=5)
    assert filed_job(store, "c") is replacement
    assert ids(store.get_all_jobs()) == ["a", "c"]


@settings(max_examples=200, deadline=None)
@given(
    st.dictionaries(st.sampled_from("abcdefgh"), st.integers(0, 3).map(float), min_size=1),
    st.integers(0, 3),
    st.lists(st.sampled_from("abcdefgh")),
    st.integers(0, 6).map(float),
)
def test_a_whole_bucket_moved_answers_like_its_jobs_moved_one_by_one(
    filed: dict[str, float], bucket_offset: int, extra: list[str], offset: float
) -> None:
    """The usual group move, every job of one instant to one later run time (the bucket moves
    whole), and its variants: some jobs listed twice, one left out in its place, a job of
    another instant among them, or a run time not later. Each leaves the store as update_job
    job by job leaves MemoryJobStore, and the moved jobs share one run time object."""
    ours, theirs = GroupedJobStore(), MemoryJobStore()
    for target in (ours, theirs):
        for job_id, at in filed.items():
            target.add_job(job(job_id, at))
    bucket = [job_id for job_id, at in filed.items() if at == bucket_offset]
    listed = bucket + [job_id for job_id in extra if job_id in filed]
    if extra and bucket and len(listed) > len(bucket):
        listed = listed[1:]  # the same length as the bucket, so only the ids tell
    when = T0 + timedelta(seconds=offset)
    group = [filed_job(ours, job_id) for job_id in listed]
    for moving in group:
        moving.next_run_time = when
    ours.update_jobs(group)
    for job_id in dict.fromkeys(listed):
        move(theirs, filed_job(theirs, job_id), offset)
    assert ids(ours.get_all_jobs()) == ids(theirs.get_all_jobs())
    assert ours.get_next_run_time() == theirs.get_next_run_time()
    for job_id in filed:
        assert filed_job(ours, job_id).next_run_time == filed_job(theirs, job_id).next_run_time
    assert len({id(j.next_run_time) for j in ours.get_all_jobs() if j.next_run_time == when}) <= 1
    now = T0 + timedelta(seconds=6)
    assert sorted((j.next_run_time, j.id) for j in ours.get_due_jobs(now)) == [
        (j.next_run_time, j.id) for j in theirs.get_due_jobs(now)
    ]
