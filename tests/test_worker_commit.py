"""A worker's shared commit: its branches' batches share transactions, each keeps its fence."""

from __future__ import annotations

import asyncio
import os
import socket
from collections.abc import AsyncIterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import pytest

from imagepipe.durable import LeaseLost, Store
from imagepipe.durable.records import (
    AttemptStart,
    Lease,
    NewPromise,
    Settled,
    Settlement,
    WriteBatch,
    encode_args,
)
from imagepipe.durable.sqlite import SQLiteStore
from imagepipe.durable.store import Claim, StoreOptions
from imagepipe.durable.worker_commit import SharedCommit


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[Store]:
    opened = SQLiteStore.open(tmp_path / "store.db", StoreOptions())
    yield opened
    await opened.close()


async def claimed(store: Store, branches: int) -> list[Claim]:
    root = NewPromise("d", None, None, "f", encode_args({}), 1.0, '{"detached":true}')
    kids = [NewPromise(f"d.{i}", "d", i, "f", encode_args({"i": i}), 1.0) for i in range(branches)]
    await store.apply(WriteBatch(creates=[root, *kids]))
    me = Lease("", "worker", os.getpid(), socket.gethostname())
    return await store.claim(me, limit=branches, stale_after=10)


def resolve(promise_id: str) -> Settlement:
    return Settlement(promise_id, "resolved", '"ok"', None, 2.0)


async def test_the_batches_of_one_loop_turn_share_one_transaction(store: Store) -> None:
    claims = await claimed(store, 3)
    shared = SharedCommit(store)
    got = await asyncio.gather(
        *(
            shared.apply(WriteBatch(fence=c.fence, starts=[AttemptStart(c.fence.key, 1)]))
            for c in claims
        )
    )
    assert got == [{}, {}, {}]
    assert (shared.flushes, shared.batches) == (1, 3)
    assert [(await store.get(c.fence.key)).attempts for c in claims] == [1, 1, 1]  # type: ignore[union-attr]


async def test_a_stale_fence_fails_only_its_own_writer(store: Store) -> None:
    first, second = await claimed(store, 2)
    # d.1 is taken over by another worker: this worker's fence on it is stale now
    other = Lease("d.1", "other", os.getpid(), socket.gethostname())
    await store.acquire_lease(other, stale_after=10, holder_gone=lambda holder: True)
    shared = SharedCommit(store)
    ok, stale = await asyncio.gather(
        shared.apply(WriteBatch(fence=first.fence, settlements=[resolve("d.0")])),
        shared.apply(WriteBatch(fence=second.fence, settlements=[resolve("d.1")])),
        return_exceptions=True,
    )
    assert ok == {}
    assert isinstance(stale, LeaseLost)
    assert stale.key == "d.1"
    states = [(await store.get(f"d.{i}")).state for i in range(2)]  # type: ignore[union-attr]
    assert states == ["resolved", "pending"]


class GatedStore(SQLiteStore):
    """A real SQLite store whose ``apply_each`` waits at a gate (to hold a flush open)."""

    gate: asyncio.Event
    entered: asyncio.Event

    async def apply_each(self, batches: Sequence[WriteBatch]) -> list[Any]:
        self.entered.set()
        await self.gate.wait()
        return await super().apply_each(batches)


async def test_batches_that_arrive_during_a_flush_make_up_the_next_one(tmp_path: Path) -> None:
    store = GatedStore.open(tmp_path / "gated.db", StoreOptions())
    assert isinstance(store, GatedStore)
    store.gate, store.entered = asyncio.Event(), asyncio.Event()
    try:
        claims = await claimed(store, 4)
        shared = SharedCommit(store)

        def start(claim: Claim) -> asyncio.Future[Mapping[str, Settled]]:
            batch = WriteBatch(fence=claim.fence, starts=[AttemptStart(claim.fence.key, 1)])
            return asyncio.ensure_future(shared.apply(batch))

        first = start(claims[0])
        await store.entered.wait()  # the first flush is being written
        rest = [start(c) for c in claims[1:]]
        await asyncio.sleep(0)  # they are waiting for the next flush
        store.gate.set()
        assert await asyncio.gather(first, *rest) == [{}] * 4
        assert (shared.flushes, shared.batches) == (2, 4)
    finally:
        await store.close()
