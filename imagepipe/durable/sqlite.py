"""The SQLite store: one file, WAL mode, numbered migrations, readable with ``sqlite3``.

Schema (version 2)::

    promises(id PK, parent_id, seq, func, args JSON, options JSON, state, value JSON,
             error JSON, attempts, failures, created_at, settled_at)
    attempts(promise_id, attempt, started_at, finished_at, error JSON)   -- failed ones
    leases(run_id PK, owner, pid, host, heartbeat_at)                     -- who executes

Writes open a ``BEGIN IMMEDIATE`` transaction that stays open until :meth:`commit`, so a
caller can group many writes into one commit (see :mod:`imagepipe.durable.commit`).
"""

from __future__ import annotations

import functools
import json
import os
import sqlite3
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NoReturn, ParamSpec, TypeVar

from imagepipe.durable.store import (
    AttemptRecord,
    ErrorInfo,
    Lease,
    PromiseRecord,
    PromiseState,
    Settled,
    WriteBatch,
    canonical_json,
)
from imagepipe.errors import StoreBusy, StoreError, UnusableStore

__all__ = ["APPLICATION_ID", "MIGRATIONS", "SCHEMA_VERSION", "SQLiteStore"]

APPLICATION_ID = 0x696D6770  # "imgp": marks a SQLite file as an imagepipe store
SQLITE_HEADER = b"SQLite format 3\x00"

P = ParamSpec("P")
R = TypeVar("R")


def _migration_1(db: sqlite3.Connection) -> None:
    db.execute(
        """CREATE TABLE promises (
            id TEXT PRIMARY KEY,
            parent_id TEXT,
            seq INTEGER,
            func TEXT NOT NULL,
            args TEXT NOT NULL,
            options TEXT NOT NULL DEFAULT '{}',
            state TEXT NOT NULL CHECK (state IN ('pending', 'resolved', 'rejected')),
            value TEXT,
            error TEXT,
            attempts INTEGER NOT NULL DEFAULT 0,
            failures INTEGER NOT NULL DEFAULT 0,
            created_at REAL NOT NULL,
            settled_at REAL
        )"""
    )
    db.execute("CREATE INDEX promises_by_parent ON promises (parent_id, seq)")
    db.execute("CREATE INDEX promises_roots ON promises (created_at) WHERE parent_id IS NULL")
    db.execute(
        """CREATE TABLE attempts (
            promise_id TEXT NOT NULL,
            attempt INTEGER NOT NULL,
            started_at REAL NOT NULL,
            finished_at REAL,
            error TEXT,
            PRIMARY KEY (promise_id, attempt)
        ) WITHOUT ROWID"""
    )
    db.execute(
        """CREATE TABLE leases (
            run_id TEXT PRIMARY KEY,
            owner TEXT NOT NULL,
            pid INTEGER NOT NULL,
            host TEXT NOT NULL,
            heartbeat_at REAL NOT NULL
        )"""
    )


def _migration_2(db: sqlite3.Connection) -> None:
    """Same table, with ``state`` checked by comparisons instead of ``IN (...)``: SQLite
    builds an ephemeral table for the list on every row written, which cost ~2 µs per
    insert and per settle (a third of the store's work per branch, measured)."""
    db.execute(
        """CREATE TABLE promises_v2 (
            id TEXT PRIMARY KEY,
            parent_id TEXT,
            seq INTEGER,
            func TEXT NOT NULL,
            args TEXT NOT NULL,
            options TEXT NOT NULL DEFAULT '{}',
            state TEXT NOT NULL
                CHECK (state = 'pending' OR state = 'resolved' OR state = 'rejected'),
            value TEXT,
            error TEXT,
            attempts INTEGER NOT NULL DEFAULT 0,
            failures INTEGER NOT NULL DEFAULT 0,
            created_at REAL NOT NULL,
            settled_at REAL
        )"""
    )
    db.execute("INSERT INTO promises_v2 SELECT * FROM promises")
    db.execute("DROP TABLE promises")  # drops its indexes too
    db.execute("ALTER TABLE promises_v2 RENAME TO promises")
    db.execute("CREATE INDEX promises_by_parent ON promises (parent_id, seq)")
    db.execute("CREATE INDEX promises_roots ON promises (created_at) WHERE parent_id IS NULL")


#: Migration N turns schema version N-1 into N. Append only; never edit a released one.
MIGRATIONS: list[Callable[[sqlite3.Connection], None]] = [_migration_1, _migration_2]
SCHEMA_VERSION = len(MIGRATIONS)


def _translate(exc: sqlite3.Error, path: str) -> StoreError:
    text = str(exc).lower()
    if "locked" in text or "busy" in text:
        return StoreBusy(f"the store {path} is locked by another process; try again")
    if "readonly" in text or "read-only" in text:
        return StoreError(f"the store {path} is read-only; check its permissions")
    if "full" in text:
        return StoreError(f"the disk holding {path} is full; free space and resume")
    if "not a database" in text or "malformed" in text or "corrupt" in text:
        return StoreError(f"the store {path} is corrupt ({exc}); restore it from a backup")
    return StoreError(f"the store {path} failed: {exc}")


def _guarded(method: Callable[P, R]) -> Callable[P, R]:
    """Turn any sqlite3 error into a one-line :class:`StoreError`."""

    @functools.wraps(method)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return method(*args, **kwargs)
        except sqlite3.Error as exc:
            store = args[0]
            assert isinstance(store, SQLiteStore)
            error = _translate(exc, store.path)
            store._abandon(error)
            raise error from exc

    return wrapper


_COLUMNS = (
    "id, parent_id, seq, func, args, state, value, error, attempts, failures, "
    "created_at, settled_at, options"
)


def _record(row: tuple[Any, ...]) -> PromiseRecord:
    return PromiseRecord(
        id=row[0],
        parent_id=row[1],
        seq=row[2],
        func=row[3],
        args=json.loads(row[4]),
        state=row[5],
        value=None if row[6] is None else json.loads(row[6]),
        error=None if row[7] is None else ErrorInfo.from_json(row[7]),
        attempts=row[8],
        failures=row[9],
        created_at=row[10],
        settled_at=row[11],
        options={} if row[12] == "{}" else json.loads(row[12]),
    )


def _attempt(row: tuple[Any, ...]) -> AttemptRecord:
    promise_id, attempt, started, finished, error = row
    return AttemptRecord(
        promise_id,
        attempt,
        started,
        finished,
        None if error is None else ErrorInfo.from_json(error),
    )


def check_store_path(path: Path, *, must_exist: bool) -> None:
    """Refuse a path that cannot be an imagepipe store, before anything touches it."""
    if path.exists():
        if path.is_dir():
            raise UnusableStore(f"--db {path} is a directory, not a database file")
        try:
            with path.open("rb") as fh:
                header = fh.read(len(SQLITE_HEADER))
        except OSError as exc:
            raise UnusableStore(f"--db {path} cannot be read: {exc.strerror}") from exc
        if header and header != SQLITE_HEADER:
            raise UnusableStore(f"--db {path} is not a SQLite database")
    elif must_exist:
        return
    elif not path.parent.is_dir():
        raise UnusableStore(f"--db {path}: directory {path.parent} does not exist")


class SQLiteStore:
    """A :class:`~imagepipe.durable.store.Store` in one SQLite file."""

    def __init__(self, conn: sqlite3.Connection, path: str) -> None:
        self._db = conn
        self.path = path
        #: set when a failure rolled back uncommitted writes: commit() must not pretend
        self._lost: StoreError | None = None

    # -- opening -------------------------------------------------------------------

    @classmethod
    def open(
        cls,
        path: str | os.PathLike[str],
        *,
        busy_timeout: float = 5.0,
        max_pages: int | None = None,
    ) -> SQLiteStore:
        """Open (creating if needed) the store at ``path`` and bring its schema up to date.

        ``busy_timeout``: seconds to wait for another writer. ``max_pages``: fault
        injection; the file may not grow past this many pages (as if the disk were full)."""
        file = Path(path)
        check_store_path(file, must_exist=False)
        try:
            conn = sqlite3.connect(file, timeout=busy_timeout, isolation_level=None)
        except sqlite3.Error as exc:
            raise _translate(exc, str(file)) from exc
        store = cls(conn, str(file))
        try:
            store._prepare()
            if max_pages is not None:
                conn.execute(f"PRAGMA max_page_count = {int(max_pages)}")
        except BaseException:
            conn.close()
            raise
        return store

    @_guarded
    def _prepare(self) -> None:
        db = self._db
        app_id = db.execute("PRAGMA application_id").fetchone()[0]
        version = db.execute("PRAGMA user_version").fetchone()[0]
        tables = db.execute("SELECT count(*) FROM sqlite_master").fetchone()[0]
        if app_id != APPLICATION_ID and tables:
            raise UnusableStore(f"--db {self.path} is a SQLite database of another program")
        if version > SCHEMA_VERSION:
            raise StoreError(
                f"the store {self.path} has schema version {version}, newer than this "
                f"imagepipe knows ({SCHEMA_VERSION}); upgrade imagepipe"
            )
        if db.execute("PRAGMA journal_mode").fetchone()[0].lower() != "wal":
            db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=NORMAL")
        if version < SCHEMA_VERSION:
            self._migrate(version)

    def _migrate(self, version: int) -> None:
        db = self._db
        db.execute("BEGIN IMMEDIATE")
        try:
            # Re-read inside the write lock: another process may have migrated meanwhile.
            version = db.execute("PRAGMA user_version").fetchone()[0]
            for number in range(version + 1, SCHEMA_VERSION + 1):
                MIGRATIONS[number - 1](db)
                db.execute(f"PRAGMA user_version = {number}")
            db.execute(f"PRAGMA application_id = {APPLICATION_ID}")
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise

    # -- transactions --------------------------------------------------------------

    def _begin(self) -> sqlite3.Connection:
        """The connection, inside a write transaction."""
        if self._lost is not None:  # earlier writes were rolled back: refuse to go on
            raise self._lost
        if not self._db.in_transaction:
            self._db.execute("BEGIN IMMEDIATE")
        return self._db

    def _write(self, sql: str, params: Sequence[Any] = ()) -> sqlite3.Cursor:
        return self._begin().execute(sql, params)

    @_guarded
    def commit(self) -> None:
        if self._lost is not None:
            raise self._lost
        if self._db.in_transaction:
            self._db.execute("COMMIT")

    @_guarded
    def rollback(self) -> None:
        if self._db.in_transaction:
            self._db.execute("ROLLBACK")

    def _abandon(self, error: StoreError | None = None) -> None:
        """After an error, drop the half-done transaction so nothing partial commits, and
        remember that writes were lost so that the next commit fails instead of lying."""
        # Set even when no transaction is open any more: on SQLITE_FULL and some I/O
        # errors SQLite has already rolled the whole transaction back by itself.
        self._lost = self._lost or error
        try:
            if self._db.in_transaction:
                self._db.execute("ROLLBACK")
        except sqlite3.Error:
            pass

    def close(self) -> None:
        try:
            self._abandon()
            self._db.close()
        except sqlite3.Error:
            pass

    # -- promises ------------------------------------------------------------------

    @_guarded
    def create(
        self,
        promise_id: str,
        *,
        func: str,
        args: Sequence[Any],
        parent_id: str | None = None,
        seq: int | None = None,
        options: dict[str, Any] | None = None,
    ) -> tuple[PromiseRecord, bool]:
        args_json = canonical_json(list(args))
        now = time.time()
        cur = self._write(
            "INSERT INTO promises (id, parent_id, seq, func, args, options, state, created_at)"
            " VALUES (?, ?, ?, ?, ?, ?, 'pending', ?) ON CONFLICT (id) DO NOTHING",
            (
                promise_id,
                parent_id,
                seq,
                func,
                args_json,
                canonical_json(options) if options else "{}",
                now,
            ),
        )
        if cur.rowcount == 1:  # new: the record is what we wrote, no need to read it back
            record = PromiseRecord(
                id=promise_id,
                parent_id=parent_id,
                seq=seq,
                func=func,
                args=list(args),
                state="pending",
                value=None,
                error=None,
                attempts=0,
                failures=0,
                created_at=now,
                settled_at=None,
                options=dict(options or {}),
            )
            return record, True
        return self._must_get(promise_id), False

    @_guarded
    def get(self, promise_id: str) -> PromiseRecord | None:
        row = self._db.execute(
            f"SELECT {_COLUMNS} FROM promises WHERE id = ?", (promise_id,)
        ).fetchone()
        return None if row is None else _record(row)

    @_guarded
    def children(self, parent_id: str) -> list[PromiseRecord]:
        rows = self._db.execute(
            f"SELECT {_COLUMNS} FROM promises WHERE parent_id = ? ORDER BY seq", (parent_id,)
        )
        return [_record(row) for row in rows]

    @_guarded
    def roots(self, limit: int | None = None) -> list[PromiseRecord]:
        rows = self._db.execute(
            f"SELECT {_COLUMNS} FROM promises WHERE parent_id IS NULL"
            " ORDER BY created_at DESC, id DESC LIMIT ?",
            (-1 if limit is None else limit,),
        )
        return [_record(row) for row in rows]

    @_guarded
    def child_counts(self, parent_ids: Sequence[str]) -> dict[str, dict[str, int]]:
        counts: dict[str, dict[str, int]] = {pid: {} for pid in parent_ids}
        for pid in parent_ids:
            for state, n in self._db.execute(
                "SELECT state, count(*) FROM promises WHERE parent_id = ? GROUP BY state",
                (pid,),
            ):
                counts[pid][state] = n
        return counts

    @_guarded
    def start_attempt(self, promise_id: str) -> int:
        row = self._write(
            "UPDATE promises SET attempts = attempts + 1 WHERE id = ? RETURNING attempts",
            (promise_id,),
        ).fetchone()
        if row is None:
            raise StoreError(f"promise {promise_id!r} vanished from {self.path}")
        attempt: int = row[0]
        return attempt

    @_guarded
    def fail_attempt(
        self, promise_id: str, attempt: int, error: ErrorInfo, started_at: float
    ) -> None:
        self._write(
            "INSERT OR REPLACE INTO attempts (promise_id, attempt, started_at, finished_at, error)"
            " VALUES (?, ?, ?, ?, ?)",
            (promise_id, attempt, started_at, time.time(), error.to_json()),
        )
        self._db.execute("UPDATE promises SET failures = failures + 1 WHERE id = ?", (promise_id,))

    @_guarded
    def attempts(self, promise_id: str) -> list[AttemptRecord]:
        rows = self._db.execute(
            "SELECT promise_id, attempt, started_at, finished_at, error FROM attempts"
            " WHERE promise_id = ? ORDER BY attempt",
            (promise_id,),
        )
        return [_attempt(row) for row in rows]

    @_guarded
    def failed_attempts(self, parent_id: str) -> list[AttemptRecord]:
        rows = self._db.execute(
            "SELECT a.promise_id, a.attempt, a.started_at, a.finished_at, a.error"
            " FROM attempts a JOIN promises p ON p.id = a.promise_id"
            " WHERE p.parent_id = ? AND a.error IS NOT NULL ORDER BY p.seq, a.attempt",
            (parent_id,),
        )
        return [_attempt(row) for row in rows]

    def _settle(
        self, promise_id: str, state: PromiseState, value: Any, error: ErrorInfo | None
    ) -> Settled:
        """Settle if still pending (the first settle wins) and return the outcome."""
        value_json = None if value is None else canonical_json(value)
        row = self._write(
            "UPDATE promises SET state = ?, value = ?, error = ?, settled_at = ?"
            " WHERE id = ? AND state = 'pending' RETURNING attempts",
            (
                state,
                value_json,
                None if error is None else error.to_json(),
                time.time(),
                promise_id,
            ),
        ).fetchone()
        if row is None:  # settled before (its outcome stands), or unknown
            record = self._must_get(promise_id)
            return Settled(record.state, record.value, record.error, record.attempts)
        # The value as given: decoding it again cost 12 ms for a 10,000-image run result.
        return Settled(state, value, error, row[0])

    @_guarded
    def resolve(self, promise_id: str, value: Any) -> Settled:
        return self._settle(promise_id, "resolved", value, None)

    @_guarded
    def reject(self, promise_id: str, error: ErrorInfo) -> Settled:
        return self._settle(promise_id, "rejected", None, error)

    def _must_get(self, promise_id: str) -> PromiseRecord:
        record = self.get(promise_id)
        if record is None:
            raise StoreError(f"promise {promise_id!r} is not in {self.path}")
        return record

    @_guarded
    def apply(self, batch: WriteBatch) -> dict[str, Settled]:
        # One executemany per kind of write: at thousands of branches, per-statement
        # overhead in the sqlite3 module costs more than SQLite's own work (~3x, measured).
        db = self._begin()
        if batch.creates:
            cur = db.executemany(
                "INSERT INTO promises (id, parent_id, seq, func, args, created_at, state)"
                " VALUES (?, ?, ?, ?, ?, ?, 'pending') ON CONFLICT (id) DO NOTHING",
                batch.creates,
            )
            if cur.rowcount != len(batch.creates):
                self._conflict("branches of", batch.creates[0].parent_id)
        if batch.starts:
            cur = db.executemany(
                "UPDATE promises SET attempts = ? WHERE id = ? AND state = 'pending'",
                batch.starts,
            )
            if cur.rowcount != len(batch.starts):
                self._conflict("settled branches of", batch.starts[0].id.rpartition(".")[0])
        if not batch.settlements:
            return {}
        cur = db.executemany(
            "UPDATE promises SET state = ?, value = ?, error = ?, settled_at = ?"
            " WHERE id = ? AND state = 'pending'",
            batch.settlements,
        )
        if cur.rowcount == len(batch.settlements):
            return {}
        # Some promises were settled before (rare: never under the lease). A row this
        # batch settled holds exactly what it wrote; any other outcome is an earlier one.
        lost = {}
        for item in batch.settlements:
            row = db.execute(
                "SELECT state, value, error, settled_at, attempts FROM promises WHERE id = ?",
                (item.id,),
            ).fetchone()
            if row is None:
                self._refuse(f"promise {item.id!r} vanished from {self.path}")
            if tuple(row[:4]) != item[:4]:
                state, value, error, _, attempts = row
                lost[item.id] = Settled(
                    state,
                    None if value is None else json.loads(value),
                    None if error is None else ErrorInfo.from_json(error),
                    attempts,
                )
        return lost

    def _conflict(self, what: str, run_id: str) -> NoReturn:
        self._refuse(
            f"the store {self.path} already holds {what} run {run_id} that this process"
            " was about to write (written by another process, or replayed wrongly); its"
            " uncommitted writes were rolled back"
        )

    def _refuse(self, message: str) -> NoReturn:
        """Fail the batch: nothing of the open transaction may commit after this."""
        error = StoreError(message)
        self._abandon(error)
        raise error

    @_guarded
    def reopen(self, promise_id: str) -> None:
        self._write(
            "UPDATE promises SET state = 'pending', error = NULL, settled_at = NULL,"
            " failures = 0 WHERE id = ? AND state = 'rejected'",
            (promise_id,),
        )

    # -- leases --------------------------------------------------------------------

    @_guarded
    def acquire_lease(self, lease: Lease, *, is_stale: Callable[[Lease], bool]) -> Lease | None:
        self.commit()
        self._write("SELECT 1")  # take the write lock: read-check-write is atomic
        try:
            row = self._db.execute(
                "SELECT run_id, owner, pid, host, heartbeat_at FROM leases WHERE run_id = ?",
                (lease.run_id,),
            ).fetchone()
            if row is not None:
                holder = Lease(*row)
                if holder.owner != lease.owner and not is_stale(holder):
                    self._db.execute("ROLLBACK")
                    return holder
            self._db.execute(
                "INSERT OR REPLACE INTO leases (run_id, owner, pid, host, heartbeat_at)"
                " VALUES (?, ?, ?, ?, ?)",
                (lease.run_id, lease.owner, lease.pid, lease.host, lease.heartbeat_at),
            )
            self._db.execute("COMMIT")
        except BaseException:
            self._abandon()
            raise
        return None

    @_guarded
    def renew_lease(self, run_id: str, owner: str, now: float) -> bool:
        cur = self._write(
            "UPDATE leases SET heartbeat_at = ? WHERE run_id = ? AND owner = ?",
            (now, run_id, owner),
        )
        return cur.rowcount == 1

    @_guarded
    def release_lease(self, run_id: str, owner: str) -> None:
        """Delete our lease row and commit, even after a failed transaction was lost:
        the row is independent of those writes, and leaving it would block a resume."""
        if self._lost is None:
            self._write("DELETE FROM leases WHERE run_id = ? AND owner = ?", (run_id, owner))
            self.commit()
            return
        self._abandon()
        self._db.execute("BEGIN IMMEDIATE")
        self._db.execute("DELETE FROM leases WHERE run_id = ? AND owner = ?", (run_id, owner))
        self._db.execute("COMMIT")
