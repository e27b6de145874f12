"""The SQL both backends run, each statement written once, and the store methods they share.

- :class:`Dialect` — what differs in a statement's text: how a parameter is written
  (``:name``, or psycopg's ``%(name)s``), where the tables live, the store's clock, row
  locks (none in SQLite, whose writer holds the whole file from ``BEGIN IMMEDIATE`` on), a
  list parameter (JSON text read with ``json_each``, or an array) and a JSON aggregate.
- :class:`Statements` — every shared statement, rendered once for a dialect.
- :class:`Tx` — a transaction as the shared methods use it.
- :class:`SQLStore` — the :class:`~.store.Store` methods both backends share. A backend
  adds only what truly differs: connecting, transactions (:meth:`SQLStore._in_transaction`,
  :meth:`SQLStore._fetchall`, :meth:`SQLStore._chunks`), claims, notifying and migrations.
"""

from __future__ import annotations

import contextlib
import json
import re
from abc import ABC, abstractmethod
from collections.abc import (
    AsyncGenerator,
    AsyncIterator,
    Awaitable,
    Callable,
    Iterable,
    Iterator,
    Mapping,
    Sequence,
)
from dataclasses import dataclass
from typing import Any, ClassVar, Protocol, TypeVar

from imagepipe.durable.batches import ended_claims, fence_key, merged
from imagepipe.durable.errors import LeaseHeld, LeaseLost, StoreConflict, StoreCorrupt
from imagepipe.durable.records import (
    AttemptRecord,
    ChildRows,
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
    stored_state,
)
from imagepipe.durable.rows import (
    CHILD_COLUMNS,
    LEASE_COLUMNS,
    PROMISE_COLUMNS,
    ROOT_COLUMNS,
    attempt_from_row,
    children_from_rows,
    lease_from_row,
    promise_from_row,
    root_from_row,
)
from imagepipe.durable.store import Store

__all__ = [
    "CHUNK_ROWS",
    "Counted",
    "Dialect",
    "Fetch",
    "Params",
    "Row",
    "SQLStore",
    "Statements",
    "Tx",
    "lease_params",
]

#: named parameters of a statement
Params = Mapping[str, Any]
#: a row as the driver returns it
Row = tuple[Any, ...]
#: rows read at a time (``fetchmany``) where a run's branches are read back
CHUNK_ROWS = 1000

T = TypeVar("T")

#: a ``:name`` parameter (not a ``::type`` cast)
_PARAM = re.compile(r"(?<![:\w]):([A-Za-z_]\w*)")


@dataclass(frozen=True)
class Dialect:
    """What differs between the backends in the text of a statement."""

    #: where the tables live: "" or a schema and a dot
    schema: str
    #: the store's clock, in Unix seconds
    now: str
    #: parameters are psycopg's ``%(name)s`` rather than SQLite's ``:name``
    pyformat: bool
    #: a list parameter is JSON text read with ``json_each`` (SQLite) rather than an array
    json_lists: bool
    #: the lock a fenced write takes on its lease row: the fence cannot move meanwhile
    share_lock: str
    #: the lock on a row a transaction reads, then changes (a lease it takes, a promise
    #: it starts, a meter it spends on)
    update_lock: str
    #: the lock on the lease rows a shared commit may end (exclusive, but not of the key:
    #: upgrading a share lock while the worker's renewal waits for the row deadlocks)
    end_lock: str
    #: an aggregate of rows of ``state`` and ``n`` into the text of one JSON object
    #: (``{}`` when there are none)
    counts_object: str
    #: the value of a ``LIMIT`` that means none
    no_limit: int | None

    def table(self, name: str) -> str:
        return self.schema + name

    def render(self, text: str) -> str:
        """``text``, written with ``:name`` parameters, for this dialect's driver (no
        string literal of a shared statement holds a colon before a letter)."""
        if not self.pyformat:
            return text
        return _PARAM.sub(r"%(\1)s", text.replace("%", "%%"))

    def one_of(self, column: str, param: str) -> str:
        """A condition: ``column`` is an item of the list parameter ``param``."""
        if self.json_lists:
            return f"{column} IN (SELECT value FROM json_each(:{param}))"
        return f"{column} = ANY(:{param})"

    def list_param(self, items: Sequence[str]) -> Any:
        """The value of a list parameter (see :meth:`one_of`)."""
        return json.dumps(list(items)) if self.json_lists else list(items)


class Statements:
    """Every statement both backends run, rendered for one :class:`Dialect`."""

    def __init__(self, dialect: Dialect) -> None:
        self.dialect = d = dialect
        promises, attempts, leases = d.table("promises"), d.table("attempts"), d.table("leases")
        now, sql = d.now, d.render
        age = f"{now} - heartbeat_at"

        # -- the writes of a batch, in the order they are applied
        self.reopen = sql(
            f"UPDATE {promises} SET state = 'pending', error = NULL, settled_at = NULL,"
            " failures = 0, child_counts = NULL WHERE id = :id AND state = 'rejected'"
        )
        self.create = sql(
            f"INSERT INTO {promises} (id, parent_id, seq, func, args, options, state, value,"
            " created_at, settled_at) VALUES (:id, :parent_id, :seq, :func, :args_json,"
            " :options_json, :state, :value_json, :created_at, CASE WHEN :state = 'pending'"
            " THEN NULL ELSE CAST(:created_at AS double precision) END)"
            " ON CONFLICT (id) DO NOTHING"
        )
        self.start = sql(
            f"UPDATE {promises} SET attempts = :attempt"
            " WHERE id = :id AND state = 'pending' AND attempts < :attempt"
        )
        self.fail = sql(
            f"INSERT INTO {attempts} (promise_id, attempt, started_at, finished_at, error)"
            " VALUES (:id, :attempt, :started_at, :finished_at, :error_json)"
        )
        self.count_failure = sql(
            f"UPDATE {promises} SET failures = failures + 1 WHERE id = :id AND state = 'pending'"
        )
        self.settle = sql(
            f"UPDATE {promises} SET state = :state, value = :value_json, error = :error_json,"
            " settled_at = :settled_at WHERE id = :id AND state = 'pending'"
        )
        #: a run's root settled by a batch keeps its branches' counts (for listing runs)
        self.keep_counts = sql(
            f"UPDATE {promises} AS p SET child_counts = (SELECT {d.counts_object} FROM"
            f" (SELECT c.state, count(*) AS n FROM {promises} AS c WHERE c.parent_id = p.id"
            f" GROUP BY c.state) AS s) WHERE {d.one_of('p.id', 'ids')}"
            " AND p.parent_id IS NULL AND p.state != 'pending' AND p.child_counts IS NULL"
        )
        self.outcomes = sql(
            "SELECT id, state, value, error, settled_at, attempts"
            f" FROM {promises} WHERE {d.one_of('id', 'ids')}"
        )

        # -- fences and leases
        self.fence = sql(f"SELECT epoch FROM {leases} WHERE key = :key{d.share_lock}")
        self.fences = sql(
            f"SELECT key, epoch FROM {leases} WHERE {d.one_of('key', 'keys')}"
            f" ORDER BY key{d.end_lock}"
        )
        self.end_claim = sql(
            f"UPDATE {leases} SET owner = NULL WHERE key = :key AND epoch = :epoch"
        )
        #: the row exists from the first acquisition on (a released one keeps its epoch)
        self.lease_row = sql(
            f"INSERT INTO {leases} (key, heartbeat_at, epoch) VALUES (:key, {now}, 0)"
            " ON CONFLICT (key) DO NOTHING"
        )
        self.lease = sql(
            f"SELECT {LEASE_COLUMNS}, {age} FROM {leases} WHERE key = :key{d.update_lock}"
        )
        self.take_lease = sql(
            f"UPDATE {leases} SET owner = :owner, pid = :pid, host = :host,"
            f" heartbeat_at = {now}, epoch = :epoch WHERE key = :key"
        )
        self.holder = sql(
            f"SELECT {LEASE_COLUMNS}, {age} FROM {leases} WHERE key = :key AND owner IS NOT NULL"
        )
        self.renew = sql(
            f"UPDATE {leases} SET heartbeat_at = {now}"
            " WHERE key = :key AND epoch = :epoch AND owner = :owner"
        )
        self.release = sql(
            f"UPDATE {leases} SET owner = NULL WHERE key = :key AND epoch = :epoch"
            " AND owner = :owner"
        )
        prefixed = "substr(key, 1, length(:prefix)) = :prefix"
        self.held = sql(
            f"SELECT key, {LEASE_COLUMNS}, {age} FROM {leases}"
            f" WHERE owner IS NOT NULL AND {prefixed} ORDER BY key"
        )
        self.forget = sql(
            f"DELETE FROM {leases} WHERE {prefixed} AND (owner IS NULL OR {age} > :older_than)"
        )

        # -- spending: a run's caps and its attempts' reservations, per meter
        spending, reservations = d.table("spending"), d.table("reservations")
        self.set_cap = sql(
            f"INSERT INTO {spending} (run_id, meter, cap) VALUES (:run, :meter, :cap)"
            " ON CONFLICT (run_id, meter) DO UPDATE SET cap = excluded.cap"
        )
        self.spending = sql(f"SELECT meter, cap, spent FROM {spending} WHERE run_id = :run")
        self.pending_attempts = sql(
            f"SELECT attempts FROM {promises} WHERE id = :id AND state = 'pending'{d.update_lock}"
        )
        self.meter_row = sql(
            f"INSERT INTO {spending} (run_id, meter) VALUES (:run, :meter) ON CONFLICT DO NOTHING"
        )
        self.meter = sql(
            f"SELECT cap, spent FROM {spending} WHERE run_id = :run AND meter = :meter"
            f"{d.update_lock}"
        )
        self.spend = sql(
            f"UPDATE {spending} SET spent = spent + :units WHERE run_id = :run AND meter = :meter"
        )
        self.reserve = sql(
            f"INSERT INTO {reservations} (promise_id, attempt, meter, reserved)"
            " VALUES (:id, :attempt, :meter, :units)"
        )
        self.pending_attempts_of = sql(
            f"SELECT id, attempts FROM {promises} WHERE {d.one_of('id', 'ids')}"
            f" AND state = 'pending' ORDER BY id{d.update_lock}"
        )
        self.start_reserved = sql(f"UPDATE {promises} SET attempts = :attempt WHERE id = :id")
        self.cost = sql(
            f"UPDATE {reservations} SET cost = :cost WHERE promise_id = :id"
            " AND attempt = :attempt AND meter = :meter AND cost IS NULL RETURNING reserved"
        )
        self.attempt_costs = sql(
            f"SELECT r.promise_id, r.attempt, r.cost FROM {reservations} r"
            f" JOIN {promises} p ON p.id = r.promise_id"
            " WHERE p.parent_id = :parent AND r.meter = :meter"
        )

        # -- a run's notes
        notes = d.table("notes")
        self.write_note = sql(
            f"INSERT INTO {notes} (run_id, key, value, updated_at)"
            " VALUES (:run_id, :key, :value_json, :updated_at) ON CONFLICT (run_id, key)"
            " DO UPDATE SET value = excluded.value, updated_at = excluded.updated_at"
        )
        self.notes = sql(f"SELECT key, value FROM {notes} WHERE run_id = :run ORDER BY key")

        # -- reads
        self.get = sql(f"SELECT {PROMISE_COLUMNS} FROM {promises} WHERE id = :id")
        self.children = sql(
            f"SELECT {PROMISE_COLUMNS} FROM {promises} WHERE parent_id = :parent ORDER BY seq"
        )
        self.child_rows = sql(
            f"SELECT {CHILD_COLUMNS} FROM {promises} WHERE parent_id = :parent ORDER BY seq"
        )
        self.any_pending = sql(
            f"SELECT EXISTS (SELECT 1 FROM {promises}"
            " WHERE parent_id = :parent AND state = 'pending')"
        )
        self.roots = sql(
            f"SELECT {ROOT_COLUMNS} FROM {promises} WHERE parent_id IS NULL"
            " ORDER BY created_at DESC, id DESC LIMIT :limit"
        )
        self.counts = sql(
            f"SELECT parent_id, state, count(*) FROM {promises}"
            f" WHERE {d.one_of('parent_id', 'ids')} GROUP BY parent_id, state"
        )
        self.failed_attempts = sql(
            "SELECT a.promise_id, a.attempt, a.started_at, a.finished_at, a.error"
            f" FROM {attempts} a JOIN {promises} p ON p.id = a.promise_id"
            " WHERE (p.parent_id = :parent OR p.id = :parent) AND a.error IS NOT NULL"
            " ORDER BY p.parent_id IS NOT NULL, p.seq, a.attempt"
        )


class Counted(Protocol):
    """A statement sent: how many rows it changed (once :meth:`Tx.check` has returned)."""

    @property
    def rowcount(self) -> int: ...


#: a read of rows by a statement and its parameters
Fetch = Callable[[str, Params], Awaitable[list[Row]]]


class Tx(ABC):
    """One transaction as the shared methods use it. A backend may send statements without
    waiting for their results (PostgreSQL's pipeline mode): :meth:`check` waits for them.

    ``where`` names the store in messages."""

    #: a count of changed rows is checked as soon as its statement ran, not at :meth:`check`
    checks_each: ClassVar[bool] = False

    def __init__(self, where: str) -> None:
        self.where = where
        self._expected: list[tuple[Counted, int, str]] = []

    @abstractmethod
    async def fetchall(self, sql: str, params: Params) -> list[Row]:
        """The rows of a statement (everything sent before it is waited for)."""

    async def fetchone(self, sql: str, params: Params) -> Row | None:
        rows = await self.fetchall(sql, params)
        return rows[0] if rows else None

    @abstractmethod
    async def send(self, sql: str, params: Params) -> Counted:
        """Run a statement whose rows are not read."""

    async def send_many(
        self,
        sql: str,
        params: Iterable[Params],
        *,
        expect: int | None = None,
        refusal: str = "",
        duplicate: str | None = None,
    ) -> Counted:
        """Run a statement once per parameter set (``executemany``). With ``expect``, a
        count of changed rows other than it is :class:`StoreConflict` ``refusal``; with
        ``duplicate``, so is a row that breaks a unique key."""
        cur = await self._executemany(sql, params, duplicate)
        if expect is not None:
            self._expected.append((cur, expect, refusal))
            if self.checks_each:
                self._compare()
        return cur

    async def check(self) -> None:
        """Wait for every statement sent; raise the :class:`StoreConflict` of the first
        that did not change the rows it was expected to."""
        await self._wait()
        self._compare()

    def _compare(self) -> None:
        for cur, expected, refusal in self._expected:
            if cur.rowcount != expected:
                raise StoreConflict(self.where, refusal)
        self._expected.clear()

    @abstractmethod
    async def _executemany(
        self, sql: str, params: Iterable[Params], duplicate: str | None
    ) -> Counted:
        """``executemany``; a broken unique key is :class:`StoreConflict` ``duplicate``
        (when given) as soon as it is known, here or in :meth:`_wait`."""

    @abstractmethod
    async def _wait(self) -> None:
        """Wait for the statements sent and not waited for yet."""


def _params(items: Sequence[Any]) -> Iterator[dict[str, Any]]:
    """The named SQL parameters of each write record, made as ``executemany`` reads them:
    the 100,000 creates of a run's fan-out are one batch, and a list of their parameters
    was a quarter of a 100,000-branch run's peak memory (27 MB, measured)."""
    return (named_params(item) for item in items)


class SQLStore(Store):
    """The store methods the SQL backends share, over a backend's transactions and reads.

    A subclass sets :attr:`sql` and implements :meth:`_in_transaction`, :meth:`_fetchall`
    and :meth:`_chunks`, the queue's claims, and :meth:`close`."""

    #: the statements, rendered for the backend's dialect
    sql: ClassVar[Statements]

    # -- what a backend supplies ---------------------------------------------------

    @abstractmethod
    async def _in_transaction(self, body: Callable[[Tx], Awaitable[T]]) -> T:
        """``body`` in one write transaction, committed when it returns (rolled back if it
        raises). ``body`` waits on nothing but ``Tx``: it may be run again from the start
        on a new connection (PostgreSQL rides out a lost one)."""

    async def _commit(
        self, body: Callable[[Tx], Awaitable[T]], recovered: Callable[[Fetch], Awaitable[T]]
    ) -> T:
        """A write batch's transaction: as :meth:`_in_transaction`. A backend that can lose
        its connection during a COMMIT and then learn that it committed (PostgreSQL) calls
        ``recovered`` instead of running ``body`` again: what ``body`` would have returned,
        read with the ``Fetch`` it is given."""
        del recovered  # an embedded database never loses a COMMIT's answer
        return await self._in_transaction(body)

    @abstractmethod
    async def _fetchall(self, sql: str, params: Params) -> list[Row]:
        """The rows of a read, outside any write transaction."""

    @abstractmethod
    def _chunks(self, sql: str, params: Params) -> AsyncGenerator[list[Row], None]:
        """The rows of a read, :data:`CHUNK_ROWS` at a time (``fetchmany``)."""

    async def _announce(self, tx: Tx, batch: WriteBatch) -> None:
        """Tell other processes, on commit, which runs ``batch`` writes to (PostgreSQL:
        NOTIFY). Nothing here: they poll."""

    # -- the one write path --------------------------------------------------------

    async def apply(self, batch: WriteBatch) -> Mapping[str, Settled]:
        async def write(tx: Tx) -> Mapping[str, Settled]:
            await self._check_fence(tx, batch.fence)
            return await self._write(tx, batch)

        async def recovered(fetch: Fetch) -> Mapping[str, Settled]:
            return await self._earlier_outcomes(fetch, batch)

        return await self._commit(write, recovered)

    async def apply_each(
        self, batches: Sequence[WriteBatch]
    ) -> list[Mapping[str, Settled] | LeaseLost]:
        if not batches:
            return []
        sql = self.sql
        #: the fences the transaction found current (known before its COMMIT)
        held: set[Fence] = set()

        async def write(tx: Tx) -> Mapping[str, Settled]:
            fences = sorted({b.fence for b in batches if b.fence is not None}, key=fence_key)
            # Every fence in one statement, locked in key order: no takeover can
            # interleave, and no lock-order deadlock with a claimer or a renewal.
            keys = sql.dialect.list_param([f.key for f in fences])
            rows = await tx.fetchall(sql.fences, {"keys": keys})
            held.clear()
            held.update(Fence(key, epoch) for key, epoch in rows)
            live = [b for b in batches if b.fence is None or b.fence in held]
            ended = ended_claims(live)
            if ended:
                await tx.send_many(sql.end_claim, [{"key": f.key, "epoch": f.epoch} for f in ended])
            return await self._write(tx, merged(live)) if live else {}

        async def recovered(fetch: Fetch) -> Mapping[str, Settled]:
            live = [b for b in batches if b.fence is None or b.fence in held]
            return await self._earlier_outcomes(fetch, merged(live)) if live else {}

        lost = await self._commit(write, recovered)
        return [
            LeaseLost(b.fence.key, b.fence.epoch)
            if b.fence is not None and b.fence not in held
            else {s.id: lost[s.id] for s in b.settlements if s.id in lost}
            for b in batches
        ]

    async def _check_fence(self, tx: Tx, fence: Fence | None) -> None:
        """:class:`LeaseLost` unless ``fence`` is current (the lease row stays locked)."""
        if fence is not None:
            row = await tx.fetchone(self.sql.fence, {"key": fence.key})
            if row is None or row[0] != fence.epoch:
                raise LeaseLost(fence.key, fence.epoch)

    async def _write(self, tx: Tx, batch: WriteBatch) -> dict[str, Settled]:
        """The writes of ``batch`` in ``tx`` (its fence checked): each kind of write is one
        ``executemany`` (at thousands of branches, a statement per write costs more than
        the database's own work); then the counts of changed rows are checked (any
        mismatch refuses the whole transaction)."""
        sql = self.sql
        await self._announce(tx, batch)
        if batch.reopens:
            await tx.send_many(sql.reopen, [{"id": promise_id} for promise_id in batch.reopens])
        if batch.creates:
            await tx.send_many(
                sql.create,
                _params(batch.creates),
                expect=len(batch.creates),
                refusal="already holds promises this batch creates",
            )
        if batch.starts:
            await tx.send_many(
                sql.start,
                _params(batch.starts),
                expect=len(batch.starts),
                refusal="holds settled or further-on promises",
            )
        if batch.failures:
            await tx.send_many(
                sql.fail, _params(batch.failures), duplicate="already holds a failed attempt"
            )
            await tx.send_many(
                sql.count_failure,
                [{"id": f.id} for f in batch.failures],
                expect=len(batch.failures),
                refusal="holds no pending promise for a failed attempt",
            )
        settled = None
        if batch.settlements:
            settled = await tx.send_many(sql.settle, _params(batch.settlements))
            ids = sql.dialect.list_param([s.id for s in batch.settlements])
            await tx.send(sql.keep_counts, {"ids": ids})
        if batch.notes:
            await tx.send_many(sql.write_note, _params(batch.notes))
        await tx.check()
        if settled is None or settled.rowcount == len(batch.settlements):
            return {}
        return await self._earlier_outcomes(tx.fetchall, batch)

    async def _earlier_outcomes(self, fetch: Fetch, batch: WriteBatch) -> dict[str, Settled]:
        """The settlements of ``batch`` that lost: their promises were settled before. A
        row this batch settled holds exactly what it wrote; any other outcome is earlier."""
        if not batch.settlements:
            return {}
        ids = self.sql.dialect.list_param([item.id for item in batch.settlements])
        rows = {row[0]: row[1:] for row in await fetch(self.sql.outcomes, {"ids": ids})}
        lost = {}
        for item in batch.settlements:
            if item.id not in rows:
                raise StoreConflict(self.where, f"has no promise {item.id!r} to settle")
            state, value, error, settled_at, attempts = rows[item.id]
            if (state, value, error, settled_at) != (
                item.state,
                item.value_json,
                item.error_json,
                item.settled_at,
            ):
                where = f"{self.where}, promise {item.id!r},"
                lost[item.id] = Settled(
                    state=stored_state(state, where),
                    value=None if value is None else decode_json(value, "value", where),
                    error=None if error is None else ErrorInfo.from_json(error, where),
                    attempts=attempts,
                )
        return lost

    # -- reads ---------------------------------------------------------------------

    async def get(self, promise_id: str) -> PromiseRecord | None:
        rows = await self._fetchall(self.sql.get, {"id": promise_id})
        return promise_from_row(rows[0], self.where) if rows else None

    async def children(self, parent_id: str) -> list[PromiseRecord]:
        rows = await self._fetchall(self.sql.children, {"parent": parent_id})
        return [promise_from_row(row, self.where) for row in rows]

    async def child_rows(self, parent_id: str) -> AsyncIterator[ChildRows]:
        where = self.where
        # closed at once when a damaged row ends the reading (no connection kept meanwhile)
        async with contextlib.aclosing(
            self._chunks(self.sql.child_rows, {"parent": parent_id})
        ) as chunks:
            async for rows in chunks:
                yield children_from_rows(rows, where)

    async def roots(self, limit: int | None = None) -> list[RootRecord]:
        sql = self.sql
        no_limit = sql.dialect.no_limit
        rows = await self._fetchall(sql.roots, {"limit": no_limit if limit is None else limit})
        # A settled run's counts were stored when it settled; only the others are counted.
        counts: dict[str, dict[str, int]] = {row[0]: {} for row in rows if row[-1] is None}
        if counts:
            ids = sql.dialect.list_param(list(counts))
            for parent_id, state, n in await self._fetchall(sql.counts, {"ids": ids}):
                counts[parent_id][state] = n
        return [root_from_row(row, counts.get(row[0]), self.where) for row in rows]

    async def notes(self, run_id: str) -> dict[str, Any]:
        rows = await self._fetchall(self.sql.notes, {"run": run_id})
        where = f"{self.where}, the notes of {run_id!r},"
        return {key: decode_json(value, key, where) for key, value in rows}

    async def failed_attempts(self, parent_id: str) -> list[AttemptRecord]:
        rows = await self._fetchall(self.sql.failed_attempts, {"parent": parent_id})
        return [attempt_from_row(row, self.where) for row in rows]

    async def any_pending(self, parent_id: str) -> bool:
        rows = await self._fetchall(self.sql.any_pending, {"parent": parent_id})
        return bool(rows and rows[0][0])

    # -- leases --------------------------------------------------------------------

    async def acquire_lease(
        self, claim: Lease, *, stale_after: float, holder_gone: Callable[[Lease], bool]
    ) -> Lease:
        sql = self.sql

        async def take(tx: Tx) -> Lease:
            # Locking the lease row serialises acquirers and waits out a fenced write.
            await tx.send(sql.lease_row, {"key": claim.key})
            row = await tx.fetchone(sql.lease, {"key": claim.key})
            if row is None:
                raise StoreCorrupt(self.where, f"lost the lease row of {claim.key!r}")
            holder = lease_from_row(claim.key, row)
            another = holder.owner is not None and holder.owner != claim.owner
            if another and holder.age <= stale_after and not holder_gone(holder):
                raise LeaseHeld(claim.key, holder)
            epoch = holder.epoch + 1
            taken = Lease(claim.key, claim.owner, claim.pid, claim.host, epoch=epoch, age=0.0)
            await tx.send(
                sql.take_lease,
                {
                    "key": taken.key,
                    "owner": taken.owner,
                    "pid": taken.pid,
                    "host": taken.host,
                    "epoch": taken.epoch,
                },
            )
            return taken

        return await self._in_transaction(take)

    async def lease_holder(self, key: str) -> Lease | None:
        rows = await self._fetchall(self.sql.holder, {"key": key})
        return lease_from_row(key, rows[0]) if rows else None

    async def renew_lease(self, lease: Lease) -> None:
        async def renew(tx: Tx) -> None:
            cur = await tx.send(self.sql.renew, lease_params(lease.key, lease.epoch, lease))
            if cur.rowcount != 1:
                raise LeaseLost(lease.key, lease.epoch)

        await self._in_transaction(renew)

    async def release_lease(self, lease: Lease) -> None:
        async def release(tx: Tx) -> None:
            await tx.send(self.sql.release, lease_params(lease.key, lease.epoch, lease))

        await self._in_transaction(release)

    async def held_leases(self, prefix: str = "") -> list[Lease]:
        rows = await self._fetchall(self.sql.held, {"prefix": prefix})
        return [lease_from_row(row[0], row[1:]) for row in rows]

    async def forget_leases(self, prefix: str, *, older_than: float) -> int:
        if not prefix:
            raise ValueError("forget_leases needs a key prefix: branch leases stay")

        async def forget(tx: Tx) -> int:
            cur = await tx.send(self.sql.forget, {"prefix": prefix, "older_than": older_than})
            return cur.rowcount

        return await self._in_transaction(forget)

    # -- spending --------------------------------------------------------------------

    async def set_spending_limit(self, run_id: str, meter: str, limit: int | None) -> None:
        async def set_cap(tx: Tx) -> None:
            await tx.send(self.sql.set_cap, {"run": run_id, "meter": meter, "cap": limit})

        await self._in_transaction(set_cap)

    async def spending(self, run_id: str) -> dict[str, Spending]:
        rows = await self._fetchall(self.sql.spending, {"run": run_id})
        return {meter: Spending(limit=cap, spent=spent) for meter, cap, spent in rows}

    async def attempt_costs(self, run_id: str, meter: str) -> dict[tuple[str, int], int | None]:
        params = {"parent": run_id, "meter": meter}
        rows = await self._fetchall(self.sql.attempt_costs, params)
        return {(promise_id, attempt): cost for promise_id, attempt, cost in rows}

    async def reserve_attempt(
        self,
        fence: Fence | None,
        run_id: str,
        promise_id: str,
        attempt: int,
        units: Mapping[str, int],
    ) -> tuple[str, Spending] | None:
        return await self.reserve_attempts(fence, run_id, [(promise_id, attempt, units)])

    async def reserve_attempts(
        self,
        fence: Fence | None,
        run_id: str,
        attempts: Sequence[tuple[str, int, Mapping[str, int]]],
    ) -> tuple[str, Spending] | None:
        sql = self.sql

        async def reserve(tx: Tx) -> None:
            await self._check_fence(tx, fence)
            ids = sql.dialect.list_param(sorted({item[0] for item in attempts}))
            rows = await tx.fetchall(sql.pending_attempts_of, {"ids": ids})
            started: dict[str, int] = {row[0]: row[1] for row in rows}
            missing = sorted({item[0] for item in attempts} - set(started))
            if missing:
                raise StoreConflict(self.where, f"holds no pending promise {missing[0]!r}")
            # started before (a call repeated after a lost connection): reserved then
            new = [item for item in attempts if started[item[0]] < item[1]]
            needed: dict[str, int] = {}
            for _, _, units in new:
                for meter, count in units.items():
                    needed[meter] = needed.get(meter, 0) + count
            for meter, total in sorted(needed.items()):  # locked in one order: no deadlock
                # locked: the workers that reserve on one run's meter take turns here
                await tx.send(sql.meter_row, {"run": run_id, "meter": meter})
                found = await tx.fetchone(sql.meter, {"run": run_id, "meter": meter})
                cap, spent = found if found else (None, 0)
                spending = Spending(limit=cap, spent=spent)
                if not spending.allows(total):
                    raise _CapReached(meter, spending)  # nothing of this call is kept
            for meter, total in needed.items():
                await tx.send(sql.spend, {"run": run_id, "meter": meter, "units": total})
            reserved = [
                {"id": promise_id, "attempt": attempt, "meter": meter, "units": count}
                for promise_id, attempt, units in new
                for meter, count in units.items()
            ]
            if reserved:
                await tx.send_many(sql.reserve, reserved)
            if new:
                starts = [{"id": promise_id, "attempt": attempt} for promise_id, attempt, _ in new]
                await tx.send_many(sql.start_reserved, starts)

        try:
            await self._in_transaction(reserve)
        except _CapReached as refused:
            return refused.meter, refused.spending
        return None

    async def settle_cost(
        self,
        fence: Fence | None,
        run_id: str,
        promise_id: str,
        attempt: int,
        cost: Mapping[str, int],
    ) -> None:
        await self.settle_costs(fence, run_id, [(promise_id, attempt, cost)])

    async def settle_costs(
        self,
        fence: Fence | None,
        run_id: str,
        costs: Sequence[tuple[str, int, Mapping[str, int]]],
    ) -> None:
        sql = self.sql

        async def settle(tx: Tx) -> None:
            await self._check_fence(tx, fence)
            change: dict[str, int] = {}
            for promise_id, attempt, cost in costs:
                for meter, actual in cost.items():
                    params = {"id": promise_id, "attempt": attempt, "meter": meter}
                    row = await tx.fetchone(sql.cost, {**params, "cost": actual})
                    if row is not None:  # the reservation gives way to the actual cost
                        change[meter] = change.get(meter, 0) + actual - row[0]
            for meter, units in sorted(change.items()):
                await tx.send(sql.spend, {"run": run_id, "meter": meter, "units": units})

        await self._in_transaction(settle)


class _CapReached(Exception):
    """A reservation that does not fit: raised out of its transaction, which rolls it back."""

    def __init__(self, meter: str, spending: Spending) -> None:
        super().__init__(meter)
        self.meter = meter
        self.spending = spending


def lease_params(key: str, epoch: int, owner: Lease) -> dict[str, Any]:
    """The parameters of :attr:`Statements.renew` and :attr:`Statements.release`: the
    lease on ``key`` at ``epoch``, if ``owner`` holds it."""
    return {"key": key, "epoch": epoch, "owner": owner.owner}
