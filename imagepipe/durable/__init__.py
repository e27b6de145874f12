"""Durable promises on a store: the core of imagepipe, a library that knows nothing of
images, screens or exit codes, and imports nothing else from imagepipe.

What an app needs is exported here; events are in :mod:`.events`, every error in
:mod:`.errors`, and the stored shapes and write records stay inside the core.

- :mod:`.lifecycle` — a run's lifecycle: :class:`Workflow`, :func:`record_run`,
  :func:`execute_run` (the lease, the replay check, the root's settlement, the clean-up)
- :mod:`.worker` — workers that share the branches of detached runs
- :mod:`.store` — the async :class:`Store` interface
- :mod:`.opening` — :func:`open_store`: the backend a URL names
- :mod:`.sqlite` — the SQLite backend (WAL, numbered migrations in :mod:`.sqlite_schema`)
- :mod:`.records` — promises, errors as stored, write batches, fences; arguments by name
- :mod:`.commit` — group commit: many writes, one transaction, nothing reported early
- :mod:`.context` — :class:`RunContext` with ``begin_run(fn, **kwargs)`` and replay;
  ``promise(fn, **kwargs)`` for a child settled from outside (``settle``), attempts started
  many at once with their reservations (``start_attempts``), and the run's own durable
  steps and notes (``step``, ``note``)
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
    StoreConflict,
    StoreError,
    StoreMissing,
)
from imagepipe.durable.lifecycle import (
    BranchOutcome,
    Executed,
    Workflow,
    execute_run,
    record_run,
)
from imagepipe.durable.opening import open_store
from imagepipe.durable.records import ErrorInfo, PromiseRecord, bind_args
from imagepipe.durable.retry import RetryPolicy
from imagepipe.durable.run_state import Execution
from imagepipe.durable.steps import Handle, Step
from imagepipe.durable.store import Store, StoreOptions

__all__ = [  # noqa: RUF022 (grouped by what they are for)
    # a run's lifecycle
    "Workflow", "Execution", "Executed", "BranchOutcome", "record_run", "execute_run",
    # inside a run
    "RunContext", "Handle", "Step", "RetryPolicy", "AttemptTimeout",
    # the store, and what it holds
    "Store", "StoreOptions", "open_store", "PromiseRecord", "ErrorInfo", "bind_args",
    # errors an app tells apart (every one is in .errors)
    "DurableError", "StoreError", "StoreMissing", "StoreConflict", "LeaseHeld", "LeaseLost",
    "NonDeterminism", "PromiseRejected", "StopRun",
]  # fmt: skip
