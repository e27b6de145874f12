"""Durable promises on a store: the core of imagepipe, a library that knows nothing of
images, screens or exit codes, and imports nothing else from imagepipe.

- :mod:`.store` — the async :class:`Store` interface
- :mod:`.opening` — :func:`open_store`: the backend a URL names
- :mod:`.sqlite` — the SQLite backend (WAL, numbered migrations in :mod:`.sqlite_schema`)
- :mod:`.records` — promises, errors as stored, write batches, fences; arguments by name
- :mod:`.commit` — group commit: many writes, one transaction, nothing reported early
- :mod:`.context` — :class:`RunContext` with ``begin_run(fn, **kwargs)`` and replay
- :mod:`.steps` — handles, steps and durable sub-steps (``await step.run(fn, **kwargs)``)
- :mod:`.retry` — the retry policy as data, run by tenacity
- :mod:`.lanes` — the tasks that run branches, each a chain of them; settlements complete
  by a callback on their batch
- :mod:`.slots` — the concurrency limit; a queued branch is run next by the task whose
  slot it is handed
- :mod:`.lease` — one owner executes a run at a time, fenced by an epoch
- :mod:`.events` — what the core tells observers
- :mod:`.errors` — the core's own errors
- :mod:`.guard` — a driver's errors in a store method become the core's store errors
- :mod:`.secrets` — store URLs and driver messages without their passwords
"""

from imagepipe.durable.context import AttemptTimeout, RunContext
from imagepipe.durable.errors import (
    DurableError,
    LeaseHeld,
    LeaseLost,
    NonDeterminism,
    PromiseRejected,
    StopRun,
    StoreBusy,
    StoreConflict,
    StoreCorrupt,
    StoreError,
    StoreFull,
    StoreMissing,
    StoreNewer,
    StoreReadOnly,
    StoreUnreachable,
    StoreUnusable,
    StoreWriteFailed,
)
from imagepipe.durable.events import (
    AttemptFailed,
    AttemptStarted,
    Event,
    PromiseQueued,
    PromiseRejectedEvent,
    PromiseReplayed,
    PromiseResolved,
)
from imagepipe.durable.lease import DEFAULT_STALE_AFTER, LeaseKeeper
from imagepipe.durable.opening import open_store
from imagepipe.durable.records import (
    AttemptRecord,
    ChildColumns,
    ErrorInfo,
    Lease,
    NewPromise,
    PromiseRecord,
    PromiseState,
    RootRecord,
    Settled,
    WriteBatch,
    bind_args,
    encode_args,
)
from imagepipe.durable.retry import RetryPolicy
from imagepipe.durable.steps import Handle, Step
from imagepipe.durable.store import Store, StoreOptions

__all__ = [
    "DEFAULT_STALE_AFTER",
    "AttemptFailed",
    "AttemptRecord",
    "AttemptStarted",
    "AttemptTimeout",
    "ChildColumns",
    "DurableError",
    "ErrorInfo",
    "Event",
    "Handle",
    "Lease",
    "LeaseHeld",
    "LeaseKeeper",
    "LeaseLost",
    "NewPromise",
    "NonDeterminism",
    "PromiseQueued",
    "PromiseRecord",
    "PromiseRejected",
    "PromiseRejectedEvent",
    "PromiseReplayed",
    "PromiseResolved",
    "PromiseState",
    "RetryPolicy",
    "RootRecord",
    "RunContext",
    "Settled",
    "Step",
    "StopRun",
    "Store",
    "StoreBusy",
    "StoreConflict",
    "StoreCorrupt",
    "StoreError",
    "StoreFull",
    "StoreMissing",
    "StoreNewer",
    "StoreOptions",
    "StoreReadOnly",
    "StoreUnreachable",
    "StoreUnusable",
    "StoreWriteFailed",
    "WriteBatch",
    "bind_args",
    "encode_args",
    "open_store",
]
