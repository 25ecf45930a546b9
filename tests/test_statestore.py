"""StateStore on real SQLite files: restarts, durability across processes, retention, recovery."""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from contextlib import closing
from pathlib import Path

import pytest

from scheduler_publisher.statestore import (
    EntryCounters,
    HistoryRow,
    SavedState,
    StateStore,
    StateStoreError,
    Totals,
)

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return tmp_path / "state" / "state.db"  # the parent does not exist yet


@pytest.fixture
def store(db_path: Path) -> Iterator[StateStore]:
    s = StateStore(db_path)
    s.open()
    yield s
    s.close()


def run_python(code: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        env=env,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def sample_state() -> SavedState:
    return SavedState(
        Totals(published=10, errors=2, dropped=1, reconnects=3, uptime_seconds=120.5),
        {"a": EntryCounters(7, 1, 0, 1_700_000_000.25), "b": EntryCounters(3, 1, 1, None)},
    )


def test_new_database_is_empty_and_created_with_parent(db_path: Path) -> None:
    """open() on a missing file creates its directory and schema and returns empty state."""
    s = StateStore(db_path)
    assert not db_path.parent.exists()  # the constructor did no I/O
    try:
        assert s.open() == SavedState(Totals(), {})
    finally:
        s.close()
    assert db_path.exists()
    assert s.recovered_from is None


def test_round_trip_across_restart(db_path: Path) -> None:
    """A restart gets back exactly what was checkpointed and continues the totals from there."""
    first = StateStore(db_path)
    first.open()
    first.checkpoint(sample_state(), now=1000.0)
    first.close()

    second = StateStore(db_path)
    saved = second.open()
    assert saved == sample_state()
    continued = Totals(
        published=saved.totals.published + 5,
        errors=saved.totals.errors,
        dropped=saved.totals.dropped,
        reconnects=saved.totals.reconnects + 1,
        uptime_seconds=saved.totals.uptime_seconds + 60,
    )
    second.checkpoint(SavedState(continued, saved.entries), now=2000.0)
    second.close()

    third = StateStore(db_path)
    assert third.open().totals == Totals(15, 2, 1, 4, 180.5)
    third.close()


def test_schema_version_recorded(store: StateStore, db_path: Path) -> None:
    """The schema_migrations table records the applied version; reopening applies nothing new."""
    store.close()
    store.open()
    with closing(sqlite3.connect(db_path)) as conn:
        versions = [v for (v,) in conn.execute("SELECT version FROM schema_migrations")]
    assert versions == [1, 2]


def test_newer_schema_is_refused(db_path: Path) -> None:
    """A file written by a newer release raises StateStoreError instead of being misread."""
    s = StateStore(db_path)
    s.open()
    s.close()
    with closing(sqlite3.connect(db_path)) as conn, conn:
        conn.execute("INSERT INTO schema_migrations VALUES (99, 0)")
    with pytest.raises(StateStoreError, match="newer"):
        StateStore(db_path).open()
    assert db_path.exists()  # not treated as corruption: the file is left alone


def test_wal_mode_is_on(store: StateStore, db_path: Path) -> None:
    """The database is in WAL mode (persistent, visible to other connections)."""
    with closing(sqlite3.connect(db_path)) as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_second_process_sees_checkpoint_without_close(store: StateStore, db_path: Path) -> None:
    """Another process reads a checkpoint while this one still holds the database open."""
    store.checkpoint(sample_state(), now=1.0)
    result = run_python(f"""
        import json, sqlite3
        conn = sqlite3.connect({str(db_path)!r})
        totals = conn.execute("SELECT published, reconnects FROM totals").fetchone()
        entries = dict(conn.execute("SELECT entry_id, published FROM entries"))
        print(json.dumps({{"totals": totals, "entries": entries}}))
    """)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == {"totals": [10, 3], "entries": {"a": 7, "b": 3}}


def test_checkpoint_survives_sigkill(db_path: Path) -> None:
    """A process killed with SIGKILL right after checkpoint() keeps that checkpoint."""
    result = run_python(f"""
        import os, signal
        from pathlib import Path
        from scheduler_publisher.statestore import EntryCounters, SavedState, StateStore, Totals
        s = StateStore(Path({str(db_path)!r}))
        s.open()
        s.checkpoint(SavedState(Totals(published=42), {{"x": EntryCounters(42)}}), now=1.0)
        os.kill(os.getpid(), signal.SIGKILL)
    """)
    assert result.returncode == -9, result.stderr
    s = StateStore(db_path)
    try:
        saved = s.open()
    finally:
        s.close()
    assert saved == SavedState(Totals(published=42), {"x": EntryCounters(42)})
    assert s.recovered_from is None


def test_removed_entries_are_deleted(store: StateStore) -> None:
    """Entries missing from a checkpoint are deleted; the others are updated."""
    store.checkpoint(sample_state(), now=1.0)
    store.checkpoint(SavedState(Totals(), {"b": EntryCounters(9), "c": EntryCounters(1)}), now=2.0)
    store.close()
    assert store.open().entries == {"b": EntryCounters(9), "c": EntryCounters(1)}
    store.checkpoint(SavedState(Totals(), {}), now=3.0)
    store.close()
    assert store.open().entries == {}


def row(at: float, n: int = 0) -> HistoryRow:
    return HistoryRow(at=at, published=n, errors=0, uptime_seconds=float(n))


def test_history_newest_first_with_limit(store: StateStore) -> None:
    """history() returns the newest rows first, up to `limit`."""
    for i in range(5):
        store.record_history(row(1000.0 + i, i))
    assert [r.published for r in store.history()] == [4, 3, 2, 1, 0]
    assert [r.published for r in store.history(limit=2)] == [4, 3]
    assert store.history(1) == [row(1004.0, 4)]


def test_history_retention_by_rows(db_path: Path) -> None:
    """Only the newest history_retention_rows rows are kept."""
    s = StateStore(db_path, history_retention_rows=3)
    s.open()
    try:
        for i in range(10):
            s.record_history(row(1000.0 + i, i))
        assert [r.published for r in s.history(100)] == [9, 8, 7]
    finally:
        s.close()


def test_history_retention_by_age(db_path: Path) -> None:
    """Rows older than history_max_age_s (relative to the newest row) are pruned."""
    s = StateStore(db_path, history_max_age_s=100)
    s.open()
    try:
        for at in (1000.0, 1050.0, 1120.0):
            s.record_history(row(at, int(at)))
        assert [r.at for r in s.history()] == [1120.0, 1050.0]  # 1000 < 1120 - 100
        s.record_history(row(5.0, 5))  # the clock jumped back: nothing is pruned
        assert [r.at for r in s.history()] == [5.0, 1120.0, 1050.0]
    finally:
        s.close()


def test_history_survives_restart(store: StateStore) -> None:
    """History rows persist across close/open."""
    store.record_history(row(1.0, 1))
    store.close()
    store.open()
    assert store.history() == [row(1.0, 1)]


def test_garbage_file_is_moved_aside(db_path: Path) -> None:
    """A file that is not SQLite is renamed to <name>.corrupt-<ts> and a fresh store starts."""
    db_path.parent.mkdir()
    db_path.write_bytes(b"definitely not sqlite " * 500)
    before = int(time.time())
    s = StateStore(db_path)
    try:
        assert s.open() == SavedState(Totals(), {})
        s.checkpoint(sample_state(), now=1.0)  # the fresh file works
    finally:
        s.close()
    assert s.recovered_from is not None
    assert s.recovered_from.parent == db_path.parent
    name, _, stamp = s.recovered_from.name.partition(".corrupt-")
    assert name == db_path.name
    assert before <= int(stamp) <= int(time.time())
    assert s.recovered_from.read_bytes().startswith(b"definitely not sqlite")


def test_leftover_wal_is_not_replayed_into_the_fresh_file(db_path: Path) -> None:
    """A corrupt file's leftover -wal/-shm never leak into the fresh database."""
    db_path.parent.mkdir()
    db_path.write_bytes(b"not sqlite " * 500)
    db_path.with_name(db_path.name + "-wal").write_bytes(b"old wal " * 100)
    db_path.with_name(db_path.name + "-shm").write_bytes(b"\0" * 32768)
    s = StateStore(db_path)
    try:
        assert s.open() == SavedState(Totals(), {})
        s.checkpoint(sample_state(), now=1.0)
    finally:
        s.close()
    assert s.recovered_from is not None
    reopened = StateStore(db_path)
    try:
        assert reopened.open() == sample_state()
    finally:
        reopened.close()
    assert reopened.recovered_from is None


def test_damaged_pages_are_moved_aside(db_path: Path) -> None:
    """A real database with damaged pages is detected at open() and replaced."""
    s = StateStore(db_path)
    s.open()
    s.checkpoint(SavedState(Totals(), {f"e{i}": EntryCounters(i) for i in range(5000)}), now=1.0)
    s.close()
    data = bytearray(db_path.read_bytes())
    page = int.from_bytes(data[16:18], "big")
    for offset in range(2 * page, len(data), 2 * page):  # keep page 1 (header + schema) intact
        data[offset : offset + 512] = bytes(range(256)) * 2
    db_path.write_bytes(bytes(data))

    again = StateStore(db_path)
    try:
        assert again.open() == SavedState(Totals(), {})
    finally:
        again.close()
    assert again.recovered_from is not None
    assert again.recovered_from.exists()


def test_second_recovery_in_same_second_does_not_overwrite(
    db_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two recoveries with the same timestamp keep both corrupt copies."""
    monkeypatch.setattr("scheduler_publisher.statestore.time.time", lambda: 1_700_000_000.5)
    db_path.parent.mkdir()
    moved = []
    for i in range(2):
        db_path.write_bytes(f"garbage {i} ".encode() * 500)
        s = StateStore(db_path)
        s.open()
        s.close()
        assert s.recovered_from is not None
        moved.append(s.recovered_from)
    assert [p.name for p in moved] == [
        "state.db.corrupt-1700000000",
        "state.db.corrupt-1700000000-1",
    ]
    assert moved[0].read_bytes().startswith(b"garbage 0")
    assert moved[1].read_bytes().startswith(b"garbage 1")


def test_unopenable_path_raises_store_error(tmp_path: Path) -> None:
    """A path that cannot be a database (a directory) raises StateStoreError and moves nothing."""
    target = tmp_path / "is-a-dir"
    target.mkdir()
    s = StateStore(target)
    with pytest.raises(StateStoreError):
        s.open()
    assert target.is_dir()
    assert s.recovered_from is None


def test_misuse_raises_store_error(db_path: Path) -> None:
    """Using the store before open() or opening it twice raises StateStoreError."""
    s = StateStore(db_path)
    with pytest.raises(StateStoreError, match="not open"):
        s.checkpoint(SavedState(Totals(), {}), now=0)
    with pytest.raises(StateStoreError, match="not open"):
        s.history()
    s.open()
    with pytest.raises(StateStoreError, match="already open"):
        s.open()
    s.close()
    s.close()  # idempotent


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"history_retention_rows": 0}, "history_retention_rows must be at least 1, got 0"),
        ({"history_max_age_s": 0}, "history_max_age_s must be positive, got 0"),
    ],
)
def test_invalid_retention_rejected(tmp_path: Path, kwargs: dict[str, float], message: str) -> None:
    """Retention bounds are validated in the constructor."""
    with pytest.raises(ValueError, match=message):
        StateStore(tmp_path / "s.db", **kwargs)  # type: ignore[arg-type]


def test_ten_thousand_entry_checkpoint(
    store: StateStore, capsys: pytest.CaptureFixture[str]
) -> None:
    """A 10,000-entry checkpoint round-trips; its duration is reported, not asserted."""
    entries = {
        f"gateway/sensor/{i:05d}": EntryCounters(i, i % 7, i % 3, 1_700_000_000.0 + i)
        for i in range(10_000)
    }
    state = SavedState(Totals(published=sum(range(10_000))), entries)
    timings = []
    for n in range(3):
        start = time.perf_counter()
        store.checkpoint(state, now=float(n))
        timings.append(time.perf_counter() - start)
    store.close()
    start = time.perf_counter()
    saved = store.open()
    load = time.perf_counter() - start
    assert saved == state
    with capsys.disabled():
        print(
            f"\n10,000-entry checkpoint: {', '.join(f'{t * 1000:.1f} ms' for t in timings)};"
            f" open+load: {load * 1000:.1f} ms"
        )
