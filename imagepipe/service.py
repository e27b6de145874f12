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
import re
import signal
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from imagepipe import settings
from imagepipe.durable import (
    AttemptRecord,
    ErrorInfo,
    Event,
    PromiseRecord,
    RunContext,
    SQLiteStore,
)
from imagepipe.durable.lease import hold_lease
from imagepipe.durable.sqlite import check_store_path
from imagepipe.errors import (
    BadInput,
    Interrupted,
    NonDeterminism,
    PromiseRejected,
    RunConflict,
    UnknownRun,
)
from imagepipe.pipeline import Deps, image_pipeline
from imagepipe.providers import KNOWN_STYLES, Faults, SimulatedProvider
from imagepipe.retry import DEFAULT_MAX_ATTEMPTS, ExponentialRetry

__all__ = [
    "DEFAULT_CONCURRENCY",
    "Branch",
    "Invocation",
    "QuietReporter",
    "Reporter",
    "RunInfo",
    "RunOutcome",
    "RunSpec",
    "RunSummary",
    "list_runs",
    "new_run_id",
    "resume_run",
    "show_run",
    "start_run",
]

WORKFLOW = "image_pipeline"
#: Provider calls in flight by default. Image APIs limit concurrent requests per key (a
#: handful to a few dozen); 16 keeps a burst within common tiers while the default three
#: styles, and any few variations, still all run at once.
DEFAULT_CONCURRENCY = 16
MAX_PROMPT = 4000
MAX_VARIATIONS = 100_000
_RUN_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.:-]{0,199}")
_CHILD_SUFFIX = re.compile(r"\.\d+$")


# -- what a run is -------------------------------------------------------------------


@dataclass(frozen=True)
class RunSpec:
    """The identity of a run: reusing an id with a different spec is refused."""

    prompt: str
    styles: tuple[str, ...]
    crash: bool = False
    variations: int = 1

    def args(self) -> list[Any]:
        return [self.prompt, list(self.styles), self.crash, self.variations]

    @classmethod
    def from_args(cls, args: Sequence[Any]) -> RunSpec:
        prompt, styles, crash, variations = args
        return cls(str(prompt), tuple(styles), bool(crash), int(variations))

    def validate(self) -> None:
        if not self.prompt.strip():
            raise BadInput('the prompt is empty; say what to draw: imagepipe run "a lighthouse"')
        if len(self.prompt) > MAX_PROMPT:
            raise BadInput(f"the prompt has {len(self.prompt)} characters; at most {MAX_PROMPT}")
        if not self.styles:
            raise BadInput("no style chosen; pass --style at least once")
        seen: set[str] = set()
        for style in self.styles:
            if style not in KNOWN_STYLES:
                raise BadInput(f"unknown style {style!r}; choose from {', '.join(KNOWN_STYLES)}")
            if style in seen:
                raise BadInput(f"style {style!r} is given twice")
            seen.add(style)
        if not 1 <= self.variations <= MAX_VARIATIONS:
            raise BadInput(
                f"--variations must be between 1 and {MAX_VARIATIONS}, not {self.variations}"
            )


@dataclass(frozen=True)
class Invocation:
    """How this process executes a run. Not part of the run's identity."""

    max_attempts: int | None = None  # None: the value stored with the run (default 5)
    concurrency: int | None = None
    time_scale: float = 1.0
    sim_latency_ms: int | None = None
    attempt_timeout: float | None = None
    faults: Faults = field(default_factory=Faults)

    def validate(self) -> None:
        if self.max_attempts is not None and self.max_attempts < 1:
            raise BadInput(f"--max-attempts must be at least 1, not {self.max_attempts}")
        if self.concurrency is not None and self.concurrency < 1:
            raise BadInput(f"--concurrency must be at least 1, not {self.concurrency}")
        if self.sim_latency_ms is not None and self.sim_latency_ms < 0:
            raise BadInput(f"--sim-latency must be 0 or more, not {self.sim_latency_ms}")
        if self.attempt_timeout is not None and self.attempt_timeout <= 0:
            raise BadInput(f"--attempt-timeout must be positive, not {self.attempt_timeout}")
        for style in sorted(self.faults.fail_styles):
            if style not in KNOWN_STYLES:
                raise BadInput(
                    f"unknown --fail-style {style!r}; choose from {', '.join(KNOWN_STYLES)}"
                )
        for name, rate in (
            ("--fail-rate", self.faults.fail_rate),
            ("--hang-rate", self.faults.hang_rate),
        ):
            if not 0 <= rate <= 1:
                raise BadInput(f"{name} must be between 0 and 1, not {rate}")


def validate_run_id(run_id: str) -> None:
    if not _RUN_ID.fullmatch(run_id):
        raise BadInput(f"run id {run_id!r} is not valid: use up to 200 letters, digits and _ . : -")
    if _CHILD_SUFFIX.search(run_id):
        raise BadInput(f"run id {run_id!r} ends like a branch id (.N); choose another")


def new_run_id() -> str:
    return f"pipeline-{int(time.time() * 1000)}"


# -- what a run produced -------------------------------------------------------------


@dataclass(frozen=True)
class Branch:
    id: str
    style: str
    variation: int
    state: str
    attempts: int
    value: dict[str, Any] | None
    error: ErrorInfo | None
    replayed: bool

    @classmethod
    def from_record(cls, record: PromiseRecord, *, replayed: bool) -> Branch:
        return cls(
            id=record.id,
            style=str(record.args[1]),
            variation=int(record.args[2]),
            state=record.state,
            attempts=record.attempts,
            value=record.value,
            error=record.error,
            replayed=replayed,
        )


def run_state(record: PromiseRecord) -> str:
    return {"resolved": "resolved", "rejected": "failed"}.get(record.state, "pending")


@dataclass(frozen=True, repr=False)
class RunOutcome:
    id: str
    state: str
    spec: RunSpec
    branches: list[Branch]
    wall_ms: int
    created_at: float
    #: False when the run was already settled and only read from the store
    executed: bool = True
    #: failed attempts of every branch, oldest first (filled in by ``show``)
    history: list[AttemptRecord] = field(default_factory=list)

    def __repr__(self) -> str:
        # Short on purpose: asyncio formats the main task's result (this object) while
        # shutting down, and a 10,000-branch repr cost ~0.1 s there.
        return f"RunOutcome(id={self.id!r}, state={self.state!r}, branches={len(self.branches)})"

    @property
    def images(self) -> list[Branch]:
        return [b for b in self.branches if b.state == "resolved"]

    @property
    def failures(self) -> list[Branch]:
        return [b for b in self.branches if b.state == "rejected"]

    @property
    def sequential_ms(self) -> int:
        return sum(int(b.value["duration_ms"]) for b in self.images if b.value)

    def result_json(self) -> dict[str, Any]:
        """The ``run --json`` / ``resume --json`` shape."""
        return {
            "id": self.id,
            "state": self.state,
            "prompt": self.spec.prompt,
            "images": [
                {
                    "style": b.style,
                    "url": b.value["url"],
                    "duration_ms": b.value["duration_ms"],
                    "attempts": b.attempts,
                    "replayed": b.replayed,
                }
                for b in self.images
                if b.value
            ],
            "wall_ms": self.wall_ms,
            "sequential_ms": self.sequential_ms,
        }

    def show_json(self) -> dict[str, Any]:
        """The ``show --json`` shape."""
        return {
            "id": self.id,
            "state": self.state,
            "prompt": self.spec.prompt,
            "branches": [
                {
                    "id": b.id,
                    "style": b.style,
                    "state": b.state,
                    "attempts": b.attempts,
                    "value": b.value,
                    "error": None if b.error is None else f"{b.error.type}: {b.error.message}",
                }
                for b in self.branches
            ],
        }


@dataclass(frozen=True)
class RunSummary:
    id: str
    state: str
    prompt: str
    created_at: float
    counts: dict[str, int]

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "state": self.state,
            "prompt": self.prompt,
            "created_at": _iso(self.created_at),
        }


def _iso(ts: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ts))


@dataclass(frozen=True)
class RunInfo:
    """What a reporter is told when execution starts."""

    id: str
    spec: RunSpec
    resumed: bool
    db_path: str
    max_attempts: int


class Reporter(Protocol):
    def run_started(self, info: RunInfo) -> None: ...

    @property
    def on_event(self) -> Callable[[Event], None] | None:
        """Where the core's events go; None for a reporter that ignores them."""
        ...


class QuietReporter:
    """Reports nothing; ``on_event`` is None so the core does not even build events."""

    on_event = None

    def run_started(self, info: RunInfo) -> None:
        pass


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


def _outcome(
    store: SQLiteStore, root: PromiseRecord, *, computed: set[str] | None = None, wall_ms: int = 0
) -> RunOutcome:
    """The run as stored; ``computed`` holds the branches settled by this invocation
    (None: nothing was executed, everything is replayed)."""
    executed = computed is not None
    computed = computed or set()
    branches = [
        Branch.from_record(r, replayed=r.id not in computed) for r in store.children(root.id)
    ]
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
    """Run the workflow on an event loop; turn Ctrl-C and SIGTERM into :class:`Interrupted`."""
    received = "SIGINT"

    async def main() -> RunOutcome:
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
        return await _execute(store, root, invocation, reporter, resumed=resumed, reopen=reopen)

    # Thousands of branches allocate many short-lived objects; the default collector
    # threshold (700) makes CPython rescan them thousands of times. Freeze what exists
    # (modules, the store) and collect young objects less often.
    thresholds = gc.get_threshold()
    gc.freeze()
    gc.set_threshold(50_000, 20, 20)
    try:
        return asyncio.run(main())
    except KeyboardInterrupt:
        raise Interrupted(root.id, "SIGINT") from None
    except asyncio.CancelledError:
        raise Interrupted(root.id, received) from None
    finally:
        gc.set_threshold(*thresholds)
        gc.unfreeze()


async def _execute(
    store: SQLiteStore,
    root: PromiseRecord,
    invocation: Invocation,
    reporter: Reporter,
    *,
    resumed: bool,
    reopen: bool = False,
) -> RunOutcome:
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
        reporter.run_started(RunInfo(root.id, spec, resumed, store.path, max_attempts))
        try:
            result = await ctx.run_workflow(image_pipeline, *spec.args())
            store.resolve(root.id, result)
        except PromiseRejected as exc:
            await ctx.settle_all()  # every other branch still finishes
            store.reject(root.id, ErrorInfo("BranchRejected", str(exc), retryable=False))
        except NonDeterminism:
            await ctx.cancel_all()
            store.rollback()  # nothing of this invocation (e.g. a retry's reopen) is kept
            raise
        except BaseException:
            await ctx.cancel_all()  # interrupted or broken: pending branches stay resumable
            raise
        await ctx.flush()
    wall_ms = round((time.perf_counter() - started) * 1000)
    settled_root = store.get(root.id)
    assert settled_root is not None
    return _outcome(store, settled_root, computed=ctx.computed, wall_ms=wall_ms)


def _reopen_rejected(store: SQLiteStore, run_id: str) -> None:
    """Set a failed run and its rejected branches back to pending (history stays)."""
    for child in store.children(run_id):
        if child.state == "rejected":
            store.reopen(child.id)
    store.reopen(run_id)  # committed with the first branch's write, or rolled back
