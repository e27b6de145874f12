"""The storage interface every backend implements, split by concern, and its options.

- :class:`Promises` — the one write path (:meth:`Promises.apply`), reading promises back,
  and the leases that fence the writes
- :class:`Queue` — the branches of detached runs, as workers claim them
- :class:`Reports` — runs, a run's branches as rows, failed attempts
- :class:`SpendingStore` — a run's spending caps, and the reservations of its attempts
- :class:`Store` — all four: what the engine and the commands hold

A store is opened from a URL (:func:`~.opening.open_store`): ``sqlite:///path/to/file.db``
(or a plain path) for the embedded SQLite backend, ``postgresql://user@host/dbname`` (or
``postgres://``) for a PostgreSQL database that several machines share. Both are written
over one SQL layer (:mod:`.sql`). Every method is ``async``; a backend that does its short
work synchronously (SQLite) may still do so inside them.

Writes have one path, :meth:`Promises.apply`: a :class:`~.records.WriteBatch` is one
transaction, committed before ``apply`` returns, and fenced by the epoch of the lease it
was made under. Leases are the only other writes, each its own transaction too.
"""

from __future__ import annotations

import asyncio
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from imagepipe.durable.errors import LeaseLost
from imagepipe.durable.records import (
    AttemptRecord,
    ChildRows,
    Fence,
    Lease,
    PromiseRecord,
    RootRecord,
    Settled,
    Spending,
    WriteBatch,
)

__all__ = [
    "DETACHED",
    "Claim",
    "Promises",
    "Queue",
    "Reports",
    "SpendingStore",
    "Store",
    "StoreOptions",
]

#: The root option that puts a run's branches on the queue that workers claim from:
#: ``options[DETACHED] is True`` on a pending root promise.
DETACHED = "detached"


@dataclass(frozen=True, slots=True)
class Claim:
    """A branch a worker claimed: its record as stored, and the fence of its lease (the
    lease's key is the branch's id). Every write of the branch carries ``fence``."""

    record: PromiseRecord
    fence: Fence


@dataclass(frozen=True)
class StoreOptions:
    """How to open a store.

    - ``create``: create the store if it does not exist (else :class:`~.errors.StoreMissing`)
    - ``verify``: check the store's integrity before writing to it
    - ``busy_timeout``: seconds to wait for another writer's lock
    - ``reconnect``: seconds a store on a server (PostgreSQL) rides out a lost connection,
      waiting for the server to come back, before it gives up with
      :class:`~.errors.StoreUnreachable`
    - ``stalled_after``: seconds a session of a store on a server (PostgreSQL) may sit idle
      inside a transaction before the server ends it, releasing its locks: a process paused
      in the middle of one (SIGSTOP, a suspended machine) must not hold the rows, and so
      the run, past the time after which its lease may be taken over (None: no limit)
    """

    create: bool = True
    verify: bool = False
    busy_timeout: float = 5.0
    reconnect: float = 30.0
    stalled_after: float | None = None


class SpendingStore(ABC):
    """A run's spending caps, held by the store so that they hold across processes and
    machines. Spending is counted per meter, in the app's units (micro-dollars, images): an
    attempt that may cost something reserves its worst case on each meter before it starts,
    in the transaction that records its start, and every cap of the run is checked there.
    Until the attempt's actual cost replaces it, the reservation counts as spent."""

    @abstractmethod
    async def set_spending_limit(self, run_id: str, meter: str, limit: int | None) -> None:
        """Set (raise, lower, or lift with None) what run ``run_id`` may spend on ``meter``."""

    @abstractmethod
    async def spending(self, run_id: str) -> dict[str, Spending]:
        """What the run may spend and has spent, by meter (only meters capped or used)."""

    @abstractmethod
    async def attempt_costs(self, run_id: str, meter: str) -> dict[tuple[str, int], int | None]:
        """What each reserved attempt of the run's branches cost on ``meter``, by (branch
        id, attempt): its actual cost once known, else None (its reservation counted)."""

    @abstractmethod
    async def reserve_attempt(
        self,
        fence: Fence | None,
        run_id: str,
        promise_id: str,
        attempt: int,
        units: Mapping[str, int],
    ) -> tuple[str, Spending] | None:
        """Start attempt ``attempt`` of pending promise ``promise_id`` (a branch of run
        ``run_id``) with ``units`` reserved on each meter, in one transaction fenced by
        ``fence``. None when done (or done before: a call repeated after a lost connection
        reserves nothing twice); else the first meter whose cap ``units`` do not fit, with
        its spending, and nothing is written."""

    @abstractmethod
    async def reserve_attempts(
        self,
        fence: Fence | None,
        run_id: str,
        attempts: Sequence[tuple[str, int, Mapping[str, int]]],
    ) -> tuple[str, Spending] | None:
        """:meth:`reserve_attempt` for many promises at once, all or nothing: for each
        (promise id, attempt, units), start that attempt with ``units`` reserved on each
        meter, in one transaction, every cap checked against their sum (a promise started
        at that attempt before is left as it is, its reservation made then).
        How a group of requests that are paid together (a provider's batch) is reserved
        before it is sent."""

    @abstractmethod
    async def settle_cost(
        self,
        fence: Fence | None,
        run_id: str,
        promise_id: str,
        attempt: int,
        cost: Mapping[str, int],
    ) -> None:
        """What attempt ``attempt`` of ``promise_id`` actually cost on each meter replaces
        its reservation there (once: a repeated call changes nothing)."""

    @abstractmethod
    async def settle_costs(
        self,
        fence: Fence | None,
        run_id: str,
        costs: Sequence[tuple[str, int, Mapping[str, int]]],
    ) -> None:
        """:meth:`settle_cost` of many (promise id, attempt, cost) in one transaction."""


class Promises(ABC):
    """Durable promises and the leases that fence their writes. ``where`` names the store
    in messages (no secrets)."""

    where: str

    # -- the one write path ------------------------------------------------------------

    @abstractmethod
    async def apply(self, batch: WriteBatch) -> Mapping[str, Settled]:
        """Apply ``batch`` in one transaction and commit it.

        Returns, by promise id, the stored outcome of each settlement that did not take
        effect because the promise was settled before: that outcome stands (the first
        settle wins). Raises :class:`~.errors.LeaseLost` if the batch's fence is stale and
        :class:`~.errors.StoreConflict` if it would create an existing promise or start or
        settle one that is not pending; either way nothing of the batch is written."""

    @abstractmethod
    async def apply_each(
        self, batches: Sequence[WriteBatch]
    ) -> list[Mapping[str, Settled] | LeaseLost]:
        """Apply several batches, each under its own fence, in ONE transaction: how a
        worker's branches share a commit. One entry per batch, in order.

        A batch whose fence is stale is left out, and its entry is the
        :class:`~.errors.LeaseLost`; every other batch is written as :meth:`apply` writes it,
        and its entry is its settlements that lost to an earlier one. A batch that settles
        the promise its fence is named after (a claimed branch) also ends that lease in the
        same transaction (no owner, the epoch kept). A conflict in any batch
        (:class:`~.errors.StoreConflict`) refuses them all."""

    @abstractmethod
    async def get(self, promise_id: str) -> PromiseRecord | None: ...

    @abstractmethod
    async def children(self, parent_id: str) -> list[PromiseRecord]:
        """The children of a promise in launch order."""

    @abstractmethod
    async def notes(self, run_id: str) -> dict[str, Any]:
        """The notes of run ``run_id`` by key (``WriteBatch.notes`` writes them)."""

    # -- leases --------------------------------------------------------------------------

    @abstractmethod
    async def acquire_lease(
        self, claim: Lease, *, stale_after: float, holder_gone: Callable[[Lease], bool]
    ) -> Lease:
        """Take the lease on ``claim.key`` with the next epoch, and return it.

        A holder whose heartbeat is younger than ``stale_after`` seconds by the store's
        clock keeps it, unless ``holder_gone(holder)`` says it is gone (a dead pid on this
        host): then :class:`~.errors.LeaseHeld`."""

    @abstractmethod
    async def lease_holder(self, key: str) -> Lease | None:
        """The current holder of ``key``, with its age by the store's clock; None if free."""

    @abstractmethod
    async def renew_lease(self, lease: Lease) -> None:
        """Renew the heartbeat; :class:`~.errors.LeaseLost` if the epoch moved on."""

    @abstractmethod
    async def release_lease(self, lease: Lease) -> None:
        """Give the lease up (its epoch stays, so the next holder's is higher)."""

    #: whether :meth:`wait_for_progress` returns as soon as another process writes
    notifies: bool = False

    async def wait_for_progress(self, run_id: str, at_most: float) -> None:
        """Return once promises of ``run_id`` may have changed, at the latest after
        ``at_most`` seconds. This base polls (it waits all of it); a backend that
        can be told of other processes' writes (PostgreSQL: LISTEN/NOTIFY) returns early."""
        await asyncio.sleep(at_most)

    @abstractmethod
    async def close(self) -> None: ...


class Queue(ABC):
    """The workers' queue: the branches of detached runs, claimed under leases."""

    @abstractmethod
    async def claim(
        self, worker: Lease, *, limit: int, stale_after: float, run_id: str | None = None
    ) -> list[Claim]:
        """Claim up to ``limit`` branches for ``worker`` (its owner, pid and host), in one
        transaction, oldest run first and in launch order; with ``run_id``, only branches
        of that run (a ``resume`` of a detached run takes part as a worker of it alone).

        A branch is claimable when it is pending, a child of a pending root whose options
        hold ``DETACHED: true``, the root's own lease (a run executed in one process) is not
        live, and no lease on the branch's id is live: held and renewed less than
        ``stale_after`` seconds ago by the store's clock. Each claim takes the lease on the
        branch's id with the next epoch (as :meth:`Promises.acquire_lease` does).
        Concurrent callers never get the same branch (SQLite: ``BEGIN IMMEDIATE``;
        PostgreSQL: ``SELECT ... FOR UPDATE SKIP LOCKED``)."""

    @abstractmethod
    async def renew_claims(self, worker: Lease, fences: Sequence[Fence]) -> list[Fence]:
        """Renew the heartbeat of each of ``worker``'s leases in ``fences`` (one
        transaction); return those that were taken over: their epoch moved on or another
        owner holds them, so that branch's writes are refused. A lease that ended with the
        epoch of its fence (its branch's settlement ended it, or it was released) is not
        renewed and not returned: nobody took it, and a renewal that runs between a
        settlement's commit and its announcement must not call the branch lost."""

    @abstractmethod
    async def any_pending(self, parent_id: str) -> bool:
        """Whether a child of ``parent_id`` is still pending: whether a run's last branch
        has settled, answered from an index of pending children (nothing is counted, so
        asking after every settlement of a large run stays cheap)."""

    @abstractmethod
    async def held_leases(self, prefix: str = "") -> list[Lease]:
        """Every held lease whose key starts with ``prefix``, with its age by the store's
        clock, ordered by key (``imagepipe workers``)."""

    @abstractmethod
    async def forget_leases(self, prefix: str, *, older_than: float) -> int:
        """Delete the lease rows whose key starts with ``prefix`` (not empty) that nobody
        holds, or whose heartbeat is older than ``older_than`` seconds by the store's
        clock, in one statement; return how many. Only for keys that no write is fenced
        by and that are never taken again (a worker's presence, ``worker:<id>``): a
        branch's or a run's row keeps its epoch for ever, so that fencing holds."""


class Reports(ABC):
    """What reports read: runs, a run's branches as rows, failed attempts."""

    @abstractmethod
    def child_rows(self, parent_id: str) -> AsyncIterator[ChildRows]:
        """The children of a promise in launch order, a chunk of rows at a time (read
        with ``fetchmany``; each chunk iterates as :class:`~.records.ChildRow` records):
        what a report of a whole run reads, never every row at once.
        :meth:`~.records.ChildColumns.collect` gathers them for a report."""

    @abstractmethod
    async def roots(self, limit: int | None = None) -> list[RootRecord]:
        """Root promises (runs), newest first, with their children's counts by state;
        their values are not read."""

    @abstractmethod
    async def failed_attempts(self, parent_id: str) -> list[AttemptRecord]:
        """Every failed attempt of ``parent_id`` and of its children, in launch order."""


class Store(Promises, Queue, Reports, SpendingStore):
    """A store: promises and leases, the workers' queue, reports, and runs' spending, in
    one database."""
