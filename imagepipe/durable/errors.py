"""The durable core's own errors. They carry no exit codes and no command-line words:
the application that embeds the core decides how each is shown and what it means.

- :class:`DurableError` — the base of every error raised by :mod:`imagepipe.durable`
- :class:`StoreError` and subclasses — the store failed or cannot be used
- :class:`LeaseHeld` / :class:`LeaseLost` — another owner executes, or took over
- :class:`NonDeterminism` — replay asked for other work than the store holds
- :class:`PromiseRejected` — awaiting a promise that was rejected
- :class:`StopRun` — raised by a step: the run cannot go on, the branch stays pending
- :class:`DrainRun` — raised by a step: as :class:`StopRun`, once the attempts in flight end
"""

from __future__ import annotations

from typing import Protocol

__all__ = [
    "DrainRun",
    "DurableError",
    "LeaseHeld",
    "LeaseLost",
    "NonDeterminism",
    "PromiseRejected",
    "SpendingCapReached",
    "StopRun",
    "StoreBusy",
    "StoreConflict",
    "StoreCorrupt",
    "StoreError",
    "StoreFull",
    "StoreMissing",
    "StoreNewer",
    "StoreReadOnly",
    "StoreUnreachable",
    "StoreUnusable",
    "StoreWriteFailed",
]


class Holder(Protocol):
    """Who holds a lease, as an error names it (a :class:`~.records.Lease`): the errors
    import nothing of the records, which raise them."""

    @property
    def pid(self) -> int: ...

    @property
    def host(self) -> str: ...


class StoredError(Protocol):
    """An error as the store keeps it (a :class:`~.records.ErrorInfo`)."""

    @property
    def type(self) -> str: ...

    @property
    def message(self) -> str: ...


class DurableError(Exception):
    """Base of every error the durable core raises. ``str()`` is one line."""


class StoreError(DurableError):
    """The store failed while reading or writing. ``where`` names the store."""

    def __init__(self, where: str, detail: str) -> None:
        super().__init__(f"the store {where} {detail}")
        self.where = where
        self.detail = detail


class StoreBusy(StoreError):
    """Another process held the store's write lock for longer than the busy timeout."""


class StoreReadOnly(StoreError):
    """The store cannot be written (permissions, read-only file system)."""


class StoreFull(StoreError):
    """The disk is full: the write did not happen."""


class StoreWriteFailed(StoreError):
    """The operating system refused a write (an I/O error: a quota, a file-size limit, a
    failing disk): the write did not happen."""


class StoreUnreachable(StoreError):
    """The store's server cannot be reached: it went away mid-use (a restart, a lost
    network, a terminated session) and did not come back within the time the store rides
    such an outage out. Nothing is lost; trying again once it is back may work."""


class StoreCorrupt(StoreError):
    """The store's file or one of its rows cannot be decoded."""


class StoreNewer(StoreError):
    """The store was written by a newer version with a schema this code does not know."""

    def __init__(self, where: str, found: int, known: int) -> None:
        super().__init__(where, f"has schema version {found}, newer than this code knows ({known})")
        self.found = found
        self.known = known


class StoreUnusable(StoreError):
    """The location cannot hold a store: a directory, another program's database, ..."""


class StoreMissing(StoreUnusable):
    """The store does not exist and was not to be created."""


class StoreConflict(StoreError):
    """A batch would create a promise that exists or start or settle one that is not
    pending: another writer got there first. The whole batch was rolled back."""


class LeaseHeld(DurableError):
    """A live owner holds the lease on this key."""

    def __init__(self, key: str, holder: Holder) -> None:
        super().__init__(f"{key} is held by process {holder.pid} on {holder.host}")
        self.key = key
        self.holder = holder


class LeaseLost(DurableError):
    """This owner's lease was taken over (it went silent for too long): its writes are
    refused by fencing, and it must stop."""

    def __init__(self, key: str, epoch: int) -> None:
        super().__init__(f"the lease on {key} (epoch {epoch}) was taken over by another owner")
        self.key = key
        self.epoch = epoch


class NonDeterminism(DurableError):
    """Replay produced other calls than the ones in the store."""


class PromiseRejected(DurableError):
    """Awaiting a promise that was rejected; ``error`` is the stored error."""

    def __init__(self, promise_id: str, error: StoredError) -> None:
        super().__init__(f"{promise_id} rejected: {error.type}: {error.message}")
        self.promise_id = promise_id
        self.error = error


class StopRun(DurableError):
    """Raised by a step function: the run cannot go on in this process (its results cannot
    be kept, say), so it stops as it does when the store fails. The step's attempt is not
    recorded as a failure and uses up no retry: the branch stays pending, for a later
    ``resume`` once the cause is fixed. ``__cause__`` holds what the step met."""


class DrainRun(StopRun):
    """Raised by a step function: the run cannot go on, for a reason that every attempt
    would meet alike (a refused key, say), but the attempts already in flight may still
    succeed and are worth their result. So the run stops once they have ended: no attempt
    starts from now on (no queued branch, no retry), the attempts in flight end and are
    recorded as usual, then the run stops with this error. As with :class:`StopRun`, the
    step's attempt is not recorded as a failure and the branch stays pending, for a later
    ``resume`` once the cause is fixed. ``__cause__`` holds what the step met."""


class SpendingCapReached(DrainRun):
    """An attempt's worst-case cost does not fit in what is left of one of the run's
    spending caps (on ``meter``): it does not start, and neither does any other; the
    attempts in flight end and are recorded, then the run stops, the rest left pending
    (raise the cap, then resume)."""

    def __init__(self, run_id: str, meter: str, spent: int, cap: int, needed: int) -> None:
        super().__init__(f"run {run_id!r} has spent {spent} {meter} of its cap of {cap}")
        self.run_id = run_id
        self.meter = meter
        self.spent = spent
        self.cap = cap
        self.needed = needed
