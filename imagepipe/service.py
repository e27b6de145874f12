"""What the commands do: start, resume, show and list runs. No printing, no typer here.

A run is a root promise whose arguments are its identity (:class:`RunSpec`); how this
invocation executes it (retry budget, concurrency, simulated faults) is an
:class:`Invocation` and may differ from one ``resume`` to the next. The store is named by
a URL (a plain path is a SQLite file) and opened through :func:`open_store`.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import signal
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TypeVar

from imagepipe import settings
from imagepipe.durable import (
    DurableError,
    ErrorInfo,
    LeaseKeeper,
    NewPromise,
    NonDeterminism,
    PromiseRecord,
    PromiseRejected,
    RetryPolicy,
    RunContext,
    Store,
    StoreConflict,
    StoreMissing,
    StoreOptions,
    WriteBatch,
    encode_args,
    open_store,
)
from imagepipe.errors import Interrupted, RunConflict, UnknownRun, from_core
from imagepipe.pipeline import Deps, image_pipeline
from imagepipe.providers import SimulatedProvider
from imagepipe.runs import (
    DEFAULT_MAX_ATTEMPTS,
    Branch,
    Invocation,
    Reporter,
    RunInfo,
    RunOutcome,
    RunSpec,
    RunSummary,
    run_state,
    validate_run_id,
)

__all__ = ["list_runs", "resume_run", "show_run", "start_run"]

T = TypeVar("T")

#: the function name a run's root promise is stored under
WORKFLOW = "image_pipeline"


# -- the store -----------------------------------------------------------------------


@contextlib.asynccontextmanager
async def _opened(url: str, *, create: bool, write: bool) -> AsyncIterator[Store]:
    """The store at ``url``; opened to ``write``, its integrity is checked first."""
    options = StoreOptions(
        create=create,
        verify=write,
        busy_timeout=settings.busy_timeout(),
        max_pages=settings.simulated_max_pages(),
    )
    store = await open_store(url, options)
    try:
        yield store
    finally:
        await store.close()


async def _root(store: Store, run_id: str) -> PromiseRecord:
    record = await store.get(run_id)
    if record is None or record.parent_id is not None or record.func != WORKFLOW:
        raise UnknownRun(run_id, store.where)
    return record


async def _stored_outcome(store: Store, root: PromiseRecord) -> RunOutcome:
    """A run that nothing executed in this invocation, as stored."""
    branches = [Branch.from_record(r) for r in await store.children(root.id)]
    return _run_outcome(root, branches, wall_ms=0, executed=False)


def _run_outcome(
    root: PromiseRecord, branches: list[Branch], *, wall_ms: int, executed: bool
) -> RunOutcome:
    return RunOutcome(
        id=root.id,
        state=run_state(root.state),
        spec=RunSpec.from_stored(root.args),
        branches=branches,
        wall_ms=wall_ms,
        created_at=root.created_at,
        executed=executed,
    )


# -- commands ------------------------------------------------------------------------


def start_run(
    url: str, run_id: str, spec: RunSpec, invocation: Invocation, reporter: Reporter
) -> RunOutcome:
    """Start a run, or pick up the stored run with this id (refused if its spec differs)."""
    validate_run_id(run_id)
    spec.validate()
    invocation.validate()

    async def start() -> RunOutcome:
        async with _opened(url, create=True, write=True) as store:
            root = await store.get(run_id)
            created = False
            if root is None:
                created = await _create_root(store, run_id, spec, invocation)
                root = await _root(store, run_id)
            if root.parent_id is not None or root.func != WORKFLOW:
                raise UnknownRun(run_id, store.where)
            _check_same_spec(run_id, RunSpec.from_stored(root.args), spec)
            if root.settled:
                return await _stored_outcome(store, root)
            return await _execute(store, root, invocation, reporter, resumed=not created)

    return _run(start, run_id)


async def _create_root(store: Store, run_id: str, spec: RunSpec, invocation: Invocation) -> bool:
    """Write the run's root; False if another process created it first (then the spec
    stored by that process is the one to check)."""
    options = {"max_attempts": invocation.max_attempts or DEFAULT_MAX_ATTEMPTS}
    root = NewPromise(
        id=run_id,
        parent_id=None,
        seq=None,
        func=WORKFLOW,
        args_json=encode_args(spec.kwargs()),
        created_at=time.time(),
        options_json=_json(options),
    )
    try:
        await store.apply(WriteBatch(creates=[root]))
    except StoreConflict:
        return False
    return True


def resume_run(
    url: str,
    run_id: str,
    invocation: Invocation,
    reporter: Reporter,
    *,
    retry_failed: bool = False,
) -> RunOutcome:
    """Finish an interrupted run; settled branches are read from the store, not redone.

    With ``retry_failed``, a failed run's rejected branches are set back to pending first
    (their attempt history stays) and run again."""
    invocation.validate()

    async def resume() -> RunOutcome:
        try:
            async with _opened(url, create=False, write=True) as store:
                root = await _root(store, run_id)
                reopen = retry_failed and root.state == "rejected"
                if root.settled and not reopen:
                    return await _stored_outcome(store, root)
                return await _execute(
                    store, root, invocation, reporter, resumed=True, reopen=reopen
                )
        except StoreMissing as missing:
            raise UnknownRun(run_id, missing.where) from None

    return _run(resume, run_id)


def show_run(url: str, run_id: str) -> RunOutcome:
    async def show() -> RunOutcome:
        try:
            async with _opened(url, create=False, write=False) as store:
                root = await _root(store, run_id)
                outcome = await _stored_outcome(store, root)
                history = await store.failed_attempts(run_id)
                return dataclasses.replace(outcome, history=history)
        except StoreMissing as missing:
            raise UnknownRun(run_id, missing.where) from None

    return _run(show, run_id)


def list_runs(url: str, limit: int | None = None) -> list[RunSummary]:
    async def listing() -> list[RunSummary]:
        try:
            async with _opened(url, create=False, write=False) as store:
                roots = [r for r in await store.roots(limit) if r.func == WORKFLOW]
        except StoreMissing:
            return []
        return [
            RunSummary(
                r.id,
                run_state(r.state),
                RunSpec.from_stored(r.args).prompt,
                r.created_at,
                r.counts,
            )
            for r in roots
        ]

    return _run(listing, None)


def _check_same_spec(run_id: str, stored: RunSpec, given: RunSpec) -> None:
    for name in ("prompt", "styles", "crash", "variations"):
        old, new = getattr(stored, name), getattr(given, name)
        if old != new:
            shown_old = list(old) if isinstance(old, tuple) else old
            shown_new = list(new) if isinstance(new, tuple) else new
            raise RunConflict(run_id, name, shown_old, shown_new)


# -- execution -----------------------------------------------------------------------


def _run(command: Callable[[], Awaitable[T]], run_id: str | None) -> T:
    """Run a command on an event loop: the core's errors become imagepipe's, and Ctrl-C
    and SIGTERM become :class:`Interrupted` (the run stays resumable)."""
    received = "SIGINT"

    async def main() -> T:
        task = asyncio.current_task()
        assert task is not None

        def on_sigterm() -> None:
            nonlocal received
            received = "SIGTERM"
            task.cancel()

        loop = asyncio.get_running_loop()
        # Not available off the main thread (tests) or on Windows: Ctrl-C still works.
        with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
            loop.add_signal_handler(signal.SIGTERM, on_sigterm)
        return await command()

    try:
        return asyncio.run(main())
    except DurableError as exc:
        raise from_core(exc, run_id) from exc
    except KeyboardInterrupt:
        if run_id is None:
            raise
        raise Interrupted(run_id, "SIGINT") from None
    except asyncio.CancelledError:
        if run_id is None:
            raise
        raise Interrupted(run_id, received) from None


async def _execute(
    store: Store,
    root: PromiseRecord,
    invocation: Invocation,
    reporter: Reporter,
    *,
    resumed: bool,
    reopen: bool = False,
) -> RunOutcome:
    """The run itself: the workflow, then the root's settlement, under the run's lease
    (taken with the first write, after the replay check)."""
    spec = RunSpec.from_stored(root.args)
    max_attempts = invocation.max_attempts or int(
        root.options.get("max_attempts", DEFAULT_MAX_ATTEMPTS)
    )
    provider = SimulatedProvider(
        time_scale=invocation.time_scale,
        latency_ms=invocation.sim_latency_ms,
        faults=invocation.faults,
    )
    # The simulated provider has no shared rate limit to spread retries over: no jitter,
    # so that the demo's back-off is the reference's 2 s, 4 s, 8 s ...
    policy = RetryPolicy(max_attempts=max_attempts, jitter=False, time_scale=invocation.time_scale)
    lease = LeaseKeeper(store, root.id, stale_after=settings.lease_timeout())
    await lease.check_free()
    ctx = RunContext(
        store,
        root.id,
        Deps(provider),
        retry=policy,
        lease=lease,
        on_event=reporter.on_event,
        concurrency=invocation.concurrency,
        attempt_timeout=invocation.attempt_timeout,
    )
    started = time.perf_counter()
    try:
        await ctx.load(reopen_rejected=reopen)
        reporter.run_started(RunInfo(root.id, spec, resumed, max_attempts))
        try:
            result = await ctx.run_workflow(image_pipeline, **spec.kwargs())
            summary = {"images": len(result["images"]), "total_ms": result["total_ms"]}
            settled = await ctx.settle_run(value=summary)
        except PromiseRejected as exc:
            await ctx.settle_all()  # every other branch still finishes
            error = ErrorInfo("BranchRejected", str(exc), retryable=False)
            settled = await ctx.settle_run(error=error)
        except NonDeterminism:
            await ctx.cancel_all()
            ctx.discard()  # nothing of this invocation is written
            raise
        except BaseException:
            await ctx.cancel_all()  # interrupted or broken: pending branches stay resumable
            raise
    finally:
        await lease.release()
    wall_ms = round((time.perf_counter() - started) * 1000)
    branches = [Branch.from_handle(h) for h in ctx.launched]
    # Not read back: every branch is known to the context, as committed.
    executed_root = dataclasses.replace(root, state=settled.state)
    return _run_outcome(executed_root, branches, wall_ms=wall_ms, executed=True)


def _json(value: object) -> str:
    from imagepipe.durable.records import canonical_json

    return canonical_json(value)
