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
from collections.abc import (
    AsyncGenerator,
    AsyncIterator,
    Awaitable,
    Callable,
    Coroutine,
    Iterable,
    Sequence,
)
from dataclasses import dataclass
from typing import Any, Concatenate, ParamSpec, TypeVar

import psycopg
from psycopg.conninfo import conninfo_to_dict
from psycopg_pool import AsyncConnectionPool

from imagepipe.durable.errors import StoreConflict, StoreUnreachable, StoreUnusable
from imagepipe.durable.postgres_errors import describe_url, lost_connection, reason, translate
from imagepipe.durable.postgres_schema import prepare_schema
from imagepipe.durable.records import Fence, Lease, WriteBatch
from imagepipe.durable.rows import CLAIM_COLUMNS, promise_from_row
from imagepipe.durable.sql import (
    CHUNK_ROWS,
    Counted,
    Dialect,
    Fetch,
    Params,
    Row,
    SQLStore,
    Statements,
    Tx,
)
from imagepipe.durable.store import DETACHED, Claim, StoreOptions

__all__ = ["POSTGRES", "PostgresStore"]

#: PostgreSQL's SQL: the tables in their own schema, rows locked as they are read (a
#: fence FOR SHARE, a lease FOR UPDATE, the leases a shared commit may end FOR NO KEY
#: UPDATE), and the database's clock (``clock_timestamp()``) in Unix seconds
POSTGRES = Dialect(
    schema="imagepipe.",
    now="extract(epoch FROM clock_timestamp())::double precision",
    pyformat=True,
    json_lists=False,
    share_lock=" FOR SHARE",
    update_lock=" FOR UPDATE",
    end_lock=" FOR NO KEY UPDATE",
    counts_object="coalesce(json_object_agg(state, n), '{}')::text",
    no_limit=None,
)
_NOW = POSTGRES.now
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


class PostgresStore(SQLStore):
    """A :class:`~imagepipe.durable.store.Store` in a PostgreSQL database."""

    sql = Statements(POSTGRES)
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
        ``verify`` is SQLite's (PostgreSQL checks its own pages)."""
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
    async def _transaction(self) -> AsyncIterator[psycopg.AsyncConnection[Any]]:
        """One transaction: committed at the end of the block, rolled back on error."""
        async with self._pool.connection() as conn, conn.transaction():
            yield conn

    @contextlib.asynccontextmanager
    async def _reading(self) -> AsyncIterator[psycopg.AsyncCursor[Any]]:
        """A cursor in autocommit mode: each statement is its own transaction (reads, and
        writes that are one statement: one round trip, no BEGIN and COMMIT)."""
        async with self._pool.connection() as conn, conn.cursor() as cur:
            yield cur

    # -- transactions and reads -----------------------------------------------------

    async def _in_transaction(self, body: Callable[[Tx], Awaitable[R]]) -> R:
        async def once() -> R:
            async with self._transaction() as conn:
                return await body(_PostgresTx(conn, None, self.where))

        return await self._ride_out(once)

    async def _commit(
        self, body: Callable[[Tx], Awaitable[R]], recovered: Callable[[Fetch], Awaitable[R]]
    ) -> R:
        """A write batch's transaction, pipelined (:meth:`_pipelined`). When a lost
        connection cut off an earlier try during its COMMIT and that COMMIT is found to have
        taken effect (:meth:`_committed_before`), ``recovered`` says what it returned."""
        sent = _Sent()

        async def once() -> R:
            if await self._committed_before(sent):
                return await recovered(self._read)
            async with self._pipelined(sent) as (conn, sync):
                return await body(_PostgresTx(conn, sync, self.where))

        return await self._ride_out(once)

    async def _fetchall(self, sql: str, params: Params) -> list[Row]:
        return await self._ride_out(lambda: self._read(sql, params))

    async def _read(self, sql: str, params: Params) -> list[Row]:
        async with self._reading() as cur:
            await cur.execute(sql, params)
            return await cur.fetchall()

    async def _chunks(self, sql: str, params: Params) -> AsyncGenerator[list[Row], None]:
        """The rows of a read, :data:`CHUNK_ROWS` at a time. Its statement rides out a
        lost connection; once it has answered, every row is on this side (a client-side
        cursor), and the chunks are made from it."""

        async def started() -> tuple[contextlib.AsyncExitStack, psycopg.AsyncCursor[Any]]:
            held = contextlib.AsyncExitStack()
            try:
                conn = await held.enter_async_context(self._pool.connection())
                cur = await held.enter_async_context(conn.cursor())
                await cur.execute(sql, params)
            except BaseException:
                await held.aclose()  # the connection goes back to the pool (or is dropped)
                raise
            return held, cur

        held, cur = await self._ride_out(started)
        async with held:
            try:
                while rows := await cur.fetchmany(CHUNK_ROWS):
                    yield rows
            except psycopg.Error as exc:
                raise translate(exc, self.where, self._url) from exc

    async def _announce(self, tx: Tx, batch: WriteBatch) -> None:
        """NOTIFY the runs ``batch`` writes to: delivered when the transaction commits,
        never if it rolls back."""
        await tx.send(_NOTIFY, {"runs": sorted(_runs_written(batch))})

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


class _PostgresTx(Tx):
    """A transaction of the PostgreSQL store. In pipeline mode (``sync`` given), the
    statements whose rows are not read are sent without waiting; :meth:`check` sends the
    sync and then compares the counts of changed rows."""

    def __init__(
        self,
        conn: psycopg.AsyncConnection[Any],
        sync: Callable[[], Awaitable[None]] | None,
        where: str,
    ) -> None:
        super().__init__(where)
        self._conn = conn
        self._sync = sync
        #: what a broken unique key means: a pipeline reports an error at its next sync,
        #: whichever statement it was
        self._duplicate: str | None = None

    async def fetchall(self, sql: str, params: Params) -> list[Row]:
        cur = self._conn.cursor()
        await cur.execute(sql, params)
        return await cur.fetchall()

    async def send(self, sql: str, params: Params) -> Counted:
        cur = self._conn.cursor()
        await cur.execute(sql, params)
        return cur

    async def _executemany(
        self, sql: str, params: Iterable[Params], duplicate: str | None
    ) -> Counted:
        if duplicate is not None:
            self._duplicate = duplicate
        cur = self._conn.cursor()
        try:
            await cur.executemany(sql, params)
        except psycopg.errors.UniqueViolation:
            raise self._refused() from None
        return cur

    async def _wait(self) -> None:
        if self._sync is not None:
            try:
                await self._sync()
            except psycopg.errors.UniqueViolation:
                raise self._refused() from None

    def _refused(self) -> StoreConflict:
        """A broken unique key: only a statement sent with ``duplicate`` can break one."""
        return StoreConflict(self.where, self._duplicate or "already holds a row it writes")


#: the channel every write batch NOTIFYs with the ids of the runs it wrote to
PROGRESS_CHANNEL = "imagepipe_progress"
_NOTIFY = f"SELECT pg_notify('{PROGRESS_CHANNEL}', run) FROM unnest(%(runs)s::text[]) AS run"


def _runs_written(batch: WriteBatch) -> set[str]:
    """The parents of the promises a batch writes (a run's root id names itself)."""
    ids = [c.parent_id or c.id for c in batch.creates]
    ids += [s.id.rpartition(".")[0] or s.id for s in batch.starts]
    ids += [f.id.rpartition(".")[0] or f.id for f in batch.failures]
    ids += [s.id.rpartition(".")[0] or s.id for s in batch.settlements]
    ids += [i.rpartition(".")[0] or i for i in batch.reopens]
    ids += [n.run_id for n in batch.notes]
    return set(ids)
