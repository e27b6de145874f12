"""What the parts of one executing run share: :class:`RunState` and its :class:`Replay`.

A :class:`~.context.RunContext` makes one and hands it to the parts that run the branches
(:class:`~.lanes.Lanes`, the handles and sub-steps of :mod:`.steps`): the store and the
group commit its writes go through, the invocation's dependencies, the listener, the run's
stops (the first store failure, the lease lost), and the replay's progress. They read it,
and nothing of the context's own.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Generic, TypeVar

from imagepipe.durable.commit import GroupCommit
from imagepipe.durable.errors import DurableError, NonDeterminism
from imagepipe.durable.events import Event
from imagepipe.durable.lease import DEFAULT_STALE_AFTER
from imagepipe.durable.retry import RetryPolicy

if TYPE_CHECKING:
    from imagepipe.durable.lease import LeaseKeeper
    from imagepipe.durable.store import Store

__all__ = ["Execution", "Replay", "RunState"]

D = TypeVar("D")


@dataclass(frozen=True)
class Execution:
    """How this process executes a run's branches (not the run's identity: it may differ
    from one invocation to the next)."""

    retry: RetryPolicy = field(default_factory=RetryPolicy)
    #: how many branches run at once (None: no limit)
    concurrency: int | None = None
    attempt_timeout: float | None = None
    #: a lease not renewed for this long may be taken over
    lease_timeout: float = DEFAULT_STALE_AFTER
    #: told of every branch's progress (None: events are not even built)
    on_event: Callable[[Event], None] | None = None
    #: the worst case an attempt of ``func(**kwargs)`` may cost on each meter of the run's
    #: spending caps (see :class:`~.store.SpendingStore`), reserved before it starts; None
    #: or empty: nothing to reserve
    cost_of_attempt: Callable[[str, Mapping[str, Any]], Mapping[str, int]] | None = None


def _nobody_listens(event: Event) -> None:
    pass


class Replay:
    """How far the workflow has launched the children the store holds: until it has
    launched every one of them again, nothing is written and no result may be awaited."""

    def __init__(self, run_id: str) -> None:
        self.run_id = run_id
        #: the seq the next ``begin_run`` gets
        self.next_seq = 0
        #: how many children the store held when the run was loaded
        self.stored = 0

    @property
    def checked(self) -> bool:
        """True once every stored child has been launched again (writes may flow)."""
        return self.next_seq >= self.stored

    def check(self) -> None:
        """Raise :class:`~.errors.NonDeterminism` unless the replay is checked."""
        if not self.checked:
            raise NonDeterminism(
                f"replay mismatch at {self.run_id}.{self.next_seq}: the store has "
                f"{self.stored} children but the code launched {self.next_seq} "
                "before it waited for a result"
            )


class RunState(Generic[D]):
    """The state one executing run shares between its context, lanes, handles and steps."""

    def __init__(
        self,
        store: Store,
        run_id: str,
        deps: D,
        commit: GroupCommit,
        *,
        lease: LeaseKeeper | None,
        on_event: Callable[[Event], None] | None,
    ) -> None:
        self.store = store
        self.run_id = run_id
        self.deps = deps
        #: every write of the run goes through it (one transaction per flush)
        self.commit = commit
        self.lease = lease
        #: tells the listener; a no-op when nobody listens
        self.emit: Callable[[Event], None] = on_event or _nobody_listens
        #: False when nobody listens: then events are not even built (hot path at scale)
        self.listening = on_event is not None
        self.replay = Replay(run_id)
        #: set to the first failure that stops the run (a store failure, ...)
        self.fatal: asyncio.Future[DurableError] = asyncio.get_running_loop().create_future()

    def fail_fast(self, exc: DurableError) -> None:
        """Stop the run: the first failure that cannot be recorded wins."""
        if not self.fatal.done():
            self.fatal.set_result(exc)

    def stops(self) -> list[asyncio.Future[Any]]:
        """What ends a wait for the branches: a store failure, the lease lost."""
        stops: list[asyncio.Future[Any]] = [self.fatal]
        if self.lease is not None:
            stops.append(self.lease.lost)
        return stops

    def raise_if_stopped(self) -> None:
        """Raise what stopped the run, if anything did: the lease lost first."""
        if self.lease is not None and self.lease.lost.done():
            raise self.lease.lost.result()
        if self.fatal.done():
            raise self.fatal.result()
