"""A worker's shared commit: the write batches of all its branches in one transaction.

Each claimed branch runs in its own run context with its own group commit (its writes in
order, each batch under the fence of the branch's own lease). Without this, every branch
would pay its own transactions: at a worker's 16 branches and two writes each (the
attempt start, the settlement), that is most of what a worker spends. :class:`SharedCommit`
stands where the store would: every batch handed to it before its next flush joins one
:meth:`~.store.Store.apply_each`, which checks each batch's own fence in that transaction
and leaves out only the stale ones. Flushes run one at a time; the batches that arrive
during one make up the next, so the more branches move at once, the bigger the batches.

Nothing changes for a branch: its batch is durable before ``apply`` returns, a stale fence
raises :class:`~.errors.LeaseLost` for that branch alone, a lost settlement returns the
earlier outcome, and a store failure is raised to every branch of the failed flush.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping

from imagepipe.durable.errors import LeaseLost
from imagepipe.durable.records import Settled, WriteBatch
from imagepipe.durable.store import Store

__all__ = ["SharedCommit"]

_Waiting = tuple[WriteBatch, "asyncio.Future[Mapping[str, Settled]]"]


class SharedCommit:
    """Coalesces the batches of many fenced writers into one transaction per flush."""

    def __init__(self, store: Store) -> None:
        self._store = store
        self._waiting: list[_Waiting] = []
        self._flush_task: asyncio.Task[None] | None = None
        #: flushes done, and batches they wrote (to see the coalescing at work)
        self.flushes = 0
        self.batches = 0

    async def apply(self, batch: WriteBatch) -> Mapping[str, Settled]:
        """Write ``batch`` with the next flush; return its lost settlements once durable."""
        done: asyncio.Future[Mapping[str, Settled]] = asyncio.get_running_loop().create_future()
        self._waiting.append((batch, done))
        if self._flush_task is None:
            # one loop turn later: the writes the same turn makes join this flush
            self._flush_task = asyncio.create_task(self._flush(), name="worker:commit")
        return await done

    async def _flush(self) -> None:
        waiting: list[_Waiting] = []
        try:
            await asyncio.sleep(0)
            while self._waiting:
                waiting, self._waiting = self._waiting, []
                try:
                    results = await self._store.apply_each([batch for batch, _ in waiting])
                except Exception as exc:
                    for _, done in waiting:
                        _fail(done, exc)
                    continue
                except BaseException:  # cancelled: whether this flush was written is unknown
                    self._waiting += waiting
                    raise
                self.flushes += 1
                self.batches += len(waiting)
                for (_, done), result in zip(waiting, results, strict=True):
                    if isinstance(result, LeaseLost):
                        _fail(done, result)
                    elif not done.done():
                        done.set_result(result)
        finally:
            self._flush_task = None
            if self._waiting:  # cancelled mid-flush: nobody will write these
                for _, done in self._waiting:
                    done.cancel()
                self._waiting = []


def _fail(done: asyncio.Future[Mapping[str, Settled]], exc: Exception) -> None:
    if not done.done():
        done.set_exception(exc)
        done.add_done_callback(_retrieved)


def _retrieved(future: asyncio.Future[Mapping[str, Settled]]) -> None:
    """Mark an exception as seen: its writer was told, or was cancelled meanwhile."""
    if not future.cancelled():
        future.exception()
