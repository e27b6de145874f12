"""The PostgreSQL store: where several machines meet. Schema in :mod:`.postgres_schema`.

psycopg 3 (async) over a small connection pool. Every write is one transaction inside a
single method call, as in the SQLite store; a write batch is fenced in that transaction
(the lease row is read ``FOR SHARE``, so no takeover can interleave), and each kind of
write is one ``executemany``, which psycopg sends in pipeline mode: a batch of a thousand
writes is a handful of round trips, not a thousand. Time for leases is the database's
clock (``clock_timestamp()``), never the caller's.

A lost connection is ridden out: every method that meets one (a server restart, a
terminated session, a lost network) waits for the server to take connections again, for
up to ``StoreOptions.reconnect`` seconds, and runs again on a new connection; only then
does it give up with :class:`StoreUnreachable`. Running again is safe: a transaction the
lost connection cut off before its COMMIT was rolled back by the server, and one cut off
during its COMMIT is looked up by its transaction id (``txid_status``) before anything is
run again. A claim whose answer was lost is the one exception: its leases lapse unused.

``where`` names the store as ``user@host:port/dbname``: never the password, and no error
text carries it (:func:`~.secrets.mask_password`).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Concatenate, ParamSpec, TypeVar

import psycopg
from psycopg.conninfo import conninfo_to_dict
from psycopg_pool import AsyncConnectionPool

from imagepipe.durable.batches import ended_claims, fence_key, merged
from imagepipe.durable.errors import (
    LeaseHeld,
    LeaseLost,
    StoreConflict,
    StoreCorrupt,
    StoreUnreachable,
    StoreUnusable,
)
from imagepipe.durable.postgres_errors import describe_url, lost_connection, reason, translate
from imagepipe.durable.postgres_schema import prepare_schema
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
    stored_state,
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
from imagepipe.durable.store import DETACHED, Claim, Store, StoreOptions

__all__ = ["PostgresStore"]

#: the database's clock, in Unix seconds
_NOW = "extract(epoch FROM clock_timestamp())::double precision"
_STATES = frozenset({"pending", "resolved", "rejected"})
#: seconds to wait for a connection when the URL does not say
_CONNECT_TIMEOUT = 10
#: connections per store: a run's writes are serial; the heartbeat and reads need a few more
_POOL_SIZE = 4
#: seconds between tries to reach a server that went away: the first, then at most
_PROBE_FIRST, _PROBE_MOST = 0.05, 1.0

P = ParamSpec("P")
R = TypeVar("R")


def _rides_out(
    method: Callable[Concatenate[PostgresStore, P], Coroutine[Any, Any, R]],
) -> Callable[Concatenate[PostgresStore, P], Coroutine[Any, Any, R]]:
    """A store method that rides out a lost connection (see :meth:`PostgresStore._ride_out`)
    and raises every other psycopg error as the core's one-line :class:`StoreError`."""

    @functools.wraps(method)
    async def wrapper(self: PostgresStore, /, *args: P.args, **kwargs: P.kwargs) -> R:
        return await self._ride_out(lambda: method(self, *args, **kwargs))

    return wrapper


@dataclass
class _Sent:
    """The id of the transaction that :meth:`PostgresStore._pipelined` is committing; set
    before its COMMIT is sent, so that a connection lost during the COMMIT can be followed
    by asking the server whether it committed."""

    xid: int | None = None


# The pool logs each failed reconnection (a server restarting) as a warning; with no
# logging configured Python would print those on stderr, through a run's output. An
# application that configures logging still gets them.
logging.getLogger("psycopg.pool").addHandler(logging.NullHandler())
# Likewise, a pipeline that a refused write aborted is logged as a warning when it ends;
# the refusal itself is raised as a one-line StoreConflict.
logging.getLogger("psycopg").addHandler(logging.NullHandler())


class PostgresStore(Store):
    """A :class:`~imagepipe.durable.store.Store` in a PostgreSQL database."""

    notifies = True

    def __init__(self, url: str, where: str, kwargs: dict[str, Any], options: StoreOptions) -> None:
        self._url = url
        self.where = where
        self._kwargs = kwargs
        self._lock_ms = str(max(1, round(options.busy_timeout * 1000)))
        stalled = options.stalled_after
        self._stalled_ms = None if stalled is None else str(max(1, round(stalled * 1000)))
        self._pool_timeout = max(_CONNECT_TIMEOUT, options.busy_timeout)
        #: seconds a lost connection is ridden out before :class:`StoreUnreachable`
        self._reconnect = options.reconnect
        self._pool = self._new_pool()
        #: held by the one task that replaces a pool whose server went away
        self._replacing = asyncio.Lock()
        #: the pool whose server went away, and how: callers wait for its replacement
        #: rather than for a connection from it (its own retries back off up to 16 s)
        self._lost: tuple[AsyncConnectionPool, psycopg.Error] | None = None
        self._old_pools: set[asyncio.Task[None]] = set()
        self._closed = False
        self._listener: psycopg.AsyncConnection[Any] | None = None

    # -- opening -------------------------------------------------------------------

    @classmethod
    async def open(cls, url: str, options: StoreOptions) -> PostgresStore:
        """Open the store in the database at ``url``, its schema created or migrated.

        The database must exist; with ``options.create`` false, one that holds no store
        is :class:`StoreMissing`. ``options.busy_timeout`` is the lock timeout;
        ``verify`` and ``max_pages`` are SQLite's (PostgreSQL checks its own pages)."""
        where = describe_url(url)
        try:
            params = conninfo_to_dict(url)
        except psycopg.Error as exc:
            why = reason(exc, url)
            raise StoreUnusable(where, f"is not a valid PostgreSQL URL ({why})") from None
        kwargs: dict[str, Any] = {"autocommit": True, "application_name": "imagepipe"}
        if "connect_timeout" not in params:
            kwargs["connect_timeout"] = _CONNECT_TIMEOUT
        try:
            conn = await psycopg.AsyncConnection.connect(url, **kwargs)
        except psycopg.Error as exc:
            raise StoreUnusable(where, f"cannot be opened: {reason(exc, url)}") from None
        store = cls(url, where, kwargs, options)
        try:
            async with conn:
                await store._configure(conn)
                await prepare_schema(conn, where, create=options.create)
        except psycopg.Error as exc:
            raise translate(exc, where, url) from exc
        await store._pool.open()
        return store

    async def _configure(self, conn: psycopg.AsyncConnection[Any]) -> None:
        await conn.execute("SELECT set_config('lock_timeout', %s, false)", (self._lock_ms,))
        if self._stalled_ms is not None:
            await conn.execute(
                "SELECT set_config('idle_in_transaction_session_timeout', %s, false)",
                (self._stalled_ms,),
            )

    def _new_pool(self) -> AsyncConnectionPool:
        return AsyncConnectionPool(
            self._url,
            kwargs=self._kwargs,
            min_size=1,
            max_size=_POOL_SIZE,
            open=False,
            configure=self._configure,
            timeout=self._pool_timeout,
            name=f"imagepipe {self.where}",
        )

    async def close(self) -> None:
        self._closed = True
        if self._listener is not None:
            with contextlib.suppress(psycopg.Error):
                await self._listener.close()
        await self._pool.close()
        await asyncio.gather(*self._old_pools)

    # -- riding out a lost connection ----------------------------------------------

    async def _ride_out(self, call: Callable[[], Awaitable[R]]) -> R:
        """``call()``, run again on a new connection for as long as it meets a lost one,
        up to ``reconnect`` seconds from the first; any other psycopg error becomes the
        core's one-line error. ``call`` must be safe to run again after a lost connection:
        every store method is (see the module's docstring)."""
        loop = asyncio.get_running_loop()
        deadline: float | None = None
        while True:
            pool = self._pool
            if self._lost is None or self._lost[0] is not pool:
                try:
                    return await call()
                except psycopg.Error as exc:
                    task = asyncio.current_task()
                    if task is not None and task.cancelling():
                        # psycopg's clean-up of a cancelled call can fail in its place
                        raise asyncio.CancelledError from None
                    if self._closed or not lost_connection(exc):
                        raise translate(exc, self.where, self._url) from exc
                    if self._pool is pool:
                        self._lost = (pool, exc)
            if deadline is None:
                deadline = loop.time() + self._reconnect
            if self._lost is not None and self._lost[0] is pool:
                await self._reconnected(pool, deadline, self._lost[1])

    async def _reconnected(
        self, lost: AsyncConnectionPool, deadline: float, exc: psycopg.Error
    ) -> None:
        """Return once the server takes connections again, with a new pool in place of
        ``lost`` (whose connections are dead, and whose own reconnection waits longer and
        longer between tries: 1, 2, 4, ... 16 s). One task probes and replaces the pool;
        the others wait for it. :class:`StoreUnreachable` at ``deadline``."""
        last = exc
        try:
            async with asyncio.timeout_at(deadline), self._replacing:
                if self._pool is not lost:
                    return  # another task has reconnected meanwhile
                pause = _PROBE_FIRST
                while True:
                    try:
                        probe = await psycopg.AsyncConnection.connect(self._url, **self._kwargs)
                    except psycopg.Error as error:
                        if not lost_connection(error):
                            raise translate(error, self.where, self._url) from error
                        last = error
                        await asyncio.sleep(pause)
                        pause = min(pause * 2, _PROBE_MOST)
                        continue
                    await probe.close()
                    break
                self._pool = self._new_pool()
                self._lost = None
                await self._pool.open()
                # The old pool's waiting callers fail (PoolClosed) and come here, to find
                # the new one; its connections in use are closed as they come back.
                closing = asyncio.create_task(lost.close())
                self._old_pools.add(closing)
                closing.add_done_callback(self._old_pools.discard)
        except TimeoutError:
            why = reason(last, self._url)
            raise StoreUnreachable(
                self.where, f"cannot be reached ({why}); gave up after {self._reconnect:g} s"
            ) from None

    async def wait_for_progress(self, run_id: str, at_most: float) -> None:
        """LISTEN on the progress channel: every batch NOTIFYs the runs it wrote to (on
        commit), so a watcher wakes at a write instead of polling."""
        try:
            if self._listener is None or self._listener.closed:
                self._listener = await psycopg.AsyncConnection.connect(self._url, **self._kwargs)
                await self._listener.execute(f"LISTEN {PROGRESS_CHANNEL}")
            async for note in self._listener.notifies(timeout=at_most):
                if note.payload == run_id or note.payload.startswith(run_id + "."):
                    return
        except psycopg.Error:  # the server restarts: poll until it is back
            self._listener = None
            await asyncio.sleep(at_most)

    @contextlib.asynccontextmanager
    async def _transaction(self) -> AsyncIterator[psycopg.AsyncCursor[Any]]:
        """One transaction: committed at the end of the block, rolled back on error."""
        async with self._pool.connection() as conn, conn.transaction(), conn.cursor() as cur:
            yield cur

    @contextlib.asynccontextmanager
    async def _reading(self) -> AsyncIterator[psycopg.AsyncCursor[Any]]:
        """A cursor in autocommit mode: each statement is its own transaction (reads, and
        writes that are one statement: one round trip, no BEGIN and COMMIT)."""
        async with self._pool.connection() as conn, conn.cursor() as cur:
            yield cur

    # -- the one write path --------------------------------------------------------

    async def apply(self, batch: WriteBatch) -> Mapping[str, Settled]:
        sent = _Sent()

        async def once() -> Mapping[str, Settled]:
            if await self._committed_before(sent):
                return await self._lost_settlements(batch)
            async with self._pipelined(sent) as (conn, sync):
                if batch.fence is not None:
                    cur = conn.cursor()
                    await cur.execute(
                        "SELECT epoch FROM imagepipe.leases WHERE key = %s FOR SHARE",
                        (batch.fence.key,),
                    )
                    row = await cur.fetchone()
                    if row is None or row[0] != batch.fence.epoch:
                        raise LeaseLost(batch.fence.key, batch.fence.epoch)
                return await self._write(conn, batch, sync)

        return await self._ride_out(once)

    async def apply_each(
        self, batches: Sequence[WriteBatch]
    ) -> list[Mapping[str, Settled] | LeaseLost]:
        if not batches:
            return []
        sent = _Sent()
        #: the fences the transaction found current (known before its COMMIT)
        held: set[Fence] = set()

        async def once() -> Mapping[str, Settled]:
            if await self._committed_before(sent):
                live = [b for b in batches if b.fence is None or b.fence in held]
                return await self._lost_settlements(merged(live)) if live else {}
            return await self._apply_each_once(batches, sent, held)

        lost = await self._ride_out(once)
        return [
            LeaseLost(b.fence.key, b.fence.epoch)
            if b.fence is not None and b.fence not in held
            else {s.id: lost[s.id] for s in b.settlements if s.id in lost}
            for b in batches
        ]

    async def _apply_each_once(
        self, batches: Sequence[WriteBatch], sent: _Sent, held: set[Fence]
    ) -> Mapping[str, Settled]:
        async with self._pipelined(sent) as (conn, sync):
            fences = sorted({b.fence for b in batches if b.fence is not None}, key=fence_key)
            # Every fence in one statement, locked in key order, and exclusively: this
            # transaction may end some of these leases, and upgrading a share lock while
            # the worker's renewal waits for the row deadlocks (measured: a flush of 16
            # branches lost every few thousand).
            cur = conn.cursor()
            await cur.execute(
                "SELECT key, epoch FROM imagepipe.leases WHERE key = ANY(%s)"
                " ORDER BY key FOR NO KEY UPDATE",
                ([f.key for f in fences],),
            )
            held.clear()
            held.update(Fence(key, epoch) for key, epoch in await cur.fetchall())
            live = [b for b in batches if b.fence is None or b.fence in held]
            ended = ended_claims(live)
            if ended:  # sent with the writes below
                await conn.cursor().execute(
                    "UPDATE imagepipe.leases l SET owner = NULL"
                    " FROM unnest(%s::text[], %s::bigint[]) AS f(key, epoch)"
                    " WHERE l.key = f.key AND l.epoch = f.epoch",
                    ([f.key for f in ended], [f.epoch for f in ended]),
                )
            return await self._write(conn, merged(live), sync) if live else {}

    @contextlib.asynccontextmanager
    async def _pipelined(
        self, sent: _Sent
    ) -> AsyncIterator[tuple[psycopg.AsyncConnection[Any], Callable[[], Awaitable[None]]]]:
        """One transaction in pipeline mode: statements are sent without waiting for each
        other's results, and the client waits only where it reads one (a fence) or calls
        ``sync``; BEGIN goes with the first statement and COMMIT with the last sync. A
        write batch is three round trips, however many kinds of writes it holds.

        The transaction's id is asked for with its first statement and kept in ``sent``
        before the COMMIT goes out (its answer came with the writes' sync: no round trip
        of its own): a connection lost during the COMMIT leaves the outcome to be looked
        up (:meth:`_committed_before`); one lost earlier rolled everything back."""
        sent.xid = None
        async with (
            self._pool.connection() as conn,
            conn.pipeline() as pipe,
            conn.transaction(),
        ):
            xid = conn.cursor()
            await xid.execute("SELECT txid_current()")
            yield conn, pipe.sync
            row = await xid.fetchone()
            sent.xid = None if row is None else int(row[0])

    async def _committed_before(self, sent: _Sent) -> bool:
        """Whether the transaction of an earlier try, which a lost connection cut off during
        its COMMIT, did commit (then it must not be written again). Its server session may
        not have ended yet: then its outcome is waited for, up to ``reconnect`` seconds."""
        if sent.xid is None:
            return False
        loop = asyncio.get_running_loop()
        give_up = loop.time() + self._reconnect
        while True:
            async with self._reading() as cur:
                await cur.execute("SELECT txid_status(%s)", (sent.xid,))
                row = await cur.fetchone()
            status = None if row is None else row[0]
            if status != "in progress" or loop.time() > give_up:
                break
            await asyncio.sleep(_PROBE_FIRST)
        if status == "in progress":
            raise StoreUnreachable(self.where, "cannot tell whether a write committed")
        if status != "committed":
            sent.xid = None  # rolled back: the next try writes it afresh
            return False
        return True

    async def _lost_settlements(self, batch: WriteBatch) -> dict[str, Settled]:
        """What :meth:`apply` returns for ``batch`` once it is known to be committed."""
        if not batch.settlements:
            return {}
        async with self._reading() as cur:
            return await self._earlier_outcomes(cur, batch)

    async def _write(
        self,
        conn: psycopg.AsyncConnection[Any],
        batch: WriteBatch,
        sync: Callable[[], Awaitable[None]],
    ) -> dict[str, Settled]:
        """The writes of ``batch`` in the current transaction (fence already checked): each
        kind of write is one ``executemany``, all sent before one ``sync``; then their row
        counts are checked (any mismatch refuses the whole transaction)."""
        counted: list[tuple[psycopg.AsyncCursor[Any], int, str]] = []

        async def send(
            sql: str, params: list[Any], conflict: str | None = None
        ) -> psycopg.AsyncCursor[Any]:
            cur = conn.cursor()
            try:  # a pipeline reports an error at its next sync: any statement's
                await cur.executemany(sql, params)
            except psycopg.errors.UniqueViolation:  # only the attempts can collide
                raise StoreConflict(self.where, "already holds a failed attempt") from None
            if conflict is not None:
                counted.append((cur, len(params), conflict))
            return cur

        # delivered when this transaction commits, never if it rolls back
        await conn.cursor().execute(
            f"SELECT pg_notify('{PROGRESS_CHANNEL}', run) FROM unnest(%s::text[]) AS run",
            (sorted(_runs_written(batch)),),
        )
        if batch.reopens:
            await send(
                "UPDATE imagepipe.promises SET state = 'pending', error = NULL,"
                " settled_at = NULL, failures = 0, child_counts = NULL"
                " WHERE id = %s AND state = 'rejected'",
                [(promise_id,) for promise_id in batch.reopens],
            )
        if batch.creates:
            await send(
                "INSERT INTO imagepipe.promises (id, parent_id, seq, func, args, options,"
                " state, value, created_at, settled_at) VALUES (%(id)s, %(parent_id)s,"
                " %(seq)s, %(func)s, %(args_json)s, %(options_json)s, %(state)s,"
                " %(value_json)s, %(created_at)s, CASE WHEN %(state)s = 'pending'"
                " THEN NULL ELSE %(created_at)s::double precision END)"
                " ON CONFLICT (id) DO NOTHING",
                [named_params(c) for c in batch.creates],
                "already holds promises this batch creates",
            )
        if batch.starts:
            await send(
                "UPDATE imagepipe.promises SET attempts = %(attempt)s"
                " WHERE id = %(id)s AND state = 'pending' AND attempts < %(attempt)s",
                [named_params(s) for s in batch.starts],
                "holds settled or further-on promises",
            )
        if batch.failures:
            await send(
                "INSERT INTO imagepipe.attempts (promise_id, attempt, started_at,"
                " finished_at, error) VALUES (%(id)s, %(attempt)s, %(started_at)s,"
                " %(finished_at)s, %(error_json)s)",
                [named_params(f) for f in batch.failures],
            )
            await send(
                "UPDATE imagepipe.promises SET failures = failures + 1"
                " WHERE id = %s AND state = 'pending'",
                [(f.id,) for f in batch.failures],
                "holds no pending promise for a failed attempt",
            )
        settled = None
        if batch.settlements:
            settled = await send(
                "UPDATE imagepipe.promises SET state = %(state)s, value = %(value_json)s,"
                " error = %(error_json)s, settled_at = %(settled_at)s"
                " WHERE id = %(id)s AND state = 'pending'",
                [named_params(s) for s in batch.settlements],
            )
            # a run's root settled here keeps its branches' counts (for listing runs)
            await conn.cursor().execute(
                "UPDATE imagepipe.promises AS p SET child_counts = (SELECT coalesce("
                "json_object_agg(state, n), '{}')::text FROM (SELECT c.state, count(*) AS n"
                " FROM imagepipe.promises AS c WHERE c.parent_id = p.id GROUP BY c.state) AS s)"
                " WHERE p.id = ANY(%s) AND p.parent_id IS NULL AND p.state != 'pending'"
                " AND p.child_counts IS NULL",
                ([s.id for s in batch.settlements],),
            )
        try:
            await sync()
        except psycopg.errors.UniqueViolation:  # only the attempts can collide
            raise StoreConflict(self.where, "already holds a failed attempt") from None
        for cur, expected, conflict in counted:
            if cur.rowcount != expected:
                raise StoreConflict(self.where, conflict)
        if settled is None or settled.rowcount == len(batch.settlements):
            return {}
        return await self._earlier_outcomes(conn.cursor(), batch)

    async def _earlier_outcomes(
        self, cur: psycopg.AsyncCursor[Any], batch: WriteBatch
    ) -> dict[str, Settled]:
        """The settlements of ``batch`` that lost: their promises were settled before. A
        row this batch settled holds exactly what it wrote; any other outcome is earlier."""
        await cur.execute(
            "SELECT id, state, value, error, settled_at, attempts FROM imagepipe.promises"
            " WHERE id = ANY(%s)",
            ([item.id for item in batch.settlements],),
        )
        rows = {row[0]: row[1:] for row in await cur.fetchall()}
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

    # -- spending --------------------------------------------------------------------

    @_rides_out
    async def set_spending_limit(self, run_id: str, meter: str, limit: int | None) -> None:
        async with self._reading() as cur:
            await cur.execute(
                "INSERT INTO imagepipe.spending (run_id, meter, cap) VALUES (%s, %s, %s)"
                " ON CONFLICT (run_id, meter) DO UPDATE SET cap = excluded.cap",
                (run_id, meter, limit),
            )

    @_rides_out
    async def spending(self, run_id: str) -> dict[str, Spending]:
        async with self._reading() as cur:
            await cur.execute(
                "SELECT meter, cap, spent FROM imagepipe.spending WHERE run_id = %s", (run_id,)
            )
            rows = await cur.fetchall()
        return {meter: Spending(cap, spent) for meter, cap, spent in rows}

    @_rides_out
    async def reserve_attempt(
        self,
        fence: Fence | None,
        run_id: str,
        promise_id: str,
        attempt: int,
        units: Mapping[str, int],
    ) -> tuple[str, Spending] | None:
        refused: tuple[str, Spending] | None = None
        async with self._transaction() as cur:
            if fence is not None:
                await self._check_fence(cur, fence)
            await cur.execute(
                "SELECT attempts FROM imagepipe.promises WHERE id = %s AND state = 'pending'"
                " FOR UPDATE",
                (promise_id,),
            )
            row = await cur.fetchone()
            if row is None:
                raise StoreConflict(self.where, f"holds no pending promise {promise_id!r}")
            if row[0] >= attempt:
                return None  # started before, with its reservation
            for meter, needed in sorted(units.items()):  # locked in one order: no deadlock
                await cur.execute(
                    "INSERT INTO imagepipe.spending (run_id, meter) VALUES (%s, %s)"
                    " ON CONFLICT DO NOTHING",
                    (run_id, meter),
                )
                # locked: the workers that reserve on one run's meter take turns here
                await cur.execute(
                    "SELECT cap, spent FROM imagepipe.spending WHERE run_id = %s AND meter = %s"
                    " FOR UPDATE",
                    (run_id, meter),
                )
                found = await cur.fetchone()
                spending = Spending(*found) if found else Spending(None, 0)
                if not spending.allows(needed):
                    refused = meter, spending
                    raise psycopg.Rollback  # nothing of this call is kept

            for meter, needed in units.items():
                await cur.execute(
                    "UPDATE imagepipe.spending SET spent = spent + %s"
                    " WHERE run_id = %s AND meter = %s",
                    (needed, run_id, meter),
                )
                await cur.execute(
                    "INSERT INTO imagepipe.reservations (promise_id, attempt, meter, reserved)"
                    " VALUES (%s, %s, %s, %s)",
                    (promise_id, attempt, meter, needed),
                )
            await cur.execute(
                "UPDATE imagepipe.promises SET attempts = %s WHERE id = %s", (attempt, promise_id)
            )
        return refused

    @_rides_out
    async def settle_cost(
        self,
        fence: Fence | None,
        run_id: str,
        promise_id: str,
        attempt: int,
        cost: Mapping[str, int],
    ) -> None:
        async with self._transaction() as cur:
            if fence is not None:
                await self._check_fence(cur, fence)
            for meter, actual in cost.items():
                await cur.execute(
                    "UPDATE imagepipe.reservations SET cost = %s WHERE promise_id = %s"
                    " AND attempt = %s AND meter = %s AND cost IS NULL RETURNING reserved",
                    (actual, promise_id, attempt, meter),
                )
                row = await cur.fetchone()
                if row is not None:
                    await cur.execute(
                        "UPDATE imagepipe.spending SET spent = spent + %s"
                        " WHERE run_id = %s AND meter = %s",
                        (actual - row[0], run_id, meter),
                    )

    async def _check_fence(self, cur: psycopg.AsyncCursor[Any], fence: Fence) -> None:
        await cur.execute(
            "SELECT epoch FROM imagepipe.leases WHERE key = %s FOR SHARE", (fence.key,)
        )
        row = await cur.fetchone()
        if row is None or row[0] != fence.epoch:
            raise LeaseLost(fence.key, fence.epoch)

    @_rides_out
    async def get(self, promise_id: str) -> PromiseRecord | None:
        async with self._reading() as cur:
            await cur.execute(
                f"SELECT {PROMISE_COLUMNS} FROM imagepipe.promises WHERE id = %s", (promise_id,)
            )
            row = await cur.fetchone()
        return None if row is None else promise_from_row(row, self.where)

    @_rides_out
    async def children(self, parent_id: str) -> list[PromiseRecord]:
        async with self._reading() as cur:
            await cur.execute(
                f"SELECT {PROMISE_COLUMNS} FROM imagepipe.promises"
                " WHERE parent_id = %s ORDER BY seq",
                (parent_id,),
            )
            rows = await cur.fetchall()
        return [promise_from_row(row, self.where) for row in rows]

    @_rides_out
    async def child_columns(self, parent_id: str) -> ChildColumns:
        columns = ChildColumns(self.where)
        async with self._reading() as cur:
            await cur.execute(
                f"SELECT {CHILD_COLUMNS} FROM imagepipe.promises WHERE parent_id = %s ORDER BY seq",
                (parent_id,),
            )
            while rows := await cur.fetchmany(1000):
                add_child_rows(columns, rows)
        return columns

    @_rides_out
    async def roots(self, limit: int | None = None) -> list[RootRecord]:
        async with self._reading() as cur:
            await cur.execute(
                f"SELECT {ROOT_COLUMNS} FROM imagepipe.promises WHERE parent_id IS NULL"
                " ORDER BY created_at DESC, id DESC LIMIT %s",
                (limit,),
            )
            rows = await cur.fetchall()
            # A settled run's counts were stored when it settled; only the others are counted.
            counts: dict[str, dict[str, int]] = {row[0]: {} for row in rows if row[-1] is None}
            await cur.execute(
                "SELECT parent_id, state, count(*) FROM imagepipe.promises"
                " WHERE parent_id = ANY(%s) GROUP BY parent_id, state",
                (list(counts),),
            )
            for parent_id, state, n in await cur.fetchall():
                counts[parent_id][state] = n
        return [root_from_row(row, counts.get(row[0]), self.where) for row in rows]

    @_rides_out
    async def failed_attempts(self, parent_id: str) -> list[AttemptRecord]:
        async with self._reading() as cur:
            await cur.execute(
                "SELECT a.promise_id, a.attempt, a.started_at, a.finished_at, a.error"
                " FROM imagepipe.attempts a JOIN imagepipe.promises p ON p.id = a.promise_id"
                " WHERE (p.parent_id = %s OR p.id = %s) AND a.error IS NOT NULL"
                " ORDER BY p.parent_id IS NOT NULL, p.seq, a.attempt",
                (parent_id, parent_id),
            )
            rows = await cur.fetchall()
        return [attempt_from_row(row, self.where) for row in rows]

    # -- leases --------------------------------------------------------------------

    @_rides_out
    async def acquire_lease(
        self, claim: Lease, *, stale_after: float, holder_gone: Callable[[Lease], bool]
    ) -> Lease:
        async with self._transaction() as cur:
            # The row exists from the first acquisition on (a released one keeps its
            # epoch); locking it serialises acquirers and waits out a fenced write.
            await cur.execute(
                f"INSERT INTO imagepipe.leases (key, heartbeat_at, epoch) VALUES (%s, {_NOW}, 0)"
                " ON CONFLICT (key) DO NOTHING",
                (claim.key,),
            )
            await cur.execute(
                f"SELECT owner, pid, host, epoch, {_NOW} - heartbeat_at FROM imagepipe.leases"
                " WHERE key = %s FOR UPDATE",
                (claim.key,),
            )
            row = await cur.fetchone()
            if row is None:
                raise StoreCorrupt(self.where, f"lost the lease row of {claim.key!r}")
            owner, pid, host, held_epoch, age = row
            if owner is not None and owner != claim.owner:
                holder = Lease(claim.key, owner, pid, host, held_epoch, age)
                if age <= stale_after and not holder_gone(holder):
                    raise LeaseHeld(claim.key, holder)
            epoch = held_epoch + 1
            await cur.execute(
                f"UPDATE imagepipe.leases SET owner = %s, pid = %s, host = %s,"
                f" heartbeat_at = {_NOW}, epoch = %s WHERE key = %s",
                (claim.owner, claim.pid, claim.host, epoch, claim.key),
            )
        return Lease(claim.key, claim.owner, claim.pid, claim.host, epoch, 0.0)

    @_rides_out
    async def lease_holder(self, key: str) -> Lease | None:
        async with self._reading() as cur:
            await cur.execute(
                f"SELECT owner, pid, host, epoch, {_NOW} - heartbeat_at FROM imagepipe.leases"
                " WHERE key = %s AND owner IS NOT NULL",
                (key,),
            )
            row = await cur.fetchone()
        return None if row is None else Lease(key, *row)

    @_rides_out
    async def renew_lease(self, lease: Lease) -> None:
        async with self._transaction() as cur:
            await cur.execute(
                f"UPDATE imagepipe.leases SET heartbeat_at = {_NOW}"
                " WHERE key = %s AND epoch = %s AND owner = %s",
                (lease.key, lease.epoch, lease.owner),
            )
            if cur.rowcount != 1:
                raise LeaseLost(lease.key, lease.epoch)

    @_rides_out
    async def release_lease(self, lease: Lease) -> None:
        async with self._transaction() as cur:
            await cur.execute(
                "UPDATE imagepipe.leases SET owner = NULL WHERE key = %s AND epoch = %s"
                " AND owner = %s",
                (lease.key, lease.epoch, lease.owner),
            )

    # -- workers -------------------------------------------------------------------

    @_rides_out
    async def claim(
        self, worker: Lease, *, limit: int, stale_after: float, run_id: str | None = None
    ) -> list[Claim]:
        if limit <= 0:
            return []
        # one run's branches: the same walk of the pending roots, narrowed to that run
        only_run = "" if run_id is None else "  AND r.id = %(run)s"
        async with self._reading() as cur:  # autocommit: the one statement is the transaction
            # One statement. The runs come from the index of pending roots, each run's
            # branches from the index of pending children in launch order (at most
            # ``limit`` of each run: nothing sorts the whole queue). SKIP LOCKED: claimers
            # on other hosts take other branches instead of waiting. The lease upsert
            # re-checks the lease as committed now: a branch another claimer leased after
            # this statement's snapshot is left alone (never claimed twice).
            await cur.execute(
                "WITH runs AS MATERIALIZED ("
                "  SELECT r.id, row_number() OVER (ORDER BY r.created_at, r.id) AS rank"
                "  FROM imagepipe.promises r LEFT JOIN imagepipe.leases rl ON rl.key = r.id"
                "  WHERE r.parent_id IS NULL AND r.state = 'pending'"
                "  AND (r.options::jsonb ->> %(detached)s) = 'true'"
                f"  AND (rl.owner IS NULL OR {_NOW} - rl.heartbeat_at > %(stale)s)"
                f"{only_run}"
                "), picked AS ("
                "  SELECT c.id, runs.rank, c.seq FROM runs CROSS JOIN LATERAL ("
                "    SELECT p.id, p.seq FROM imagepipe.promises p"
                "    LEFT JOIN imagepipe.leases l ON l.key = p.id"
                "    WHERE p.parent_id = runs.id AND p.state = 'pending'"
                f"    AND (l.owner IS NULL OR {_NOW} - l.heartbeat_at > %(stale)s)"
                "    ORDER BY p.seq LIMIT %(limit)s FOR UPDATE OF p SKIP LOCKED"
                "  ) c ORDER BY runs.rank, c.seq LIMIT %(limit)s"
                "), leased AS ("
                "  INSERT INTO imagepipe.leases AS l (key, owner, pid, host, heartbeat_at, epoch)"
                f"  SELECT id, %(owner)s, %(pid)s, %(host)s, {_NOW}, 1 FROM picked"
                "  ON CONFLICT (key) DO UPDATE SET owner = excluded.owner, pid = excluded.pid,"
                "  host = excluded.host, heartbeat_at = excluded.heartbeat_at,"
                "  epoch = l.epoch + 1"
                f"  WHERE l.owner IS NULL OR {_NOW} - l.heartbeat_at > %(stale)s"
                "  RETURNING l.key, l.epoch"
                f") SELECT {CLAIM_COLUMNS}, leased.epoch FROM leased"
                " JOIN picked ON picked.id = leased.key"
                " JOIN imagepipe.promises p ON p.id = leased.key"
                " ORDER BY picked.rank, picked.seq",
                {
                    "detached": DETACHED,
                    "stale": stale_after,
                    "limit": limit,
                    "owner": worker.owner,
                    "pid": worker.pid,
                    "host": worker.host,
                    "run": run_id,
                },
            )
            rows = await cur.fetchall()
        return [
            Claim(promise_from_row(row[:-1], self.where), Fence(row[0], int(row[-1])))
            for row in rows
        ]

    @_rides_out
    async def renew_claims(self, worker: Lease, fences: Sequence[Fence]) -> list[Fence]:
        if not fences:
            return []
        async with self._reading() as cur:  # autocommit: the one statement is the transaction
            # One statement, rows locked in key order: no round trip per claim, and no
            # lock-order deadlock with a claimer or a fenced batch.
            await cur.execute(
                f"UPDATE imagepipe.leases l SET heartbeat_at = {_NOW}"
                " FROM unnest(%s::text[], %s::bigint[]) AS f(key, epoch)"
                " WHERE l.key = f.key AND l.epoch = f.epoch AND l.owner = %s RETURNING l.key",
                ([f.key for f in fences], [f.epoch for f in fences], worker.owner),
            )
            renewed = {row[0] for row in await cur.fetchall()}
            missed = [fence for fence in fences if fence.key not in renewed]
            if not missed:
                return []
            # A statement of its own, so that it sees what committed meanwhile: a claim
            # that a settlement ended as this renewal ran is ended, not taken.
            await cur.execute(
                "SELECT key, epoch FROM imagepipe.leases"
                " WHERE key = ANY(%s::text[]) AND owner IS NULL",
                ([f.key for f in missed],),
            )
            ended = {(key, int(epoch)) for key, epoch in await cur.fetchall()}
        return [fence for fence in missed if (fence.key, fence.epoch) not in ended]

    @_rides_out
    async def any_pending(self, parent_id: str) -> bool:
        async with self._reading() as cur:
            # served by the index of pending children: no count over the run
            await cur.execute(
                "SELECT EXISTS (SELECT 1 FROM imagepipe.promises"
                " WHERE parent_id = %s AND state = 'pending')",
                (parent_id,),
            )
            row = await cur.fetchone()
        return bool(row and row[0])

    @_rides_out
    async def held_leases(self, prefix: str = "") -> list[Lease]:
        async with self._reading() as cur:
            await cur.execute(
                f"SELECT key, owner, pid, host, epoch, {_NOW} - heartbeat_at"
                " FROM imagepipe.leases WHERE owner IS NOT NULL"
                " AND left(key, length(%s)) = %s ORDER BY key",
                (prefix, prefix),
            )
            rows = await cur.fetchall()
        return [Lease(*row) for row in rows]

    @_rides_out
    async def forget_leases(self, prefix: str, *, older_than: float) -> int:
        if not prefix:
            raise ValueError("forget_leases needs a key prefix: branch leases stay")
        async with self._reading() as cur:  # autocommit: the one statement is the transaction
            await cur.execute(
                "DELETE FROM imagepipe.leases WHERE left(key, length(%s)) = %s"
                f" AND (owner IS NULL OR {_NOW} - heartbeat_at > %s)",
                (prefix, prefix, older_than),
            )
            return cur.rowcount


#: the channel every write batch NOTIFYs with the ids of the runs it wrote to
PROGRESS_CHANNEL = "imagepipe_progress"


def _runs_written(batch: WriteBatch) -> set[str]:
    """The parents of the promises a batch writes (a run's root id names itself)."""
    ids = [c.parent_id or c.id for c in batch.creates]
    ids += [s.id.rpartition(".")[0] or s.id for s in batch.starts]
    ids += [f.id.rpartition(".")[0] or f.id for f in batch.failures]
    ids += [s.id.rpartition(".")[0] or s.id for s in batch.settlements]
    ids += [i.rpartition(".")[0] or i for i in batch.reopens]
    return set(ids)
