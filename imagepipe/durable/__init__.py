"""Durable promises on a store: the core of imagepipe. Knows nothing about images.

- :mod:`.store` — the promise model and the :class:`Store` protocol
- :mod:`.sqlite` — the SQLite store (WAL, numbered migrations)
- :mod:`.commit` — group commit: many writes, one ``COMMIT``, nothing reported early
- :mod:`.context` — :class:`RunContext` with ``begin_run(fn, *args)`` and replay
- :mod:`.slots` — the concurrency limit; a queued branch gets its task when a slot frees
- :mod:`.lease` — one process executes a run at a time; a dead one is taken over at once
- :mod:`.events` — what the core tells observers
"""

from imagepipe.durable.context import AttemptTimeout, Handle, RetryPolicy, RunContext, Step
from imagepipe.durable.events import (
    AttemptFailed,
    AttemptStarted,
    Event,
    PromiseQueued,
    PromiseRejectedEvent,
    PromiseReplayed,
    PromiseResolved,
)
from imagepipe.durable.sqlite import SQLiteStore
from imagepipe.durable.store import (
    AttemptRecord,
    ErrorInfo,
    Lease,
    PromiseRecord,
    PromiseState,
    Settled,
    Store,
)

__all__ = [
    "AttemptFailed",
    "AttemptRecord",
    "AttemptStarted",
    "AttemptTimeout",
    "ErrorInfo",
    "Event",
    "Handle",
    "Lease",
    "PromiseQueued",
    "PromiseRecord",
    "PromiseRejectedEvent",
    "PromiseReplayed",
    "PromiseResolved",
    "PromiseState",
    "RetryPolicy",
    "RunContext",
    "SQLiteStore",
    "Settled",
    "Step",
    "Store",
]
