"""Counters that survive restarts: totals, per-entry counters and a short history, in SQLite.

WAL with ``synchronous=NORMAL``: a committed checkpoint survives the process being killed
(SIGKILL, OOM, watchdog abort); a power cut may lose the last few checkpoints but never
corrupts the file. If the file is corrupt anyway (bad flash, a truncated copy), it is moved
aside and the service starts from zero rather than not at all.

One process writes a database: `open()` takes its writer lock (logs/writer_lock.py) before it
reads a byte, and raises FileInUseError while another process holds it. Two writers would
each delete the other's entries at every checkpoint (issue 27 #2).
"""

from __future__ import annotations

import contextlib
import sqlite3
import threading
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import NamedTuple

from scheduler_publisher.logs.writer_lock import FileInUseError, WriterLock

__all__ = [
    "EntryCounters",
    "HistoryRow",
    "SavedState",
    "StateStore",
    "StateStoreError",
    "Totals",
]


class EntryCounters(NamedTuple):
    """An entry's counters as saved. A named tuple, not a frozen dataclass: a checkpoint builds
    one per entry (10,000 at a time), and a tuple costs a fraction of the dataclass's
    `object.__setattr__` per field, on the thread that publishes (docs/design.md, "Checkpoints
    off the publishing path")."""

    published: int = 0
    errors: int = 0
    dropped: int = 0
    last_published_at: float | None = None  # unix time
    seq: int = 0  # the last {{seq}} a templated entry published (template.py)


@dataclass(frozen=True, slots=True)
class Totals:
    """Cumulative across runs: the service adds this run's counts to what open() returned."""

    published: int = 0
    errors: int = 0
    dropped: int = 0
    reconnects: int = 0
    uptime_seconds: float = 0.0


@dataclass(frozen=True, slots=True)
class SavedState:
    totals: Totals = Totals()
    entries: Mapping[str, EntryCounters] = field(default_factory=lambda: MappingProxyType({}))


@dataclass(frozen=True, slots=True)
class HistoryRow:
    at: float  # unix time
    published: int
    errors: int
    uptime_seconds: float


class StateStoreError(Exception):
    """The state database could not be used (I/O, permissions, a newer schema, misuse)."""


# Each entry upgrades the schema by one version; never edit one that has shipped.
_MIGRATIONS: tuple[str, ...] = (
    """
    CREATE TABLE totals (
        id             INTEGER PRIMARY KEY CHECK (id = 1),
        published      INTEGER NOT NULL,
        errors         INTEGER NOT NULL,
        dropped        INTEGER NOT NULL,
        reconnects     INTEGER NOT NULL,
        uptime_seconds REAL    NOT NULL,
        saved_at       REAL    NOT NULL
    );
    CREATE TABLE entries (
        entry_id          TEXT    PRIMARY KEY,
        published         INTEGER NOT NULL,
        errors            INTEGER NOT NULL,
        dropped           INTEGER NOT NULL,
        last_published_at REAL
    ) WITHOUT ROWID;
    CREATE TABLE history (
        id             INTEGER PRIMARY KEY,
        at             REAL    NOT NULL,
        published      INTEGER NOT NULL,
        errors         INTEGER NOT NULL,
        uptime_seconds REAL    NOT NULL
    );
    CREATE INDEX history_at ON history (at);
    """,
    """
    ALTER TABLE entries ADD COLUMN seq INTEGER NOT NULL DEFAULT 0;
    """,
)

_CORRUPTION_CODES = frozenset({sqlite3.SQLITE_CORRUPT, sqlite3.SQLITE_NOTADB})


class _CorruptError(Exception):
    """Raised internally when the file opens but fails its integrity check."""


class _NewerSchemaError(Exception):
    """Raised internally when the file was written by a newer version of the service."""


class StateStore:
    """Owns one SQLite connection; every method takes a small lock, so any thread may call."""

    def __init__(
        self,
        path: Path,
        *,
        history_retention_rows: int = 10_000,
        history_max_age_s: float = 30 * 86400,
        adopt_from: Path | None = None,
    ) -> None:
        if history_retention_rows < 1:
            raise ValueError(
                f"history_retention_rows must be at least 1, got {history_retention_rows}"
            )
        if history_max_age_s <= 0:
            raise ValueError(f"history_max_age_s must be positive, got {history_max_age_s}")
        self.path = path
        self.history_retention_rows = history_retention_rows
        self.history_max_age_s = history_max_age_s
        # A shard's own database starts as a copy of this one while it does not exist yet
        # (settings.ServiceSettings.state_db_predecessor).
        self.adopt_from = adopt_from
        self.recovered_from: Path | None = None  # where open() moved a corrupt file
        self.adopted_from: Path | None = None  # the file open() copied the counters from
        self.lock_unsupported: str | None = None  # why the file is used without a writer lock
        self._lock = threading.Lock()
        self._conn: sqlite3.Connection | None = None
        self._writer: WriterLock | None = None

    def open(self) -> SavedState:
        """Open (creating or migrating) the database and return what was last checkpointed.
        Raises FileInUseError while another writer holds the database, StateStoreError when
        it cannot be used otherwise."""
        with self._lock:
            if self._conn is not None:
                raise StateStoreError(f"{self.path}: already open")
            self.recovered_from = self.adopted_from = None
            try:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                self._writer = WriterLock.acquire(self.path, "state database")
            except FileInUseError:
                raise
            except OSError as exc:
                raise StateStoreError(f"{self.path}: cannot lock state database: {exc}") from exc
            self.lock_unsupported = self._writer.unsupported
            try:
                return self._open_locked()
            except BaseException:
                self._writer.release()
                raise

    def _open_locked(self) -> SavedState:
        try:
            self._adopt()
            try:
                self._conn, saved = self._connect_and_load()
            except (_CorruptError, sqlite3.DatabaseError) as exc:
                if not _is_corruption(exc):
                    raise
                self.recovered_from = self._move_aside(int(time.time()))
                self._conn, saved = self._connect_and_load()
        except (OSError, sqlite3.Error, _CorruptError, _NewerSchemaError) as exc:
            raise StateStoreError(f"{self.path}: cannot open state database: {exc}") from exc
        return saved

    def _adopt(self) -> None:
        """Copy `adopt_from` to a database that does not exist yet (SQLite's backup: a
        consistent copy even while another process writes the source)."""
        source = self.adopt_from
        if source is None or self.path.exists() or not source.is_file():
            return
        try:
            with (
                contextlib.closing(sqlite3.connect(source, timeout=5.0)) as src,
                contextlib.closing(sqlite3.connect(self.path)) as dst,
            ):
                src.backup(dst)
        except sqlite3.Error as exc:
            self.path.unlink(missing_ok=True)
            raise StateStoreError(
                f"{self.path}: cannot copy the counters of {source} into it ({exc}); "
                f"move {source} away to start this database from zero"
            ) from exc
        self.adopted_from = source

    def checkpoint(self, state: SavedState, *, now: float) -> None:
        """Save `state` in one transaction; entries absent from it are deleted."""
        t = state.totals
        rows = [(entry_id, *counters) for entry_id, counters in state.entries.items()]
        with self._transaction() as conn:
            conn.execute(
                "INSERT INTO totals (id, published, errors, dropped, reconnects, uptime_seconds,"
                " saved_at) VALUES (1, ?, ?, ?, ?, ?, ?)"
                " ON CONFLICT (id) DO UPDATE SET published = excluded.published,"
                " errors = excluded.errors, dropped = excluded.dropped,"
                " reconnects = excluded.reconnects, uptime_seconds = excluded.uptime_seconds,"
                " saved_at = excluded.saved_at",
                (t.published, t.errors, t.dropped, t.reconnects, t.uptime_seconds, now),
            )
            # Replace rather than upsert: small rows spread over every page, so it writes about
            # the same pages, and entries removed from the config go without a diff.
            conn.execute("DELETE FROM entries")
            conn.executemany(
                "INSERT INTO entries (entry_id, published, errors, dropped, last_published_at,"
                " seq) VALUES (?, ?, ?, ?, ?, ?)",
                rows,
            )

    def record_history(self, row: HistoryRow) -> None:
        """Append `row`, then prune to the newest `history_retention_rows` within the max age."""
        with self._transaction() as conn:
            conn.execute(
                "INSERT INTO history (at, published, errors, uptime_seconds) VALUES (?, ?, ?, ?)",
                (row.at, row.published, row.errors, row.uptime_seconds),
            )
            # The new row's time is "now"; a gateway clock that jumped back prunes nothing.
            conn.execute("DELETE FROM history WHERE at < ?", (row.at - self.history_max_age_s,))
            conn.execute(
                "DELETE FROM history WHERE id <= "
                "(SELECT id FROM history ORDER BY id DESC LIMIT 1 OFFSET ?)",
                (self.history_retention_rows,),
            )

    def history(self, limit: int = 100) -> list[HistoryRow]:
        """The newest `limit` rows, newest first (insertion order, immune to clock jumps)."""
        with self._lock:
            conn = self._require_open()
            try:
                cursor = conn.execute(
                    "SELECT at, published, errors, uptime_seconds FROM history"
                    " ORDER BY id DESC LIMIT ?",
                    (limit,),
                )
                return [HistoryRow(*r) for r in cursor]
            except sqlite3.Error as exc:
                raise StateStoreError(f"{self.path}: cannot read history: {exc}") from exc

    def close(self) -> None:
        """Close the connection (idempotent); SQLite folds the WAL back into the file. Then the
        writer lock goes: another process may open the database from here on."""
        with self._lock:
            conn, self._conn = self._conn, None
            if conn is not None:
                conn.close()
            writer, self._writer = self._writer, None
            if writer is not None:
                writer.release()

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            conn = self._require_open()
            try:
                with _immediate(conn):
                    yield conn
            except sqlite3.Error as exc:
                raise StateStoreError(f"{self.path}: cannot write state: {exc}") from exc

    def _require_open(self) -> sqlite3.Connection:
        if self._conn is None:
            raise StateStoreError(f"{self.path}: not open")
        return self._conn

    def _connect_and_load(self) -> tuple[sqlite3.Connection, SavedState]:
        # isolation_level=None: transactions are explicit (BEGIN IMMEDIATE ... COMMIT).
        # check_same_thread=False: the lock, not the creating thread, guards the connection.
        conn = sqlite3.connect(
            self.path, timeout=5.0, isolation_level=None, check_same_thread=False
        )
        try:
            _configure(conn)
            _migrate(conn)
            return conn, _load(conn)
        except BaseException:
            conn.close()
            raise

    def _move_aside(self, stamp: int) -> Path:
        """Rename the corrupt file (and its WAL) to <name>.corrupt-<stamp>[-n]."""
        target = self.path.with_name(f"{self.path.name}.corrupt-{stamp}")
        n = 0
        while target.exists():
            n += 1
            target = self.path.with_name(f"{self.path.name}.corrupt-{stamp}-{n}")
        self.path.rename(target)
        # SQLite normally deletes the WAL when the failed connection closes; one that is
        # left would be replayed into the fresh database, so it goes aside too. The -shm
        # file is only an index of the WAL.
        wal = self.path.with_name(self.path.name + "-wal")
        if wal.exists():
            wal.rename(target.with_name(target.name + "-wal"))
        self.path.with_name(self.path.name + "-shm").unlink(missing_ok=True)
        return target


def _is_corruption(exc: BaseException) -> bool:
    if isinstance(exc, _CorruptError):
        return True
    code = getattr(exc, "sqlite_errorcode", None)
    return isinstance(code, int) and (code & 0xFF) in _CORRUPTION_CODES


@contextlib.contextmanager
def _immediate(conn: sqlite3.Connection) -> Iterator[None]:
    """One write transaction; BEGIN IMMEDIATE takes the write lock up front."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        yield
    except BaseException:
        # Some errors (SQLITE_FULL, SQLITE_IOERR) already rolled back; a second ROLLBACK
        # would raise and hide the original error.
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise
    conn.execute("COMMIT")


def _configure(conn: sqlite3.Connection) -> None:
    conn.execute("PRAGMA journal_mode = WAL")
    conn.execute("PRAGMA synchronous = NORMAL")
    # Cap the WAL left on disk after checkpoints: gateway flash is small.
    conn.execute("PRAGMA journal_size_limit = 4194304")
    # Catches a damaged file now, while moving it aside is still cheap, rather than mid-run.
    result = conn.execute("PRAGMA quick_check").fetchone()
    if result is None or result[0] != "ok":
        raise _CorruptError(f"quick_check: {result[0] if result else 'no result'}")


def _migrate(conn: sqlite3.Connection) -> None:
    with _immediate(conn):
        conn.execute(
            "CREATE TABLE IF NOT EXISTS schema_migrations"
            " (version INTEGER PRIMARY KEY, applied_at REAL NOT NULL)"
        )
        row = conn.execute("SELECT max(version) FROM schema_migrations").fetchone()
        current = row[0] or 0
        if current > len(_MIGRATIONS):
            raise _NewerSchemaError(
                f"schema version {current} is newer than this program knows"
                f" ({len(_MIGRATIONS)}); was the service downgraded?"
            )
        for version in range(current + 1, len(_MIGRATIONS) + 1):
            # Statement by statement: executescript() would COMMIT our transaction first.
            for statement in _MIGRATIONS[version - 1].split(";"):
                if statement.strip():
                    conn.execute(statement)
            conn.execute(
                "INSERT INTO schema_migrations (version, applied_at) VALUES (?, ?)",
                (version, time.time()),
            )


def _load(conn: sqlite3.Connection) -> SavedState:
    row = conn.execute(
        "SELECT published, errors, dropped, reconnects, uptime_seconds FROM totals WHERE id = 1"
    ).fetchone()
    totals = Totals(*row) if row else Totals()
    entries = {
        entry_id: EntryCounters(published, errors, dropped, last, seq)
        for entry_id, published, errors, dropped, last, seq in conn.execute(
            "SELECT entry_id, published, errors, dropped, last_published_at, seq FROM entries"
        )
    }
    return SavedState(totals, MappingProxyType(entries))
