"""The concurrency limit: FIFO hand-over, queued branches without tasks, cancellation."""

from __future__ import annotations

import asyncio

import pytest
from test_context import context

from imagepipe.durable import PromiseRejected, Step, Store
from imagepipe.durable.slots import Slots


def unused(item: str) -> None:
    raise AssertionError(f"nothing is queued, yet {item} was started")


async def test_slots_are_handed_over_first_come_first_served() -> None:
    order: list[str] = []
    slots: Slots[str] = Slots(1, order.append)
    assert slots.try_take()
    slots.queue("queued")
    waiter = asyncio.create_task(slots.take())
    await asyncio.sleep(0)  # one loop turn: the task is now waiting
    assert not slots.try_take(), "a free slot goes to the waiters first"
    slots.give_back()
    assert order == ["queued"]
    assert not waiter.done()
    slots.give_back()
    await waiter
    slots.give_back()
    assert slots.try_take(), "nobody waits: the slot is free again"


async def test_a_waiter_cancelled_after_it_was_handed_a_slot_passes_it_on() -> None:
    slots: Slots[str] = Slots(1, unused)
    assert slots.try_take()
    first = asyncio.create_task(slots.take())
    second = asyncio.create_task(slots.take())
    await asyncio.sleep(0)
    slots.give_back()  # handed to `first`...
    first.cancel()  # ...which is cancelled before it could use it
    await asyncio.gather(first, return_exceptions=True)
    await asyncio.wait_for(second, timeout=5)
    assert first.cancelled()


async def test_a_waiter_cancelled_while_waiting_refuses_the_slot() -> None:
    slots: Slots[str] = Slots(1, unused)
    assert slots.try_take()
    gone = asyncio.create_task(slots.take())
    await asyncio.sleep(0)
    gone.cancel()
    await asyncio.gather(gone, return_exceptions=True)
    slots.give_back()
    assert slots.try_take(), "the slot was not lost to the cancelled waiter"


async def test_queued_branches_get_a_task_only_when_a_slot_frees(store: Store) -> None:
    ctx = await context(store, lease=False, concurrency=2)
    gate = asyncio.Event()

    async def step(s: Step[None], i: int) -> int:
        await gate.wait()
        return i

    def branch_tasks() -> int:  # the group commit's flush is one task of its own
        return len([t for t in asyncio.all_tasks() if t.get_name() != "commit"])

    before = branch_tasks()
    handles = [ctx.begin_run(step, i=i) for i in range(50)]
    assert branch_tasks() - before == 2, "48 queued branches, no task for them"
    gate.set()
    # The last handle is awaited before its branch has started, and still gets its value.
    assert await handles[-1] == 49
    assert [await h for h in handles] == list(range(50))


async def test_after_a_rejection_queued_branches_still_run_to_the_end(
    store: Store,
) -> None:
    ctx = await context(store, lease=False, concurrency=1)

    class Refused(Exception):
        retryable = False

    async def step(s: Step[None], i: int) -> int:
        if i == 0:
            raise Refused("no")
        return i

    handles = [ctx.begin_run(step, i=i) for i in range(5)]
    with pytest.raises(PromiseRejected):
        await handles[0]
    # Branches 1-4 were still queued behind the single slot when 0 failed.
    await ctx.settle_all()
    states = {c.id: c.state for c in await store.children("run")}
    assert states == {
        "run.0": "rejected",
        "run.1": "resolved",
        "run.2": "resolved",
        "run.3": "resolved",
        "run.4": "resolved",
    }
