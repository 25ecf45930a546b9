"""Schedule: one APScheduler job per entry, all calling the one shared tick function, and
carrying as little per job as APScheduler allows (10,000 entries means 10,000 jobs)."""

from __future__ import annotations

import threading
from datetime import datetime

from scheduler_publisher.config import PublishConfig
from scheduler_publisher.scheduling import Schedule
from tests.support import wait_until


def test_jobs_share_one_tick_and_keep_no_per_job_strings() -> None:
    ticked: list[str] = []
    lock = threading.Lock()

    def tick(entry_id: str, _slot: datetime | None = None, _missed: int = 0) -> None:
        with lock:
            ticked.append(entry_id)

    schedule = Schedule(tick)
    schedule.start()
    try:
        for i in range(3):
            schedule.add(PublishConfig(id=f"e{i}", topic=f"t/{i}", data={}, interval=0.1))
        jobs = [schedule._scheduler.get_job(f"e{i}") for i in range(3)]
        assert schedule.job_ids() == {"e0", "e1", "e2"}
        assert len({id(job.func) for job in jobs}) == 1, "one shared publish function"
        assert [job.args for job in jobs] == [("e0",), ("e1",), ("e2",)]
        # No "module:qualname" string per job (only pickling job stores need it) and one
        # shared name string.
        assert [job.func_ref for job in jobs] == [None, None, None]
        assert len({id(job.name) for job in jobs}) == 1
        wait_until(lambda: {"e0", "e1", "e2"} <= set(ticked), 10, message="every job ticks")
    finally:
        schedule.shutdown()


def test_entries_named_like_internal_jobs_leave_the_heartbeat_alone() -> None:
    """Entries whose ids equal internal job ids, added and removed, neither replace nor remove
    the scheduler's heartbeat: it keeps beating, and job_ids() lists entries only."""
    schedule = Schedule(lambda *_: None)
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
