"""What the commands do: start, resume, show and list runs. No printing, no typer here.

A run is a root promise whose arguments are its identity (:class:`RunSpec`); how this
invocation executes it (retry budget, concurrency, simulated faults) is an
:class:`Invocation` and may differ from one ``resume`` to the next.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import gc
import signal
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from imagepipe import settings
from imagepipe.durable import ErrorInfo, PromiseRecord, RunContext, SQLiteStore
from imagepipe.durable.lease import hold_lease
from imagepipe.durable.sqlite import check_store_path
from imagepipe.errors import Interrupted, NonDeterminism, PromiseRejected, RunConflict, UnknownRun
from imagepipe.pipeline import Deps, image_pipeline
from imagepipe.providers import SimulatedProvider
from imagepipe.retry import DEFAULT_MAX_ATTEMPTS, ExponentialRetry
from imagepipe.runs import (
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

#: the function name a run's root promise is stored under
WORKFLOW = "image_pipeline"


# -- the store -----------------------------------------------------------------------


@contextmanager
def _open(db_path: Path, *, create: bool) -> Iterator[SQLiteStore | None]:
    check_store_path(db_path, must_exist=not create)
    if not create and not db_path.exists():
        yield None
        return
    store = SQLiteStore.open(
        db_path, busy_timeout=settings.busy_timeout(), max_pages=settings.simulated_max_pages()
    )
    try:
        yield store
    finally:
        store.close()


def _root(store: SQLiteStore | None, run_id: str, db_path: Path) -> PromiseRecord:
    record = None if store is None else store.get(run_id)
    if record is None or record.parent_id is not None or record.func != WORKFLOW:
        raise UnknownRun(run_id, str(db_path))
    return record


def _outcome(store: SQLiteStore, root: PromiseRecord) -> RunOutcome:
    """A run that nothing executed in this invocation, as stored."""
    branches = [Branch.from_record(r) for r in store.children(root.id)]
    return _run_outcome(root, branches, wall_ms=0, executed=False)


def _executed_outcome(root: PromiseRecord, ctx: RunContext[Deps], wall_ms: int) -> RunOutcome:
    """A run this invocation executed. Every branch is known without reading the store
    back: replayed ones were read when launched, the others' outcomes were committed
    before the context recorded them (re-reading 10,000 rows cost ~0.1 s)."""
    branches = [Branch.from_record(r, ctx.outcomes.get(r.id)) for r in ctx.launched]
    return _run_outcome(root, branches, wall_ms=wall_ms, executed=True)


def _run_outcome(
    root: PromiseRecord, branches: list[Branch], *, wall_ms: int, executed: bool
) -> RunOutcome:
    return RunOutcome(
        id=root.id,
        state=run_state(root),
        spec=RunSpec.from_args(root.args),
        branches=branches,
        wall_ms=wall_ms,
        created_at=root.created_at,
        executed=executed,
    )


# -- commands ------------------------------------------------------------------------


def start_run(
    db_path: Path, run_id: str, spec: RunSpec, invocation: Invocation, reporter: Reporter
) -> RunOutcome:
    """Start a run, or pick up the stored run with this id (refused if its spec differs)."""
    validate_run_id(run_id)
    spec.validate()
    invocation.validate()
    with _open(db_path, create=True) as store:
        assert store is not None
        existing = store.get(run_id)
        if existing is None:
            options = {"max_attempts": invocation.max_attempts or DEFAULT_MAX_ATTEMPTS}
            root, _ = store.create(run_id, func=WORKFLOW, args=spec.args(), options=options)
            store.commit()
            return _drive(store, root, invocation, reporter, resumed=False)
        root = _root(store, run_id, db_path)
        _check_same_spec(run_id, RunSpec.from_args(root.args), spec)
        if root.settled:
            return _outcome(store, root)
        return _drive(store, root, invocation, reporter, resumed=True)


def resume_run(
    db_path: Path,
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
    with _open(db_path, create=False) as store:
        root = _root(store, run_id, db_path)
        assert store is not None
        reopen = retry_failed and root.state == "rejected"
        if root.settled and not reopen:
            return _outcome(store, root)
        return _drive(store, root, invocation, reporter, resumed=True, reopen=reopen)


def show_run(db_path: Path, run_id: str) -> RunOutcome:
    with _open(db_path, create=False) as store:
        root = _root(store, run_id, db_path)
        assert store is not None
        outcome = _outcome(store, root)
        return dataclasses.replace(outcome, history=store.failed_attempts(run_id))


def list_runs(db_path: Path, limit: int | None = None) -> list[RunSummary]:
    with _open(db_path, create=False) as store:
        if store is None:
            return []
        roots = [r for r in store.roots(limit) if r.func == WORKFLOW]
        counts = store.child_counts([r.id for r in roots])
        return [
            RunSummary(r.id, run_state(r), str(r.args[0]), r.created_at, counts[r.id])
            for r in roots
        ]


def _check_same_spec(run_id: str, stored: RunSpec, given: RunSpec) -> None:
    for name in ("prompt", "styles", "crash", "variations"):
        old, new = getattr(stored, name), getattr(given, name)
        if old != new:
            shown_old = list(old) if isinstance(old, tuple) else old
            shown_new = list(new) if isinstance(new, tuple) else new
            raise RunConflict(run_id, name, shown_old, shown_new)


# -- execution -----------------------------------------------------------------------


def _drive(
    store: SQLiteStore,
    root: PromiseRecord,
    invocation: Invocation,
    reporter: Reporter,
    *,
    resumed: bool,
    reopen: bool = False,
) -> RunOutcome:
    """Run the workflow on an event loop; turn Ctrl-C and SIGTERM into :class:`Interrupted`.

    The first signal cancels the run, which stops cleanly (branches left pending, lease
    released); later ones are ignored. asyncio.run's own SIGINT handler raised
    KeyboardInterrupt for a second Ctrl-C at whatever line was running, in the middle of
    that clean-up: Runner.close then waited for tasks that would never finish (a 10-minute
    hang), or the KeyboardInterrupt escaped after the message was printed (exit -2)."""
    received: str | None = None
    main_task: asyncio.Task[RunOutcome] | None = None

    def stop(name: str) -> None:
        nonlocal received
        if received is not None:
            return  # the first signal's clean stop is under way
        received = name
        if main_task is not None:
            with contextlib.suppress(RuntimeError):  # the loop has already closed
                main_task.get_loop().call_soon_threadsafe(main_task.cancel)

    async def main() -> RunOutcome:
        nonlocal main_task
        main_task = asyncio.current_task()
        if received is not None:  # signalled before the loop ran
            raise asyncio.CancelledError
        return await _execute(store, root, invocation, reporter, resumed, reopen)

    # Plain handlers, installed before asyncio.run so that it installs none of its own; not
    # loop.add_signal_handler, whose wakeup fd outlives the loop's socket by a few lines of
    # loop.close() ("Bad file descriptor" printed if a signal lands there).
    previous = {}
    for sig in (signal.SIGINT, signal.SIGTERM):
        # Not available off the main thread (tests) or on Windows: Ctrl-C still works.
        with contextlib.suppress(ValueError, OSError):
            previous[sig] = signal.signal(sig, lambda signum, _: stop(signal.Signals(signum).name))
    # Thousands of branches allocate many short-lived objects; the default collector
    # threshold (700) makes CPython rescan them thousands of times. Freeze what exists
    # (modules, the store) and collect young objects less often.
    thresholds = gc.get_threshold()
    gc.freeze()
    gc.set_threshold(50_000, 20, 20)
    try:
        return asyncio.run(main())
    except (KeyboardInterrupt, asyncio.CancelledError):
        raise Interrupted(root.id, received or "SIGINT") from None
    finally:
        gc.set_threshold(*thresholds)
        gc.unfreeze()
        for sig, handler in previous.items():
            # After an interruption, SIG_IGN rather than our handler: at exit CPython resets
            # Python-level handlers to SIG_DFL, and a late Ctrl-C then killed it (-2).
            signal.signal(sig, handler if received is None else signal.SIG_IGN)


async def _execute(
    store: SQLiteStore,
    root: PromiseRecord,
    invocation: Invocation,
    reporter: Reporter,
    resumed: bool,
    reopen: bool,
) -> RunOutcome:
    """The run itself, under the lease: the workflow, then the root's settlement."""
    spec = RunSpec.from_args(root.args)
    max_attempts = invocation.max_attempts or int(
        root.options.get("max_attempts", DEFAULT_MAX_ATTEMPTS)
    )
    provider = SimulatedProvider(
        time_scale=invocation.time_scale,
        latency_ms=invocation.sim_latency_ms,
        faults=invocation.faults,
    )
    ctx = RunContext(
        store,
        root.id,
        Deps(provider),
        retry=ExponentialRetry(max_attempts=max_attempts, time_scale=invocation.time_scale),
        on_event=reporter.on_event,
        concurrency=invocation.concurrency,
        attempt_timeout=invocation.attempt_timeout,
    )
    started = time.perf_counter()
    async with hold_lease(store, root.id):
        if reopen:  # under the lease: no other process is running these branches
            _reopen_rejected(store, root.id)
        reporter.run_started(RunInfo(root.id, spec, resumed, max_attempts))
        try:
            result = await ctx.run_workflow(image_pipeline, *spec.args())
            settled = store.resolve(root.id, result)
        except PromiseRejected as exc:
            await ctx.settle_all()  # every other branch still finishes
            error = ErrorInfo("BranchRejected", str(exc), retryable=False)
            settled = store.reject(root.id, error)
        except NonDeterminism:
            await ctx.cancel_all()
            ctx.discard()
            store.rollback()  # nothing of this invocation (e.g. a retry's reopen) is kept
            raise
        except BaseException:
            await ctx.cancel_all()  # interrupted or broken: pending branches stay resumable
            raise
        await ctx.flush()
    wall_ms = round((time.perf_counter() - started) * 1000)
    # Not read back: the root's value holds every image again (~15 ms to decode at 10,000).
    return _executed_outcome(root._replace(state=settled.state), ctx, wall_ms)


def _reopen_rejected(store: SQLiteStore, run_id: str) -> None:
    """Set a failed run and its rejected branches back to pending (history stays)."""
    for child in store.children(run_id):
        if child.state == "rejected":
            store.reopen(child.id)
    store.reopen(run_id)  # committed with the first branch's write, or rolled back
