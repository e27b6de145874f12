"""The concurrency limit: at most ``limit`` attempts in flight, first come, first served.

Like :class:`asyncio.Semaphore`, except that a waiter can be a plain queued item rather
than a suspended task. A branch that has not started yet waits as an item: when a slot is
handed to it, either the branch that gave the slot back runs it next in its own task
(:meth:`Slots.pass_on`, the common path: a run of 10,000 branches at a limit of 16 holds
16 tasks and a queue), or it is started with the ``start`` callback (:meth:`Slots.give_back`).
A branch that waits to retry waits as a future (:meth:`Slots.take`), as it would on a
semaphore. Once closed (:meth:`Slots.close`: the run drains), no slot is handed out.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable
from typing import Generic, TypeVar

__all__ = ["Slots"]

Q = TypeVar("Q")


class _Grant:
    """A task waiting in :meth:`Slots.take`; its future is done when it gets a slot (or is
    cancelled if the task stopped waiting)."""

    __slots__ = ("future",)

    def __init__(self, future: asyncio.Future[None]) -> None:
        self.future = future


class Slots(Generic[Q]):
    """The slots of one run; ``start(item)`` starts a queued item handed a slot that nobody
    runs next in their own task."""

    def __init__(self, limit: int | None, start: Callable[[Q], None]) -> None:
        self._limit = limit
        self._start = start
        self._taken = 0
        #: no slot is handed out any more (see :meth:`close`)
        self._closed = False
        #: who gets the next free slot: a queued item, or a waiting task's grant
        self._waiting: deque[Q | _Grant] = deque()

    def try_take(self) -> bool:
        """Take a slot if one is free and nobody is waiting for it."""
        if self._closed:
            return False
        if self._limit is None:
            return True
        if self._taken < self._limit and not self._waiting:
            self._taken += 1
            return True
        return False

    def queue(self, item: Q) -> None:
        """Queue ``item`` for a slot (after the waiters before it)."""
        self._waiting.append(item)

    async def take(self) -> None:
        """Wait for a slot."""
        if self.try_take():
            return
        granted: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiting.append(_Grant(granted))
        try:
            await granted
        except asyncio.CancelledError:
            if granted.done() and not granted.cancelled():
                self.give_back()  # handed a slot, then cancelled before using it
            raise

    def pass_on(self) -> Q | None:
        """Free a slot, unless the first waiter is a queued item: then the slot stays taken
        and the item is returned, for the caller to run next in its own task."""
        if self._limit is None or self._closed:
            return None
        while self._waiting:
            waiter = self._waiting.popleft()
            if not isinstance(waiter, _Grant):
                return waiter
            if not waiter.future.done():  # done: cancelled while it waited
                waiter.future.set_result(None)
                return None
        self._taken -= 1
        return None

    def give_back(self) -> None:
        """Free a slot: it goes to the first waiter (a queued item is started with
        ``start``)."""
        item = self.pass_on()
        if item is not None:
            self._start(item)

    def close(self) -> None:
        """Hand out no slot from now on: the queued items and the waiting tasks wait until
        they are forgotten (:meth:`forget_waiters`) or cancelled."""
        self._closed = True

    def forget_waiters(self) -> list[Q]:
        """Drop every waiter (the run is being cancelled); return the queued items."""
        items = [waiter for waiter in self._waiting if not isinstance(waiter, _Grant)]
        self._waiting.clear()
        return items
