"""Detached runs and the workers that execute them: ``run --detach``, ``worker``,
``watch`` and ``workers``. No printing, no typer here.

A detached run is a root promise whose options hold ``detached: true``, written together
with ALL its branches as pending (the same ids and arguments a plain run would create, from
the workflow's own fan-out). Workers on any host that reaches the store claim its branches
(:mod:`imagepipe.durable.worker`), run them with the run's stored provider and identity
options (keys from the worker's own environment), and settle the root with the last one.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from imagepipe import settings
from imagepipe.batches.setup import BATCH, POLL_FIRST, POLL_MOST
from imagepipe.budget import Caps, with_image_cap
from imagepipe.durable import (
    BranchOutcome,
    ErrorInfo,
    PromiseRecord,
    Store,
    StoreError,
    StoreMissing,
    bind_args,
    record_run,
)
from imagepipe.durable.errors import DrainRun, LeaseHeld, SpendingCapReached
from imagepipe.durable.events import (
    AttemptStarted,
    Event,
    PromiseQueued,
    PromiseRejectedEvent,
    PromiseReplayed,
    PromiseResolved,
)
from imagepipe.durable.lifecycle import reopen_run
from imagepipe.durable.records import RootRecord
from imagepipe.durable.retry import RetryPolicy
from imagepipe.durable.tasks import owned_tasks
from imagepipe.durable.worker import WORKER_PREFIX, BranchJob, Worker, WorkerStats
from imagepipe.errors import (
    AccountStopped,
    BadInput,
    BatchTrouble,
    BatchUnfinished,
    CapReached,
    ImagepipeError,
    Interrupted,
    StoreUnreachable,
    UnknownRun,
)
from imagepipe.execution import (
    WORKFLOW,
    RunSetup,
    check_same_spec,
    check_stored_cost_cap,
    checked_caps,
    execute_here,
    execution_for,
    image_dir,
    opened_store,
    read_root,
    run_command,
    run_options,
    run_outcome,
    stopped_at_cap,
    tidy_after_execution,
    with_provider,
)
from imagepipe.files import ImageDirUnusable, claim_image_dir
from imagepipe.pipeline import IMAGE_RUN, Deps, generate_image, summarize_run
from imagepipe.runs.batches import RunBatches
from imagepipe.runs.model import (
    DEFAULT_MAX_ATTEMPTS,
    Branch,
    Invocation,
    RunSpec,
    validate_run_id,
)
from imagepipe.runs.outcome import RunOutcome
from imagepipe.runs.reporting import QuietReporter, Reporter, RunInfo

__all__ = [
    "WorkerInfo",
    "detach_run",
    "execute_detached",
    "list_workers",
    "run_worker",
    "watch_run",
]


def detach_run(url: str, run_id: str, spec: RunSpec, invocation: Invocation) -> str:
    """Record the run and all its branches as pending for workers; execute nothing.
    Detaching the same run again is a no-op; another spec under its id is a conflict."""
    validate_run_id(run_id)
    spec.validate()
    invocation.validate()
    spec = with_provider(spec, invocation)
    caps = checked_caps(spec, invocation)
    out_dir = image_dir(invocation.out_dir) if invocation.out_dir else None
    if out_dir is not None:
        # the folder the workers will write to is the run's: refused now if it cannot be
        claim_image_dir(out_dir, run_id, mark=False)

    async def detach() -> str:
        async with opened_store(url, create=True, write=True) as store:
            if out_dir is not None and await store.get(run_id) is None:
                claim_image_dir(out_dir, run_id)
            root, _ = await record_run(
                store,
                run_id,
                IMAGE_RUN,
                spec.kwargs(),
                options=run_options(run_id, invocation),
                detached=True,
            )
            # another process may have recorded it first: its spec is the one to check
            if root.parent_id is not None or root.func != WORKFLOW:
                raise UnknownRun(run_id, store.where)
            check_same_spec(run_id, RunSpec.from_stored(root.args), spec)
            await caps.store(store, run_id)  # the workers' reservations check them
            return run_id

    return run_command(detach, run_id)


def _tidy_images(run_id: str, directory: Path | None, children: Sequence[BranchOutcome]) -> None:
    """A run's root is settled: no process can still be writing its images legitimately,
    so its image folder is brought in line with the store (staged files promoted, orphans
    removed)."""
    outcomes = [(c.state, c.value) for c in children]
    tidy_after_execution(run_id, directory, outcomes)


async def _branch_job(
    store: Store, run_id: str, execution: RunSetup, invocation: Invocation
) -> BranchJob[Deps]:
    """How this process runs a run's branches, whether a worker or a ``resume``."""
    reserve = await with_image_cap(store, run_id, execution.reserve)
    return BranchJob(
        fn=generate_image,
        deps=execution.deps,
        retry=execution.retry,
        summarize=summarize_run,
        attempt_timeout=invocation.attempt_timeout,
        cost_of_attempt=reserve,
        on_run_settled=functools.partial(_tidy_images, run_id, execution.deps.out_dir),
    )


def _refusing_job(error: ImageDirUnusable) -> BranchJob[None]:
    """The job of a run whose image folder this worker cannot use (taken by another run,
    not writable here): each of its branches is rejected with the reason, at once and
    without a provider call, so that the run fails saying why (``imagepipe retry ID``
    once it is fixed) and the worker goes on with the other runs."""

    @functools.wraps(generate_image)
    async def refuse(step: Any, /, **kwargs: Any) -> Any:
        raise error

    return BranchJob(
        fn=refuse, deps=None, retry=RetryPolicy(max_attempts=1), summarize=summarize_run
    )


def _job_maker(store: Store, invocation: Invocation) -> Callable[[PromiseRecord], Any]:
    async def job_for(root: PromiseRecord) -> BranchJob[Any]:
        # a cost cap this worker cannot price would not hold here: stop (exit 2)
        await check_stored_cost_cap(store, root, Caps())
        try:
            execution = execution_for(root, invocation)
        except ImageDirUnusable as exc:
            return _refusing_job(exc)
        return await _branch_job(store, root.id, execution, invocation)

    return job_for


def _idle_poll() -> float:
    """How often a worker with a free slot looks for claimable branches again."""
    return min(0.2, settings.lease_timeout() / 10)


def run_worker(
    url: str,
    invocation: Invocation,
    *,
    once: bool,
    on_lost: Callable[[str], None],
    on_batch_stop: Callable[[str], None] | None = None,
) -> WorkerStats:
    """Claim and run branches of detached runs; with ``once``, until none is pending.
    A run's spending caps are its own (given to ``run`` or ``resume``), not a worker's.

    Beside them, the worker collects the batches of runs sent through a provider's batch
    mode (``run --batch``) as ``resume`` would, one process per run at a time (the run's
    lease): ``on_batch_stop`` is told, in one line, why it stopped following one (its
    batches left branches unrun, a batch could not be read...).

    A provider's error of the account or the set-up (a refused key...) stops the worker
    once its requests in flight have ended (:class:`~imagepipe.errors.AccountStopped`,
    naming the run): every branch it would claim would meet it, while other workers,
    set up otherwise, may go on with them."""
    invocation.validate()
    if invocation.max_cost is not None or invocation.max_images is not None:
        raise BadInput(
            "--max-cost and --max-images are a run's: give them to run --detach or resume ID"
        )

    async def work() -> WorkerStats:
        async with opened_store(url, create=True, write=True) as store:
            await _forget_gone_workers(store)
            worker = Worker(
                store,
                _job_maker(store, invocation),
                concurrency=invocation.concurrency or 16,
                once=once,
                on_lost=on_lost,
                stale_after=settings.lease_timeout(),
                poll=_idle_poll(),
            )
            try:
                async with owned_tasks() as tasks:
                    collector = tasks.create_task(
                        _collect_batch_runs(
                            store, invocation, once=once, on_stop=on_batch_stop or _ignore
                        ),
                        name="worker:batches",
                    )
                    stats = await worker.run()
                    if not once:
                        collector.cancel()
                return stats
            except SpendingCapReached as reached:
                raise await stopped_at_cap(store, reached.run_id, reached) from None
            except DrainRun as exc:
                fix = getattr(exc.__cause__, "fix", None)
                raise AccountStopped(str(exc), fix, worker.drained, worker=True) from exc
            finally:
                for job in worker.jobs():
                    if job.deps is not None:  # a refusing job has no provider
                        await job.deps.provider.aclose()

    try:
        return run_command(work, "worker", executes=True)
    except StoreUnreachable as exc:  # no run to resume: a worker is simply started again
        raise StoreUnreachable(exc.store_error) from None
    except Interrupted as exc:
        stopped = ImagepipeError(
            f"worker stopped by {'SIGTERM' if exc.exit_code == 143 else 'SIGINT'}: the "
            "branches it held are pending again, for any worker to claim"
        )
        stopped.exit_code = exc.exit_code
        raise stopped from None


def _ignore(line: str) -> None:
    pass


async def _collect_batch_runs(
    store: Store, invocation: Invocation, *, once: bool, on_stop: Callable[[str], None]
) -> None:
    """A worker's part in runs sent in batches: follow each pending one whose batches are
    open (or planned and unsent) and that no live process holds, collecting them as
    ``resume`` does, each in a task of its own. With ``once``, until no such run is left.
    An account-wide error or a store failure stops the worker; anything else that ends a
    run's collection is told to ``on_stop`` and the worker goes on: it follows that run
    again only after a wait that doubles each time (from the first poll's to the longest),
    and with ``once`` not at all (what stopped it, an output line that cannot be read, a
    batch the provider no longer knows, would stop it again)."""
    following: dict[str, asyncio.Task[bool]] = {}
    #: runs whose following stopped: (loop time from which to follow again, the wait)
    resting: dict[str, tuple[float, float]] = {}
    first, most = POLL_FIRST * invocation.time_scale, POLL_MOST * invocation.time_scale
    stale_after = settings.lease_timeout()
    loop = asyncio.get_running_loop()
    try:
        while True:
            for run_id, task in list(following.items()):
                if task.done():
                    del following[run_id]
                    if task.result():  # what must stop the worker is raised here
                        wait = min(most, 2 * resting.get(run_id, (0.0, first / 2))[1])
                        resting[run_id] = (loop.time() + wait, wait)
                    else:
                        resting.pop(run_id, None)
            for root in await _batch_runs_to_collect(store, stale_after):
                rest = resting.get(root.id)
                if rest is not None and (once or loop.time() < rest[0]):
                    continue
                if root.id not in following:
                    following[root.id] = asyncio.create_task(
                        _follow_batches(store, root.id, invocation, on_stop),
                        name=f"worker:batches:{root.id}",
                    )
            if once and not following:
                return
            await asyncio.sleep(_idle_poll() * 5)
    finally:
        for task in following.values():
            task.cancel()
        await asyncio.gather(*following.values(), return_exceptions=True)


async def _batch_runs_to_collect(store: Store, stale_after: float) -> list[RootRecord]:
    """Pending runs sent in batches, with a batch open or unsent, that nobody holds."""
    found = []
    for root in await store.roots():
        if root.state != "pending" or root.func != WORKFLOW or root.options.get(BATCH) is not True:
            continue
        batches = RunBatches.from_notes(await store.notes(root.id))
        if not (batches.open or batches.unsent):
            continue
        holder = await store.lease_holder(root.id)
        if holder is None or holder.age > stale_after:
            found.append(root)
    return found


async def _follow_batches(
    store: Store, run_id: str, invocation: Invocation, on_stop: Callable[[str], None]
) -> bool:
    """Collect one run's batches here until they have all ended (or another process
    holds the run); True if the collection stopped short (told to ``on_stop``)."""
    root = await store.get(run_id)
    if root is None or root.settled:
        return False
    try:
        await execute_here(
            store, root, invocation, QuietReporter(), resumed=True, follow=True, submit=False
        )
    except LeaseHeld:
        return False  # another process follows it
    except (BatchUnfinished, BatchTrouble, CapReached, BadInput) as exc:
        on_stop(exc.message)
        return True
    return False


def watch_run(url: str, run_id: str, reporter: Reporter, *, poll: float = 0.2) -> RunOutcome:
    """Report a run that other processes execute, until its root settles: woken by each
    write on PostgreSQL (LISTEN/NOTIFY), polling every ``poll`` seconds on SQLite. The
    outcome is the run as stored then. A run sent in batches that no other process
    follows is followed here: its batches polled and collected, as ``resume`` does, but
    no new batch sent."""

    async def watch() -> RunOutcome:
        try:
            async with opened_store(url, create=False, write=False) as store:
                root = await read_root(store, run_id)
                if root.options.get(BATCH) is not True or root.settled:
                    return await _follow(store, root, reporter, resumed=False, poll=poll)
            # a run sent in batches is collected by whoever follows it: this process,
            # unless another holds it (then the run's notes tell its batches' progress)
            async with opened_store(url, create=False, write=True) as store:
                root = await read_root(store, run_id)
                invocation = Invocation(time_scale=settings.time_scale())
                with contextlib.suppress(LeaseHeld):
                    return await execute_here(
                        store,
                        root,
                        invocation,
                        reporter,
                        resumed=True,
                        submit=False,
                        following=True,
                    )
                return await _follow(store, root, reporter, resumed=False, poll=poll)
        except StoreMissing as missing:
            raise UnknownRun(run_id, missing.where) from None

    return run_command(watch, run_id, executes=True)


async def _follow(
    store: Store,
    root: PromiseRecord,
    reporter: Reporter,
    *,
    resumed: bool,
    poll: float,
    max_attempts: int | None = None,
) -> RunOutcome:
    """Report a run from the store until its root settles; the outcome is the run as
    stored then. A watcher (not ``resumed``) shows every branch as executed, timed from
    the run's start; a ``resume`` shows the branches settled before it began as replayed,
    timed from its own start."""
    run_id = root.id
    started = time.perf_counter()
    spec = RunSpec.from_stored(root.args)
    if max_attempts is None:
        max_attempts = int(root.options.get("max_attempts", DEFAULT_MAX_ATTEMPTS))
    reporter.run_started(RunInfo(run_id, spec, resumed, max_attempts))
    seen: dict[str, tuple[str, int]] = {}
    earlier: set[str] | None = None  # the branches settled before this began
    listening = reporter.on_event
    while True:
        if earlier is None or listening is not None:  # else: nobody to tell of progress
            children = await store.children(run_id)
            if earlier is None:
                earlier = {r.id for r in children if r.settled} if resumed else set()
            if listening is not None:
                for event in _changes(children, seen):
                    listening(event)
        if reporter.on_batches is not None and root.options.get(BATCH) is True:
            reporter.on_batches(RunBatches.from_notes(await store.notes(run_id)))
        root = await read_root(store, run_id)
        if root.settled:
            children = await store.children(run_id)
            replayed = earlier or set()
            branches = [replace(Branch.from_record(r), replayed=r.id in replayed) for r in children]
            if resumed:
                wall_ms = round((time.perf_counter() - started) * 1000)
            else:
                wall_ms = round(((root.settled_at or 0) - root.created_at) * 1000)
            return run_outcome(root, branches, wall_ms=wall_ms, executed=True)
        # PostgreSQL wakes the watcher at each write (LISTEN/NOTIFY); SQLite polls
        await store.wait_for_progress(run_id, 2.0 if store.notifies else poll)


async def execute_detached(
    store: Store,
    root: PromiseRecord,
    invocation: Invocation,
    reporter: Reporter,
    *,
    reopen: bool = False,
) -> RunOutcome:
    """``resume``, ``run --id`` or ``retry`` of a detached run: this process takes part as
    one more worker of that run alone, through the same per-branch claims and leases as
    the ``worker`` processes, until the run's root settles. A branch that another
    worker's live lease holds is never run here: it is waited for (and taken over only
    once that lease lapses, as any worker would). Progress is reported from the store, as
    ``watch`` reports it; the outcome is the run as stored once settled. Interrupted, the
    claims are released and the run stays resumable.

    With ``reopen`` (``retry`` of a failed run), its rejected branches and its root are
    set back to pending first (their attempt history stays), for any worker to claim."""
    execution = execution_for(root, invocation)  # the provider and its key, checked first
    job = await _branch_job(store, root.id, execution, invocation)

    async def job_for(record: PromiseRecord) -> BranchJob[Deps]:
        return job  # this worker claims the branches of this one run only

    try:
        if reopen:
            await reopen_run(store, root.id)
            root = await read_root(store, root.id)
        worker = Worker(
            store,
            job_for,
            concurrency=invocation.concurrency or execution.default_concurrency,
            once=True,
            run_id=root.id,
            stale_after=settings.lease_timeout(),
            poll=_idle_poll(),
        )
        # the worker is this block's task: an interruption cancels it (its branches stop,
        # their claims released), and its failure ends the following
        try:
            async with owned_tasks() as tasks:
                working = tasks.create_task(worker.run(), name=f"resume:{root.id}")
                outcome = await _follow(
                    store,
                    root,
                    reporter,
                    resumed=True,
                    poll=worker.poll,
                    max_attempts=execution.retry.max_attempts,
                )
                await working  # it stops once it sees the root settled
        except SpendingCapReached as reached:
            raise await stopped_at_cap(store, root.id, reached) from None
    finally:
        await job.deps.provider.aclose()
    return outcome


def _changes(children: list[PromiseRecord], seen: dict[str, tuple[str, int]]) -> list[Event]:
    """The events that turn what a reporter saw last into what the store holds now."""
    events: list[Event] = []
    for r in children:
        before = seen.get(r.id)
        seen[r.id] = (r.state, r.attempts)
        kwargs = bind_args(generate_image, r.args)
        if before is None:
            if r.settled:
                events.append(
                    PromiseReplayed(r.id, r.func, kwargs, r.state, r.value, r.error, r.attempts)
                )
                continue
            events.append(PromiseQueued(r.id, r.func, kwargs, r.attempts))
            before = ("pending", 0)
        if before[0] != "pending":
            continue
        for attempt in range(before[1] + 1, r.attempts + 1):
            events.append(AttemptStarted(r.id, r.func, attempt))
        if r.state == "resolved":
            events.append(PromiseResolved(r.id, r.value, r.attempts))
        elif r.state == "rejected":
            error = r.error or ErrorInfo("Error", "rejected")
            events.append(PromiseRejectedEvent(r.id, error, r.attempts))
    return events


@dataclass(frozen=True)
class WorkerInfo:
    """A live worker: where it runs, how many branches it holds, its last heartbeat."""

    host: str
    pid: int
    owner: str
    claimed: int
    heartbeat_age: float


#: a worker's presence row is deleted once its heartbeat is this many lease timeouts old
PRESENCE_KEPT = 10


async def _forget_gone_workers(store: Store) -> None:
    """Delete the presence rows (``worker:<id>``) of workers that stopped, or were killed
    long ago: their heartbeat is ``PRESENCE_KEPT`` lease timeouts old. No write is fenced
    by such a row, and no worker takes one again (each has an id of its own)."""
    older_than = PRESENCE_KEPT * settings.lease_timeout()
    await store.forget_leases(WORKER_PREFIX, older_than=older_than)


def list_workers(url: str) -> list[WorkerInfo]:
    """The workers whose heartbeat is younger than the lease timeout."""
    stale_after = settings.lease_timeout()

    async def listing() -> list[WorkerInfo]:
        try:
            async with opened_store(url, create=False, write=False) as store:
                with contextlib.suppress(StoreError):  # a read-only store still lists
                    await _forget_gone_workers(store)
                held = await store.held_leases()
        except StoreMissing:
            return []
        claimed: dict[str, int] = {}
        for lease in held:
            if not lease.key.startswith(WORKER_PREFIX) and lease.age <= stale_after:
                claimed[lease.owner] = claimed.get(lease.owner, 0) + 1
        return [
            WorkerInfo(w.host, w.pid, w.owner, claimed.get(w.owner, 0), w.age)
            for w in held
            if w.key.startswith(WORKER_PREFIX) and w.age <= stale_after
        ]

    return run_command(listing, None)
