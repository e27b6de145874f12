"""A worker's claim renewal and its own settlements (issue 19, item 12): a renewal that
runs between a branch's settlement commit (which ends the branch's claim in the same
transaction) and the announcement of that settlement must not call the branch lost. The
worker printed "lost branch ..." for branches it had resolved itself, and counted them
lost, not resolved."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from imagepipe.durable.records import (
    ErrorInfo,
    Fence,
    Lease,
    NewPromise,
    PromiseRecord,
    WriteBatch,
    encode_args,
)
from imagepipe.durable.retry import RetryPolicy
from imagepipe.durable.sqlite import SQLiteStore
from imagepipe.durable.steps import Step
from imagepipe.durable.store import StoreOptions
from imagepipe.durable.worker import BranchJob, Worker


class RenewedAfterCommit(SQLiteStore):
    """A real SQLite store whose ``apply_each``, once it has committed a settlement,
    returns only after a claim renewal that started after that commit has run: the
    window between a settlement's commit and its announcement, held open."""

    committed = False
    renewed: asyncio.Event

    async def apply_each(self, batches: Sequence[WriteBatch]) -> list[Any]:
        results = await super().apply_each(batches)
        if any(batch.settlements for batch in batches):
            self.committed = True
            await self.renewed.wait()
            await asyncio.sleep(0)  # the worker has acted on the renewal's answer
        return results

    async def renew_claims(self, worker: Lease, fences: Sequence[Fence]) -> list[Fence]:
        after_commit = self.committed and bool(fences)
        lost = await super().renew_claims(worker, fences)
        if after_commit:
            self.renewed.set()
        return lost


async def draw(step: Step[Any], /, *, i: int) -> dict[str, int]:
    return {"i": i}


def summarize(children: list[PromiseRecord]) -> tuple[Any, ErrorInfo | None]:
    return {"images": len(children)}, None


async def test_a_branch_whose_settlement_ended_its_claim_is_not_reported_lost(
    tmp_path: Path,
) -> None:
    store = RenewedAfterCommit.open(tmp_path / "store.db", StoreOptions())
    assert isinstance(store, RenewedAfterCommit)
    store.renewed = asyncio.Event()
    root = NewPromise("d", None, None, "f", encode_args({}), 1.0, '{"detached":true}')
    branch = NewPromise("d.0", "d", 0, "draw", encode_args({"i": 0}), 1.0)
    await store.apply(WriteBatch(creates=[root, branch]))
    job = BranchJob(fn=draw, deps=None, retry=RetryPolicy(max_attempts=1), summarize=summarize)

    async def job_for(record: PromiseRecord) -> BranchJob[Any]:
        return job

    lost: list[str] = []
    # renewals every 0.5 s; a claim lapses only after 5 s of silence (and nobody else claims)
    worker = Worker(store, job_for, concurrency=1, stale_after=5.0, poll=0.05, on_lost=lost.append)
    running = asyncio.create_task(worker.run())
    try:
        while worker.stats.resolved + worker.stats.lost == 0:
            assert not running.done(), running.result()
            await asyncio.sleep(0.01)  # the worker runs in this loop: poll its counters
    finally:
        running.cancel()
        await asyncio.gather(running, return_exceptions=True)
        await store.close()
    assert lost == []
    assert (worker.stats.resolved, worker.stats.lost) == (1, 0)
