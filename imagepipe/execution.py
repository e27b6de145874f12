"""What executing or reading a stored run takes, for every command that does it: plain
runs (:mod:`imagepipe.service`) and detached ones (:mod:`imagepipe.detached`) alike.

- :func:`opened_store`, :func:`read_root`: the store at a URL, a run's root promise
- :func:`run_command`: an event loop on which Ctrl-C and SIGTERM are a clean stop
- :func:`with_provider`, :func:`check_same_spec`, :func:`run_options`: a run's identity
  checked, and what it stores beside it
- :func:`execution_for` / :class:`RunSetup`: the provider, image folder and retry policy
  this invocation executes a stored run's branches with, whoever executes them
- :func:`run_outcome`: a run as a command reports it
- :func:`image_dir_of`, :func:`reconcile_run_images`, :func:`reconcile_outcomes`,
  :func:`tidy_after_execution`: a run's image folder, and bringing it in line with the store
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import signal
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from imagepipe import settings
from imagepipe.batches.setup import BATCH, batch_mode_of, driver_for
from imagepipe.budget import (
    MICRO_USD,
    Caps,
    cap_reached,
    caps_of,
    reservation,
    with_image_cap,
)
from imagepipe.durable import (
    BranchOutcome,
    DurableError,
    Execution,
    PromiseRecord,
    RetryPolicy,
    Store,
    StoreOptions,
    execute_run,
    open_store,
)
from imagepipe.durable.errors import SpendingCapReached
from imagepipe.durable.records import ChildColumns
from imagepipe.errors import BadInput, CapReached, Interrupted, RunConflict, UnknownRun, from_core
from imagepipe.files import (
    ReconcileReport,
    claim_image_dir,
    default_image_dir,
    has_staged,
    image_dir_owner,
    reconcile_images,
    remove_temporaries,
)
from imagepipe.pipeline import IMAGE_RUN, Deps, recorded_images
from imagepipe.prices import current_prices, prices_if_readable
from imagepipe.providers.base import ProviderError
from imagepipe.providers.contract import ProviderClass, ProviderSettings
from imagepipe.providers.options import ProviderOptions, build_options, identity
from imagepipe.providers.registry import get_provider_class
from imagepipe.runs.batches import BatchesSubmitted, RunBatches
from imagepipe.runs.model import DEFAULT_MAX_ATTEMPTS, Branch, Invocation, RunSpec
from imagepipe.runs.outcome import LaunchedBranches, RunOutcome, StoredBranches, run_state
from imagepipe.runs.reporting import Reporter, RunInfo
from imagepipe.styles import templates_for
from imagepipe.text import quoted

__all__ = [
    "WORKFLOW",
    "RunSetup",
    "check_same_spec",
    "check_stored_cost_cap",
    "checked_caps",
    "execute_here",
    "execution_for",
    "image_dir",
    "image_dir_of",
    "opened_store",
    "provider_settings",
    "read_root",
    "reconcile_outcomes",
    "reconcile_run_images",
    "run_command",
    "run_options",
    "run_outcome",
    "stopped_at_cap",
    "stored_outcome",
    "tidy_after_execution",
    "with_provider",
]

T = TypeVar("T")

#: the function name a run's root promise is stored under
WORKFLOW = IMAGE_RUN.name


@contextlib.asynccontextmanager
async def opened_store(url: str, *, create: bool, write: bool) -> AsyncIterator[Store]:
    """The store at ``url``; opened to ``write``, its integrity is checked first."""
    options = StoreOptions(
        create=create,
        verify=write,
        busy_timeout=settings.busy_timeout(),
        reconnect=settings.db_reconnect(),
        stalled_after=settings.lease_timeout(),
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


def with_provider(spec: RunSpec, invocation: Invocation) -> RunSpec:
    """The spec with its provider's identity options and its styles' templates, checked
    before anything is written: an unknown provider, a bad option or a missing key is bad
    input."""
    provider_class = get_provider_class(spec.provider)
    options = build_options(provider_class.Options, spec.provider, list(invocation.option_pairs))
    _check_credentials(provider_class, options)
    return dataclasses.replace(
        spec, options=identity(options), templates=templates_for(spec.all_styles)
    )


def checked_caps(spec: RunSpec, invocation: Invocation) -> Caps:
    """This command's spending caps for the run, checked before anything is written: a
    cost cap on a model whose price is unknown is bad input."""
    caps = caps_of(invocation)
    if caps.max_cost is not None:
        caps.check_priced(spec.provider, spec.options, current_prices())
    return caps


async def check_stored_cost_cap(store: Store, root: PromiseRecord, caps: Caps) -> None:
    """A cost cap stored with the run needs a price in this process too: without one its
    attempts would reserve images only, and the cap would not hold (a prices file that
    names the model without its quality, a worker's own file). Bad input, before this
    command writes anything; a cap this command gives is checked by :func:`checked_caps`."""
    if caps.max_cost is not None:
        return
    stored = (await store.spending(root.id)).get(MICRO_USD)
    if stored is None or stored.limit is None:
        return
    spec = RunSpec.from_stored(root.args)
    whose = f"the --max-cost stored with run {quoted(root.id)}"
    Caps(max_cost=stored.limit).check_priced(
        spec.provider, spec.options, current_prices(), whose=whose
    )


async def stopped_at_cap(
    store: Store, run_id: str, reached: SpendingCapReached, *, batch: bool = False
) -> CapReached:
    """The one line for a run stopped at a spending cap, with the cap that would finish
    its pending branches at their worst case (at the batch rate for a ``batch`` run)."""
    root = await read_root(store, run_id)
    spec = RunSpec.from_stored(root.args)
    prices = prices_if_readable()
    reserve = reservation(spec.provider, spec.options, spec.templates, prices, batch=batch)
    reserve = await with_image_cap(store, run_id, reserve)
    pending = [c for c in await store.children(run_id) if not c.settled]
    return cap_reached(reached, run_id, pending, reserve, await store.spending(run_id))


def run_options(run_id: str, invocation: Invocation) -> dict[str, Any]:
    """What a new run stores beside its spec: its retry budget and image folder."""
    out_dir = image_dir(invocation.out_dir or default_image_dir(run_id))
    return {
        "max_attempts": invocation.max_attempts or DEFAULT_MAX_ATTEMPTS,
        "out_dir": str(out_dir),
    }


def check_same_spec(run_id: str, stored: RunSpec, given: RunSpec) -> None:
    """Refuse ``given`` unless it makes the same run as ``stored``, in one short line.

    A prompt file's rows are compared by their prompt, style and variations only: comment
    and blank lines move a row's line number but leave the run as it is. Only the first
    changed row is named (a file can hold 100,000 rows)."""
    if bool(stored.prompts) != bool(given.prompts):
        had = "with" if stored.prompts else "without"
        raise BadInput(
            f"run {quoted(run_id)} already exists {had} a prompt file; pick another --id or omit it"
        )
    if stored.prompts:
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
        if name == "prompts":
            continue  # compared row by row above: a row's line number is not its identity
        if name == "templates":  # one per style, and each row of a prompt file may add one
            _check_same_templates(run_id, stored.templates, given.templates)
            continue
        old, new = getattr(stored, name), getattr(given, name)
        if old != new:
            shown_old = list(old) if isinstance(old, tuple) else old
            shown_new = list(new) if isinstance(new, tuple) else new
            raise RunConflict(run_id, name, shown_old, shown_new)


def _check_same_templates(run_id: str, stored: Mapping[str, str], given: Mapping[str, str]) -> None:
    """Name the first style whose template differs, not every template of the run."""
    for style in sorted(set(stored) | set(given)):
        if stored.get(style) != given.get(style):
            field = f"the template of style {quoted(style)}"
            raise RunConflict(run_id, field, stored.get(style), given.get(style))


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


@dataclass(frozen=True)
class RunSetup:
    """What executing a stored run's branches takes in this invocation, whoever executes
    them (``run``/``resume`` here, or a worker)."""

    spec: RunSpec
    deps: Deps
    retry: RetryPolicy
    default_concurrency: int
    #: what an attempt reserves against the run's spending caps (None: a free provider)
    reserve: Callable[[str, Mapping[str, Any]], Mapping[str, int]] | None = None
    #: the same, for an attempt sent in a provider's batch (at its batch rate)
    batch_reserve: Callable[[str, Mapping[str, Any]], Mapping[str, int]] | None = None


def execution_for(root: PromiseRecord, invocation: Invocation) -> RunSetup:
    """The run's provider (checked for its key) with its stored identity options and this
    invocation's connection settings, its image folder and its retry policy."""
    spec = RunSpec.from_stored(root.args)
    provider_class = get_provider_class(spec.provider)
    options = _invocation_options(root.id, spec, provider_class, invocation)
    _check_credentials(provider_class, options)
    out_dir = image_dir_of(root, invocation)
    claim_image_dir(out_dir, root.id)
    max_attempts = invocation.max_attempts or int(
        root.options.get("max_attempts", DEFAULT_MAX_ATTEMPTS)
    )
    provider = provider_class.create(options, provider_settings(invocation))
    prices = prices_if_readable()
    return RunSetup(
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
        reserve=reservation(spec.provider, spec.options, spec.templates, prices),
        batch_reserve=reservation(spec.provider, spec.options, spec.templates, prices, batch=True),
    )


def _check_credentials(provider_class: ProviderClass, options: ProviderOptions) -> None:
    """The provider's key checked before anything is written: whatever provider error it
    raises (:class:`~imagepipe.providers.base.MissingCredentials` for a missing key) is bad
    input, exit 2, in the provider's words (they name the variable to set)."""
    try:
        provider_class.check_credentials(options)
    except ProviderError as exc:
        raise BadInput(exc.message) from exc


def _invocation_options(
    run_id: str, spec: RunSpec, provider_class: ProviderClass, invocation: Invocation
) -> ProviderOptions:
    """The run's provider options: its stored identity, with this invocation's connection
    settings (``-o base_url ...``); an identity option that differs is a conflict."""
    given = build_options(provider_class.Options, spec.provider, list(invocation.option_pairs))
    for key, value in identity(given).items():
        if key in dict(invocation.option_pairs) and spec.options.get(key) != value:
            raise RunConflict(run_id, f"option {key}", spec.options.get(key), value)
    pairs = [(k, str(v)) for k, v in spec.options.items()] + list(invocation.option_pairs)
    return build_options(provider_class.Options, spec.provider, pairs)


def provider_settings(invocation: Invocation) -> ProviderSettings:
    """What of this invocation the provider is built with (not the run's identity)."""
    return ProviderSettings(
        time_scale=invocation.time_scale,
        rpm=invocation.rpm,
        coordinated_backoff=settings.coordinated_backoff(),
        rate_limit_patience=settings.rate_limit_patience(),
        sim_latency_ms=invocation.sim_latency_ms,
    )


def image_dir_of(root: PromiseRecord, invocation: Invocation | None = None) -> Path:
    """Where the run's images go: ``--out`` of this invocation, else the run's own."""
    given = invocation.out_dir if invocation is not None else None
    return image_dir(given or root.options.get("out_dir") or default_image_dir(root.id))


async def reconcile_run_images(
    store: Store, root: PromiseRecord, *, exclusive: bool = True
) -> ReconcileReport:
    """Bring a run's image folder in line with its store (:func:`.files.reconcile_images`);
    ``exclusive`` only when no other process can be executing the run (it is settled, or
    this process holds it). The store is read only if something is staged."""
    directory = image_dir_of(root)
    if not has_staged(directory):
        return ReconcileReport()
    records = await store.children(root.id)
    outcomes = [(r.state, r.value) for r in records]
    return reconcile_outcomes(root.id, directory, outcomes, exclusive=exclusive)


def reconcile_outcomes(
    run_id: str,
    directory: Path | None,
    outcomes: Iterable[tuple[str, Any]],
    *,
    exclusive: bool,
) -> ReconcileReport:
    """Reconcile run ``run_id``'s image ``directory`` with its branches' (state, value), if
    anything is staged there (and the folder is still the run's)."""
    if directory is None or not has_staged(directory):
        return ReconcileReport()
    recorded = recorded_images(directory, outcomes)
    return reconcile_images(directory, recorded, exclusive=exclusive, owner=run_id)


def tidy_after_execution(
    run_id: str, directory: Path | None, outcomes: Iterable[tuple[str, Any]]
) -> ReconcileReport:
    """What ends an execution that settled the run (every branch is settled, so no other
    process can be writing its images legitimately): reconcile its folder, and remove the
    temporary files older versions wrote beside the images and a kill left behind. Not on
    a mere ``resume`` of a settled run: listing a folder of 100,000 images each time would
    cost more than the files it might find."""
    report = reconcile_outcomes(run_id, directory, outcomes, exclusive=True)
    if directory is not None and image_dir_owner(directory) == run_id:
        removed = remove_temporaries(directory)
        report = dataclasses.replace(report, removed=report.removed + removed)
    return report


def image_dir(path: str | Path) -> Path:
    """Where a run's images go, made absolute (the store may be read from elsewhere)."""
    return Path(path).expanduser().absolute()


# -- executing a run here ------------------------------------------------------------


async def stored_outcome(store: Store, root: PromiseRecord) -> RunOutcome:
    """A run that nothing executed in this invocation, as stored (with its batches)."""
    branches = StoredBranches(await ChildColumns.collect(store.where, store.child_rows(root.id)))
    return await _with_batches(store, root, run_outcome(root, branches, wall_ms=0, executed=False))


async def _with_batches(store: Store, root: PromiseRecord, outcome: RunOutcome) -> RunOutcome:
    """``outcome`` with the run's batches (read from its notes) if it was sent in batches:
    reported with them, and estimated at their price."""
    if root.options.get(BATCH) is not True:
        return outcome
    batches = RunBatches.from_notes(await store.notes(root.id))
    return dataclasses.replace(outcome, batches=batches)


async def execute_here(
    store: Store,
    root: PromiseRecord,
    invocation: Invocation,
    reporter: Reporter,
    *,
    resumed: bool,
    reopen: bool = False,
    follow: bool = True,
    submit: bool = True,
    following: bool = False,
) -> RunOutcome:
    """The run itself, executed here by the core's run lifecycle (under the run's lease);
    once it has settled, its image folder is tidied while this process still holds it.

    A run through batches sends its unsent groups and (with ``submit``) plans new ones for
    its free branches, then (with ``follow``) polls and collects its batches; without
    ``follow`` it returns as stored once every batch is created."""
    execution = execution_for(root, invocation)
    spec, provider = execution.spec, execution.deps.provider
    batch = batch_mode_of(root.options, invocation)
    driver = driver_for(
        root,
        spec.provider,
        execution.deps.options,
        provider_settings(invocation),
        batch=batch,
        follow=follow,
        submit=submit,
        out_dir=execution.deps.out_dir,
        reserve=await with_image_cap(store, root.id, execution.batch_reserve) if batch else None,
        on_progress=reporter.on_batches,
        time_scale=invocation.time_scale,
    )
    deps = execution.deps if driver is None else dataclasses.replace(execution.deps, batches=driver)

    def started() -> None:
        info = RunInfo(root.id, spec, resumed, execution.retry.max_attempts, following=following)
        reporter.run_started(info)

    def tidy(branches: Sequence[BranchOutcome]) -> None:
        # every branch is settled and this process holds the run: finish what kills left
        # in the image folder (staged files recorded but not renamed, orphans)
        outcomes = ((b.state, b.value) for b in branches)
        tidy_after_execution(root.id, execution.deps.out_dir, outcomes)

    how = Execution(
        retry=execution.retry,
        concurrency=invocation.concurrency or execution.default_concurrency,
        attempt_timeout=invocation.attempt_timeout,
        lease_timeout=settings.lease_timeout(),
        on_event=reporter.on_event,
        cost_of_attempt=await with_image_cap(store, root.id, execution.reserve),
    )
    begun = time.perf_counter()
    try:
        executed = await execute_run(
            store,
            root,
            IMAGE_RUN,
            deps,
            how,
            reopen=reopen,
            on_started=started,
            on_settled=tidy,
        )
    except SpendingCapReached as reached:
        raise await stopped_at_cap(store, root.id, reached, batch=batch) from None
    except BatchesSubmitted:
        return await stored_outcome(store, root)
    finally:
        await provider.aclose()
        client = getattr(driver, "client", None)
        if client is not None:
            await client.aclose()
    wall_ms = round((time.perf_counter() - begun) * 1000)
    branches = LaunchedBranches(executed.branches)
    outcome = run_outcome(executed.root, branches, wall_ms=wall_ms, executed=True)
    return await _with_batches(store, root, outcome)
