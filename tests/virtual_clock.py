"""An asyncio event loop on a virtual clock, for tests of waits that must hold on any machine.

:func:`run` runs a coroutine on a :class:`VirtualClockLoop`: ``loop.time()`` starts at 0 and
moves only when every task waits, straight to the next timer, and by a microsecond
(:data:`TICK`) each time the loop goes round. A test then sees the times its code asked for
(``asyncio.sleep``, ``call_at``, aiolimiter) to within microseconds, the same on every run
however busy the machine is. Only for code that waits on timers, not on I/O or other
threads: a loop with nothing scheduled at all raises instead of waiting for ever.
"""

from __future__ import annotations

import asyncio
import selectors
from collections.abc import Coroutine
from typing import Any, TypeVar

__all__ = ["VirtualClockLoop", "run"]

T = TypeVar("T")

#: the least each turn of the loop moves the clock (seconds)
TICK = 1e-6


class _Clock:
    def __init__(self) -> None:
        self.now = 0.0


class _Selector(selectors.DefaultSelector):
    """Never blocks: when nothing is ready, the clock jumps by the timeout the loop asked
    to wait (the time until its next timer)."""

    def __init__(self, clock: _Clock) -> None:
        super().__init__()
        self._clock = clock

    def select(self, timeout: float | None = None) -> list[tuple[selectors.SelectorKey, int]]:
        ready = super().select(0)
        if not ready:
            if timeout is None:
                raise RuntimeError("the virtual clock's loop has nothing scheduled: a deadlock")
            # At least a microsecond each time round, as on a real clock: a timer set a
            # rounding error ahead (aiolimiter's can be) then comes due.
            self._clock.now += max(timeout, TICK)
        return ready


class VirtualClockLoop(asyncio.SelectorEventLoop):
    def __init__(self) -> None:
        self._clock = _Clock()
        super().__init__(_Selector(self._clock))

    def time(self) -> float:
        return self._clock.now


def run(coro: Coroutine[Any, Any, T]) -> T:
    """Run ``coro`` to the end on a fresh :class:`VirtualClockLoop`."""
    loop = VirtualClockLoop()
    try:
        return loop.run_until_complete(coro)
    finally:
        loop.close()
