"""A run's lifecycle, owned by the core: record a run, execute it, settle it.

A run is a root promise under an id whose children are its branches. As with Resonate's
``resonate.run(id, fn, *args)`` and DBOS's ``start_workflow`` under a workflow id, the id
is the run's identity: recording a run that exists already returns the stored one, and
executing a run that has settled children replays them instead of running them again.

- :class:`Workflow` — an app's workflow as the core runs it: the function that fans out its
  branches, and :attr:`Workflow.summarize`, the one place where a run's outcome is computed
  from its branches', whoever settles the root (:func:`execute_run` or a worker)
- :func:`record_run` — write the run's root (and, for workers, every branch as pending)
  unless it exists; the stored root either way
- :func:`reopen_run` — set a failed run's rejected branches back to pending (``retry``)
- :func:`execute_run` — execute a recorded run in this process: the lease, the replay
  check, the branches, the root's settlement, the clean-up once it is settled
- :func:`settle_root_if_done` — settle a run's root once its last branch has settled, as
  a worker does
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Awaitable, Callable, Generator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

from imagepipe.durable.context import RunContext
from imagepipe.durable.errors import NonDeterminism, PromiseRejected, StoreConflict
from imagepipe.durable.lease import LeaseKeeper
from imagepipe.durable.records import (
    ErrorInfo,
    NewPromise,
    PromiseRecord,
    PromiseState,
    Settlement,
    WriteBatch,
    bind_args,
    canonical_json,
    encode_args,
)
from imagepipe.durable.run_state import Execution
from imagepipe.durable.steps import Handle
from imagepipe.durable.store import DETACHED, Store

__all__ = [
    "BranchOutcome",
    "Executed",
    "Execution",
    "Workflow",
    "execute_run",
    "is_detached",
    "record_run",
    "reopen_run",
    "settle_root_if_done",
]

D = TypeVar("D")


class BranchOutcome(Protocol):
    """A settled branch as :attr:`Workflow.summarize` reads it: a live handle, or a
    promise read from the store."""

    @property
    def id(self) -> str: ...
    @property
    def state(self) -> PromiseState: ...
    @property
    def value(self) -> Any: ...
    @property
    def error(self) -> ErrorInfo | None: ...


#: a run's outcome from its settled branches (in launch order): a value, or an error
Summarize = Callable[[Sequence[BranchOutcome]], tuple[Any, ErrorInfo | None]]


@dataclass(frozen=True)
class Workflow:
    """An app's workflow as the core runs it.

    ``fn(ctx, **kwargs)`` fans out the run's branches with ``ctx.begin_run`` and waits for
    them; what it returns is not stored. The run's root settles with ``summarize`` of its
    branches, in launch order, whether this process executed them or workers did."""

    fn: Callable[..., Awaitable[Any]]
    summarize: Summarize

    @property
    def name(self) -> str:
        """What the run's root promise is stored as."""
        return self.fn.__name__


@dataclass(frozen=True)
class Executed:
    """A run that :func:`execute_run` settled: its root as settled, and every branch in
    launch order with its outcome."""

    root: PromiseRecord
    branches: Sequence[Handle[Any]]


def is_detached(root: PromiseRecord) -> bool:
    """Whether the run was recorded for workers (``record_run(..., detached=True)``)."""
    return root.options.get(DETACHED) is True


async def record_run(
    store: Store,
    run_id: str,
    workflow: Workflow,
    kwargs: Mapping[str, Any],
    *,
    options: Mapping[str, Any],
    detached: bool = False,
) -> tuple[PromiseRecord, bool]:
    """Write the run ``run_id`` of ``workflow(ctx, **kwargs)`` unless it exists, with
    ``options`` (how it is executed by default) beside its arguments; return the stored
    root and whether this call wrote it. The stored root may be another process's: the
    caller compares its arguments with ``kwargs``.

    A ``detached`` run is written with every branch its workflow launches before it first
    waits, all pending, in the same transaction: any
    worker may then claim them."""
    stored = await store.get(run_id)
    if stored is not None:
        return stored, False
    now = time.time()
    options = {**options, DETACHED: True} if detached else dict(options)
    root = NewPromise(
        id=run_id,
        parent_id=None,
        seq=None,
        func=workflow.name,
        args_json=encode_args(kwargs),
        created_at=now,
        options_json=canonical_json(options),
    )
    creates = [root]
    if detached:
        creates += _planned_creates(run_id, await _plan_branches(workflow.fn, **kwargs), now)
    try:
        await store.apply(WriteBatch(creates=creates))
        written = True
    except StoreConflict:
        written = False  # another process recorded it first: its run is the one
    stored = await store.get(run_id)
    assert stored is not None, "a run just recorded is in the store"
    return stored, written


async def reopen_run(store: Store, run_id: str) -> None:
    """Set a failed run's rejected branches and its root back to pending (``retry``); their
    attempt history stays."""
    rejected = [r.id for r in await store.children(run_id) if r.state == "rejected"]
    await store.apply(WriteBatch(reopens=[*rejected, run_id]))


async def execute_run(
    store: Store,
    root: PromiseRecord,
    workflow: Workflow,
    deps: D,
    execution: Execution,
    *,
    reopen: bool = False,
    on_started: Callable[[], object] | None = None,
    on_settled: Callable[[Sequence[BranchOutcome]], object] | None = None,
) -> Executed:
    """Execute the recorded run ``root`` here, under its lease, and settle it.

    The lease is checked free first (:class:`~.errors.LeaseHeld` otherwise) and taken with
    the first write, which waits until the workflow has launched every branch the store
    holds (the replay check: :class:`~.errors.NonDeterminism` otherwise, nothing written).
    ``on_started`` is called once the stored branches are read, before the workflow runs.
    A rejected branch lets every other branch finish before the run settles. Once the root
    is settled, ``on_settled(branches)`` runs while this process still holds the run (to
    tidy what the branches left behind). Interrupted or stopped, the branches not settled
    stay pending and the run resumable; the lease is released either way.

    With ``reopen`` (a failed run retried), its rejected branches and its root are set back
    to pending first; their attempt history stays."""
    lease = LeaseKeeper(store, root.id, stale_after=execution.lease_timeout)
    await lease.check_free()
    ctx: RunContext[D] = RunContext(store, root.id, deps, execution, lease=lease)
    try:
        await ctx.load(reopen_rejected=reopen)
        if on_started is not None:
            on_started()
        try:
            try:
                await ctx.run_workflow(workflow.fn, **bind_args(workflow.fn, root.args))
            except PromiseRejected:
                await ctx.settle_all()  # every other branch still finishes
        except NonDeterminism:
            await ctx.cancel_all()
            ctx.discard()  # nothing of this invocation is written
            raise
        except BaseException:
            await ctx.cancel_all()  # interrupted or stopped: pending branches stay resumable
            raise
        value, error = workflow.summarize(ctx.launched)
        settled = await ctx.settle_run(value=value, error=error)
        if on_settled is not None:
            on_settled(ctx.launched)
    finally:
        await ctx.close()
        await lease.release()
    # Not read back: every branch is known to the context, as committed.
    executed_root = _settled_copy(root, settled.state, settled.value, settled.error)
    return Executed(executed_root, ctx.launched)


async def settle_root_if_done(
    store: Store,
    run_id: str,
    summarize: Summarize,
    on_settled: Callable[[Sequence[BranchOutcome]], object] | None = None,
) -> bool:
    """Settle the run's root if every branch has settled; True if this call settled it.

    Called by whoever settles a branch, after that settlement is durable: of two workers
    settling the last two branches at once, the later check sees both. Two settling the
    root at once is harmless: the first settle wins."""
    if await store.any_pending(run_id):
        return False
    root = await store.get(run_id)
    if root is None or root.settled:
        return False
    children = await store.children(run_id)
    value, error = summarize(children)
    settlement = Settlement(
        run_id,
        "rejected" if error is not None else "resolved",
        None if value is None else canonical_json(value),
        None if error is None else error.to_json(),
        time.time(),
    )
    lost = await store.apply(WriteBatch(settlements=[settlement]))
    if run_id in lost:
        return False
    if on_settled is not None:
        on_settled(children)
    return True


# -- planning a detached run: the workflow's fan-out, executing nothing --------------


@dataclass(frozen=True)
class _Planned:
    """One ``begin_run`` call of a workflow's fan-out."""

    fn: Callable[..., Awaitable[Any]]
    kwargs: dict[str, Any]


class _FanOutDone(Exception):
    """Raised when the planned workflow first awaits a result: its fan-out is complete."""


class _Unexecuted:
    """A planned branch's handle: awaiting it ends the planning."""

    def __await__(self) -> Generator[Any, None, Any]:
        raise _FanOutDone
        yield  # a generator, as __await__ must return


class _Planner:
    """Stands in for a :class:`~.context.RunContext`: records calls, executes nothing. It
    has no dependencies (``deps`` is None): nothing runs."""

    def __init__(self) -> None:
        self.planned: list[_Planned] = []
        self.deps = None

    def begin_run(self, fn: Callable[..., Awaitable[Any]], /, **kwargs: Any) -> _Unexecuted:
        self.planned.append(_Planned(fn, kwargs))
        return _Unexecuted()


async def _plan_branches(workflow: Callable[..., Awaitable[Any]], **kwargs: Any) -> list[_Planned]:
    """The branches ``workflow(ctx, **kwargs)`` launches before it first waits for one:
    the same calls, in the same order, as a run would make (so the same ids)."""
    planner = _Planner()
    with contextlib.suppress(_FanOutDone):
        await workflow(planner, **kwargs)
    return planner.planned


def _planned_creates(run_id: str, planned: list[_Planned], created_at: float) -> list[NewPromise]:
    """The pending child promises ``<run>.0``, ``<run>.1``, ... of a planned fan-out."""
    return [
        NewPromise(
            f"{run_id}.{seq}", run_id, seq, call.fn.__name__, encode_args(call.kwargs), created_at
        )
        for seq, call in enumerate(planned)
    ]


def _settled_copy(
    root: PromiseRecord, state: PromiseState, value: Any, error: ErrorInfo | None
) -> PromiseRecord:
    from dataclasses import replace

    return replace(root, state=state, value=value, error=error, settled_at=time.time())
