"""Branches in chains: a task goes on with the queued branch its slot is handed to, and a
branch's settlement completes by a callback on its batch's commit, not by a waiting task."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from typing import Any

import pytest
from test_context import NO_WAIT, context

from imagepipe.durable import PromiseRejected, Step, Store, StoreError
from imagepipe.durable.events import PromiseResolved
from imagepipe.durable.records import Settled, Settlement, WriteBatch


class Sink:
    """Stands where the store would (``writes=``): records each batch, and can hold or
    fail the batches that carry settlements."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self.batches: list[WriteBatch] = []
        #: set when a batch with settlements reaches the sink
        self.settling = asyncio.Event()
        #: when set, batches with settlements wait for :attr:`release`
        self.hold = False
        self.release = asyncio.Event()
        self.fail = False

    async def apply(self, batch: WriteBatch) -> Mapping[str, Settled]:
        self.batches.append(batch)
        if batch.settlements:
            self.settling.set()
            if self.fail:
                raise StoreError("test", "is full")
            if self.hold:
                await self.release.wait()
        return await self.store.apply(batch)


async def test_one_task_runs_the_branches_queued_behind_its_slot(store: Store) -> None:
    ctx = await context(store, lease=False, concurrency=2)
    ran_in: list[asyncio.Task[Any] | None] = []

    async def step(s: Step[None], i: int) -> int:
        ran_in.append(asyncio.current_task())
        return i

    handles = [ctx.begin_run(step, i=i) for i in range(20)]
    assert [await h for h in handles] == list(range(20))
    assert len(set(ran_in)) == 2, "a task per slot, not one per branch"
    await ctx.settle_all()
    assert not ctx._lanes.running


async def test_the_next_branchs_start_joins_the_commit_of_the_previous_settlement(
    store: Store,
) -> None:
    sink = Sink(store)
    ctx = await context(store, lease=False, concurrency=1, writes=sink)

    async def step(s: Step[None], i: int) -> int:
        return i

    handles = [ctx.begin_run(step, i=i) for i in range(3)]
    assert [await h for h in handles] == [0, 1, 2]
    await ctx.settle_all()
    written = [
        (len(b.creates), [s.id for s in b.starts], [s.id for s in b.settlements])
        for b in sink.batches
    ]
    assert written == [
        (3, ["run.0"], []),
        (0, ["run.1"], ["run.0"]),
        (0, ["run.2"], ["run.1"]),
        (0, [], ["run.2"]),
    ]


async def test_a_branch_retries_in_its_own_time_while_the_queued_ones_go_on(
    store: Store,
) -> None:
    calls: list[tuple[int, int]] = []
    handles: list[Any] = []

    async def back_off(delay: float) -> None:
        # The back-off lasts until the last queued branch has settled: were the retrying
        # branch to keep the slot, or the queue to wait for its task, this would hang.
        await handles[-1]

    async def step(s: Step[None], i: int) -> int:
        calls.append((i, s.attempt))
        if i == 0 and s.attempt == 1:
            raise ConnectionError("flaky")
        return i

    ctx = await context(store, lease=False, concurrency=1, sleep=back_off)
    handles.extend(ctx.begin_run(step, i=i) for i in range(5))
    assert await asyncio.wait_for(handles[0], timeout=10) == 0
    assert calls == [(0, 1), (1, 1), (2, 1), (3, 1), (4, 1), (0, 2)]
    await ctx.settle_all()
    states = {c.id: (c.state, c.attempts) for c in await store.children("run")}
    assert states == {
        "run.0": ("resolved", 2),
        **{f"run.{i}": ("resolved", 1) for i in range(1, 5)},
    }


async def test_a_rejection_is_settled_by_the_commit_and_keeps_its_cause(store: Store) -> None:
    class Refused(Exception):
        retryable = False

    async def step(s: Step[None]) -> int:
        raise Refused("no")

    ctx = await context(store, lease=False, retry=NO_WAIT)
    handle = ctx.begin_run(step)
    with pytest.raises(PromiseRejected) as info:
        await handle
    assert isinstance(info.value.__cause__, Refused)
    assert (handle.state, handle.attempts) == ("rejected", 1)
    record = await store.get("run.0")
    assert record is not None
    assert record.state == "rejected"


async def test_settle_all_waits_for_settlements_still_in_their_commit(store: Store) -> None:
    sink = Sink(store)
    sink.hold = True
    events: list[Any] = []
    ctx = await context(store, events, lease=False, writes=sink)

    async def step(s: Step[None]) -> str:
        return "done"

    handle = ctx.begin_run(step)
    settling = asyncio.create_task(ctx.settle_all())
    await sink.settling.wait()
    assert not ctx._lanes.running, "the branch's task has ended: only its settlement is left"
    for _ in range(10):
        await asyncio.sleep(0)  # loop turns, not time: nothing but the commit can end it
    assert not settling.done()
    assert not handle.settled
    assert not [e for e in events if isinstance(e, PromiseResolved)], "nothing heard early"
    sink.release.set()
    await settling
    assert (handle.state, handle.value) == ("resolved", "done")
    assert [e.id for e in events if isinstance(e, PromiseResolved)] == ["run.0"]


async def test_cancelling_with_a_settlement_in_flight_commits_it_and_starts_nothing_more(
    store: Store,
) -> None:
    sink = Sink(store)
    sink.hold = True
    ctx = await context(store, lease=False, concurrency=1, writes=sink)

    async def step(s: Step[None], i: int) -> int:
        return i

    handles = [ctx.begin_run(step, i=i) for i in range(3)]
    await sink.settling.wait()  # run.0's settlement and run.1's start are being written
    cancelling = asyncio.create_task(ctx.cancel_all())  # as Ctrl-C does
    for _ in range(10):
        await asyncio.sleep(0)  # loop turns, not time: nothing but the commit can end it
    assert not cancelling.done(), "cancel_all waits for the settlement already written"
    sink.release.set()
    await cancelling
    assert (handles[0].state, handles[0].value) == ("resolved", 0)
    for queued in handles[1:]:
        with pytest.raises(asyncio.CancelledError):
            await queued
    states = {c.id: (c.state, c.attempts) for c in await store.children("run")}
    assert states == {
        "run.0": ("resolved", 1),
        "run.1": ("pending", 1),  # cancelled once its start was durable: resumable
        "run.2": ("pending", 0),  # still queued: never started
    }


async def test_a_store_failure_in_a_settlements_commit_stops_the_run(store: Store) -> None:
    sink = Sink(store)
    sink.fail = True
    ctx = await context(store, lease=False, concurrency=2, writes=sink)
    handles: list[Any] = []

    async def step(s: Step[None], i: int) -> int:
        return i

    async def workflow(ctx: Any) -> list[int]:
        handles.extend(ctx.begin_run(step, i=i) for i in range(6))
        return [await h for h in handles]

    with pytest.raises(StoreError, match="is full"):
        await asyncio.wait_for(ctx.run_workflow(workflow), timeout=10)
    with pytest.raises(StoreError, match="is full"):
        await handles[0]  # its awaiter hears why it has no outcome
    with pytest.raises(StoreError, match="is full"):
        await ctx.settle_all()
    await ctx.cancel_all()
    assert not any(h.settled for h in handles)
    assert [len(b.settlements) for b in sink.batches if b.settlements] == [2], "fail fast"


async def test_an_effect_runs_once_the_value_is_recorded_and_before_anyone_hears(
    store: Store,
) -> None:
    sink = Sink(store)
    sink.hold = True
    ctx = await context(store, lease=False, concurrency=1, writes=sink)
    seen: list[tuple[bool, str]] = []
    handle: Any = None

    async def step(s: Step[None]) -> str:
        s.after_recorded(lambda: seen.append((handle.settled, "first")))
        s.after_recorded(lambda: seen.append((handle.settled, "second")))
        return "done"

    handle = ctx.begin_run(step)
    await sink.settling.wait()
    for _ in range(10):
        await asyncio.sleep(0)  # loop turns, not time: only the commit can run the effects
    assert seen == [], "not before the value is durable"
    sink.release.set()
    assert await handle == "done"
    assert seen == [(False, "first"), (False, "second")], "in order, before the handle settles"


async def test_an_effect_never_runs_for_a_value_that_is_not_recorded(store: Store) -> None:
    sink = Sink(store)
    ctx = await context(store, lease=False, concurrency=2, writes=sink)
    ran: list[str] = []
    tries = 0

    async def failing_then_fine(s: Step[None]) -> str:
        nonlocal tries
        tries += 1
        s.after_recorded(lambda: ran.append(f"attempt {s.attempt}"))
        if tries == 1:
            raise RuntimeError("this attempt's image is never recorded")
        return "fine"

    assert await ctx.begin_run(failing_then_fine) == "fine"
    assert ran == ["attempt 2"], "the failed attempt's effect never runs"

    # Another owner settles the branch first: its outcome stands, and this one's effect
    # (whose value was not recorded) never runs.
    other = WriteBatch()

    async def beaten(s: Step[None]) -> str:
        s.after_recorded(lambda: ran.append("beaten"))
        other.settlements.append(Settlement(s.id, "resolved", '"theirs"', None, 2.0))
        await store.apply(other)
        return "mine"

    assert await ctx.begin_run(beaten) == "theirs"
    assert ran == ["attempt 2"]

    # A commit that fails records nothing: no effect, and the run stops.
    sink.fail = True

    async def unrecorded(s: Step[None]) -> str:
        s.after_recorded(lambda: ran.append("unrecorded"))
        return "lost"

    with pytest.raises(StoreError):
        await ctx.begin_run(unrecorded)
    assert ran == ["attempt 2"]
