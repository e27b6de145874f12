"""The concurrency limit: at most ``limit`` attempts in flight, first come, first served.

Like :class:`asyncio.Semaphore`, except that a waiter can be a plain callback. A branch
that has not started yet waits as a callback that creates its task, so a run of 10,000
branches at a limit of 16 holds 16 tasks and a queue, not 10,000 suspended tasks (each
costs memory and a wake-up, measured at ~4 µs a branch). A branch that waits to retry
waits as a future, as it would on a semaphore.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable

__all__ = ["Slots"]


class Slots:
    def __init__(self, limit: int | None) -> None:
        self._limit = limit
        self._taken = 0
        #: who gets the next free slot; each returns False to refuse it (it was cancelled)
        self._waiting: deque[Callable[[], bool]] = deque()

    def try_take(self) -> bool:
        """Take a slot if one is free and nobody is waiting for it."""
        if self._limit is None:
            return True
        if self._taken < self._limit and not self._waiting:
            self._taken += 1
            return True
        return False

    def when_free(self, start: Callable[[], bool]) -> None:
        """Call ``start`` when a slot is handed to it (after the waiters before it)."""
        self._waiting.append(start)

    async def take(self) -> None:
        """Wait for a slot."""
        if self.try_take():
            return
        granted: asyncio.Future[None] = asyncio.get_running_loop().create_future()

        def hand_over() -> bool:
            if granted.done():  # cancelled while it waited
                return False
            granted.set_result(None)
            return True

        self._waiting.append(hand_over)
        try:
            await granted
        except asyncio.CancelledError:
            if granted.done() and not granted.cancelled():
                self.give_back()  # handed a slot, then cancelled before using it
            raise

    def give_back(self) -> None:
        """Free a slot: it goes to the first waiter that takes it."""
        if self._limit is None:
            return
        while self._waiting:
            if self._waiting.popleft()():
                return
        self._taken -= 1

    def forget_waiters(self) -> int:
        """Drop every waiter (the run is being cancelled); return how many there were."""
        count = len(self._waiting)
        self._waiting.clear()
        return count
