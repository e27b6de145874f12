"""The SQLite store: one file in WAL mode, readable with ``sqlite3``; schema in
:mod:`.sqlite_schema`.

Every write is one ``BEGIN IMMEDIATE`` ... ``COMMIT`` inside a single method call, so no
transaction stays open across an ``await`` and nobody commits another's writes. The short
SQLite work runs synchronously inside the ``async`` methods. Time for leases is the store's
clock: ``julianday('now')`` in SQL, never the caller's.
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
import stat
from collections.abc import AsyncGenerator, Awaitable, Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, TypeVar

from imagepipe.durable.errors import (
    StoreBusy,
    StoreConflict,
    StoreCorrupt,
    StoreError,
    StoreFull,
    StoreMissing,
    StoreNewer,
    StoreReadOnly,
    StoreUnusable,
    StoreWriteFailed,
)
from imagepipe.durable.guard import translating
from imagepipe.durable.records import Fence, Lease
from imagepipe.durable.rows import CLAIM_COLUMNS, promise_from_row
from imagepipe.durable.sql import (
    CHUNK_ROWS,
    Counted,
    Dialect,
    Params,
    Row,
    SQLStore,
    Statements,
    Tx,
    lease_params,
)
from imagepipe.durable.sqlite_schema import APPLICATION_ID, MIGRATIONS, SCHEMA_VERSION
from imagepipe.durable.store import DETACHED, Claim, StoreOptions

__all__ = ["SQLITE", "SQLiteStore", "check_store_file"]

T = TypeVar("T")

SQLITE_HEADER = b"SQLite format 3\x00"

#: SQLite's SQL: one writer holds the whole file from ``BEGIN IMMEDIATE`` on, so no row is
#: locked; the clock is ``julianday('now')``, in Unix seconds
SQLITE = Dialect(
    schema="",
    now="((julianday('now') - 2440587.5) * 86400.0)",
    pyformat=False,
    json_lists=True,
    share_lock="",
    update_lock="",
    end_lock="",
    counts_object="json_group_object(state, n)",
    no_limit=-1,
)
_NOW = SQLITE.now


#: what the sqlite3 module raises: its own errors, and UnicodeDecodeError when SQLite's
#: message quotes a schema that is not UTF-8 (the module cannot decode the message itself)
_DriverError = sqlite3.Error | UnicodeDecodeError
_DRIVER_ERRORS: tuple[type[_DriverError], ...] = (sqlite3.Error, UnicodeDecodeError)


def _translate(exc: _DriverError, where: str) -> StoreError:
    if isinstance(exc, UnicodeDecodeError):
        return StoreCorrupt(where, "is corrupt (its schema is not UTF-8)")
    text = str(exc).lower()
    if "locked" in text or "busy" in text:
        return StoreBusy(where, "is locked by another process")
    if "readonly" in text or "read-only" in text:
        return StoreReadOnly(where, "is read-only")
    if "full" in text:
        return StoreFull(where, "cannot grow: the disk is full")
    if "disk i/o error" in text:
        return StoreWriteFailed(where, "could not be written (disk I/O error)")
    if "not a database" in text or "malformed" in text or "corrupt" in text:
        return StoreCorrupt(where, "is corrupt")
    if "could not decode" in text:  # damaged text in a row; the message quotes its bytes
        return StoreCorrupt(where, "is corrupt (a row holds text that is not UTF-8)")
    return StoreError(where, f"failed: {str(exc)!r}")


#: turn any ``sqlite3`` error into a one-line :class:`StoreError`
_guarded = translating(_DRIVER_ERRORS, _translate)


def check_store_file(file: Path, *, create: bool) -> None:
    """Refuse a path that cannot be a store, before anything touches it."""
    where = str(file)
    try:
        info = file.stat()
    except FileNotFoundError:
        if not create:
            raise StoreMissing(where, "does not exist") from None
        if not file.parent.is_dir():
            parent = str(file.parent)
            raise StoreUnusable(
                where, f"cannot be created: directory {parent!r} does not exist"
            ) from None
        return
    except OSError as exc:
        raise StoreUnusable(where, f"cannot be read: {exc.strerror}") from None
    if stat.S_ISDIR(info.st_mode):
        raise StoreUnusable(where, "is a directory, not a database file")
    if not stat.S_ISREG(info.st_mode):
        raise StoreUnusable(where, "is not a regular file")
    try:
        with file.open("rb") as fh:
            header = fh.read(len(SQLITE_HEADER))
    except OSError as exc:
        raise StoreUnusable(where, f"cannot be read: {exc.strerror}") from None
    if header and header != SQLITE_HEADER:
        raise StoreUnusable(where, "is not a SQLite database")


class SQLiteStore(SQLStore):
    """A :class:`~imagepipe.durable.store.Store` in one SQLite file."""

    sql = Statements(SQLITE)

    def __init__(self, conn: sqlite3.Connection, where: str) -> None:
        self._db = conn
        self.where = where
        self._unverified = False

    # -- opening -------------------------------------------------------------------

    @classmethod
    def open(cls, path: str | os.PathLike[str], options: StoreOptions) -> SQLiteStore:
        """Open the store at ``path`` (created if ``options.create``), migrated to the
        current schema; with ``options.verify``, refuse to write to one that fails
        ``quick_check``."""
        file = Path(path)
        where = str(file)
        check_store_file(file, create=options.create)
        try:
            conn = sqlite3.connect(file, timeout=options.busy_timeout, isolation_level=None)
        except sqlite3.Error as exc:
            raise _translate(exc, where) from exc
        store = cls(conn, where)
        try:
            store._prepare(options)
        except _DRIVER_ERRORS as exc:
            conn.close()
            raise _translate(exc, where) from exc
        except BaseException:
            conn.close()
            raise
        return store

    def _prepare(self, options: StoreOptions) -> None:
        db = self._db
        app_id = db.execute("PRAGMA application_id").fetchone()[0]
        version = db.execute("PRAGMA user_version").fetchone()[0]
        tables = db.execute("SELECT count(*) FROM sqlite_master").fetchone()[0]
        if app_id != APPLICATION_ID and tables:
            raise StoreUnusable(self.where, "is a SQLite database of another program")
        if version > SCHEMA_VERSION:
            raise StoreNewer(self.where, version, SCHEMA_VERSION)
        wal = db.execute("PRAGMA journal_mode").fetchone()[0].lower() == "wal"
        # Checked before the first write, not here: a command that finds it has nothing to
        # write (resume of a finished run) need not read the whole file (~50 ms at 100k).
        # Migrating and turning WAL on are writes too, even for a store opened to read.
        writes_now = version < SCHEMA_VERSION or not wal
        self._unverified = bool(tables) and (options.verify or writes_now)
        if not wal:
            self._verify_before_writing()
            db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=NORMAL")
        if version < SCHEMA_VERSION:
            with self._transaction():
                # Re-read inside the write lock: another process may have migrated meanwhile.
                version = db.execute("PRAGMA user_version").fetchone()[0]
                for number in range(version + 1, SCHEMA_VERSION + 1):
                    MIGRATIONS[number - 1](db)
                    db.execute(f"PRAGMA user_version = {number}")
                db.execute(f"PRAGMA application_id = {APPLICATION_ID}")
        if options.max_pages is not None:
            db.execute(f"PRAGMA max_page_count = {int(options.max_pages)}")

    def _verify_before_writing(self) -> None:
        if self._unverified:
            problem = self._db.execute("PRAGMA quick_check(1)").fetchone()[0]
            if problem != "ok":
                raise StoreCorrupt(self.where, f"is corrupt ({problem!r})")
            self._unverified = False

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        """One write transaction: committed at the end of the block, rolled back on error.
        The first one of a store opened with ``verify`` checks its integrity first."""
        db = self._db
        self._verify_before_writing()
        db.execute("BEGIN IMMEDIATE")
        try:
            yield db
            db.execute("COMMIT")
        except BaseException:
            # SQLite may have rolled back by itself already (SQLITE_FULL, some I/O errors).
            if db.in_transaction:
                with contextlib.suppress(sqlite3.Error):
                    db.execute("ROLLBACK")
            raise

    async def close(self) -> None:
        with contextlib.suppress(sqlite3.Error):
            if self._db.in_transaction:
                self._db.execute("ROLLBACK")
            self._db.close()

    # -- transactions and reads -----------------------------------------------------

    async def _in_transaction(self, body: Callable[[Tx], Awaitable[T]]) -> T:
        with self._translated(), self._transaction() as db:
            return await body(_SQLiteTx(db, self.where))

    async def _fetchall(self, sql: str, params: Params) -> list[Row]:
        with self._translated():
            return self._db.execute(sql, params).fetchall()

    async def _chunks(self, sql: str, params: Params) -> AsyncGenerator[list[Row], None]:
        with self._translated():
            cursor = self._db.execute(sql, params)
            while rows := cursor.fetchmany(CHUNK_ROWS):
                yield rows

    @contextlib.contextmanager
    def _translated(self) -> Iterator[None]:
        """Any ``sqlite3`` error of the block as a one-line :class:`StoreError`."""
        try:
            yield
        except _DRIVER_ERRORS as exc:
            raise _translate(exc, self.where) from exc

    # -- workers -------------------------------------------------------------------

    @_guarded
    async def claim(
        self, worker: Lease, *, limit: int, stale_after: float, run_id: str | None = None
    ) -> list[Claim]:
        if limit <= 0:
            return []
        # one run's branches: the same walk of the pending roots, narrowed to that run
        only_run = "" if run_id is None else " AND r.id = :run"
        with self._transaction() as db:  # BEGIN IMMEDIATE: one claimer at a time
            # The runs oldest first, then each run's branches in launch order, both from
            # the indexes of pending promises (migration 5): a claim reads what it takes,
            # not every branch of the queue, settled or not.
            # (Named: the planner would rather walk every root by parent_id IS NULL.)
            runs = db.execute(
                "SELECT r.id FROM promises r INDEXED BY promises_pending_roots"
                " LEFT JOIN leases rl ON rl.key = r.id"
                " WHERE r.parent_id IS NULL AND r.state = 'pending'"
                f" AND json_extract(r.options, '$.{DETACHED}') = 1"
                f" AND (rl.owner IS NULL OR {_NOW} - rl.heartbeat_at > :stale)"
                f"{only_run} ORDER BY r.created_at, r.id",
                {"stale": stale_after, "run": run_id},
            ).fetchall()
            rows: list[Any] = []
            for (pending_run,) in runs:
                if len(rows) >= limit:
                    break
                rows += db.execute(
                    f"SELECT {CLAIM_COLUMNS}, l.epoch FROM promises p"
                    " LEFT JOIN leases l ON l.key = p.id"
                    " WHERE p.parent_id = :run AND p.state = 'pending'"
                    f" AND (l.owner IS NULL OR {_NOW} - l.heartbeat_at > :stale)"
                    " ORDER BY p.seq LIMIT :limit",
                    {"run": pending_run, "stale": stale_after, "limit": limit - len(rows)},
                ).fetchall()
            claims = []
            for row in rows:
                record, epoch = promise_from_row(row[:-1], self.where), (row[-1] or 0) + 1
                db.execute(
                    _CLAIM_LEASE,
                    {
                        "key": record.id,
                        "owner": worker.owner,
                        "pid": worker.pid,
                        "host": worker.host,
                        "epoch": epoch,
                    },
                )
                claims.append(Claim(record, Fence(record.id, epoch)))
        return claims

    @_guarded
    async def renew_claims(self, worker: Lease, fences: Sequence[Fence]) -> list[Fence]:
        lost = []
        with self._transaction() as db:
            for fence in fences:
                cur = db.execute(self.sql.renew, lease_params(fence.key, fence.epoch, worker))
                if cur.rowcount == 1:
                    continue
                row = db.execute(
                    "SELECT owner, epoch FROM leases WHERE key = ?", (fence.key,)
                ).fetchone()
                if row != (None, fence.epoch):  # not ended by its own settlement: taken
                    lost.append(fence)
        return lost


class _SQLiteTx(Tx):
    """A transaction of the SQLite store: every statement runs at once, and a count of
    changed rows is checked as soon as it is known."""

    checks_each = True

    def __init__(self, db: sqlite3.Connection, where: str) -> None:
        super().__init__(where)
        self._db = db

    async def fetchall(self, sql: str, params: Params) -> list[Row]:
        return self._db.execute(sql, params).fetchall()

    async def send(self, sql: str, params: Params) -> Counted:
        return self._db.execute(sql, params)

    async def _executemany(
        self, sql: str, params: Iterable[Params], duplicate: str | None
    ) -> Counted:
        try:
            return self._db.executemany(sql, params)
        except sqlite3.IntegrityError:
            if duplicate is None:
                raise
            raise StoreConflict(self.where, duplicate) from None

    async def _wait(self) -> None:
        """Nothing waits: each statement ran when it was sent."""


#: a claim takes the lease on the branch's id with the next epoch
_CLAIM_LEASE = (
    "INSERT INTO leases (key, owner, pid, host, heartbeat_at, epoch)"
    f" VALUES (:key, :owner, :pid, :host, {_NOW}, :epoch) ON CONFLICT (key) DO UPDATE SET"
    " owner = excluded.owner, pid = excluded.pid, host = excluded.host,"
    " heartbeat_at = excluded.heartbeat_at, epoch = excluded.epoch"
)
