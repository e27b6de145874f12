"""Handles, steps and durable sub-steps: what a workflow and a step function hold.

- :class:`Handle` — the awaitable result of ``RunContext.begin_run``; it keeps the child's
  outcome once settled and wakes its awaiters (no task stands behind it)
- :class:`Step` — what a step function receives: its durable id (the idempotency key), its
  durable attempt number, the invocation's dependencies, and :meth:`Step.run`
- :class:`SubSteps` — ``await step.run(fn, **kwargs)`` runs ``fn`` once and stores its
  result as child promise ``<step id>.<n>``; on replay the stored result is returned
  without calling ``fn``. This is how a step records "job created, id X" before it waits
  for the job, so that a resume polls job X instead of paying for a second one.
- :func:`check_replay` — a stored call must match the code's call, argument by name
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Awaitable, Callable, Generator
from typing import TYPE_CHECKING, Any, Generic, TypeVar

from imagepipe.durable.errors import NonDeterminism, PromiseRejected
from imagepipe.durable.records import (
    ARGS_VERSION,
    ErrorInfo,
    NewPromise,
    PromiseRecord,
    PromiseState,
    Settled,
    bind_args,
    canonical_json,
    encode_args,
)

if TYPE_CHECKING:
    from imagepipe.durable.run_state import RunState

__all__ = ["Handle", "Step", "SubSteps", "check_replay"]

D = TypeVar("D")
T = TypeVar("T")


def check_replay(record: PromiseRecord, fn: Callable[..., Any], kwargs: dict[str, Any]) -> None:
    """Raise :class:`NonDeterminism` unless ``fn(**kwargs)`` is the call ``record`` holds.

    Arguments are compared by name, with ``fn``'s defaults filled in on both sides: a
    parameter added with a default keeps runs stored before it replayable."""
    if record.func == fn.__name__ and record.args == {"version": ARGS_VERSION, "kwargs": kwargs}:
        return  # the common case, without inspecting the signature
    stored = canonical_json(bind_args(fn, record.args))
    given = canonical_json(bind_args(fn, {"version": ARGS_VERSION, "kwargs": kwargs}))
    if record.func != fn.__name__ or stored != given:
        raise NonDeterminism(
            f"replay mismatch at {record.id}: the store has {record.func}{stored} but the "
            f"code now calls {fn.__name__}{given}"
        )


class Handle(Generic[T]):
    """A child promise as this invocation knows it: its call, and its outcome once settled.

    No task stands behind a handle: the branch (run by whichever task of the context runs
    it) settles it once its settlement is durable, and that wakes its awaiters. A waiter's
    future is made only when someone awaits a handle that is still pending. A branch that
    stops without an outcome (a store failure, cancellation) hands its awaiters the error."""

    __slots__ = (
        "_exception",
        "_state",
        "_waiting",
        "args",
        "attempts",
        "error",
        "func",
        "id",
        "replayed",
        "state",
        "stored",
        "value",
    )

    def __init__(
        self,
        state: RunState[Any],
        promise_id: str,
        func: str,
        args: dict[str, Any],
        *,
        stored: bool,
    ) -> None:
        self._state = state
        self.id = promise_id
        self.func = func
        #: the call's arguments by name
        self.args = args
        #: whether the promise was in the store before this invocation
        self.stored = stored
        self.state: PromiseState = "pending"
        self.value: Any = None
        self.error: ErrorInfo | None = None
        self.attempts = 0
        #: True when the outcome was in the store and nothing ran
        self.replayed = False
        #: the awaiters of the pending handle
        self._waiting: list[asyncio.Future[None]] | None = None
        #: while pending: why the branch stopped without an outcome (its awaiters get it);
        #: once rejected here: the exception the rejection came from (its ``__cause__``).
        #: One slot, not two: a handle is 128 bytes with it, 144 with two, and the extra
        #: size class left half its blocks empty at 100,000 branches (15 MB of RSS)
        self._exception: BaseException | None = None

    @classmethod
    def from_record(
        cls, state: RunState[Any], record: PromiseRecord, fn: Callable[..., Any]
    ) -> Handle[T]:
        """The handle of a child read from the store; ``fn`` names older positional
        arguments."""
        args = record.args
        kwargs = args["kwargs"] if args.get("version") == ARGS_VERSION else bind_args(fn, args)
        handle: Handle[T] = cls(state, record.id, record.func, kwargs, stored=True)
        handle.attempts = record.attempts
        if record.settled:
            handle.state, handle.value, handle.error = record.state, record.value, record.error
            handle.replayed = True
        return handle

    @property
    def settled(self) -> bool:
        return self.state != "pending"

    def settle(self, outcome: Settled, *, cause: BaseException | None = None) -> None:
        """Keep the durable ``outcome`` and wake the awaiters; ``cause`` is the exception a
        live rejection came from."""
        self.state, self.value, self.error = outcome.state, outcome.value, outcome.error
        self.attempts = outcome.attempts
        self._exception = cause
        self._wake(None)

    def fail(self, failure: BaseException) -> None:
        """The branch stopped without an outcome: its awaiters, now and later, get
        ``failure`` (the handle stays pending, as the promise does in the store)."""
        self._exception = failure
        self._wake(failure)

    def _wake(self, failure: BaseException | None) -> None:
        for waiter in self._waiting or ():
            if waiter.done():
                continue  # its awaiter stopped waiting
            if failure is None:
                waiter.set_result(None)
            elif isinstance(failure, asyncio.CancelledError):
                waiter.cancel()
            else:
                waiter.set_exception(failure)
        self._waiting = None

    def __await__(self) -> Generator[Any, None, T]:
        return self._result().__await__()

    async def _result(self) -> T:
        if not self.settled:
            self._state.replay.check()
            if self._exception is None:
                waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
                if self._waiting is None:
                    self._waiting = [waiter]
                else:
                    self._waiting.append(waiter)
                await waiter
            if self._exception is not None and not self.settled:
                raise self._exception
        if self.state == "resolved":
            value: T = self.value
            return value
        error = self.error or ErrorInfo("Error", "rejected")
        raise PromiseRejected(self.id, error) from self._exception


class Step(Generic[D]):
    """What a step function receives."""

    __slots__ = (
        "_next",
        "_stored",
        "_sub_steps",
        "attempt",
        "cost",
        "deps",
        "id",
        "on_recorded",
    )

    def __init__(
        self, promise_id: str, attempt: int, deps: D, sub_steps: SubSteps, stored: bool
    ) -> None:
        #: the durable id: a provider gets it as the idempotency key
        self.id = promise_id
        #: the durable attempt number: it continues across processes
        self.attempt = attempt
        self.deps = deps
        #: what :meth:`after_recorded` was given, in order (None: nothing)
        self.on_recorded: list[Callable[[], object]] | None = None
        #: what this attempt actually cost on each meter of the run's spending caps, once
        #: the step function knows (a meter left out: unknown, its worst case stays counted)
        self.cost: dict[str, int] | None = None
        self._sub_steps = sub_steps
        self._stored = stored
        self._next = 0

    def after_recorded(self, effect: Callable[[], object]) -> None:
        """Call ``effect()`` once the value this attempt returns is durably recorded as the
        step's outcome, before anyone hears of it; never if it is not recorded (the attempt
        failed, the lease was lost, the run stopped, or another owner settled the step
        first). For what must follow the record and only the record, such as making a
        staged file visible: a process that was taken over never gets that far. It must
        not raise; if it does, the run stops."""
        if self.on_recorded is None:
            self.on_recorded = [effect]
        else:
            self.on_recorded.append(effect)

    async def run(self, fn: Callable[..., Awaitable[T]], /, **kwargs: Any) -> T:
        """Run ``fn(**kwargs)`` as durable sub-step ``<id>.<n>``; on replay, return the
        stored result without calling it. The result must be a JSON value."""
        seq = self._next
        self._next += 1
        return await self._sub_steps.run(self.id, seq, self._stored, fn, kwargs)


class SubSteps:
    """The durable sub-steps of every running child of one context."""

    def __init__(self, state: RunState[Any]) -> None:
        self._state = state
        #: results of each running child's sub-steps, by seq; read once per child
        self._known: dict[str, dict[int, PromiseRecord | Any]] = {}

    async def run(
        self,
        parent_id: str,
        seq: int,
        stored_parent: bool,
        fn: Callable[..., Awaitable[T]],
        kwargs: dict[str, Any],
    ) -> T:
        known = self._known.get(parent_id)
        if known is None:
            known = {}
            if stored_parent:  # a child of an earlier invocation may have sub-steps stored
                children = await self._state.store.children(parent_id)
                known = {r.seq: r for r in children if r.seq is not None}
            self._known[parent_id] = known
        if seq in known:
            earlier = known[seq]
            if isinstance(earlier, PromiseRecord):
                check_replay(earlier, fn, kwargs)
                value: T = earlier.value
                return value
            copied: T = _copy(earlier)
            return copied
        result = await fn(**kwargs)
        value_json = canonical_json(result)
        promise = NewPromise(
            f"{parent_id}.{seq}",
            parent_id,
            seq,
            fn.__name__,
            encode_args(kwargs),
            time.time(),
            state="resolved",
            value_json=value_json,
        )
        # Shielded: an attempt timeout that cancels this step must not cancel the commit
        # that the other branches' writes share.
        await asyncio.shield(self._state.commit.create(promise))
        stored: T = json.loads(value_json)
        known[seq] = stored
        fresh: T = _copy(stored)
        return fresh

    def forget(self, parent_id: str) -> None:
        self._known.pop(parent_id, None)


def _copy(value: Any) -> Any:
    return json.loads(json.dumps(value))
