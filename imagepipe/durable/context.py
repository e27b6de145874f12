"""The run context: ``begin_run(fn, *args)`` turns a call into a durable child promise.

A workflow is an ordinary ``async def`` that receives a :class:`RunContext`. Every
``begin_run`` gets the next deterministic id ``<run>.<n>``, writes the promise to the store
(or finds it there), and returns a :class:`Handle` at once, so a loop can fan out before
anything has finished. Awaiting a handle gives the value or raises
:class:`~imagepipe.errors.PromiseRejected`.

Replay is re-execution: to resume a run, call the same workflow again with a fresh
context on the same store. Children already settled are returned from the store without
running; pending ones run, continuing their durable attempt count. If the code now asks
for a different call at some position than the store holds, that is
:class:`~imagepipe.errors.NonDeterminism`, never a silent mix of results.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Generator
from typing import Any, Generic, NamedTuple, Protocol, TypeVar

from imagepipe.durable.commit import GroupCommit
from imagepipe.durable.events import (
    AttemptFailed,
    AttemptStarted,
    Event,
    PromiseQueued,
    PromiseRejectedEvent,
    PromiseReplayed,
    PromiseResolved,
)
from imagepipe.durable.slots import Slots
from imagepipe.durable.store import (
    ErrorInfo,
    NewPromise,
    PromiseRecord,
    Settled,
    Store,
    canonical_json,
)
from imagepipe.errors import NonDeterminism, PromiseRejected, StoreError

__all__ = ["AttemptTimeout", "Handle", "RetryPolicy", "RunContext", "Step"]

D = TypeVar("D")
T = TypeVar("T")


class AttemptTimeout(Exception):
    """An attempt ran longer than the per-attempt timeout. Retryable."""

    retryable = True


class RetryPolicy(Protocol):
    """How a failed attempt is retried. Implemented with tenacity in :mod:`imagepipe.retry`."""

    def allows(self, failures: int) -> bool:
        """Whether a branch that already failed ``failures`` times may try again."""
        ...

    async def retry(
        self,
        attempt: Callable[[], Awaitable[T]],
        error: Exception,
        *,
        failures: int,
        last_attempt: Callable[[], int],
        before_sleep: Callable[[BaseException, float], None],
    ) -> T:
        """``attempt`` just failed with ``error``: run it again until it succeeds or the
        policy gives up, then re-raise the real error.

        ``failures`` counts the failed attempts so far, this one included;
        ``last_attempt()`` is the durable number of the attempt that just failed, which
        sets the back-off. Only failed branches get here: the first attempt is awaited
        directly, so the retry machinery costs nothing when nothing fails."""
        ...


class Step(NamedTuple, Generic[D]):
    """What a step function receives: its durable id (the idempotency key), the attempt
    number (durable: it continues across processes) and the invocation's dependencies."""

    id: str
    attempt: int
    deps: D


class Handle(Generic[T]):
    """The awaitable result of :meth:`RunContext.begin_run`.

    A handle is replayed (its outcome was in the store), queued (waiting for a
    concurrency slot: it has no task yet) or started (its task runs or has finished)."""

    __slots__ = ("_awaiting_start", "_record", "_task", "id")

    def __init__(self, promise_id: str, *, record: PromiseRecord | None = None) -> None:
        self.id = promise_id
        self._record = record
        self._task: asyncio.Task[T] | None = None
        self._awaiting_start: list[asyncio.Future[None]] = []

    @property
    def replayed(self) -> bool:
        """True when the outcome was already in the store and nothing runs."""
        return self._record is not None

    def __await__(self) -> Generator[Any, None, T]:
        if self._task is not None:
            return self._task.__await__()
        if self._record is not None:
            return self._stored().__await__()
        return self._after_start().__await__()

    def _started(self, task: asyncio.Task[T]) -> None:
        self._task = task
        for waiter in self._awaiting_start:
            if not waiter.done():
                waiter.set_result(None)
        self._awaiting_start.clear()

    async def _after_start(self) -> T:
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._awaiting_start.append(waiter)
        await waiter
        assert self._task is not None
        return await self._task

    async def _stored(self) -> T:
        record = self._record
        assert record is not None
        if record.state == "resolved":
            value: T = record.value
            return value
        error = record.error or ErrorInfo("Error", "rejected")
        raise PromiseRejected(record.id, error.type, error.message)


class RunContext(Generic[D]):
    """Creates and runs the child promises of one run."""

    def __init__(
        self,
        store: Store,
        run_id: str,
        deps: D,
        *,
        retry: RetryPolicy,
        on_event: Callable[[Event], None] | None = None,
        concurrency: int | None = None,
        attempt_timeout: float | None = None,
    ) -> None:
        self.store = store
        self.run_id = run_id
        self.deps = deps
        self._retry = retry
        self._emit = on_event or (lambda event: None)
        #: False when nobody listens: then events are not even built (hot path at scale)
        self._listening = on_event is not None
        self._slots = Slots(concurrency or None)
        self._attempt_timeout = attempt_timeout
        self._commit = GroupCommit(store)
        #: set to the first store failure seen by any branch: the run stops at once
        self._fatal: asyncio.Future[StoreError] | None = None
        self._next_seq = 0
        #: the children already in the store, by seq: read at the first begin_run (under
        #: the run's lease, which keeps other processes from writing them), then replayed
        self._stored: dict[int | None, PromiseRecord] | None = None
        self._tasks: list[asyncio.Task[Any]] = []
        #: every child launched, as it was when launched (settled ones: as stored)
        self.launched: list[PromiseRecord] = []
        #: how the children settled by this invocation settled, as committed
        self.outcomes: dict[str, Settled] = {}

    # -- the workflow --------------------------------------------------------------

    async def run_workflow(self, workflow: Callable[..., Awaitable[T]], *args: Any) -> T:
        """Run ``workflow(self, *args)`` and check that replay matched the store.

        A store failure in any branch (disk full, read-only, corrupt) stops the workflow
        at once instead of letting it wait on siblings that can no longer be recorded."""
        self._fatal = asyncio.get_running_loop().create_future()
        main: asyncio.Future[T] = asyncio.ensure_future(workflow(self, *args))
        watch: set[asyncio.Future[Any]] = {main, self._fatal}
        try:
            await asyncio.wait(watch, return_when=asyncio.FIRST_COMPLETED)
        finally:
            if not main.done():
                main.cancel()
                await asyncio.gather(main, return_exceptions=True)
        if self._fatal.done():
            if not main.cancelled():
                main.exception()  # retrieved: the store failure below is the one to report
            raise self._fatal.result()
        result: T = main.result()
        self.check_no_leftovers()
        return result

    def _fail_fast(self, exc: StoreError) -> None:
        if self._fatal is not None and not self._fatal.done():
            self._fatal.set_result(exc)

    # -- fan-out -------------------------------------------------------------------

    def begin_run(self, fn: Callable[..., Awaitable[T]], *args: Any) -> Handle[T]:
        """Create (or find) the next child promise and start it; return its handle."""
        seq = self._next_seq
        self._next_seq += 1
        func = fn.__name__
        record = self._stored_children().get(seq)
        if record is None:
            record = self._create(seq, func, args)
        else:
            self._check_replay(record, func, args)
        promise_id = record.id
        self.launched.append(record)
        if record.settled:
            self._emit(
                PromiseReplayed(
                    promise_id,
                    func,
                    record.args,
                    record.state,
                    record.value,
                    record.error,
                    record.attempts,
                )
            )
            return Handle(promise_id, record=record)
        if self._listening:
            self._emit(PromiseQueued(promise_id, func, record.args, record.attempts))
        handle: Handle[T] = Handle(promise_id)
        if self._slots.try_take():
            self._start(handle, record, fn, args)
        else:  # its task is created when a slot is handed to it
            self._slots.when_free(lambda: self._start(handle, record, fn, args))
        return handle

    def _start(
        self,
        handle: Handle[T],
        record: PromiseRecord,
        fn: Callable[..., Awaitable[T]],
        args: tuple[Any, ...],
    ) -> bool:
        """Start a branch that holds a concurrency slot (given back by its first attempt)."""
        task = asyncio.create_task(self._execute(record, fn, args), name=record.id)
        self._tasks.append(task)
        handle._started(task)
        return True

    def _create(self, seq: int, func: str, args: tuple[Any, ...]) -> PromiseRecord:
        """A new pending child, written with the next group commit (before it can start)."""
        promise_id = f"{self.run_id}.{seq}"
        now = time.time()
        self._commit.create(
            NewPromise(promise_id, self.run_id, seq, func, canonical_json(args), now)
        )
        # id, parent_id, seq, func, args, state, value, error, attempts, failures,
        # created_at, settled_at, options (positional: once per branch, it shows)
        return PromiseRecord(
            promise_id, self.run_id, seq, func, list(args), "pending", None, None, 0, 0,
            now, None, {},
        )  # fmt: skip

    def _stored_children(self) -> dict[int | None, PromiseRecord]:
        if self._stored is None:
            self._stored = {r.seq: r for r in self.store.children(self.run_id)}
        return self._stored

    def _check_replay(self, record: PromiseRecord, func: str, args: tuple[Any, ...]) -> None:
        given = canonical_json(list(args))
        stored = canonical_json(record.args)
        if record.func != func or given != stored:
            raise NonDeterminism(
                f"replay mismatch at {record.id}: the store has {record.func}{stored} but the "
                f"code now calls {func}{given}; this run cannot be resumed by this version"
            )

    def check_no_leftovers(self) -> None:
        """After the workflow returns: the store must hold no child the code did not ask for."""
        stored = len(self._stored_children())
        if stored > self._next_seq:
            raise NonDeterminism(
                f"replay mismatch at {self.run_id}.{self._next_seq}: the store has {stored} "
                f"branches but the code now launches {self._next_seq}"
            )

    # -- execution -----------------------------------------------------------------

    async def _execute(
        self, record: PromiseRecord, fn: Callable[..., Awaitable[T]], args: tuple[Any, ...]
    ) -> T:
        try:
            return await self._run_branch(record, fn, args)
        except StoreError as exc:
            self._fail_fast(exc)  # this branch's outcome cannot be recorded: stop the run
            raise

    async def _run_branch(
        self, record: PromiseRecord, fn: Callable[..., Awaitable[T]], args: tuple[Any, ...]
    ) -> T:
        promise_id, func = record.id, record.func
        current = record.attempts
        slots = self._slots
        holding = True  # a branch starts with the slot it was started with

        async def attempt() -> T:
            nonlocal current, holding
            if not holding:
                await slots.take()
            holding = False  # given back below, whatever happens
            try:
                current += 1
                started_at = time.time()
                # the attempt count is durable before the call
                await self._commit.start_attempt(promise_id, current)
                if self._listening:
                    self._emit(AttemptStarted(promise_id, func, current))
                step = Step(promise_id, current, self.deps)
                try:
                    if self._attempt_timeout is None:
                        return await fn(step, *args)
                    return await self._call_with_timeout(fn(step, *args))
                except StoreError:
                    raise
                except Exception as exc:
                    error = ErrorInfo.from_exception(exc)
                    self.store.fail_attempt(promise_id, current, error, started_at)
                    await self._commit.durable()
                    raise
            finally:
                slots.give_back()

        def before_sleep(exc: BaseException, delay: float) -> None:
            error = ErrorInfo.from_exception(exc)
            self._emit(AttemptFailed(promise_id, func, current, error, delay))

        try:
            if not self._retry.allows(record.failures):
                holding = False
                slots.give_back()  # no attempt to make
                raise _exhausted(self.store, promise_id)
            try:
                value = await attempt()
            except StoreError:
                raise
            except Exception as exc:
                value = await self._retry.retry(
                    attempt,
                    exc,
                    failures=record.failures + 1,
                    last_attempt=lambda: current,
                    before_sleep=before_sleep,
                )
        except StoreError:
            raise  # not the branch's failure: the run stops (see _execute)
        except Exception as exc:
            error = ErrorInfo.from_exception(exc)
            self._emit(AttemptFailed(promise_id, func, current, error, None))
            settled = await self._commit.settle(
                promise_id, value=None, error=error, attempts=current
            )
            self.outcomes[promise_id] = settled
            self._emit(PromiseRejectedEvent(promise_id, error, settled.attempts))
            raise PromiseRejected(promise_id, error.type, error.message) from exc
        # durable before anyone hears of it
        settled = await self._commit.settle(promise_id, value=value, error=None, attempts=current)
        self.outcomes[promise_id] = settled
        if self._listening:
            self._emit(PromiseResolved(promise_id, settled.value, settled.attempts))
        result: T = settled.value
        return result

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

    # -- fan-in helpers for the runner ---------------------------------------------

    @property
    def computed(self) -> set[str]:
        """Ids of the children settled by this invocation (the others were replayed)."""
        return set(self.outcomes)

    async def settle_all(self) -> None:
        """Wait until every child has settled (errors are in the store). Queued children
        start as slots free up, so each round waits for the tasks started during the one
        before; every task is looked at once (a rescan per round would be O(n²/limit))."""
        seen = 0
        while seen < len(self._tasks):
            started, seen = self._tasks[seen:], len(self._tasks)
            if pending := [task for task in started if not task.done()]:
                await asyncio.wait(pending)
        for task in self._tasks:
            if not task.cancelled():
                exc = task.exception()
                if isinstance(exc, StoreError):
                    raise exc

    async def cancel_all(self) -> None:
        """Cancel unfinished children; they stay pending in the store, resumable."""
        self._slots.forget_waiters()  # queued children never start
        for task in self._tasks:
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)

    async def flush(self) -> None:
        await self._commit.durable()

    def discard(self) -> None:
        """Drop this invocation's writes not yet flushed (before a rollback)."""
        self._commit.discard()


def _exhausted(store: Store, promise_id: str) -> Exception:
    """The error to reject with when the stored failures already use up the budget."""
    history = store.attempts(promise_id)
    last = next((a.error for a in reversed(history) if a.error is not None), None)
    if last is None:
        return RuntimeError("no attempts left")
    exc = _StoredError(last.message)
    exc.type_name, exc.retryable = last.type, last.retryable
    return exc


class _StoredError(Exception):
    """A stored error re-raised as it was (its type name is kept for the record)."""

    type_name = "Error"
    retryable = True
