"""A worker, and a run's lease keeper, stop when cancelled, even when the store turns the
cancellation of their heartbeat into a store error (psycopg does: the rollback after a
cancelled query fails when the server has just restarted, and that error replaces the
cancellation)."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

from imagepipe.durable import Store, StoreError
from imagepipe.durable.lease import LeaseKeeper
from imagepipe.durable.records import Fence, Lease, PromiseRecord
from imagepipe.durable.worker import BranchJob, Worker


async def test_a_renewal_whose_cancellation_became_a_store_error_still_stops_the_worker(
    store: Store,
) -> None:
    renewing = asyncio.Event()

    async def renew_claims(worker: Lease, fences: Sequence[Fence]) -> list[Fence]:
        renewing.set()
        try:
            await asyncio.Event().wait()  # the server is gone: the call hangs...
        except asyncio.CancelledError:
            # ...and the clean-up of the cancelled call fails in turn
            raise StoreError("postgres@test", "lost its connection") from None
        return []

    store.renew_claims = renew_claims  # type: ignore[method-assign]

    async def job_for(root: PromiseRecord) -> BranchJob[Any]:
        raise AssertionError("no detached run: nothing is claimed")

    worker = Worker(store, job_for, concurrency=2, stale_after=0.05, poll=60)
    running = asyncio.create_task(worker.run())
    await renewing.wait()
    running.cancel()
    # Before the fix the renewal swallowed its cancellation and the worker waited for it
    # forever: a timeout is the only way this can fail.
    done, _ = await asyncio.wait({running}, timeout=10)
    assert done == {running}
    assert running.cancelled()


async def test_a_run_lease_whose_renewal_cancellation_became_a_store_error_is_released(
    store: Store,
) -> None:
    """The same for the lease of a run: its heartbeat must stop when released, or the
    run's process never ends."""
    renewing = asyncio.Event()

    async def renew_lease(lease: Lease) -> None:
        renewing.set()
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            raise StoreError("postgres@test", "lost its connection") from None

    keeper = LeaseKeeper(store, "run", stale_after=0.05)
    await keeper.acquire()
    store.renew_lease = renew_lease  # type: ignore[method-assign]
    await renewing.wait()
    releasing = asyncio.create_task(keeper.release())
    # Before the fix the heartbeat swallowed its cancellation and release() waited for it
    # forever: a timeout is the only way this can fail.
    done, _ = await asyncio.wait({releasing}, timeout=10)
    assert done == {releasing}
    assert releasing.result() is None
    assert keeper.lease is None
