"""The spending cap, on every backend: reservations checked and written in one transaction,
fenced, and never counted twice."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import pytest

from imagepipe.durable import LeaseLost, Store, StoreConflict
from imagepipe.durable.records import Fence, Lease, NewPromise, Spending, WriteBatch, encode_args


async def a_run(store: Store, branches: int = 3) -> None:
    creates = [NewPromise("run", None, None, "wf", encode_args({}), 1.0)]
    creates += [
        NewPromise(f"run.{i}", "run", i, "step", encode_args({"i": i}), 1.0)
        for i in range(branches)
    ]
    await store.apply(WriteBatch(creates=creates))


USD100 = {"usd": 100}


async def attempts(store: Store, promise_id: str) -> int:
    record = await store.get(promise_id)
    assert record is not None
    return record.attempts


async def test_a_reservation_that_does_not_fit_is_refused_and_writes_nothing(store: Store) -> None:
    await a_run(store)
    await store.set_spending_limit("run", "usd", 250)
    assert await store.reserve_attempt(None, "run", "run.0", 1, USD100) is None
    assert await store.reserve_attempt(None, "run", "run.1", 1, USD100) is None
    over = await store.reserve_attempt(None, "run", "run.2", 1, USD100)
    assert over == ("usd", Spending(250, 200))
    assert await attempts(store, "run.2") == 0, "a refused attempt did not start"
    assert await attempts(store, "run.0") == 1
    assert await store.spending("run") == {"usd": Spending(250, 200)}


async def test_an_actual_cost_replaces_the_reservation_once(store: Store) -> None:
    await a_run(store)
    await store.set_spending_limit("run", "usd", 250)
    await store.reserve_attempt(None, "run", "run.0", 1, USD100)
    await store.settle_cost(None, "run", "run.0", 1, {"usd": 30})
    await store.settle_cost(None, "run", "run.0", 1, {"usd": 30})  # repeated: changes nothing
    assert await store.spending("run") == {"usd": Spending(250, 30)}
    # the room it gave back is usable
    assert await store.reserve_attempt(None, "run", "run.1", 1, USD100) is None
    assert await store.reserve_attempt(None, "run", "run.2", 1, USD100) is None
    assert await store.spending("run") == {"usd": Spending(250, 230)}


async def test_a_repeated_reservation_of_a_started_attempt_reserves_nothing_twice(
    store: Store,
) -> None:
    await a_run(store)
    assert await store.reserve_attempt(None, "run", "run.0", 1, USD100) is None
    assert await store.reserve_attempt(None, "run", "run.0", 1, USD100) is None
    assert await store.spending("run") == {"usd": Spending(None, 100)}, (
        "no cap: counted, never refused"
    )


async def test_raising_the_cap_lets_the_next_attempt_start(store: Store) -> None:
    await a_run(store)
    await store.set_spending_limit("run", "usd", 100)
    await store.reserve_attempt(None, "run", "run.0", 1, USD100)
    refused = await store.reserve_attempt(None, "run", "run.1", 1, USD100)
    assert refused == ("usd", Spending(100, 100))
    await store.set_spending_limit("run", "usd", 200)
    assert await store.reserve_attempt(None, "run", "run.1", 1, USD100) is None


async def test_a_stale_fence_reserves_nothing(store: Store) -> None:
    await a_run(store)
    first = await store.acquire_lease(
        Lease("run", "a", 1, "h"), stale_after=0.0, holder_gone=lambda _: True
    )
    await store.acquire_lease(
        Lease("run", "b", 2, "h"), stale_after=0.0, holder_gone=lambda _: True
    )
    with pytest.raises(LeaseLost):
        await store.reserve_attempt(Fence("run", first.epoch), "run", "run.0", 1, USD100)
    assert await store.spending("run") == {}


async def test_only_a_pending_branch_can_reserve(store: Store) -> None:
    await a_run(store, branches=1)
    with pytest.raises(StoreConflict):
        await store.reserve_attempt(None, "run", "run.9", 1, USD100)  # no such branch


async def test_concurrent_reservers_never_exceed_the_cap_together(
    reopen: Callable[[], Awaitable[Store]],
) -> None:
    stores = [await reopen() for _ in range(4)]
    await a_run(stores[0], branches=40)
    await stores[0].set_spending_limit("run", "usd", 1000)

    async def reserve(store: Store, i: int) -> bool:
        return await store.reserve_attempt(None, "run", f"run.{i}", 1, USD100) is None

    granted = await asyncio.gather(*(reserve(stores[i % 4], i) for i in range(40)))
    assert sum(granted) == 10
    assert await stores[0].spending("run") == {"usd": Spending(1000, 1000)}


async def test_every_meter_must_fit_and_a_refusal_writes_none_of_them(store: Store) -> None:
    await a_run(store)
    await store.set_spending_limit("run", "images", 1)
    both = {"usd": 100, "images": 1}
    assert await store.reserve_attempt(None, "run", "run.0", 1, both) is None
    refused = await store.reserve_attempt(None, "run", "run.1", 1, both)
    assert refused == ("images", Spending(1, 1))
    assert await store.spending("run") == {"usd": Spending(None, 100), "images": Spending(1, 1)}
    assert await attempts(store, "run.1") == 0
    await store.settle_cost(None, "run", "run.0", 1, {"usd": 40})  # images: stays counted
    assert await store.spending("run") == {"usd": Spending(None, 40), "images": Spending(1, 1)}


async def test_each_reserved_attempt_says_what_it_cost_once_known(store: Store) -> None:
    await a_run(store)
    await store.reserve_attempt(None, "run", "run.0", 1, USD100)
    await store.reserve_attempt(None, "run", "run.1", 1, {"usd": 100, "images": 1})
    await store.settle_cost(None, "run", "run.0", 1, {"usd": 0})
    assert await store.attempt_costs("run", "usd") == {("run.0", 1): 0, ("run.1", 1): None}
    assert await store.attempt_costs("run", "images") == {("run.1", 1): None}
    assert await store.attempt_costs("other", "usd") == {}


async def test_a_group_is_reserved_whole_or_not_at_all(store: Store) -> None:
    """A provider's batch is paid together: its attempts start together, or none does."""
    await a_run(store, branches=4)
    await store.set_spending_limit("run", "usd", 350)
    group = [(f"run.{i}", 1, USD100) for i in range(4)]
    refused = await store.reserve_attempts(None, "run", group)
    assert refused == ("usd", Spending(350, 0)), "400 does not fit in 350"
    assert [await attempts(store, f"run.{i}") for i in range(4)] == [0, 0, 0, 0]
    assert await store.spending("run") == {"usd": Spending(350, 0)}
    assert await store.reserve_attempts(None, "run", group[:3]) is None
    assert [await attempts(store, f"run.{i}") for i in range(4)] == [1, 1, 1, 0]
    assert await store.spending("run") == {"usd": Spending(350, 300)}
    # repeated after a kill: the started ones reserve nothing twice, the new one fits
    assert await store.reserve_attempts(None, "run", group[:3]) is None
    assert await store.spending("run") == {"usd": Spending(350, 300)}
    assert await store.reserve_attempt(None, "run", "run.3", 1, {"usd": 50}) is None
    assert await store.spending("run") == {"usd": Spending(350, 350)}


async def test_a_group_of_actual_costs_replaces_their_reservations_once(store: Store) -> None:
    await a_run(store, branches=3)
    group = [(f"run.{i}", 1, {"usd": 100, "images": 1}) for i in range(3)]
    assert await store.reserve_attempts(None, "run", group) is None
    costs = [("run.0", 1, {"usd": 50}), ("run.1", 1, {"usd": 0, "images": 0})]
    await store.settle_costs(None, "run", costs)
    await store.settle_costs(None, "run", costs)  # collected again: changes nothing
    spent = await store.spending("run")
    assert spent == {"usd": Spending(None, 150), "images": Spending(None, 2)}
    assert await store.attempt_costs("run", "usd") == {
        ("run.0", 1): 50,
        ("run.1", 1): 0,
        ("run.2", 1): None,
    }


async def test_a_run_s_notes_are_written_with_its_batches_and_overwritten(
    store: Store,
) -> None:
    from imagepipe.durable.records import Note

    await a_run(store, branches=1)
    await store.apply(WriteBatch(notes=[Note("run", "plan", '{"groups":[["run.0"]]}', 1.0)]))
    await store.apply(WriteBatch(notes=[Note("run", "status", '"validating"', 2.0)]))
    await store.apply(WriteBatch(notes=[Note("run", "status", '"completed"', 3.0)]))
    assert await store.notes("run") == {"plan": {"groups": [["run.0"]]}, "status": "completed"}
    assert await store.notes("another") == {}


async def test_a_stale_fence_writes_no_note(store: Store) -> None:
    from imagepipe.durable.records import Note

    await a_run(store, branches=1)
    first = await store.acquire_lease(
        Lease("run", "a", 1, "h"), stale_after=0.0, holder_gone=lambda _: True
    )
    await store.acquire_lease(
        Lease("run", "b", 2, "h"), stale_after=0.0, holder_gone=lambda _: True
    )
    note = Note("run", "created", '{"id":"batch_1"}', 1.0)
    with pytest.raises(LeaseLost):
        await store.apply(WriteBatch(fence=Fence("run", first.epoch), notes=[note]))
    assert await store.notes("run") == {}
