"""Lanes: the tasks that run the branches of a run context, each task a chain of them.

A branch that finds a concurrency slot free gets a task. Once its attempt has returned,
its settlement is written to the group commit without waiting for it: a done-callback on
the batch's outcome settles the handle, emits the event and wakes the handle's awaiters
once the batch is durable (nobody hears of a result before). The same task then goes on
with the queued branch that its slot is handed to, so a run of 10,000 branches at a limit
of 16 makes 16 tasks, not 10,000 (a task per branch, with its creation, first step and
done callbacks, cost more than the rest of a branch's bookkeeping), and the next branch's
attempt start joins the same group commit as the previous branch's settlement.

A branch whose attempt fails gives its slot back at once (the queued branch it goes to
starts in a task of its own, the rare path) and waits out its back-off in its task. A
store failure, in a branch or in a settlement's commit, stops the run (fail fast).

A step that raises :class:`~.errors.DrainRun` makes the run drain: from then on no attempt
starts (the slots are closed: no queued branch starts, no retry), the attempts in flight
end and their settlements are committed as usual, and then the run stops with that error,
its branch and every other one not settled left pending.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, TypeVar

from imagepipe.durable.commit import Committed, Settling
from imagepipe.durable.errors import (
    DrainRun,
    DurableError,
    LeaseLost,
    NonDeterminism,
    SpendingCapReached,
    StopRun,
    StoreError,
)
from imagepipe.durable.events import (
    AttemptFailed,
    AttemptStarted,
    PromiseRejectedEvent,
    PromiseResolved,
    RunDraining,
)
from imagepipe.durable.records import ErrorInfo, Settled
from imagepipe.durable.retry import RetryPolicy, retry_failed, waited_out
from imagepipe.durable.run_state import RunState
from imagepipe.durable.slots import Slots
from imagepipe.durable.steps import Handle, Step, SubSteps

__all__ = ["AttemptTimeout", "Lanes"]

T = TypeVar("T")

#: errors that stop the whole run when a branch meets them: its outcome cannot be recorded
_STOPS_RUN = (StoreError, LeaseLost, NonDeterminism, StopRun)


class AttemptTimeout(Exception):
    """An attempt ran longer than the per-attempt timeout. Retryable."""

    retryable = True


class Lanes:
    """Runs the branches of one run under its concurrency limit, with what the run shares
    (:class:`~.run_state.RunState`: its store, group commit, listener and stops) and its
    branches' sub-steps."""

    def __init__(
        self,
        state: RunState[Any],
        sub_steps: SubSteps,
        *,
        concurrency: int | None,
        retry: RetryPolicy,
        attempt_timeout: float | None,
        sleep: Callable[[float], Awaitable[None]],
        cost_of_attempt: Callable[[str, Mapping[str, Any]], Mapping[str, int]] | None = None,
    ) -> None:
        self._state = state
        self._sub_steps = sub_steps
        self._retry = retry
        self._attempt_timeout = attempt_timeout
        self._sleep = sleep
        self._cost_of_attempt = cost_of_attempt
        self._slots: Slots[_Branch] = Slots(concurrency, self._start)
        #: tasks not finished yet (each runs a chain of branches, see _run_chain)
        self.running: set[asyncio.Task[None]] = set()
        #: settlements written whose batch is not done yet
        self._settling = 0
        #: the settlements of the batch being collected, announced when it is done
        self._announcing: _Announcements | None = None
        #: done when a task ends or the last settlement in flight is committed
        self._changed: asyncio.Future[None] | None = None
        #: what makes the run drain (see :meth:`drain`), once a step has raised it
        self._draining: DrainRun | None = None
        #: branches between an attempt's start and that attempt's end (its settlement
        #: written, or its failure recorded and its back-off begun): what a drain awaits
        self._attempting = 0

    def launch(
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

    def _start(self, branch: _Branch) -> None:
        """Start a task for a branch that holds a concurrency slot; the task goes on with
        the queued branches its slot is handed to (see :meth:`_run_chain`)."""
        task = asyncio.create_task(self._run_chain(branch), name=branch.handle.id)
        self.running.add(task)
        task.add_done_callback(self._chain_ended)

    def _chain_ended(self, task: asyncio.Task[None]) -> None:
        self.running.discard(task)
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
            except DrainRun as exc:
                # no outcome, and none is told: the branch stays pending, its awaiters
                # waiting until the drain ends and stops the run
                self.drain(exc)
                return
            except Exception as exc:
                handle.fail(exc)
                if isinstance(exc, _STOPS_RUN):
                    self._state.fail_fast(exc)  # this branch's outcome cannot be recorded: stop
                return  # told to its awaiters; the run stops (or its workflow decides)
            except BaseException as exc:
                handle.fail(exc)
                raise
            finally:
                self._sub_steps.forget(handle.id)
                self._idle(branch)  # its settlement is written, or it stopped without one
            branch = self._slots.pass_on() if holding else None

    async def _run_branch(self, branch: _Branch) -> bool:
        """Run one branch until its settlement is written; return whether its task still
        holds the concurrency slot (its last attempt succeeded) to pass on."""
        handle, fn, kwargs = branch.handle, branch.fn, branch.kwargs
        promise_id, func = handle.id, handle.func
        current = handle.attempts
        slots = self._slots
        holding = True  # a branch starts with the slot it was started with
        step: Step[Any] | None = None  # the latest attempt's

        async def call() -> Any:
            nonlocal step
            if not branch.busy:  # again after a wait, during which the branch was idle
                if self._draining is not None:  # nothing more is sent while the run drains
                    raise DrainRun(str(self._draining)) from self._draining.__cause__
                branch.busy = True
                self._attempting += 1
            step = Step(promise_id, current, self._state.deps, self._sub_steps, handle.stored)
            if self._state.listening:
                self._state.emit(AttemptStarted(promise_id, func, current))
            if self._attempt_timeout is None:
                return await fn(step, **kwargs)
            return await self._call_with_timeout(fn(step, **kwargs))

        async def attempt() -> Any:
            nonlocal current, holding
            if not holding:
                await slots.take()
                holding = True
            try:
                if self._draining is not None:  # no attempt starts while the run drains
                    raise DrainRun(str(self._draining)) from self._draining.__cause__
                branch.busy = True
                self._attempting += 1
                current += 1
                started_at = time.time()
                # the attempt count is durable before the call, with its worst-case cost
                # reserved against the run's cap if it may cost anything
                reserved = self._cost_of_attempt(func, kwargs) if self._cost_of_attempt else None
                if reserved:
                    await self._reserve(promise_id, current, reserved)
                else:
                    await self._state.commit.start_attempt(promise_id, current)
                try:
                    # a failure that is a wait (a rate limit) is waited out and called
                    # again in this same attempt: it is not a failed attempt (the branch is
                    # idle while it waits, see before_sleep: a drain does not wait for it)
                    value = await waited_out(
                        self._retry, call, before_wait=before_sleep, sleep=self._sleep
                    )
                except DurableError as exc:
                    if (
                        reserved
                        and isinstance(exc, DrainRun)
                        and getattr(exc.__cause__, "unpaid", False)
                    ):
                        # an account-wide error the provider answered: nothing to pay for
                        await self._settle_cost(promise_id, current, dict.fromkeys(reserved, 0))
                    raise
                except Exception as exc:
                    assert step is not None  # made by call() before anything it runs
                    if reserved and getattr(exc, "unpaid", False):
                        step.cost = dict.fromkeys(reserved, 0)  # refused before any work
                    if reserved and step.cost is not None:
                        await self._settle_cost(promise_id, current, step.cost)
                    error = ErrorInfo.from_exception(exc)
                    await self._state.commit.fail_attempt(promise_id, current, started_at, error)
                    raise
                if reserved and step is not None and step.cost is not None:
                    await self._settle_cost(promise_id, current, step.cost)
                return value
            except BaseException:
                # Not kept for the retry: the back-off holds no slot. The next waiter gets
                # it (a queued branch in a task of its own: this one is busy retrying).
                holding = False
                slots.give_back()
                raise

        def before_sleep(exc: BaseException, delay: float) -> None:
            self._idle(branch)  # its failure is recorded: a drain does not await its back-off
            error = ErrorInfo.from_exception(exc)
            self._state.emit(AttemptFailed(promise_id, func, current, error, delay))

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
            self._state.emit(AttemptFailed(promise_id, func, current, error, None))
            self._write_settlement(handle, None, error, current, cause=exc)
            return holding
        effects = None if step is None else step.on_recorded
        self._write_settlement(handle, value, None, current, cause=None, effects=effects)
        return holding

    def settle_held(
        self,
        handle: Handle[Any],
        value: Any,
        error: ErrorInfo | None,
        effects: list[Callable[[], object]] | None,
    ) -> None:
        """Settle a child that no lane runs (``RunContext.promise``) as a lane settles its
        branch: written to the group commit, announced (its effects run first) once
        durable, and waited for by :meth:`wait_idle`."""
        cause = None if error is None else _StoredError(error.message)
        self._write_settlement(handle, value, error, handle.attempts, cause=cause, effects=effects)

    def _write_settlement(
        self,
        handle: Handle[Any],
        value: Any,
        error: ErrorInfo | None,
        attempts: int,
        *,
        cause: Exception | None,
        effects: list[Callable[[], object]] | None = None,
    ) -> None:
        """Write the branch's settlement to the group commit without waiting for it: the
        handle is settled, and the event emitted, by the done-callback of the batch's future
        (:class:`_Announcements`, one per batch) once it is durable: nobody hears of a
        result before. The step's ``effects`` (:meth:`.Step.after_recorded`) run there
        first, if this settlement is the one the store recorded. :meth:`settle_all` waits
        for it."""
        settling = self._state.commit.write_settlement(
            handle.id, value=value, error=error, attempts=attempts
        )
        batch = self._announcing
        if batch is None or batch.written is not settling.written:
            batch = self._announcing = _Announcements(self._announce, settling.written)
            settling.written.add_done_callback(batch)
        batch.settlements.append(
            _Announce(handle=handle, settling=settling, cause=cause, effects=effects)
        )
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
                    self._state.fail_fast(failure)
                for announce in batch.settlements:
                    announce.handle.fail(failure)
                return
            try:
                settled = [announce.settle() for announce in batch.settlements]
            except Exception as exc:  # an effect broke its promise not to raise
                stop = StopRun(f"an effect after a recorded value failed: {exc}")
                stop.__cause__ = exc
                self._state.fail_fast(stop)
                for announce in batch.settlements:
                    if not announce.handle.settled:
                        announce.handle.fail(stop)
                return
            for announce, outcome in zip(batch.settlements, settled, strict=True):
                if outcome.state == "rejected":
                    error = outcome.error or ErrorInfo("Error", "rejected")
                    self._state.emit(
                        PromiseRejectedEvent(announce.handle.id, error, outcome.attempts)
                    )
                elif self._state.listening:
                    self._state.emit(
                        PromiseResolved(announce.handle.id, outcome.value, outcome.attempts)
                    )
        finally:
            self._settling -= len(batch.settlements)
            if not self._settling:
                self._notify()
                self._check_drained()

    def _idle(self, branch: _Branch) -> None:
        """``branch``'s attempt has ended: its failure is recorded, or its settlement
        written (or it stopped without either)."""
        if branch.busy:
            branch.busy = False
            self._attempting -= 1
            if self._draining is not None:
                self._check_drained()

    def drain(self, stop: DrainRun) -> None:
        """A step raised ``stop`` (or the run is told to drain): start no attempt from now
        on, and stop the run with it once the attempts in flight have ended and their
        settlements are committed (the first one wins; the later ones are its echoes)."""
        if self._draining is None:
            self._draining = stop
            self._slots.close()
            self._state.emit(RunDraining(str(stop), self._attempting))
        self._check_drained()

    def _check_drained(self) -> None:
        """Stop the run if it drains and nothing is left in flight."""
        if self._draining is not None and not self._attempting and not self._settling:
            self._state.fail_fast(self._draining)

    async def _reserve(self, promise_id: str, attempt: int, units: Mapping[str, int]) -> None:
        """Start the attempt with ``units`` reserved on the run's meters, in one transaction
        under the run's (or branch's) fence, once the branch's promise is in the store;
        :class:`~.errors.SpendingCapReached` if they do not fit a cap."""
        state = self._state
        fence = await state.commit.durable()
        refused = await state.store.reserve_attempt(fence, state.run_id, promise_id, attempt, units)
        if refused is not None:
            meter, spending = refused
            assert spending.limit is not None, "only a cap refuses a reservation"
            raise SpendingCapReached(
                state.run_id, meter, spending.spent, spending.limit, units[meter]
            )

    async def _settle_cost(self, promise_id: str, attempt: int, cost: Mapping[str, int]) -> None:
        """What the attempt actually cost replaces its reservation, meter by meter."""
        state = self._state
        fence = await state.commit.durable()
        await state.store.settle_cost(fence, state.run_id, promise_id, attempt, cost)

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
        history = await self._state.store.failed_attempts(promise_id)
        last = next((a.error for a in reversed(history) if a.error is not None), None)
        if last is None:
            return RuntimeError("no attempts left")
        exc = _StoredError(last.message)
        exc.type_name, exc.retryable = last.type, last.retryable
        return exc

    async def wait_idle(self, *, tasks: bool, stops: list[asyncio.Future[Any]]) -> None:
        """Wait until no settlement waits for its commit (and, with ``tasks``, no task is
        left), or one of ``stops`` is done (a store failure, the lease lost)."""
        while (self._settling or (tasks and self.running)) and not any(
            stop.done() for stop in stops
        ):
            if self._changed is None or self._changed.done():
                self._changed = asyncio.get_running_loop().create_future()
            await asyncio.wait([self._changed, *stops], return_when=asyncio.FIRST_COMPLETED)

    def _notify(self) -> None:
        """A task ended, or the last settlement in flight was committed."""
        if self._changed is not None and not self._changed.done():
            self._changed.set_result(None)

    async def cancel(self) -> None:
        """Cancel the tasks; the queued branches never start (their awaiters, like the
        running ones', get CancelledError)."""
        for queued in self._slots.forget_waiters():
            queued.handle.fail(asyncio.CancelledError())
        running = list(self.running)
        for task in running:
            task.cancel()
        if running:
            await asyncio.gather(*running, return_exceptions=True)


class _Branch:
    """A branch to run: its handle, its call, and its failed attempts so far. Past the
    concurrency limit, every branch of a run's fan-out waits as one of these at once: a
    small object with slots (a closure and its cells cost ~230 bytes a branch, measured at
    100,000 branches)."""

    __slots__ = ("busy", "failures", "fn", "handle", "kwargs")

    def __init__(
        self,
        *,
        handle: Handle[Any],
        fn: Callable[..., Awaitable[Any]],
        kwargs: dict[str, Any],
        failures: int,
    ) -> None:
        self.handle, self.fn, self.kwargs, self.failures = handle, fn, kwargs, failures
        #: an attempt of it has started and not ended (counted in ``Lanes._attempting``)
        self.busy = False


class _Announce:
    """A branch's settlement written to a batch, to announce once the batch is done."""

    __slots__ = ("cause", "effects", "handle", "settling")

    def __init__(
        self,
        *,
        handle: Handle[Any],
        settling: Settling,
        cause: Exception | None,
        effects: list[Callable[[], object]] | None,
    ) -> None:
        self.handle, self.settling = handle, settling
        #: the exception a rejection came from
        self.cause = cause
        #: the attempt's effects to run once its value is recorded
        self.effects = effects

    def settle(self) -> Settled:
        """Run the effects if this settlement is the one recorded, then settle the handle
        as stored (the batch committed); return the outcome."""
        if self.effects and self.settling.recorded():
            for effect in self.effects:
                effect()
        outcome = self.settling.outcome()
        self.handle.settle(outcome, cause=self.cause if outcome.state == "rejected" else None)
        return outcome


class _Announcements:
    """The done-callback of a batch's future that announces the settlements in it: one
    loop callback per commit, not one per branch."""

    __slots__ = ("announce", "settlements", "written")

    def __init__(self, announce: Callable[[_Announcements], None], written: Committed) -> None:
        self.announce, self.written = announce, written
        self.settlements: list[_Announce] = []

    def __call__(self, written: Committed) -> None:
        self.announce(self)


class _StoredError(Exception):
    """A stored error re-raised as it was (its type name is kept for the record)."""

    type_name = "Error"
    retryable = True
