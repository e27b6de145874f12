"""Group commit: many writes, one transaction, and nobody hears of a write before it.

Branches hand their writes (a new child, a started attempt, a failed one, a settlement) to
a :class:`GroupCommit` and await the future it returns. The first write of a batch
schedules one flush, two event-loop turns later; every write made before the flush runs
joins that batch, which ``Store.apply`` writes in one transaction under the run's fence.
Every writer of the batch awaits the same future, done once the batch is committed. So
thousands of branches that move in the same loop turn share one commit, and a result is
still never reported before it is durable. Batches are applied one at a time, in order.
A settlement can also be written without awaiting it (:meth:`GroupCommit.write_settlement`):
its writer registers a callback on a second future of the batch instead, and goes on
meanwhile. That one only the flush completes: the writers' future is cancelled for all of
them when one writer that awaits it is cancelled (asyncio cancels the future a task waits
on), yet the batch is still written, and a settlement in it must hear so.

The first flush acquires the run's lease (through ``acquire``): nothing is written before
the run is known to be this process's. While the group commit is *held* (a resumed run
whose replay is not yet checked) writes wait in the batch and nothing is flushed.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Awaitable, Callable, Mapping
from types import MappingProxyType
from typing import Any, Protocol

from imagepipe.durable.records import (
    AttemptFailure,
    AttemptStart,
    ErrorInfo,
    Fence,
    NewPromise,
    Note,
    PromiseState,
    Settled,
    Settlement,
    WriteBatch,
    canonical_json,
)
from imagepipe.durable.store import Store

__all__ = ["BatchSink", "Committed", "GroupCommit", "Settling"]

#: what a flush tells its writers: the settlements that lost to an earlier one, by id
Committed = asyncio.Future[Mapping[str, Settled]]
_NOTHING_LOST: Mapping[str, Settled] = MappingProxyType({})
_JSON_SCALARS = frozenset({str, int, float, bool, type(None)})


def read_back(value: Any, value_json: str | None) -> Any:
    """``value`` as a replay will read it from the store, so that a live run and a replay
    see the same thing. A flat dict of JSON scalars with string keys (most step results)
    reads back as an equal dict: copy it rather than decode the JSON again."""
    if type(value) is dict and all(
        type(k) is str and type(v) in _JSON_SCALARS for k, v in value.items()
    ):
        return dict(value)
    return None if value_json is None else json.loads(value_json)


class BatchSink(Protocol):
    """Where a group commit's batches go: a :class:`~.store.Store`, or a worker's shared
    commit (:class:`~.worker_commit.SharedCommit`) that writes many branches' batches in one
    transaction."""

    async def apply(self, batch: WriteBatch) -> Mapping[str, Settled]: ...


class Settling:
    """A settlement written to the batch: :meth:`outcome` once :attr:`written` is done."""

    __slots__ = ("attempts", "error", "promise_id", "state", "value", "value_json", "written")

    def __init__(
        self,
        written: Committed,
        promise_id: str,
        *,
        value: Any,
        value_json: str | None,
        error: ErrorInfo | None,
        attempts: int,
    ) -> None:
        #: the flush's outcome of the batch the settlement is in: done by the flush alone
        #: (or cancelled if the batch was discarded, or its flush cancelled midway)
        self.written = written
        self.promise_id = promise_id
        self.state: PromiseState = "rejected" if error is not None else "resolved"
        self.value, self.value_json = value, value_json
        self.error, self.attempts = error, attempts

    def recorded(self) -> bool:
        """True if the store recorded this settlement (the batch committed, and no earlier
        settlement of the promise stands in its place)."""
        return self.promise_id not in self.written.result()

    def outcome(self) -> Settled:
        """The outcome as stored (the batch committed): if the promise was settled before,
        that outcome stands."""
        earlier = self.written.result().get(self.promise_id)
        if earlier is not None:
            return earlier
        return Settled(
            self.state, read_back(self.value, self.value_json), self.error, self.attempts
        )


class GroupCommit:
    def __init__(
        self, store: Store | BatchSink, *, acquire: Callable[[], Awaitable[Fence]] | None = None
    ) -> None:
        self._store = store
        self._acquire = acquire
        self._fence: Fence | None = None
        self._batch = WriteBatch()
        #: the future of the batch being collected, awaited by its writers; None while empty
        self._committed: Committed | None = None
        #: the same batch's outcome for :class:`Settling`, completed by the flush alone
        self._written: Committed | None = None
        self._flushing = False
        self._held = False
        #: the flush under way, owned here: :meth:`close` waits for it
        self._flush_task: asyncio.Task[None] | None = None

    # -- writes ------------------------------------------------------------------------

    def create(self, promise: NewPromise) -> Committed:
        self._batch.creates.append(promise)
        return self._next_commit()

    def reopen(self, promise_id: str) -> Committed:
        """Set a rejected promise back to pending (its history stays)."""
        self._batch.reopens.append(promise_id)
        return self._next_commit()

    def note(self, run_id: str, key: str, value: Any) -> Committed:
        """Write run ``run_id``'s note ``key`` (a JSON value), replacing what it held."""
        self._batch.notes.append(Note(run_id, key, canonical_json(value), time.time()))
        return self._next_commit()

    def start_attempt(self, promise_id: str, attempt: int) -> Committed:
        self._batch.starts.append(AttemptStart(promise_id, attempt))
        return self._next_commit()

    def fail_attempt(
        self, promise_id: str, attempt: int, started_at: float, error: ErrorInfo
    ) -> Committed:
        self._batch.failures.append(
            AttemptFailure(promise_id, attempt, started_at, time.time(), error.to_json())
        )
        return self._next_commit()

    async def settle(
        self, promise_id: str, *, value: Any, error: ErrorInfo | None, attempts: int
    ) -> Settled:
        """Resolve with ``value`` (or reject with ``error``) after ``attempts`` attempts;
        return the outcome as stored, once durable. If the promise was settled before,
        that outcome stands."""
        settling = self.write_settlement(promise_id, value=value, error=error, attempts=attempts)
        await self._next_commit()
        return settling.outcome()

    def write_settlement(
        self, promise_id: str, *, value: Any, error: ErrorInfo | None, attempts: int
    ) -> Settling:
        """:meth:`settle` without waiting: the settlement joins the batch at once; its
        outcome is known when the returned :attr:`Settling.written` is done."""
        value_json = None if value is None else canonical_json(value)
        error_json = None if error is None else error.to_json()
        state: PromiseState = "rejected" if error is not None else "resolved"
        self._batch.settlements.append(
            Settlement(promise_id, state, value_json, error_json, time.time())
        )
        self._next_commit()
        assert self._written is not None
        return Settling(
            self._written,
            promise_id,
            value=value,
            value_json=value_json,
            error=error,
            attempts=attempts,
        )

    async def durable(self) -> Fence | None:
        """Wait until every write made so far is committed (the lease taken with the first);
        the fence they were written under."""
        await self._next_commit()
        return self._fence

    @property
    def held(self) -> bool:
        """True while writes wait for :meth:`release` (nothing is flushed)."""
        return self._held

    # -- flushing ------------------------------------------------------------------------

    def hold(self) -> None:
        """Keep every write in the batch until :meth:`release`."""
        self._held = True

    def release(self) -> None:
        self._held = False
        if self._committed is not None:
            self._schedule()

    def discard(self) -> None:
        """Drop the writes not flushed yet (the invocation is abandoned)."""
        self._batch = WriteBatch()
        if self._committed is not None and self._written is not None:
            self._committed.cancel()
            self._written.cancel()
            self._committed = self._written = None

    def _next_commit(self) -> Committed:
        if self._committed is None:
            loop = asyncio.get_running_loop()
            self._committed, self._written = loop.create_future(), loop.create_future()
            self._schedule()
        return self._committed

    def _schedule(self) -> None:
        if not self._flushing and not self._held:
            self._flushing = True
            self._flush_task = asyncio.create_task(self._flush(), name="commit")
            self._flush_task.add_done_callback(self._flush_ended)

    def _flush_ended(self, task: asyncio.Task[None]) -> None:
        _retrieved(task)
        if task is self._flush_task and task.cancelled():
            # possibly before it began: its writers must not wait for ever
            self._flushing = False
            for future in (self._committed, self._written):
                if future is not None and not future.done():
                    future.cancel()
            self._committed = self._written = None

    async def close(self) -> None:
        """Wait for the flush under way, if any: nothing this commit started outlives it.
        Its writers were told of its outcome, whatever it was."""
        if self._flush_task is not None:
            await asyncio.gather(self._flush_task, return_exceptions=True)

    async def _flush(self) -> None:
        # Two loop turns first: the tasks this turn's writes woke (a freed concurrency slot
        # starting the next attempt) add their writes to the same commit (halves commits).
        try:
            await asyncio.sleep(0)
            await asyncio.sleep(0)
            while self._committed is not None and self._written is not None and not self._held:
                batch, told = self._batch, (self._written, self._committed)
                self._batch, self._committed, self._written = WriteBatch(), None, None
                try:
                    if self._fence is None and self._acquire is not None:
                        self._fence = await self._acquire()
                    batch.fence = self._fence
                    lost = await self._store.apply(batch) if batch else _NOTHING_LOST
                except Exception as exc:
                    for future in told:
                        if not future.done():
                            future.set_exception(exc)
                            future.add_done_callback(_retrieved)
                except BaseException:
                    for future in told:  # cancelled midway: whether it was written is unknown
                        future.cancel()
                    raise
                else:
                    for future in told:
                        if not future.done():
                            future.set_result(lost)
        finally:
            self._flushing = False  # in this task: a write right after starts the next


def _retrieved(future: asyncio.Future[Any]) -> None:
    """Mark a future's exception as seen: its writers were told, or were cancelled."""
    if not future.cancelled():
        future.exception()
