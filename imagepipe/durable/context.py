"""The run context: ``begin_run(fn, **kwargs)`` turns a call into a durable child promise.

A workflow is an ordinary ``async def`` that receives a :class:`RunContext`. Every
``begin_run`` gets the next deterministic id ``<run>.<n>``, hands the promise to the group
commit (or finds it in the store), and returns a :class:`Handle` at once, so a loop can
fan out before anything has finished. Awaiting a handle gives the value or raises
:class:`~.errors.PromiseRejected`. Inside a child, ``await step.run(fn, **kwargs)`` is a
durable sub-step ``<child>.<n>`` (see :mod:`.steps`).

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
import time
from collections.abc import Awaitable, Callable
from typing import Any, Generic, TypeVar

from imagepipe.durable.commit import BatchSink, Committed, GroupCommit, Settling
from imagepipe.durable.errors import (
    DurableError,
    LeaseLost,
    NonDeterminism,
    StoreError,
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
from imagepipe.durable.lease import LeaseKeeper
from imagepipe.durable.records import (
    ErrorInfo,
    NewPromise,
    PromiseRecord,
    Settled,
    encode_args,
)
from imagepipe.durable.retry import RetryPolicy, retry_failed
from imagepipe.durable.slots import Slots
from imagepipe.durable.steps import Handle, Step, SubSteps, check_replay
from imagepipe.durable.store import Store

__all__ = ["AttemptTimeout", "RunContext"]

D = TypeVar("D")
T = TypeVar("T")

#: errors that stop the whole run when a branch meets them: its outcome cannot be recorded
_STOPS_RUN = (StoreError, LeaseLost, NonDeterminism)


class AttemptTimeout(Exception):
    """An attempt ran longer than the per-attempt timeout. Retryable."""

    retryable = True


class RunContext(Generic[D]):
    """Creates, runs and replays the child promises of one run."""

    def __init__(
        self,
        store: Store,
        run_id: str,
        deps: D,
        *,
        retry: RetryPolicy,
        lease: LeaseKeeper | None = None,
        on_event: Callable[[Event], None] | None = None,
        concurrency: int | None = None,
        attempt_timeout: float | None = None,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        writes: BatchSink | None = None,
    ) -> None:
        self.store = store
        self.run_id = run_id
        self.deps = deps
        self._retry = retry
        self._lease = lease
        self._emit = on_event or (lambda event: None)
        #: False when nobody listens: then events are not even built (hot path at scale)
        self._listening = on_event is not None
        self._slots: Slots[_Branch] = Slots(concurrency or None, self._start)
        self._attempt_timeout = attempt_timeout
        self._sleep = sleep
        # ``writes``: where the batches go if not straight to the store (a worker's branches
        # share one commit, see :mod:`.worker_commit`)
        self._commit = GroupCommit(
            writes or store, acquire=None if lease is None else lease.acquire
        )
        self._sub_steps = SubSteps(self)
        #: set to the first store failure seen by any branch: the run stops at once
        self._fatal: asyncio.Future[DurableError] = asyncio.get_running_loop().create_future()
        self._next_seq = 0
        #: the children in the store, by seq, until launched (read by :meth:`load`)
        self._stored: dict[int, PromiseRecord] = {}
        self._stored_count = 0
        #: branch tasks not finished yet (each runs a chain of branches, see _run_chain)
        self._running: set[asyncio.Task[None]] = set()
        #: settlements written whose batch is not done yet
        self._settling = 0
        #: the settlements of the batch being collected, announced when it is done
        self._announcing: _Announcements | None = None
        #: done when a task ends or the last settlement in flight is committed
        self._changed: asyncio.Future[None] | None = None
        #: every child launched, in order; each holds its outcome once settled
        self.launched: list[Handle[Any]] = []

    # -- before the workflow -------------------------------------------------------

    async def load(self, *, reopen_rejected: bool = False) -> None:
        """Read the children the store holds, to replay them. Until every one of them is
        launched again, nothing is written. With ``reopen_rejected``, a failed run's
        rejected children (and the run) are set back to pending first (``retry``)."""
        children = await self.store.children(self.run_id)
        self._stored = {r.seq: r for r in children if r.seq is not None}
        self._stored_count = len(self._stored)
        if self._stored_count:
            self._commit.hold()
        if reopen_rejected:
            for seq, record in self._stored.items():
                if record.state == "rejected":
                    self._commit.reopen(record.id)
                    self._stored[seq] = _reopened(record)
            self._commit.reopen(self.run_id)

    # -- the workflow --------------------------------------------------------------

    async def run_workflow(self, workflow: Callable[..., Awaitable[T]], **kwargs: Any) -> T:
        """Run ``workflow(self, **kwargs)`` and check that replay matched the store.

        A store failure in any branch (disk full, read-only, corrupt) or the loss of the
        lease stops the workflow at once instead of letting it wait on siblings whose
        outcomes can no longer be recorded."""
        main: asyncio.Future[T] = asyncio.ensure_future(workflow(self, **kwargs))
        watch: set[asyncio.Future[Any]] = {main, self._fatal}
        if self._lease is not None:
            watch.add(self._lease.lost)
        try:
            await asyncio.wait(watch, return_when=asyncio.FIRST_COMPLETED)
        finally:
            if not main.done():
                main.cancel()
                await asyncio.gather(main, return_exceptions=True)
        if self._lease is not None and self._lease.lost.done():
            raise self._lease.lost.result()
        if self._fatal.done():
            if not main.cancelled():
                main.exception()  # retrieved: the store failure below is the one to report
            raise self._fatal.result()
        result: T = main.result()
        self._check_all_launched()
        return result

    def _fail_fast(self, exc: DurableError) -> None:
        if not self._fatal.done():
            self._fatal.set_result(exc)

    @property
    def replay_checked(self) -> bool:
        """True once every stored child has been launched again (writes may flow)."""
        return self._next_seq >= self._stored_count

    def _check_all_launched(self) -> None:
        if not self.replay_checked:
            raise NonDeterminism(
                f"replay mismatch at {self.run_id}.{self._next_seq}: the store has "
                f"{self._stored_count} children but the code launched {self._next_seq} "
                "before it waited for a result"
            )

    # -- fan-out -------------------------------------------------------------------

    def begin_run(self, fn: Callable[..., Awaitable[T]], /, **kwargs: Any) -> Handle[T]:
        """Create (or find) the next child promise and start it; return its handle."""
        seq = self._next_seq
        self._next_seq += 1
        func = fn.__name__
        record = self._stored.pop(seq, None)
        if record is None:
            handle: Handle[T] = self._create(seq, func, kwargs)
            failures = 0
        else:
            check_replay(record, fn, kwargs)
            handle = Handle.from_record(self, record, fn)
            failures = record.failures
        self.launched.append(handle)
        if seq + 1 == self._stored_count:
            self._commit.release()  # every stored child is matched: the replay is checked
        if handle.settled:
            if self._listening:
                self._emit(
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
        if self._listening:
            self._emit(PromiseQueued(handle.id, func, handle.args, handle.attempts))
        self._launch(handle, fn, kwargs, failures)
        return handle

    def _launch(
        self,
        handle: Handle[T],
        fn: Callable[..., Awaitable[T]],
        kwargs: dict[str, Any],
        failures: int,
    ) -> None:
        """Start a pending branch now if a concurrency slot is free, else queue it."""
        branch = _Branch(handle=handle, fn=fn, kwargs=kwargs, failures=failures)
        if self._slots.try_take():
            self._start(branch)
        else:  # run by the first task whose slot is handed to it (see _run_chain)
            self._slots.queue(branch)

    def _create(self, seq: int, func: str, kwargs: dict[str, Any]) -> Handle[T]:
        """A new pending child, written with the next group commit (before it can start)."""
        promise_id = f"{self.run_id}.{seq}"
        self._commit.create(
            NewPromise(promise_id, self.run_id, seq, func, encode_args(kwargs), time.time())
        )
        return Handle(self, promise_id, func, kwargs, stored=False)

    def _start(self, branch: _Branch) -> None:
        """Start a task for a branch that holds a concurrency slot; the task goes on with
        the queued branches its slot is handed to (see :meth:`_run_chain`)."""
        task = asyncio.create_task(self._run_chain(branch), name=branch.handle.id)
        self._running.add(task)
        task.add_done_callback(self._chain_ended)

    def _chain_ended(self, task: asyncio.Task[None]) -> None:
        self._running.discard(task)
        self._notify()

    # -- execution -----------------------------------------------------------------

    async def _run_chain(self, branch: _Branch | None) -> None:
        """Run ``branch``, then every queued branch that the slot it gives back is handed
        to, in this same task: a task per branch (its creation, first step and done
        callbacks) cost more than the rest of a branch's bookkeeping. A branch's
        settlement is not awaited here (see :meth:`_write_settlement`), so the next
        branch's first write joins the same group commit as it.

        A branch that fails an attempt gives its slot back at once (the queued branch it
        goes to starts in a task of its own: the rare path) and retries in this task; a
        branch that stops the run (a store failure, the lease lost, cancellation) ends the
        chain, its awaiters told why."""
        while branch is not None:
            handle = branch.handle
            try:
                holding = await self._run_branch(branch)
            except Exception as exc:
                handle.fail(exc)
                if isinstance(exc, _STOPS_RUN):
                    self._fail_fast(exc)  # this branch's outcome cannot be recorded: stop
                return  # told to its awaiters; the run stops (or its workflow decides)
            except BaseException as exc:
                handle.fail(exc)
                raise
            finally:
                self._sub_steps.forget(handle.id)
            branch = self._slots.pass_on() if holding else None

    async def _run_branch(self, branch: _Branch) -> bool:
        """Run one branch until its settlement is written; return whether its task still
        holds the concurrency slot (its last attempt succeeded) to pass on."""
        handle, fn, kwargs = branch.handle, branch.fn, branch.kwargs
        promise_id, func = handle.id, handle.func
        current = handle.attempts
        slots = self._slots
        holding = True  # a branch starts with the slot it was started with

        async def attempt() -> Any:
            nonlocal current, holding
            if not holding:
                await slots.take()
                holding = True
            try:
                current += 1
                started_at = time.time()
                # the attempt count is durable before the call
                await self._commit.start_attempt(promise_id, current)
                if self._listening:
                    self._emit(AttemptStarted(promise_id, func, current))
                step = Step(promise_id, current, self.deps, self._sub_steps, handle.stored)
                try:
                    if self._attempt_timeout is None:
                        return await fn(step, **kwargs)
                    return await self._call_with_timeout(fn(step, **kwargs))
                except DurableError:
                    raise
                except Exception as exc:
                    error = ErrorInfo.from_exception(exc)
                    await self._commit.fail_attempt(promise_id, current, started_at, error)
                    raise
            except BaseException:
                # Not kept for the retry: the back-off holds no slot. The next waiter gets
                # it (a queued branch in a task of its own: this one is busy retrying).
                holding = False
                slots.give_back()
                raise

        def before_sleep(exc: BaseException, delay: float) -> None:
            error = ErrorInfo.from_exception(exc)
            self._emit(AttemptFailed(promise_id, func, current, error, delay))

        try:
            if not self._retry.allows(branch.failures):
                holding = False
                slots.give_back()  # no attempt to make
                raise await self._exhausted(promise_id)
            try:
                value = await attempt()
            except DurableError:
                raise
            except Exception as exc:
                value = await retry_failed(
                    self._retry,
                    attempt,
                    exc,
                    failures=branch.failures + 1,
                    last_attempt=lambda: current,
                    before_sleep=before_sleep,
                    sleep=self._sleep,
                )
        except DurableError:
            raise  # not the branch's failure: the run stops (see _run_chain)
        except Exception as exc:
            error = ErrorInfo.from_exception(exc)
            self._emit(AttemptFailed(promise_id, func, current, error, None))
            self._write_settlement(handle, None, error, current, cause=exc)
            return holding
        self._write_settlement(handle, value, None, current, cause=None)
        return holding

    def _write_settlement(
        self,
        handle: Handle[Any],
        value: Any,
        error: ErrorInfo | None,
        attempts: int,
        *,
        cause: Exception | None,
    ) -> None:
        """Write the branch's settlement to the group commit without waiting for it: the
        handle is settled, and the event emitted, by the done-callback of the batch's future
        (:class:`_Announcements`, one per batch) once it is durable: nobody hears of a
        result before. :meth:`settle_all` waits for it."""
        settling = self._commit.write_settlement(
            handle.id, value=value, error=error, attempts=attempts
        )
        batch = self._announcing
        if batch is None or batch.written is not settling.written:
            batch = self._announcing = _Announcements(self, settling.written)
            settling.written.add_done_callback(batch)
        batch.settlements.append(_Announce(handle=handle, settling=settling, cause=cause))
        self._settling += 1

    def _announce(self, batch: _Announcements) -> None:
        """A batch with settlements is done: settle each handle as stored, then tell the
        listeners. A commit that failed stops the run, and the handles' awaiters get its
        error; a discarded one (the invocation is abandoned) cancels them."""
        if self._announcing is batch:
            self._announcing = None
        written = batch.written
        try:
            failure = asyncio.CancelledError() if written.cancelled() else written.exception()
            if failure is not None:
                if isinstance(failure, _STOPS_RUN):
                    self._fail_fast(failure)
                for announce in batch.settlements:
                    announce.handle.fail(failure)
                return
            settled = [announce.settle() for announce in batch.settlements]
            for announce, outcome in zip(batch.settlements, settled, strict=True):
                if outcome.state == "rejected":
                    error = outcome.error or ErrorInfo("Error", "rejected")
                    self._emit(PromiseRejectedEvent(announce.handle.id, error, outcome.attempts))
                elif self._listening:
                    self._emit(PromiseResolved(announce.handle.id, outcome.value, outcome.attempts))
        finally:
            self._settling -= len(batch.settlements)
            if not self._settling:
                self._notify()

    async def _call_with_timeout(self, call: Awaitable[T]) -> T:
        try:
            async with asyncio.timeout(self._attempt_timeout) as deadline:
                return await call
        except TimeoutError:
            if deadline.expired():
                raise AttemptTimeout(
                    f"attempt timed out after {self._attempt_timeout:g} s"
                ) from None
            raise

    async def _exhausted(self, promise_id: str) -> Exception:
        """The error to reject with when the stored failures already use up the budget."""
        history = await self.store.failed_attempts(promise_id)
        last = next((a.error for a in reversed(history) if a.error is not None), None)
        if last is None:
            return RuntimeError("no attempts left")
        exc = _StoredError(last.message)
        exc.type_name, exc.retryable = last.type, last.retryable
        return exc

    # -- the run's own promise and fan-in helpers ----------------------------------

    async def settle_run(self, *, value: Any = None, error: ErrorInfo | None = None) -> Settled:
        """Settle the run's root promise, through the same fenced write path."""
        return await self._commit.settle(self.run_id, value=value, error=error, attempts=0)

    async def settle_all(self) -> None:
        """Wait until every started child has settled and no queued one is left (their
        errors are in the store): no task left, and no settlement still waiting for its
        commit. A store failure in any of them is raised."""
        await self._wait_idle(tasks=True)
        if self._lease is not None and self._lease.lost.done():
            raise self._lease.lost.result()
        if self._fatal.done():
            raise self._fatal.result()

    async def cancel_all(self) -> None:
        """Cancel unfinished children; they stay pending in the store, resumable. Queued
        ones never start (awaiting them raises CancelledError, as for the running ones).
        The settlements already written to a batch are committed (the flush runs on its
        own task) and waited for, unless the run is stopping: nothing that a branch
        returned is lost to the cancellation."""
        for queued in self._slots.forget_waiters():
            queued.handle.fail(asyncio.CancelledError())  # its awaiters must not wait forever
        running = list(self._running)
        for task in running:
            task.cancel()
        if running:
            await asyncio.gather(*running, return_exceptions=True)
        if not self._commit.held:
            await self._wait_idle(tasks=False)

    async def _wait_idle(self, *, tasks: bool) -> None:
        """Wait until no settlement waits for its commit (and, with ``tasks``, no task is
        left), or the run stops (a store failure, the lease lost)."""
        stops: list[asyncio.Future[Any]] = [self._fatal]
        if self._lease is not None:
            stops.append(self._lease.lost)
        while (self._settling or (tasks and self._running)) and not any(
            stop.done() for stop in stops
        ):
            if self._changed is None or self._changed.done():
                self._changed = asyncio.get_running_loop().create_future()
            await asyncio.wait([self._changed, *stops], return_when=asyncio.FIRST_COMPLETED)

    def _notify(self) -> None:
        """A task ended, or the last settlement in flight was committed."""
        if self._changed is not None and not self._changed.done():
            self._changed.set_result(None)

    def discard(self) -> None:
        """Drop this invocation's writes not yet flushed (nothing of it is kept)."""
        self._commit.discard()

    # used by :class:`~.steps.SubSteps`
    @property
    def group_commit(self) -> GroupCommit:
        return self._commit


class _Branch:
    """A branch to run: its handle, its call, and its failed attempts so far. Past the
    concurrency limit, every branch of a run's fan-out waits as one of these at once: a
    small object with slots (a closure and its cells cost ~230 bytes a branch, measured at
    100,000 branches)."""

    __slots__ = ("failures", "fn", "handle", "kwargs")

    def __init__(
        self,
        *,
        handle: Handle[Any],
        fn: Callable[..., Awaitable[Any]],
        kwargs: dict[str, Any],
        failures: int,
    ) -> None:
        self.handle, self.fn, self.kwargs, self.failures = handle, fn, kwargs, failures


class _Announce:
    """A branch's settlement written to a batch, to announce once the batch is done."""

    __slots__ = ("cause", "handle", "settling")

    def __init__(self, *, handle: Handle[Any], settling: Settling, cause: Exception | None) -> None:
        self.handle, self.settling = handle, settling
        #: the exception a rejection came from
        self.cause = cause

    def settle(self) -> Settled:
        """Settle the handle as stored (the batch committed); return the outcome."""
        outcome = self.settling.outcome()
        self.handle.settle(outcome, cause=self.cause if outcome.state == "rejected" else None)
        return outcome


class _Announcements:
    """The done-callback of a batch's future that announces the settlements in it: one
    loop callback per commit, not one per branch."""

    __slots__ = ("ctx", "settlements", "written")

    def __init__(self, ctx: RunContext[Any], written: Committed) -> None:
        self.ctx, self.written = ctx, written
        self.settlements: list[_Announce] = []

    def __call__(self, written: Committed) -> None:
        self.ctx._announce(self)


def _reopened(record: PromiseRecord) -> PromiseRecord:
    from dataclasses import replace

    return replace(record, state="pending", error=None, settled_at=None, failures=0)


class _StoredError(Exception):
    """A stored error re-raised as it was (its type name is kept for the record)."""

    type_name = "Error"
    retryable = True
