"""Workers: processes, on any host that reaches the store, that share the branches of
detached runs.

- :class:`BranchJob` — the app's part of running a run's branches; a claimed branch runs
  through the same machinery as a run (attempt counting, failure history, retry policy,
  sub-steps, group commit), every write fenced by the branch's own lease
- a run's root is settled by whichever worker settles its last branch
  (:func:`.lifecycle.settle_root_if_done`: the first settle wins, so a double one is harmless)
- :class:`Worker` — the loop: claim up to ``concurrency`` branches, run them, renew their
  leases, claim more; with ``once``, stop when no detached run is left pending

A claim is a lease on the branch's id (:meth:`~.store.Store.claim`). A worker that is
stopped or cut off past ``stale_after`` loses its claims to another worker; its renewal
then finds them taken (the branch stops at once), and any write it still makes is refused
by the store because its epoch is stale.

A branch that raises :class:`~.errors.DrainRun` (its cause is this worker's set-up, a key
say, which every branch here would meet) makes the worker drain and stop: it claims
nothing more, and every branch it holds drains (:meth:`.RunContext.drain`): no attempt
starts, those in flight end and are recorded, the others' claims are released (those
branches stay pending, for any worker); then the worker raises that error
(:attr:`Worker.drained` names the run it came from).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
import socket
import uuid
from collections.abc import Awaitable, Callable, Coroutine, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from imagepipe.durable.context import RunContext
from imagepipe.durable.errors import DrainRun, LeaseLost, StoreBusy, StoreError
from imagepipe.durable.lease import LeaseKeeper, holder_gone, reraise_if_cancelled
from imagepipe.durable.lifecycle import BranchOutcome, Summarize, settle_root_if_done
from imagepipe.durable.records import (
    Fence,
    Lease,
    PromiseRecord,
)
from imagepipe.durable.retry import RetryPolicy
from imagepipe.durable.run_state import Execution
from imagepipe.durable.steps import Step
from imagepipe.durable.store import DETACHED, Claim, Store
from imagepipe.durable.tasks import owned_tasks
from imagepipe.durable.worker_commit import SharedCommit

__all__ = [
    "WORKER_PREFIX",
    "BranchJob",
    "Worker",
    "WorkerStats",
]

D = TypeVar("D")
T = TypeVar("T")

#: a worker's own lease (its presence for ``imagepipe workers``) is ``worker:<owner>``
WORKER_PREFIX = "worker:"

# -- running one claimed branch ------------------------------------------------------


@dataclass(frozen=True)
class BranchJob(Generic[D]):
    """How to run the branches of one run: the app's part (which function, with which
    provider in ``deps``, under which retry policy) and how its root settles."""

    fn: Callable[..., Awaitable[Any]]
    deps: D
    retry: RetryPolicy
    summarize: Summarize
    attempt_timeout: float | None = None
    #: what an attempt reserves against the run's spending caps (see :class:`.Execution`)
    cost_of_attempt: Callable[[str, Mapping[str, Any]], Mapping[str, int]] | None = None
    #: called with the run's branches once this worker has settled the run's root (every
    #: branch settled: no process can still be executing one), e.g. to tidy its files
    on_run_settled: Callable[[Sequence[BranchOutcome]], object] | None = None


class _ClaimedLease(LeaseKeeper):
    """The lease of a claimed branch: taken by the claim, renewed by the :class:`Worker`
    (which sets :attr:`lost` when the renewal finds it taken), released when it settles."""

    def __init__(self, store: Store, claim: Claim, worker: Lease, stale_after: float) -> None:
        super().__init__(store, claim.fence.key, stale_after=stale_after)
        self.lease = Lease(
            claim.fence.key, worker.owner, worker.pid, worker.host, claim.fence.epoch
        )

    async def acquire(self) -> Fence:
        assert self.lease is not None
        return Fence(self.key, self.lease.epoch)


async def _settle(
    ctx: RunContext[D],
    keeper: _ClaimedLease,
    record: PromiseRecord,
    fn: Callable[..., Awaitable[Any]],
) -> str:
    handle = ctx.adopt(record, fn)
    try:
        await ctx.settle_all()
    except DrainRun:
        await ctx.cancel_all()
        if handle.settled:  # its outcome was recorded before the drain stopped the branch
            return handle.state
        raise
    except (LeaseLost, StoreBusy):
        await ctx.cancel_all()
        if handle.settled:
            # Its settlement was durable first, and ended the lease with it: a renewal
            # that ran after that commit finds the lease ended, which is no takeover.
            return handle.state
        # Taken over, or the store stayed locked: nothing more of this branch is written
        # here; its lease lapses (or is released below) and it is claimed again.
        if not keeper.lost.done():
            keeper.lost.set_result(LeaseLost(keeper.key, claim_epoch(keeper)))
        return "lost"
    except BaseException:
        await ctx.cancel_all()
        raise
    finally:
        await ctx.close()
        if handle.settled:
            keeper.lease = None  # the claim ended with the settlement, in its transaction
        await keeper.release()
    return handle.state


def claim_epoch(keeper: LeaseKeeper) -> int:
    return 0 if keeper.lease is None else keeper.lease.epoch


# -- the worker loop -------------------------------------------------------------------


@dataclass
class WorkerStats:
    """What a worker did: branches claimed, settled by it, and lost to another worker."""

    claimed: int = 0
    resolved: int = 0
    rejected: int = 0
    lost: int = 0
    runs_settled: int = 0


class Worker:
    """Claims and runs the branches of detached runs until stopped (or, with ``once``,
    until no detached run is pending). ``job_for(root)`` gives the app's part for a run.

    With ``run_id``, it is a worker of that run alone (how ``resume`` of a detached run
    takes part beside the workers): it claims only that run's branches, and with ``once``
    it stops when that run's root has settled."""

    def __init__(
        self,
        store: Store,
        job_for: Callable[[PromiseRecord], Awaitable[BranchJob[Any]]],
        *,
        concurrency: int,
        stale_after: float,
        poll: float = 0.2,
        once: bool = False,
        on_lost: Callable[[str], None] | None = None,
        run_id: str | None = None,
    ) -> None:
        self.store = store
        #: the one run this worker takes part in, or None for every detached run
        self.run_id = run_id
        self._job_for = job_for
        #: the app's part of each run this worker has branches of (made once per run)
        self._jobs: dict[str, asyncio.Task[BranchJob[Any]]] = {}
        #: the root check of each run not started yet (joined by later settlements)
        self._root_checks: dict[str, asyncio.Task[None]] = {}
        #: root checks running beside the branches (a failure stops the worker)
        self._background: set[asyncio.Task[None]] = set()
        #: every branch's writes go through one shared commit: one transaction per flush
        self._writes = SharedCommit(store)
        self.concurrency = concurrency
        self.stale_after = stale_after
        self.poll = poll
        self.once = once
        self._on_lost = on_lost or (lambda branch_id: None)
        owner = uuid.uuid4().hex
        self.me = Lease(WORKER_PREFIX + owner, owner, os.getpid(), socket.gethostname())
        self.stats = WorkerStats()
        self._keepers: dict[str, _ClaimedLease] = {}
        self._running: set[asyncio.Task[None]] = set()
        #: what owns every task of this worker while it runs (see :meth:`run`)
        self._tasks: asyncio.TaskGroup | None = None
        #: branches whose call has returned, only their settlement left to write: they
        #: hold no slot (a slot is a provider call, as in a plain run)
        self._settling: set[str] = set()
        self._counted_fns: dict[Callable[..., Awaitable[Any]], Callable[..., Awaitable[Any]]] = {}
        #: set when a branch gives its slot back before its task ends
        self._freed = asyncio.Event()
        #: the context of each branch running, by its id
        self._contexts: dict[str, RunContext[Any]] = {}
        #: the DrainRun a branch raised, once one has (see :meth:`_drain_step`)
        self._draining: DrainRun | None = None
        #: the run of the branch that raised it
        self.drained: str | None = None

    def jobs(self) -> list[BranchJob[Any]]:
        """The jobs of the runs this worker has branches of (to close their providers)."""
        return [
            task.result()
            for task in self._jobs.values()
            if task.done() and not task.cancelled() and task.exception() is None
        ]

    async def run(self) -> WorkerStats:
        """Work until the queue is drained (``once``) or the task is cancelled. The branches,
        the root checks and the renewal are tasks of this call: none outlives it, and a
        store failure in any of them stops the worker."""
        self.me = await self.store.acquire_lease(
            self.me, stale_after=self.stale_after, holder_gone=holder_gone
        )
        try:
            async with owned_tasks() as tasks:
                self._tasks = tasks
                renewer = tasks.create_task(self._renew(), name="worker:renew")
                try:
                    await self._loop()
                finally:
                    renewer.cancel()
        finally:
            self._tasks = None
            with contextlib.suppress(StoreError, LeaseLost):
                await self.store.release_lease(self.me)
        return self.stats

    def _task(self, coro: Coroutine[Any, Any, T], name: str) -> asyncio.Task[T]:
        assert self._tasks is not None, "tasks are started while the worker runs"
        return self._tasks.create_task(coro, name=name)

    async def _loop(self) -> None:
        while True:
            if self._draining is not None:
                await self._drain_step()
                continue
            self._freed.clear()
            active = len(self._running) - len(self._settling)
            free = self.concurrency - active
            # Claim as soon as a quarter of the slots is free (or none is busy): a claim is
            # one short statement served by indexes, but one per freed slot would be a
            # transaction per branch again.
            batch = not active or free >= max(1, self.concurrency // 4)
            try:
                claims = (
                    await self.store.claim(
                        self.me, limit=free, stale_after=self.stale_after, run_id=self.run_id
                    )
                    if batch
                    else []
                )
            except StoreBusy:
                claims = []  # another claimer held the queue too long: try again shortly
            for claim in claims:
                self._start(claim)
            if not self._running:
                if self.once and not self._background and not await self._queue_open():
                    return
                await asyncio.sleep(self.poll)
            else:
                # wait for a slot (a branch that ends, or that has only its settlement left
                # to write); with nothing claimable now, also for branches that lapse
                # elsewhere to be claimable
                freed = asyncio.ensure_future(self._freed.wait())
                await asyncio.wait(
                    {*self._running, freed},
                    timeout=self.poll if batch and not claims else None,
                    return_when=asyncio.FIRST_COMPLETED,
                )
                freed.cancel()
            # (a task that failed has cancelled this loop already: see run)
            self._running = {t for t in self._running if not t.done()}
            self._background = {t for t in self._background if not t.done()}

    async def _drain_step(self) -> None:
        """Draining: claim nothing; wait for a branch to end (each drains: see
        :meth:`_branch`); raise the DrainRun once none is left."""
        if not self._running:
            assert self._draining is not None
            raise self._draining
        await asyncio.wait(self._running, return_when=asyncio.FIRST_COMPLETED)
        for task in [t for t in self._running if t.done()]:
            self._running.discard(task)
            task.result()  # a store failure stops the worker at once

    def _start(self, claim: Claim) -> None:
        self.stats.claimed += 1
        self._running.add(self._task(self._branch(claim), name=claim.fence.key))

    async def _branch(self, claim: Claim) -> None:
        run_id = claim.record.parent_id
        assert run_id is not None
        job = await self._job(run_id)
        try:
            outcome = await self._run(claim, job)
        except DrainRun as exc:  # the branch stays pending, its claim released
            if self._draining is None:
                self._draining, self.drained = exc, run_id
                for ctx in self._contexts.values():
                    ctx.drain(exc)  # every branch held here would meet it too
            return
        if outcome == "lost":
            self.stats.lost += 1
            self._on_lost(claim.fence.key)
            return
        setattr(self.stats, outcome, getattr(self.stats, outcome) + 1)
        self._check_root(run_id, job)  # beside the branches: the slot is free already

    async def _job(self, run_id: str) -> BranchJob[Any]:
        """The app's part for the run, made once and shared by its branches."""
        making = self._jobs.get(run_id)
        if making is None or (making.done() and (making.cancelled() or making.exception())):
            making = self._jobs[run_id] = self._task(self._make_job(run_id), name=f"job:{run_id}")
        return await asyncio.shield(making)  # shared by the run's branches: not cancelled

    async def _make_job(self, run_id: str) -> BranchJob[Any]:
        root = await self.store.get(run_id)
        assert root is not None, "a claimed branch has a root"
        return await self._job_for(root)

    def _check_root(self, run_id: str, job: BranchJob[Any]) -> None:
        """Settle the run's root if its last branch has settled, in a task of its own.

        The branches that settle together share one check: a check that has not started
        yet is joined (it starts after their settlements are durable, so it sees them); one
        already running may not see them, so a new one is started beside it."""
        if run_id not in self._root_checks:
            check = self._task(self._root_check(run_id, job), name=f"root:{run_id}")
            self._root_checks[run_id] = check
            self._background.add(check)

    async def _root_check(self, run_id: str, job: BranchJob[Any]) -> None:
        await asyncio.sleep(0)  # the branches settled in this loop turn join this check
        del self._root_checks[run_id]  # from now on, a settlement needs a later check
        if await settle_root_if_done(self.store, run_id, job.summarize, job.on_run_settled):
            self.stats.runs_settled += 1

    async def _run(self, claim: Claim, job: BranchJob[Any]) -> str:
        """Run a claimed branch to its settlement: its state, or ``lost`` when the claim
        was taken over (then nothing more of it was written)."""
        key, run_id = claim.fence.key, claim.record.parent_id
        assert run_id is not None, "a claim is a branch of a run"
        keeper = self._keepers[key] = _ClaimedLease(self.store, claim, self.me, self.stale_after)
        try:
            how = Execution(
                retry=job.retry,
                attempt_timeout=job.attempt_timeout,
                cost_of_attempt=job.cost_of_attempt,
            )
            ctx: RunContext[Any] = RunContext(
                self.store, run_id, job.deps, how, lease=keeper, writes=self._writes
            )
            self._contexts[key] = ctx
            if self._draining is not None:  # claimed as the worker began to drain
                ctx.drain(self._draining)
            return await _settle(ctx, keeper, claim.record, self._counted(job.fn))
        finally:
            self._keepers.pop(key, None)
            self._contexts.pop(key, None)
            self._settling.discard(key)

    def _counted(self, fn: Callable[..., Awaitable[Any]]) -> Callable[..., Awaitable[Any]]:
        """``fn`` that frees the branch's slot once it has returned a value: what is left
        is writing the settlement, which needs no provider (as in a plain run, whose slot
        is given back when the attempt ends), so the next claim need not wait for it.

        One wrapper per function, not per branch: a new one each time made every branch
        read the function's signature again to name its stored arguments."""
        if fn not in self._counted_fns:

            @functools.wraps(fn)
            async def counted(step: Step[Any], /, **kwargs: Any) -> Any:
                value = await fn(step, **kwargs)
                self._settling.add(step.id)  # the branch's durable id: its claim's key
                self._freed.set()
                return value

            self._counted_fns[fn] = counted
        return self._counted_fns[fn]

    async def _queue_open(self) -> bool:
        """True while a detached run (of ours) is pending: its branches may still lapse to
        us. A pending run whose branches have all settled is settled here: the process
        that settled its last branch died before it could settle the root, and nobody
        else would (no branch is left to claim, so no settlement would check it)."""
        if self.run_id is not None:
            root = await self.store.get(self.run_id)
            if root is None or root.settled:
                return False
            branches_left = {self.run_id: await self.store.any_pending(self.run_id)}
        else:
            branches_left = {
                r.id: bool(r.counts.get("pending"))
                for r in await self.store.roots()
                if r.state == "pending" and r.options.get(DETACHED) is True
            }
        for run_id, left in branches_left.items():
            if not left:
                job = await self._job(run_id)
                if await settle_root_if_done(self.store, run_id, job.summarize, job.on_run_settled):
                    self.stats.runs_settled += 1
        return bool(branches_left)

    async def _renew(self) -> None:
        loop = asyncio.get_running_loop()
        renewed = loop.time()
        while True:
            await asyncio.sleep(self.stale_after / 10)
            keepers = dict(self._keepers)
            fences = [Fence(key, claim_epoch(k)) for key, k in keepers.items()]
            try:
                lost = await self.store.renew_claims(self.me, fences)
                with contextlib.suppress(LeaseLost):
                    await self.store.renew_lease(self.me)
                renewed = loop.time()
            except StoreError:
                reraise_if_cancelled()
                if loop.time() - renewed <= self.stale_after:
                    continue  # busy for a moment: fencing keeps the data safe meanwhile
                lost = fences  # silent too long: every claim may have been taken over
            for fence in lost:
                keeper = keepers[fence.key]
                if not keeper.lost.done():
                    keeper.lost.set_result(LeaseLost(fence.key, fence.epoch))
