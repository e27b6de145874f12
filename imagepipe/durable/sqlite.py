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
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from imagepipe.durable.batches import ended_claims, fence_key, merged
from imagepipe.durable.errors import (
    LeaseHeld,
    LeaseLost,
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
from imagepipe.durable.records import (
    AttemptRecord,
    ChildColumns,
    ErrorInfo,
    Fence,
    Lease,
    PromiseRecord,
    RootRecord,
    Settled,
    Spending,
    WriteBatch,
    decode_json,
    named_params,
)
from imagepipe.durable.rows import (
    CHILD_COLUMNS,
    CLAIM_COLUMNS,
    PROMISE_COLUMNS,
    ROOT_COLUMNS,
    add_child_rows,
    attempt_from_row,
    promise_from_row,
    root_from_row,
)
from imagepipe.durable.sqlite_schema import APPLICATION_ID, MIGRATIONS, SCHEMA_VERSION
from imagepipe.durable.store import DETACHED, Claim, Store, StoreOptions

__all__ = ["SQLiteStore", "check_store_file"]

SQLITE_HEADER = b"SQLite format 3\x00"
#: the store's clock, in Unix seconds
_NOW = "((julianday('now') - 2440587.5) * 86400.0)"


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


class SQLiteStore(Store):
    """A :class:`~imagepipe.durable.store.Store` in one SQLite file."""

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

    # -- the one write path --------------------------------------------------------

    @_guarded
    async def apply(self, batch: WriteBatch) -> Mapping[str, Settled]:
        # One executemany per kind of write: at thousands of branches, per-statement
        # overhead in the sqlite3 module costs more than SQLite's own work (~3x, measured).
        # Parameters are made one row at a time (see _params).
        with self._transaction() as db:
            if batch.fence is not None:
                self._check_fence(db, batch.fence)
            return self._write(db, batch)

    @_guarded
    async def apply_each(
        self, batches: Sequence[WriteBatch]
    ) -> list[Mapping[str, Settled] | LeaseLost]:
        if not batches:
            return []
        with self._transaction() as db:  # BEGIN IMMEDIATE: no takeover can interleave
            fences = sorted({b.fence for b in batches if b.fence is not None}, key=fence_key)
            held = {
                fence
                for fence in fences
                if db.execute("SELECT epoch FROM leases WHERE key = ?", (fence.key,)).fetchone()
                == (fence.epoch,)
            }
            live = [b for b in batches if b.fence is None or b.fence in held]
            lost = self._write(db, merged(live)) if live else {}
            db.executemany(
                "UPDATE leases SET owner = NULL WHERE key = ? AND epoch = ?",
                [(f.key, f.epoch) for f in ended_claims(live)],
            )
        return [
            LeaseLost(b.fence.key, b.fence.epoch)
            if b.fence is not None and b.fence not in held
            else {s.id: lost[s.id] for s in b.settlements if s.id in lost}
            for b in batches
        ]

    def _write(self, db: sqlite3.Connection, batch: WriteBatch) -> dict[str, Settled]:
        """The writes of ``batch``, in its transaction (fence already checked)."""
        if batch.reopens:
            db.executemany(
                "UPDATE promises SET state = 'pending', error = NULL, settled_at = NULL,"
                " failures = 0, child_counts = NULL WHERE id = ? AND state = 'rejected'",
                [(promise_id,) for promise_id in batch.reopens],
            )
        if batch.creates:
            cur = db.executemany(
                "INSERT INTO promises (id, parent_id, seq, func, args, options, state, value,"
                " created_at, settled_at) VALUES (:id, :parent_id, :seq, :func, :args_json,"
                " :options_json, :state, :value_json, :created_at,"
                " CASE WHEN :state = 'pending' THEN NULL ELSE :created_at END)"
                " ON CONFLICT (id) DO NOTHING",
                _params(batch.creates),
            )
            if cur.rowcount != len(batch.creates):
                raise StoreConflict(self.where, "already holds promises this batch creates")
        if batch.starts:
            cur = db.executemany(
                "UPDATE promises SET attempts = :attempt"
                " WHERE id = :id AND state = 'pending' AND attempts < :attempt",
                _params(batch.starts),
            )
            if cur.rowcount != len(batch.starts):
                raise StoreConflict(self.where, "holds settled or further-on promises")
        if batch.failures:
            try:
                db.executemany(
                    "INSERT INTO attempts (promise_id, attempt, started_at, finished_at,"
                    " error) VALUES (:id, :attempt, :started_at, :finished_at, :error_json)",
                    _params(batch.failures),
                )
            except sqlite3.IntegrityError:
                raise StoreConflict(self.where, "already holds a failed attempt") from None
            cur = db.executemany(
                "UPDATE promises SET failures = failures + 1 WHERE id = ? AND state = 'pending'",
                [(f.id,) for f in batch.failures],
            )
            if cur.rowcount != len(batch.failures):
                raise StoreConflict(self.where, "holds no pending promise for a failed attempt")
        if not batch.settlements:
            return {}
        cur = db.executemany(
            "UPDATE promises SET state = :state, value = :value_json, error = :error_json,"
            " settled_at = :settled_at WHERE id = :id AND state = 'pending'",
            _params(batch.settlements),
        )
        settled_all = cur.rowcount == len(batch.settlements)
        db.execute(
            f"UPDATE promises SET child_counts = {_CHILD_COUNTS} WHERE id IN"
            " (SELECT value FROM json_each(?)) AND parent_id IS NULL AND state != 'pending'"
            " AND child_counts IS NULL",
            (_json_list([s.id for s in batch.settlements]),),
        )
        return {} if settled_all else self._earlier_outcomes(db, batch)

    def _earlier_outcomes(self, db: sqlite3.Connection, batch: WriteBatch) -> dict[str, Settled]:
        """The settlements of ``batch`` that lost: their promises were settled before. A
        row this batch settled holds exactly what it wrote; any other outcome is earlier."""
        lost = {}
        for item in batch.settlements:
            row = db.execute(
                "SELECT state, value, error, settled_at, attempts FROM promises WHERE id = ?",
                (item.id,),
            ).fetchone()
            if row is None:
                raise StoreConflict(self.where, f"has no promise {item.id!r} to settle")
            state, value, error, settled_at, attempts = row
            if (state, value, error, settled_at) != (
                item.state,
                item.value_json,
                item.error_json,
                item.settled_at,
            ):
                where = f"{self.where}, promise {item.id!r},"
                lost[item.id] = Settled(
                    state=state,
                    value=None if value is None else decode_json(value, "value", where),
                    error=None if error is None else ErrorInfo.from_json(error, where),
                    attempts=attempts,
                )
        return lost

    def _check_fence(self, db: sqlite3.Connection, fence: Fence) -> None:
        row = db.execute("SELECT epoch FROM leases WHERE key = ?", (fence.key,)).fetchone()
        if row is None or row[0] != fence.epoch:
            raise LeaseLost(fence.key, fence.epoch)

    # -- spending --------------------------------------------------------------------

    @_guarded
    async def set_spending_limit(self, run_id: str, meter: str, limit: int | None) -> None:
        with self._transaction() as db:
            db.execute(
                "INSERT INTO spending (run_id, meter, cap) VALUES (?, ?, ?)"
                " ON CONFLICT (run_id, meter) DO UPDATE SET cap = excluded.cap",
                (run_id, meter, limit),
            )

    @_guarded
    async def spending(self, run_id: str) -> dict[str, Spending]:
        rows = self._db.execute(
            "SELECT meter, cap, spent FROM spending WHERE run_id = ?", (run_id,)
        ).fetchall()
        return {meter: Spending(cap, spent) for meter, cap, spent in rows}

    @_guarded
    async def reserve_attempt(
        self,
        fence: Fence | None,
        run_id: str,
        promise_id: str,
        attempt: int,
        units: Mapping[str, int],
    ) -> tuple[str, Spending] | None:
        with self._transaction() as db:  # BEGIN IMMEDIATE: one reserver at a time
            if fence is not None:
                self._check_fence(db, fence)
            row = db.execute(
                "SELECT attempts FROM promises WHERE id = ? AND state = 'pending'", (promise_id,)
            ).fetchone()
            if row is None:
                raise StoreConflict(self.where, f"holds no pending promise {promise_id!r}")
            if row[0] >= attempt:
                return None  # started before, with its reservation
            for meter, needed in sorted(units.items()):
                found = db.execute(
                    "SELECT cap, spent FROM spending WHERE run_id = ? AND meter = ?",
                    (run_id, meter),
                ).fetchone()
                spending = Spending(*found) if found else Spending(None, 0)
                if not spending.allows(needed):
                    return meter, spending
            for meter, needed in units.items():
                db.execute(
                    "INSERT INTO spending (run_id, meter, spent) VALUES (?, ?, ?)"
                    " ON CONFLICT (run_id, meter) DO UPDATE SET spent = spent + excluded.spent",
                    (run_id, meter, needed),
                )
                db.execute(
                    "INSERT INTO reservations (promise_id, attempt, meter, reserved)"
                    " VALUES (?, ?, ?, ?)",
                    (promise_id, attempt, meter, needed),
                )
            db.execute("UPDATE promises SET attempts = ? WHERE id = ?", (attempt, promise_id))
        return None

    @_guarded
    async def settle_cost(
        self,
        fence: Fence | None,
        run_id: str,
        promise_id: str,
        attempt: int,
        cost: Mapping[str, int],
    ) -> None:
        with self._transaction() as db:
            if fence is not None:
                self._check_fence(db, fence)
            for meter, actual in cost.items():
                row = db.execute(
                    "UPDATE reservations SET cost = ? WHERE promise_id = ? AND attempt = ?"
                    " AND meter = ? AND cost IS NULL RETURNING reserved",
                    (actual, promise_id, attempt, meter),
                ).fetchone()
                if row is not None:
                    db.execute(
                        "UPDATE spending SET spent = spent + ? WHERE run_id = ? AND meter = ?",
                        (actual - row[0], run_id, meter),
                    )

    # -- reads ---------------------------------------------------------------------

    @_guarded
    async def get(self, promise_id: str) -> PromiseRecord | None:
        row = self._db.execute(
            f"SELECT {PROMISE_COLUMNS} FROM promises WHERE id = ?", (promise_id,)
        ).fetchone()
        return None if row is None else promise_from_row(row, self.where)

    @_guarded
    async def children(self, parent_id: str) -> list[PromiseRecord]:
        rows = self._db.execute(
            f"SELECT {PROMISE_COLUMNS}, {_JSON_COLUMNS} FROM promises"
            " WHERE parent_id = ? ORDER BY seq",
            (parent_id,),
        ).fetchall()
        decoded = _decode_json_columns(rows)
        if decoded is None:  # some column is damaged: decode row by row to say which
            return [promise_from_row(row[:-1], self.where) for row in rows]
        return [
            promise_from_row(row, self.where, json_values)
            for row, json_values in zip(rows, decoded, strict=True)
        ]

    @_guarded
    async def child_columns(self, parent_id: str) -> ChildColumns:
        columns = ChildColumns(self.where)
        cursor = self._db.execute(
            f"SELECT {CHILD_COLUMNS} FROM promises WHERE parent_id = ? ORDER BY seq",
            (parent_id,),
        )
        while rows := cursor.fetchmany(1000):  # never every row and its columns at once
            add_child_rows(columns, rows)
        return columns

    @_guarded
    async def roots(self, limit: int | None = None) -> list[RootRecord]:
        rows = self._db.execute(
            f"SELECT {ROOT_COLUMNS} FROM promises"
            " WHERE parent_id IS NULL ORDER BY created_at DESC, id DESC LIMIT ?",
            (-1 if limit is None else limit,),
        ).fetchall()
        # A settled run's counts were stored when it settled; only the others are counted.
        counts: dict[str, dict[str, int]] = {row[0]: {} for row in rows if row[-1] is None}
        for parent_id, state, n in self._db.execute(
            "SELECT parent_id, state, count(*) FROM promises WHERE parent_id IN"
            " (SELECT value FROM json_each(?)) GROUP BY parent_id, state",
            (_json_list(list(counts)),),
        ):
            counts[parent_id][state] = n
        return [root_from_row(row, counts.get(row[0]), self.where) for row in rows]

    @_guarded
    async def failed_attempts(self, parent_id: str) -> list[AttemptRecord]:
        rows = self._db.execute(
            "SELECT a.promise_id, a.attempt, a.started_at, a.finished_at, a.error"
            " FROM attempts a JOIN promises p ON p.id = a.promise_id"
            " WHERE (p.parent_id = ? OR p.id = ?) AND a.error IS NOT NULL"
            " ORDER BY p.parent_id IS NOT NULL, p.seq, a.attempt",
            (parent_id, parent_id),
        )
        return [attempt_from_row(row, self.where) for row in rows]

    # -- leases --------------------------------------------------------------------

    @_guarded
    async def acquire_lease(
        self, claim: Lease, *, stale_after: float, holder_gone: Callable[[Lease], bool]
    ) -> Lease:
        with self._transaction() as db:
            row = db.execute(
                f"SELECT owner, pid, host, epoch, {_NOW} - heartbeat_at FROM leases WHERE key = ?",
                (claim.key,),
            ).fetchone()
            epoch = 1
            if row is not None:
                owner, pid, host, held_epoch, age = row
                epoch = held_epoch + 1
                if owner is not None and owner != claim.owner:
                    holder = Lease(claim.key, owner, pid, host, held_epoch, age)
                    if age <= stale_after and not holder_gone(holder):
                        raise LeaseHeld(claim.key, holder)
            db.execute(
                f"INSERT INTO leases (key, owner, pid, host, heartbeat_at, epoch)"
                f" VALUES (?, ?, ?, ?, {_NOW}, ?) ON CONFLICT (key) DO UPDATE SET"
                " owner = excluded.owner, pid = excluded.pid, host = excluded.host,"
                " heartbeat_at = excluded.heartbeat_at, epoch = excluded.epoch",
                (claim.key, claim.owner, claim.pid, claim.host, epoch),
            )
        return Lease(claim.key, claim.owner, claim.pid, claim.host, epoch, 0.0)

    @_guarded
    async def lease_holder(self, key: str) -> Lease | None:
        row = self._db.execute(
            f"SELECT owner, pid, host, epoch, {_NOW} - heartbeat_at FROM leases"
            " WHERE key = ? AND owner IS NOT NULL",
            (key,),
        ).fetchone()
        return None if row is None else Lease(key, *row)

    @_guarded
    async def renew_lease(self, lease: Lease) -> None:
        with self._transaction() as db:
            cur = db.execute(
                f"UPDATE leases SET heartbeat_at = {_NOW}"
                " WHERE key = ? AND epoch = ? AND owner = ?",
                (lease.key, lease.epoch, lease.owner),
            )
            if cur.rowcount != 1:
                raise LeaseLost(lease.key, lease.epoch)

    @_guarded
    async def release_lease(self, lease: Lease) -> None:
        with self._transaction() as db:
            db.execute(
                "UPDATE leases SET owner = NULL WHERE key = ? AND epoch = ? AND owner = ?",
                (lease.key, lease.epoch, lease.owner),
            )

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
                    f"INSERT INTO leases (key, owner, pid, host, heartbeat_at, epoch)"
                    f" VALUES (?, ?, ?, ?, {_NOW}, ?) ON CONFLICT (key) DO UPDATE SET"
                    " owner = excluded.owner, pid = excluded.pid, host = excluded.host,"
                    " heartbeat_at = excluded.heartbeat_at, epoch = excluded.epoch",
                    (record.id, worker.owner, worker.pid, worker.host, epoch),
                )
                claims.append(Claim(record, Fence(record.id, epoch)))
        return claims

    @_guarded
    async def renew_claims(self, worker: Lease, fences: Sequence[Fence]) -> list[Fence]:
        lost = []
        with self._transaction() as db:
            for fence in fences:
                cur = db.execute(
                    f"UPDATE leases SET heartbeat_at = {_NOW}"
                    " WHERE key = ? AND epoch = ? AND owner = ?",
                    (fence.key, fence.epoch, worker.owner),
                )
                if cur.rowcount == 1:
                    continue
                row = db.execute(
                    "SELECT owner, epoch FROM leases WHERE key = ?", (fence.key,)
                ).fetchone()
                if row != (None, fence.epoch):  # not ended by its own settlement: taken
                    lost.append(fence)
        return lost

    @_guarded
    async def any_pending(self, parent_id: str) -> bool:
        row = self._db.execute(
            "SELECT EXISTS (SELECT 1 FROM promises WHERE parent_id = ? AND state = 'pending')",
            (parent_id,),
        ).fetchone()
        return bool(row[0])

    @_guarded
    async def held_leases(self, prefix: str = "") -> list[Lease]:
        rows = self._db.execute(
            f"SELECT key, owner, pid, host, epoch, {_NOW} - heartbeat_at FROM leases"
            " WHERE owner IS NOT NULL AND substr(key, 1, ?) = ? ORDER BY key",
            (len(prefix), prefix),
        )
        return [Lease(*row) for row in rows]

    @_guarded
    async def forget_leases(self, prefix: str, *, older_than: float) -> int:
        if not prefix:
            raise ValueError("forget_leases needs a key prefix: branch leases stay")
        with self._transaction() as db:
            cur = db.execute(
                "DELETE FROM leases WHERE substr(key, 1, ?) = ?"
                f" AND (owner IS NULL OR {_NOW} - heartbeat_at > ?)",
                (len(prefix), prefix, older_than),
            )
            return cur.rowcount


#: how many children of the row ``promises`` are in each state, as a JSON object
_CHILD_COUNTS = (
    "(SELECT json_group_object(state, n) FROM (SELECT c.state, count(*) AS n"
    " FROM promises AS c WHERE c.parent_id = promises.id GROUP BY c.state))"
)


def _params(items: Sequence[Any]) -> Iterator[dict[str, Any]]:
    """The named SQL parameters of each write record, made as ``executemany`` reads them:
    the 100,000 creates of a run's fan-out are one batch, and a list of their parameters
    was a quarter of a 100,000-branch run's peak memory (27 MB, measured)."""
    return (named_params(item) for item in items)


#: a row's ``args`` and ``value`` as the text of one JSON array, for :func:`_decode_json_columns`
_JSON_COLUMNS = "'[' || args || ',' || coalesce(value, 'null') || ']'"


def _decode_json_columns(rows: list[tuple[Any, ...]]) -> list[list[Any]] | None:
    """Decode the last column of ``rows`` (``_JSON_COLUMNS``) with one ``json.loads``
    over all of them: at 100,000 branches, a call per column cost more than the decoding
    itself (``show --json`` of a resolved 100k run: ~2x faster, measured). None when the
    text does not decode to one ``[args, value]`` pair per row, as a damaged column
    would make it: the caller then decodes row by row, to report the damaged one."""
    import json

    try:
        decoded = json.loads("[" + ",".join([row[-1] for row in rows]) + "]")
    except (ValueError, TypeError):
        return None
    if len(decoded) != len(rows) or any(
        type(pair) is not list or len(pair) != 2 for pair in decoded
    ):
        return None
    return decoded  # type: ignore[no-any-return]


def _json_list(items: list[str]) -> str:
    import json

    return json.dumps(items)
