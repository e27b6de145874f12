"""The run context: ``begin_run(fn, **kwargs)`` turns a call into a durable child promise.

A workflow is an ordinary ``async def`` that receives a :class:`RunContext`. Every
``begin_run`` gets the next deterministic id ``<run>.<n>``, hands the promise to the group
commit (or finds it in the store), and returns a :class:`Handle` at once, so a loop can
fan out before anything has finished. Awaiting a handle gives the value or raises
:class:`~.errors.PromiseRejected`. The branches run in a few long-lived tasks, each a chain
of branches under the concurrency limit (see :mod:`.lanes`). Inside a child,
``await step.run(fn, **kwargs)`` is a durable sub-step ``<child>.<n>`` (see :mod:`.steps`).

A workflow may also hold a child without running it: ``ctx.promise(fn, **kwargs)`` creates
(or finds) it as ``begin_run`` does, and the app settles it with :meth:`RunContext.settle`
when its outcome arrives from elsewhere (a provider's batch answers many at once). Its
attempts are started with :meth:`RunContext.start_attempts`, many in one transaction, with
their worst-case cost reserved. The run itself has durable steps, :meth:`RunContext.step`,
whose results are stored as the run's notes (``await ctx.step("upload", fn, **kwargs)``
runs ``fn`` once), and notes of progress that are overwritten (:meth:`RunContext.note`).

Replay is re-execution: to resume a run, call the same workflow again with a fresh
context on the same store. Children already settled are returned from the store without
running; pending ones run, continuing their durable attempt count. Arguments are compared
by name; a call that differs from the stored one at its position is
:class:`~.errors.NonDeterminism`, and so is a workflow that waits for a result before it
has launched every child the store holds. Nothing of the invocation is written before
that check has passed: until then the group commit is held.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any, Generic, TypeVar

from imagepipe.durable.commit import BatchSink, Committed, GroupCommit
from imagepipe.durable.errors import DrainRun, SpendingCapReached
from imagepipe.durable.events import PromiseQueued, PromiseReplayed
from imagepipe.durable.lanes import AttemptTimeout, Lanes
from imagepipe.durable.lease import LeaseKeeper
from imagepipe.durable.records import (
    ErrorInfo,
    NewPromise,
    PromiseRecord,
    Settled,
    encode_args,
)
from imagepipe.durable.run_state import Execution, RunState
from imagepipe.durable.steps import Handle, SubSteps, check_replay
from imagepipe.durable.store import Store

__all__ = ["AttemptTimeout", "RunContext"]

D = TypeVar("D")
T = TypeVar("T")


class RunContext(Generic[D]):
    """Creates, runs and replays the child promises of one run."""

    def __init__(
        self,
        store: Store,
        run_id: str,
        deps: D,
        execution: Execution | None = None,
        *,
        lease: LeaseKeeper | None = None,
        writes: BatchSink | None = None,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        """``execution``: how the branches run (retry policy, concurrency, listener);
        ``writes``: where the batches go if not straight to the store (a worker's branches
        share one commit, see :mod:`.worker_commit`); ``sleep``: how back-offs wait."""
        execution = execution or Execution()
        self.store = store
        self.run_id = run_id
        self.deps = deps
        commit = GroupCommit(writes or store, acquire=None if lease is None else lease.acquire)
        #: what the lanes, handles and sub-steps share with this context (see :mod:`.run_state`)
        self._state = RunState(
            store, run_id, deps, commit, lease=lease, on_event=execution.on_event
        )
        self._sub_steps = SubSteps(self._state)
        #: the tasks that run the branches (see :mod:`.lanes`)
        self._lanes = Lanes(
            self._state,
            self._sub_steps,
            concurrency=execution.concurrency or None,
            retry=execution.retry,
            attempt_timeout=execution.attempt_timeout,
            cost_of_attempt=execution.cost_of_attempt,
            sleep=sleep,
        )
        #: the children in the store, by seq, until launched (read by :meth:`load`)
        self._stored: dict[int, PromiseRecord] = {}
        #: every child launched, in order; each holds its outcome once settled
        self.launched: list[Handle[Any]] = []
        #: the run's notes as stored (read by :meth:`load`) and as written since
        self._notes: dict[str, Any] = {}
        #: each held child's call and stored failures, until it settles or is run here
        self._held: dict[str, tuple[Callable[..., Awaitable[Any]], dict[str, Any], int]] = {}

    # -- before the workflow -------------------------------------------------------

    async def load(self, *, reopen_rejected: bool = False) -> None:
        """Read the children the store holds, to replay them. Until every one of them is
        launched again, nothing is written. With ``reopen_rejected``, a failed run's
        rejected children (and the run) are set back to pending first (``retry``)."""
        children = await self.store.children(self.run_id)
        self._stored = {r.seq: r for r in children if r.seq is not None}
        self._notes = await self.store.notes(self.run_id)
        self._state.replay.stored = len(self._stored)
        commit = self._state.commit
        if self._stored:
            commit.hold()
        if reopen_rejected:
            for seq, record in self._stored.items():
                if record.state == "rejected":
                    commit.reopen(record.id)
                    self._stored[seq] = _reopened(record)
            commit.reopen(self.run_id)

    # -- the workflow --------------------------------------------------------------

    async def run_workflow(self, workflow: Callable[..., Awaitable[T]], **kwargs: Any) -> T:
        """Run ``workflow(self, **kwargs)`` and check that replay matched the store.

        A store failure in any branch (disk full, read-only, corrupt) or the loss of the
        lease stops the workflow at once instead of letting it wait on siblings whose
        outcomes can no longer be recorded."""
        main: asyncio.Future[T] = asyncio.ensure_future(workflow(self, **kwargs))
        watch: set[asyncio.Future[Any]] = {main, *self._state.stops()}
        try:
            await asyncio.wait(watch, return_when=asyncio.FIRST_COMPLETED)
        finally:
            if not main.done():
                main.cancel()
                await asyncio.gather(main, return_exceptions=True)
        if any(stop.done() for stop in self._state.stops()):
            if not main.cancelled():
                main.exception()  # retrieved: what stopped the run is the one to report
            self._state.raise_if_stopped()
        result: T = main.result()
        self._state.replay.check()
        return result

    @property
    def replay_checked(self) -> bool:
        """True once every stored child has been launched again (writes may flow)."""
        return self._state.replay.checked

    # -- fan-out -------------------------------------------------------------------

    def begin_run(self, fn: Callable[..., Awaitable[T]], /, **kwargs: Any) -> Handle[T]:
        """Create (or find) the next child promise and start it; return its handle."""
        return self._launch(fn, kwargs, run=True)

    def promise(self, fn: Callable[..., Awaitable[T]], /, **kwargs: Any) -> Handle[T]:
        """Create (or find) the next child promise as :meth:`begin_run` does (the same id,
        replay check and events) but do not run it: its outcome comes from elsewhere, and
        the app records it with :meth:`settle`. As Resonate's ``ctx.promise()``, a promise
        completed from outside; a later invocation may run the same child with
        :meth:`begin_run` instead (its call is the same)."""
        return self._launch(fn, kwargs, run=False)

    def _launch(
        self, fn: Callable[..., Awaitable[T]], kwargs: dict[str, Any], *, run: bool
    ) -> Handle[T]:
        replay, state = self._state.replay, self._state
        seq = replay.next_seq
        replay.next_seq += 1
        func = fn.__name__
        record = self._stored.pop(seq, None)
        if record is None:
            handle: Handle[T] = self._create(seq, func, kwargs)
            failures = 0
        else:
            check_replay(record, fn, kwargs)
            handle = Handle.from_record(state, record, fn)
            failures = record.failures
        self.launched.append(handle)
        if seq + 1 == replay.stored:
            state.commit.release()  # every stored child is matched: the replay is checked
        if handle.settled:
            if state.listening:
                state.emit(
                    PromiseReplayed(
                        handle.id,
                        func,
                        handle.args,
                        handle.state,
                        handle.value,
                        handle.error,
                        handle.attempts,
                    )
                )
            return handle
        if state.listening:
            state.emit(PromiseQueued(handle.id, func, handle.args, handle.attempts))
        if run:
            self._lanes.launch(handle, fn, kwargs, failures)
        else:
            self._held[handle.id] = (fn, kwargs, failures)
        return handle

    def adopt(self, record: PromiseRecord, fn: Callable[..., Awaitable[T]]) -> Handle[T]:
        """Run ``record``, a pending child of this run that the workflow did not launch here
        (a branch a worker claimed), as :meth:`begin_run` runs a new one; return its
        handle. It continues the record's attempt count and failure history."""
        handle: Handle[T] = Handle.from_record(self._state, record, fn)
        self.launched.append(handle)
        self._lanes.launch(handle, fn, handle.args, record.failures)
        return handle

    def _create(self, seq: int, func: str, kwargs: dict[str, Any]) -> Handle[T]:
        """A new pending child, written with the next group commit (before it can start)."""
        promise_id = f"{self.run_id}.{seq}"
        self._state.commit.create(
            NewPromise(promise_id, self.run_id, seq, func, encode_args(kwargs), time.time())
        )
        return Handle(self._state, promise_id, func, kwargs, stored=False)

    # -- children the app settles (see :meth:`promise`) --------------------------------

    def run_held(self, handle: Handle[Any]) -> None:
        """Run a held child here after all, as :meth:`begin_run` would have (its stored
        attempts and failures continued): its outcome will not come from elsewhere."""
        fn, kwargs, failures = self._held.pop(handle.id)
        self._lanes.launch(handle, fn, kwargs, failures)

    async def start_attempts(
        self, attempts: Sequence[tuple[Handle[Any], int, Mapping[str, int]]]
    ) -> None:
        """For each (held child, attempt number, units), start that attempt with ``units``
        reserved on the run's meters, all in one transaction: a group paid together (a
        provider's batch) is reserved whole before it is sent. A child already at its
        attempt is left as it is, so a step repeated after a kill reserves nothing twice.
        :class:`~.errors.SpendingCapReached` if they do not fit a cap (nothing written)."""
        if not attempts:
            return
        fence = await self._state.commit.durable()
        items = [(handle.id, n, units) for handle, n, units in attempts]
        refused = await self.store.reserve_attempts(fence, self.run_id, items)
        if refused is not None:
            meter, spending = refused
            assert spending.limit is not None, "only a cap refuses a reservation"
            needed = sum(units.get(meter, 0) for _, _, units in attempts)
            raise SpendingCapReached(self.run_id, meter, spending.spent, spending.limit, needed)
        for handle, n, _ in attempts:
            handle.attempts = max(handle.attempts, n)

    async def durable(self) -> None:
        """Wait until every write made so far (settlements, notes) is committed."""
        await self._state.commit.durable()

    def fail_attempt(self, handle: Handle[Any], started_at: float, error: ErrorInfo) -> Committed:
        """Record that the current attempt of a held child failed (``error``): it stays
        pending, and its next attempt may be started."""
        return self._state.commit.fail_attempt(handle.id, handle.attempts, started_at, error)

    async def settle_costs(self, costs: Sequence[tuple[Handle[Any], Mapping[str, int]]]) -> None:
        """What the current attempt of each held child actually cost replaces its
        reservation, meter by meter, in one transaction."""
        if costs:
            fence = await self._state.commit.durable()
            items = [(handle.id, handle.attempts, cost) for handle, cost in costs]
            await self.store.settle_costs(fence, self.run_id, items)

    def settle(
        self,
        handle: Handle[Any],
        *,
        value: Any = None,
        error: ErrorInfo | None = None,
        after_recorded: Callable[[], object] | None = None,
    ) -> None:
        """Resolve a held child with ``value`` (or reject it with ``error``) after its
        current attempt, as a branch that ran would be: the settlement joins the group
        commit, and once it is durable the handle settles, ``after_recorded()`` runs (only
        if this settlement is the one the store recorded), and listeners hear of it.
        :meth:`settle_all` waits for it."""
        effects = None if after_recorded is None else [after_recorded]
        self._held.pop(handle.id, None)
        self._lanes.settle_held(handle, value, error, effects)

    # -- the run's own steps and notes -----------------------------------------------

    async def step(self, key: str, fn: Callable[..., Awaitable[T]], /, **kwargs: Any) -> T:
        """Run ``fn(**kwargs)`` once as the run's durable step ``key``: its result (a JSON
        value) is stored as the run's note ``key`` before this returns, and returned from
        there, without calling ``fn``, by every later invocation. For what the run does
        once for many children: a provider's batch created, so that a resume collects it
        instead of paying for a second one."""
        if key in self._notes:
            stored: T = _copy(self._notes[key])
            return stored
        result = await fn(**kwargs)
        await self.note(key, result)
        fresh: T = _copy(self._notes[key])
        return fresh

    async def note(self, key: str, value: Any) -> None:
        """Store ``value`` (a JSON value) as the run's note ``key``, replacing what it held;
        return once durable. For progress a report shows (a batch's latest status)."""
        written = self._state.commit.note(self.run_id, key, value)
        await asyncio.shield(written)  # a cancelled caller must not cancel the shared commit
        self._notes[key] = json.loads(json.dumps(value))

    @property
    def notes(self) -> Mapping[str, Any]:
        """The run's notes: as stored when this invocation began, and as written since."""
        return self._notes

    # -- the run's own promise and fan-in helpers ----------------------------------

    async def settle_run(self, *, value: Any = None, error: ErrorInfo | None = None) -> Settled:
        """Settle the run's root promise, through the same fenced write path."""
        return await self._state.commit.settle(self.run_id, value=value, error=error, attempts=0)

    async def settle_all(self) -> None:
        """Wait until every started child has settled and no queued one is left (their
        errors are in the store): no task left, and no settlement still waiting for its
        commit. What stopped the run (a store failure, the lease lost) is raised."""
        await self._lanes.wait_idle(tasks=True, stops=self._state.stops())
        self._state.raise_if_stopped()

    def drain(self, stop: DrainRun) -> None:
        """Stop the run as if a step had raised ``stop`` (see :mod:`.lanes`): no attempt
        starts from now on, and once the attempts in flight have ended and are recorded,
        the run stops with it."""
        self._lanes.drain(stop)

    async def cancel_all(self) -> None:
        """Cancel unfinished children; they stay pending in the store, resumable. Queued
        ones never start (awaiting them raises CancelledError, as for the running ones).
        The settlements already written to a batch are committed (the flush runs on its
        own task) and waited for, unless the run is stopping: nothing that a branch
        returned is lost to the cancellation."""
        await self._lanes.cancel()
        if not self._state.commit.held:
            await self._lanes.wait_idle(tasks=False, stops=self._state.stops())

    def discard(self) -> None:
        """Drop this invocation's writes not yet flushed (nothing of it is kept)."""
        self._state.commit.discard()

    async def close(self) -> None:
        """Wait for the commit under way, if any: nothing of this context outlives it."""
        await self._state.commit.close()


def _copy(value: Any) -> Any:
    """A JSON value the caller may change without changing the one kept here."""
    return json.loads(json.dumps(value))


def _reopened(record: PromiseRecord) -> PromiseRecord:
    from dataclasses import replace

    return replace(record, state="pending", error=None, settled_at=None, failures=0)
