"""Detached runs and the workers that execute them: ``run --detach``, ``worker``,
``watch`` and ``workers``. No printing, no typer here.

A detached run is a root promise whose options hold ``detached: true``, written together
with ALL its branches as pending (the same ids and arguments a plain run would create, from
the workflow's own fan-out). Workers on any host that reaches the store claim its branches
(:mod:`imagepipe.durable.worker`), run them with the run's stored provider and identity
options (keys from the worker's own environment), and settle the root with the last one.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

from imagepipe import settings
from imagepipe.durable import (
    AttemptStarted,
    ErrorInfo,
    Event,
    PromiseQueued,
    PromiseRecord,
    PromiseRejected,
    PromiseRejectedEvent,
    PromiseReplayed,
    PromiseResolved,
    Store,
    StoreConflict,
    StoreError,
    StoreMissing,
    WriteBatch,
)
from imagepipe.durable.store import DETACHED
from imagepipe.durable.worker import (
    WORKER_PREFIX,
    BranchJob,
    Worker,
    WorkerStats,
    plan_branches,
    planned_creates,
)
from imagepipe.errors import ImagepipeError, Interrupted, StoreUnreachable, UnknownRun
from imagepipe.pipeline import Deps, generate_image, image_pipeline
from imagepipe.runs import (
    DEFAULT_MAX_ATTEMPTS,
    Branch,
    Invocation,
    Reporter,
    RunInfo,
    RunOutcome,
    RunSpec,
    validate_run_id,
)
from imagepipe.service import (
    check_same_spec,
    execution_for,
    opened_store,
    read_root,
    root_promise,
    run_command,
    run_outcome,
    with_provider,
)

__all__ = ["WorkerInfo", "detach_run", "list_workers", "run_worker", "summarize", "watch_run"]

#: tests only: a file to which every provider call made by a worker appends a line
CALL_LOG = "IMAGEPIPE_TEST_CALL_LOG"


def detach_run(url: str, run_id: str, spec: RunSpec, invocation: Invocation) -> str:
    """Record the run and all its branches as pending for workers; execute nothing.
    Detaching the same run again is a no-op; another spec under its id is a conflict."""
    validate_run_id(run_id)
    spec.validate()
    invocation.validate()
    spec = with_provider(spec, invocation)

    async def detach() -> str:
        async with opened_store(url, create=True, write=True) as store:
            if await store.get(run_id) is None:
                planned = await plan_branches(image_pipeline, **spec.kwargs())
                now = time.time()
                creates = [
                    root_promise(run_id, spec, invocation, now, **{DETACHED: True}),
                    *planned_creates(run_id, planned, now),
                ]
                # another process may have created it first: its spec is checked below
                with contextlib.suppress(StoreConflict):
                    await store.apply(WriteBatch(creates=creates))
            root_record = await read_root(store, run_id)
            check_same_spec(run_id, RunSpec.from_stored(root_record.args), spec)
            return run_id

    return run_command(detach, run_id)


def summarize(children: list[PromiseRecord]) -> tuple[Any, ErrorInfo | None]:
    """What a run's root settles with, as a plain run settles it: the images' count and
    time, or the first rejected branch (in launch order) as the run's error."""
    for child in children:
        if child.state == "rejected":
            error = child.error or ErrorInfo("Error", "rejected")
            message = str(PromiseRejected(child.id, error))
            return None, ErrorInfo("BranchRejected", message, retryable=False)
    total = sum(int((c.value or {}).get("duration_ms", 0)) for c in children)
    return {"images": len(children), "total_ms": total}, None


class _LoggedProvider:
    """Tests only: appends ``<branch id> <attempt> <pid>`` for every provider call."""

    def __init__(self, inner: Any, path: str) -> None:
        self._inner = inner
        self.name = inner.name
        # line-buffered: every line is on disk before the call, even if kill -9 follows
        self._log = open(path, "a", buffering=1)  # noqa: SIM115 (closed by aclose)

    async def generate(self, request: Any, steps: Any) -> Any:
        self._log.write(f"{request.idempotency_key} {request.attempt} {os.getpid()}\n")
        return await self._inner.generate(request, steps)

    async def aclose(self) -> None:
        self._log.close()
        await self._inner.aclose()


def _job_maker(invocation: Invocation) -> Callable[[PromiseRecord], Any]:
    async def job_for(root: PromiseRecord) -> BranchJob[Deps]:
        execution = execution_for(root, invocation)
        deps = execution.deps
        if os.environ.get(CALL_LOG):
            deps = replace(deps, provider=_LoggedProvider(deps.provider, os.environ[CALL_LOG]))
        return BranchJob(
            fn=generate_image,
            deps=deps,
            retry=execution.retry,
            summarize=summarize,
            attempt_timeout=invocation.attempt_timeout,
        )

    return job_for


def run_worker(
    url: str, invocation: Invocation, *, once: bool, on_lost: Callable[[str], None]
) -> WorkerStats:
    """Claim and run branches of detached runs; with ``once``, until none is pending."""
    invocation.validate()

    async def work() -> WorkerStats:
        async with opened_store(url, create=True, write=True) as store:
            await _forget_gone_workers(store)
            worker = Worker(
                store,
                _job_maker(invocation),
                concurrency=invocation.concurrency or 16,
                stale_after=settings.lease_timeout(),
                poll=min(0.2, settings.lease_timeout() / 10),
                once=once,
                on_lost=on_lost,
            )
            try:
                return await worker.run()
            finally:
                for job in worker.jobs():
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


def watch_run(url: str, run_id: str, reporter: Reporter, *, poll: float = 0.2) -> RunOutcome:
    """Report a run that other processes execute, until its root settles: woken by each
    write on PostgreSQL (LISTEN/NOTIFY), polling every ``poll`` seconds on SQLite. The
    outcome is the run as stored then."""

    async def watch() -> RunOutcome:
        try:
            async with opened_store(url, create=False, write=False) as store:
                root = await read_root(store, run_id)
                spec = RunSpec.from_stored(root.args)
                max_attempts = int(root.options.get("max_attempts", DEFAULT_MAX_ATTEMPTS))
                reporter.run_started(RunInfo(run_id, spec, False, max_attempts))
                seen: dict[str, tuple[str, int]] = {}
                while True:
                    children = await store.children(run_id)
                    if reporter.on_event is not None:
                        for event in _changes(children, seen):
                            reporter.on_event(event)
                    root = await read_root(store, run_id)
                    if root.settled:
                        # executed by the workers, not replayed; timed from the run's start
                        children = await store.children(run_id)
                        branches = [
                            replace(Branch.from_record(r), replayed=False) for r in children
                        ]
                        wall_ms = round(((root.settled_at or 0) - root.created_at) * 1000)
                        return run_outcome(root, branches, wall_ms=wall_ms, executed=True)
                    # PostgreSQL wakes the watcher at each write (LISTEN/NOTIFY); SQLite polls
                    await store.wait_for_progress(run_id, 2.0 if store.notifies else poll)
        except StoreMissing as missing:
            raise UnknownRun(run_id, missing.where) from None

    return run_command(watch, run_id, executes=True)


def _changes(children: list[PromiseRecord], seen: dict[str, tuple[str, int]]) -> list[Event]:
    """The events that turn what a reporter saw last into what the store holds now."""
    events: list[Event] = []
    for r in children:
        before = seen.get(r.id)
        seen[r.id] = (r.state, r.attempts)
        kwargs = r.args.get("kwargs", {})
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
