"""What the commands do: start, resume, show and list runs. No printing, no typer here.

A run is a root promise whose arguments are its identity (:class:`RunSpec`); how this
invocation executes it (retry budget, concurrency, simulated faults) is an
:class:`Invocation` and may differ from one ``resume`` to the next. The store is named by
a URL (a plain path is a SQLite file) and opened through :func:`open_store`.

The building blocks the commands share, used by :mod:`imagepipe.detached` too:
:func:`opened_store`, :func:`read_root`, :func:`run_command` (an event loop with Ctrl-C as
a clean stop), :func:`with_provider`, :func:`check_same_spec`, :func:`root_promise`,
:func:`execution_for`, :func:`run_outcome`.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import signal
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

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
from imagepipe.errors import BadInput, Interrupted, RunConflict, UnknownRun, from_core
from imagepipe.files import default_image_dir
from imagepipe.pipeline import Deps, image_pipeline
from imagepipe.providers import SimulatedProvider
from imagepipe.providers.options import ProviderOptions, build_options, identity
from imagepipe.providers.registry import get_provider_class
from imagepipe.runs import (
    DEFAULT_MAX_ATTEMPTS,
    Branch,
    Invocation,
    LaunchedBranches,
    Reporter,
    RunInfo,
    RunOutcome,
    RunSpec,
    RunSummary,
    StoredBranches,
    run_state,
    validate_run_id,
)
from imagepipe.styles import templates_for
from imagepipe.text import quoted

__all__ = [
    "check_same_spec",
    "execution_for",
    "list_runs",
    "opened_store",
    "read_root",
    "resume_run",
    "root_promise",
    "run_command",
    "run_outcome",
    "show_run",
    "start_run",
    "with_provider",
]

T = TypeVar("T")

#: the function name a run's root promise is stored under
WORKFLOW = "image_pipeline"


# -- the store -----------------------------------------------------------------------


@contextlib.asynccontextmanager
async def opened_store(url: str, *, create: bool, write: bool) -> AsyncIterator[Store]:
    """The store at ``url``; opened to ``write``, its integrity is checked first."""
    options = StoreOptions(
        create=create,
        verify=write,
        busy_timeout=settings.busy_timeout(),
        max_pages=settings.simulated_max_pages(),
        reconnect=settings.db_reconnect(),
    )
    store = await open_store(url, options)
    try:
        yield store
    finally:
        await store.close()


async def read_root(store: Store, run_id: str) -> PromiseRecord:
    record = await store.get(run_id)
    if record is None or record.parent_id is not None or record.func != WORKFLOW:
        raise UnknownRun(run_id, store.where)
    return record


async def _stored_outcome(store: Store, root: PromiseRecord) -> RunOutcome:
    """A run that nothing executed in this invocation, as stored."""
    branches = StoredBranches(await store.child_columns(root.id))
    return run_outcome(root, branches, wall_ms=0, executed=False)


def run_outcome(
    root: PromiseRecord, branches: Sequence[Branch], *, wall_ms: int, executed: bool
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
    spec = with_provider(spec, invocation)

    async def start() -> RunOutcome:
        async with opened_store(url, create=True, write=True) as store:
            root = await store.get(run_id)
            created = False
            if root is None:
                created = await _create_root(store, run_id, spec, invocation)
                root = await read_root(store, run_id)
            if root.parent_id is not None or root.func != WORKFLOW:
                raise UnknownRun(run_id, store.where)
            check_same_spec(run_id, RunSpec.from_stored(root.args), spec)
            if root.settled:
                return await _stored_outcome(store, root)
            return await _execute(store, root, invocation, reporter, resumed=not created)

    return run_command(start, run_id, executes=True)


def with_provider(spec: RunSpec, invocation: Invocation) -> RunSpec:
    """The spec with its provider's identity options and its styles' templates, checked
    before anything is written: an unknown provider, a bad option or a missing key is bad
    input."""
    provider_class: Any = get_provider_class(spec.provider)
    options = build_options(provider_class.Options, spec.provider, list(invocation.option_pairs))
    provider_class.check_credentials(options)
    return dataclasses.replace(
        spec, options=identity(options), templates=templates_for(spec.all_styles)
    )


def root_promise(
    run_id: str, spec: RunSpec, invocation: Invocation, created_at: float, **options: Any
) -> NewPromise:
    """A run's root promise: its spec as arguments; its retry budget, image folder and any
    other ``options`` (a detached run's mark) as options."""
    out_dir = _image_dir(invocation.out_dir or default_image_dir(run_id))
    options |= {
        "max_attempts": invocation.max_attempts or DEFAULT_MAX_ATTEMPTS,
        "out_dir": str(out_dir),
    }
    return NewPromise(
        id=run_id,
        parent_id=None,
        seq=None,
        func=WORKFLOW,
        args_json=encode_args(spec.kwargs()),
        created_at=created_at,
        options_json=_json(options),
    )


async def _create_root(store: Store, run_id: str, spec: RunSpec, invocation: Invocation) -> bool:
    """Write the run's root; False if another process created it first (then the spec
    stored by that process is the one to check)."""
    root = root_promise(run_id, spec, invocation, time.time())
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
            async with opened_store(url, create=False, write=True) as store:
                root = await read_root(store, run_id)
                reopen = retry_failed and root.state == "rejected"
                if root.settled and not reopen:
                    return await _stored_outcome(store, root)
                return await _execute(
                    store, root, invocation, reporter, resumed=True, reopen=reopen
                )
        except StoreMissing as missing:
            raise UnknownRun(run_id, missing.where) from None

    return run_command(resume, run_id, executes=True)


def show_run(url: str, run_id: str) -> RunOutcome:
    async def show() -> RunOutcome:
        try:
            async with opened_store(url, create=False, write=False) as store:
                root = await read_root(store, run_id)
                outcome = await _stored_outcome(store, root)
                history = await store.failed_attempts(run_id)
                return dataclasses.replace(outcome, history=history)
        except StoreMissing as missing:
            raise UnknownRun(run_id, missing.where) from None

    return run_command(show, run_id)


def list_runs(url: str, limit: int | None = None) -> list[RunSummary]:
    async def listing() -> list[RunSummary]:
        try:
            async with opened_store(url, create=False, write=False) as store:
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

    return run_command(listing, None)


def check_same_spec(run_id: str, stored: RunSpec, given: RunSpec) -> None:
    if stored.prompts or given.prompts:
        from imagepipe.prompts import first_changed_row

        changed = first_changed_row(
            [dict(r) for r in stored.prompts], [dict(r) for r in given.prompts]
        )
        if changed:
            raise BadInput(
                f"run {quoted(run_id)} already exists with another prompt file: {changed}; "
                "pick another --id or omit it"
            )
    for key in sorted(set(stored.options) | set(given.options)):
        if stored.options.get(key) != given.options.get(key):
            raise RunConflict(run_id, f"-o {key}", stored.options.get(key), given.options.get(key))
    for name in RunSpec.FIELDS:
        old, new = getattr(stored, name), getattr(given, name)
        if old != new:
            shown_old = list(old) if isinstance(old, tuple) else old
            shown_new = list(new) if isinstance(new, tuple) else new
            raise RunConflict(run_id, name, shown_old, shown_new)


# -- execution -----------------------------------------------------------------------


def run_command(
    command: Callable[[], Awaitable[T]], run_id: str | None, *, executes: bool = False
) -> T:
    """Run a command on an event loop; the core's errors become imagepipe's. For a command
    that ``executes`` a run, Ctrl-C and SIGTERM become :class:`Interrupted` (the run stays
    resumable).

    The first signal cancels the run, which stops cleanly (branches left pending, lease
    released); later ones are ignored. asyncio.run's own SIGINT handler raised
    KeyboardInterrupt for a second Ctrl-C at whatever line was running, in the middle of
    that clean-up: Runner.close then waited for tasks that would never finish (a 10-minute
    hang), or the KeyboardInterrupt escaped after the message was printed (exit -2)."""
    received: str | None = None
    main_task: asyncio.Task[T] | None = None

    def stop(name: str) -> None:
        nonlocal received
        if received is not None:
            return  # the first signal's clean stop is under way
        received = name
        if main_task is not None:
            with contextlib.suppress(RuntimeError):  # the loop has already closed
                main_task.get_loop().call_soon_threadsafe(main_task.cancel)

    async def main() -> T:
        nonlocal main_task
        main_task = asyncio.current_task()
        if received is not None:  # signalled before the loop ran
            raise asyncio.CancelledError
        return await command()

    # Plain handlers, installed before asyncio.run so that it installs none of its own; not
    # loop.add_signal_handler, whose wakeup fd outlives the loop's socket by a few lines of
    # loop.close() ("Bad file descriptor" printed if a signal lands there).
    previous = {}
    for sig in (signal.SIGINT, signal.SIGTERM) if executes else ():
        # Not available off the main thread (tests) or on Windows: Ctrl-C still works.
        with contextlib.suppress(ValueError, OSError):
            previous[sig] = signal.signal(sig, lambda signum, _: stop(signal.Signals(signum).name))
    try:
        return asyncio.run(main())
    except DurableError as exc:
        raise from_core(exc, run_id) from exc
    except (KeyboardInterrupt, asyncio.CancelledError):
        if not executes or run_id is None:
            raise
        raise Interrupted(run_id, received or "SIGINT") from None
    finally:
        for sig, handler in previous.items():
            # After an interruption, SIG_IGN rather than our handler: at exit CPython resets
            # Python-level handlers to SIG_DFL, and a late Ctrl-C then killed it (-2).
            signal.signal(sig, handler if received is None else signal.SIG_IGN)


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
    execution = execution_for(root, invocation)
    spec, provider = execution.spec, execution.deps.provider
    lease = LeaseKeeper(store, root.id, stale_after=settings.lease_timeout())
    await lease.check_free()
    ctx = RunContext(
        store,
        root.id,
        execution.deps,
        retry=execution.retry,
        lease=lease,
        on_event=reporter.on_event,
        concurrency=invocation.concurrency or execution.default_concurrency,
        attempt_timeout=invocation.attempt_timeout,
    )
    started = time.perf_counter()
    try:
        await ctx.load(reopen_rejected=reopen)
        reporter.run_started(RunInfo(root.id, spec, resumed, execution.retry.max_attempts))
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
        await provider.aclose()
    wall_ms = round((time.perf_counter() - started) * 1000)
    branches = LaunchedBranches(ctx.launched)
    # Not read back: every branch is known to the context, as committed.
    executed_root = dataclasses.replace(root, state=settled.state)
    return run_outcome(executed_root, branches, wall_ms=wall_ms, executed=True)


@dataclass(frozen=True)
class Execution:
    """What executing a stored run's branches takes in this invocation, whoever executes
    them (``run``/``resume`` here, or a worker)."""

    spec: RunSpec
    deps: Deps
    retry: RetryPolicy
    default_concurrency: int


def execution_for(root: PromiseRecord, invocation: Invocation) -> Execution:
    """The run's provider (checked for its key) with its stored identity options and this
    invocation's connection settings, its image folder and its retry policy."""
    spec = RunSpec.from_stored(root.args)
    provider_class: Any = get_provider_class(spec.provider)
    options = _invocation_options(root.id, spec, provider_class, invocation)
    provider_class.check_credentials(options)
    out_dir = _image_dir(
        invocation.out_dir or root.options.get("out_dir") or default_image_dir(root.id)
    )
    max_attempts = invocation.max_attempts or int(
        root.options.get("max_attempts", DEFAULT_MAX_ATTEMPTS)
    )
    provider = _provider(provider_class, options, invocation)
    return Execution(
        spec=spec,
        deps=Deps(provider, options, spec.templates, out_dir),
        # The simulated provider has no shared rate limit to spread retries over: no
        # jitter, so that the demo's back-off is the reference's 2 s, 4 s, 8 s ...
        retry=RetryPolicy(
            max_attempts=max_attempts,
            jitter=spec.provider != "simulated",
            time_scale=invocation.time_scale,
        ),
        default_concurrency=int(provider_class.default_concurrency),
    )


def _invocation_options(
    run_id: str, spec: RunSpec, provider_class: Any, invocation: Invocation
) -> ProviderOptions:
    """The run's provider options: its stored identity, with this invocation's connection
    settings (``-o base_url ...``); an identity option that differs is a conflict."""
    given = build_options(provider_class.Options, spec.provider, list(invocation.option_pairs))
    for key, value in identity(given).items():
        if key in dict(invocation.option_pairs) and spec.options.get(key) != value:
            raise RunConflict(run_id, f"option {key}", spec.options.get(key), value)
    pairs = [(k, str(v)) for k, v in spec.options.items()] + list(invocation.option_pairs)
    return build_options(provider_class.Options, spec.provider, pairs)


def _provider(provider_class: Any, options: ProviderOptions, invocation: Invocation) -> Any:
    """One provider instance for the run, shared by its branches."""
    if provider_class is SimulatedProvider:
        return SimulatedProvider(
            options,
            time_scale=invocation.time_scale,
            latency_ms=invocation.sim_latency_ms,
            faults=invocation.faults,
        )
    from imagepipe.providers.http import Pacer

    pacer = Pacer(
        rpm=invocation.rpm,
        coordinated=settings.coordinated_backoff(),
        time_scale=invocation.time_scale,
    )
    return provider_class(options, pacer=pacer, time_scale=invocation.time_scale)


def _image_dir(path: str | Path) -> Path:
    """Where a run's images go, made absolute (the store may be read from elsewhere)."""
    return Path(path).expanduser().absolute()


def _json(value: object) -> str:
    from imagepipe.durable.records import canonical_json

    return canonical_json(value)
