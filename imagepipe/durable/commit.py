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
        self._pending: asyncio.Future[None] | None = None
        self.commits = 0

    async def durable(self) -> None:
        """Return once every write made so far by this process is committed."""
        if self._pending is None:
            loop = asyncio.get_running_loop()
            self._pending = loop.create_future()
            loop.call_soon(self._flush)
        # shield: one waiter being cancelled must not cancel the flush for the others.
        await asyncio.shield(self._pending)

    def _flush(self) -> None:
        pending, self._pending = self._pending, None
        assert pending is not None
        try:
            self._store.commit()
        except Exception as exc:
            pending.set_exception(exc)
            # Retrieve it here so an abandoned flush does not warn "never retrieved".
            pending.exception()
        else:
            self.commits += 1
            pending.set_result(None)
