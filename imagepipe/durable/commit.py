"""Group commit: many writes, one ``COMMIT``, and nobody hears of a write before it.

Branches hand their writes (a new child, a started attempt, a settlement) to a
:class:`GroupCommit` and await it. The first write schedules one flush on the event loop;
every write made before that flush runs is applied in one batch (:meth:`Store.apply`)
and covered by one ``COMMIT``, and only then are the waiters released. So thousands of
branches that move in the same loop turn share one commit, and a result is still never
reported before it is on disk.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Mapping
from types import MappingProxyType
from typing import Any

from imagepipe.durable.store import (
    AttemptStart,
    ErrorInfo,
    NewPromise,
    PromiseState,
    Settled,
    Settlement,
    Store,
    WriteBatch,
    canonical_json,
)

__all__ = ["GroupCommit"]

_NOTHING_LOST: Mapping[str, Settled] = MappingProxyType({})


_JSON_SCALARS = frozenset({str, int, float, bool, type(None)})


def _read_back(value: Any, value_json: str | None) -> Any:
    """``value`` as a replay will read it from the store, so that a live run and a replay
    see the same thing. A flat dict of JSON scalars with string keys (most step results)
    reads back as an equal dict: copy it rather than decode the JSON again."""
    if type(value) is dict and all(
        type(k) is str and type(v) in _JSON_SCALARS for k, v in value.items()
    ):
        return dict(value)
    return None if value_json is None else json.loads(value_json)


class GroupCommit:
    def __init__(self, store: Store) -> None:
        self._store = store
        self._batch = WriteBatch()
        self._waiters: list[asyncio.Future[Mapping[str, Settled]]] = []
        self._scheduled = False

    def create(self, promise: NewPromise) -> None:
        """Create a child with the next flush. Nothing waits for it: the promise is
        applied before any attempt of it can start (see :class:`WriteBatch`)."""
        self._batch.creates.append(promise)
        self._schedule()

    def start_attempt(self, promise_id: str, attempt: int) -> asyncio.Future[Mapping[str, Settled]]:
        """Record that ``attempt`` started; await the result to know it is durable."""
        self._batch.starts.append(AttemptStart(attempt, promise_id))
        return self.durable()

    async def settle(
        self, promise_id: str, *, value: Any, error: ErrorInfo | None, attempts: int
    ) -> Settled:
        """Resolve with ``value`` (or reject with ``error``) after ``attempts`` attempts;
        return the outcome as stored, once durable. If the promise was settled before,
        that outcome stands."""
        value_json = None if value is None else canonical_json(value)
        state: PromiseState = "rejected" if error is not None else "resolved"
        error_json = None if error is None else error.to_json()
        self._batch.settlements.append(
            Settlement(state, value_json, error_json, time.time(), promise_id)
        )
        stored = (await self.durable()).get(promise_id)
        if stored is not None:  # settled before: that outcome stands
            return stored
        return Settled(state, _read_back(value, value_json), error, attempts)

    def durable(self) -> asyncio.Future[Mapping[str, Settled]]:
        """A future done once every write made so far is committed. Its result: the
        stored outcomes of the settlements in that commit that found their promise
        settled already, by promise id."""
        self._schedule()
        # One future per waiter (cheaper than shielding a shared one): a waiter that is
        # cancelled cancels only its own future, never the flush the others wait for.
        waiter: asyncio.Future[Mapping[str, Settled]] = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        return waiter

    def discard(self) -> None:
        """Drop writes not flushed yet (the run is being rolled back)."""
        self._batch = WriteBatch()

    def _schedule(self) -> None:
        if not self._scheduled:
            self._scheduled = True
            asyncio.get_running_loop().call_soon(self._flush_next_turn)

    def _flush_next_turn(self) -> None:
        # One more loop turn: the tasks this turn's writes woke (a freed concurrency slot
        # starting the next attempt) add their writes to the same commit (halves commits).
        asyncio.get_running_loop().call_soon(self._flush)

    def _flush(self) -> None:
        batch, self._batch = self._batch, WriteBatch()
        waiters, self._waiters = self._waiters, []
        self._scheduled = False
        try:
            lost = self._store.apply(batch) if batch else _NOTHING_LOST
            self._store.commit()
        except Exception as exc:
            for waiter in waiters:
                if not waiter.done():
                    waiter.set_exception(exc)
        else:
            for waiter in waiters:
                if not waiter.done():
                    waiter.set_result(lost)
