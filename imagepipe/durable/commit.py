"""Group commit: many writes, one ``COMMIT``, and nobody hears of a write before it.

Each branch writes into the store's open transaction and then awaits :meth:`durable`.
The first waiter schedules one flush on the event loop; every write made before that
flush runs is covered by its ``COMMIT``, and only then are the waiters released. So
thousands of branches that settle in the same loop turn share one commit, and a result
is still never reported before it is on disk.
"""

from __future__ import annotations

import asyncio

from imagepipe.durable.store import Store

__all__ = ["GroupCommit"]


class GroupCommit:
    def __init__(self, store: Store) -> None:
        self._store = store
        self._waiters: list[asyncio.Future[None]] = []

    async def durable(self) -> None:
        """Return once every write made so far by this process is committed."""
        loop = asyncio.get_running_loop()
        if not self._waiters:
            loop.call_soon(self._flush)
        # One future per waiter (cheaper than shielding a shared one): a waiter that is
        # cancelled cancels only its own future, never the flush the others wait for.
        waiter = loop.create_future()
        self._waiters.append(waiter)
        await waiter

    def _flush(self) -> None:
        waiters, self._waiters = self._waiters, []
        try:
            self._store.commit()
        except Exception as exc:
            for waiter in waiters:
                if not waiter.done():
                    waiter.set_exception(exc)
        else:
            for waiter in waiters:
                if not waiter.done():
                    waiter.set_result(None)
