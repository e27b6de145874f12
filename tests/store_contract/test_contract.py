"""The contract every store backend keeps: one write path, first settle wins, fencing,
leases by the store's clock. A new backend is done when this suite is green for it."""

from __future__ import annotations

import os
import socket
from collections.abc import Awaitable, Callable

import pytest

from imagepipe.durable import ErrorInfo, LeaseHeld, LeaseLost, Store, StoreConflict
from imagepipe.durable.records import (
    AttemptFailure,
    AttemptStart,
    ChildColumns,
    Fence,
    Lease,
    NewPromise,
    Settlement,
    WriteBatch,
    encode_args,
)

Reopen = Callable[[], Awaitable[Store]]


def new(
    promise_id: str, parent: str | None = None, seq: int | None = None, **kw: object
) -> NewPromise:
    return NewPromise(promise_id, parent, seq, "f", encode_args(kw), 1.0)


def resolve(promise_id: str, value: str, at: float = 2.0) -> Settlement:
    return Settlement(promise_id, "resolved", value, None, at)


def reject(promise_id: str, error: ErrorInfo, at: float = 2.0) -> Settlement:
    return Settlement(promise_id, "rejected", None, error.to_json(), at)


async def test_a_batch_is_durable_when_apply_returns(store: Store, reopen: Reopen) -> None:
    await store.apply(WriteBatch(creates=[new("r"), new("r.0", "r", 0, x=1)]))
    again = await reopen()
    record = await again.get("r.0")
    assert record is not None
    assert (record.parent_id, record.seq, record.state) == ("r", 0, "pending")
    assert record.args == {"version": 1, "kwargs": {"x": 1}}


async def test_creating_an_existing_promise_refuses_the_whole_batch(store: Store) -> None:
    await store.apply(WriteBatch(creates=[new("r")]))
    with pytest.raises(StoreConflict):
        await store.apply(WriteBatch(creates=[new("r.0", "r", 0), new("r")]))
    assert await store.get("r.0") is None


async def test_first_settle_wins_and_the_loser_gets_the_stored_outcome(store: Store) -> None:
    await store.apply(WriteBatch(creates=[new("r"), new("r.0", "r", 0)]))
    assert await store.apply(WriteBatch(settlements=[resolve("r.0", '"first"')])) == {}
    lost = await store.apply(
        WriteBatch(settlements=[reject("r.0", ErrorInfo("E", "late")), resolve("r", "1")])
    )
    assert set(lost) == {"r.0"}
    assert (lost["r.0"].state, lost["r.0"].value) == ("resolved", "first")
    record = await store.get("r.0")
    assert record is not None
    assert (record.state, record.value) == ("resolved", "first")
    root = await store.get("r")
    assert root is not None
    assert root.value == 1


async def test_a_batch_applies_creates_then_starts_then_failures_then_settlements(
    store: Store,
) -> None:
    error = ErrorInfo("Boom", "no", retryable=False)
    batch = WriteBatch(
        creates=[new("r"), new("r.0", "r", 0)],
        starts=[AttemptStart("r.0", 1)],
        failures=[AttemptFailure("r.0", 1, 1.0, 1.5, error.to_json())],
        settlements=[reject("r.0", error)],
    )
    assert await store.apply(batch) == {}
    record = await store.get("r.0")
    assert record is not None
    assert (record.state, record.attempts, record.failures, record.error) == (
        "rejected",
        1,
        1,
        error,
    )
    history = await store.failed_attempts("r")
    assert [(a.promise_id, a.attempt, a.error) for a in history] == [("r.0", 1, error)]


async def test_attempt_counts_never_go_down_nor_start_on_a_settled_promise(store: Store) -> None:
    await store.apply(
        WriteBatch(creates=[new("r"), new("r.0", "r", 0)], starts=[AttemptStart("r.0", 2)])
    )
    with pytest.raises(StoreConflict):
        await store.apply(WriteBatch(starts=[AttemptStart("r.0", 1)]))
    await store.apply(WriteBatch(settlements=[resolve("r.0", "1")]))
    with pytest.raises(StoreConflict):
        await store.apply(WriteBatch(starts=[AttemptStart("r.0", 3)]))
    record = await store.get("r.0")
    assert record is not None
    assert record.attempts == 2


async def test_a_failed_attempt_is_recorded_once(store: Store) -> None:
    failure = AttemptFailure("r.0", 1, 1.0, 1.5, ErrorInfo("E", "x").to_json())
    await store.apply(WriteBatch(creates=[new("r"), new("r.0", "r", 0)], failures=[failure]))
    with pytest.raises(StoreConflict):
        await store.apply(WriteBatch(failures=[failure]))
    record = await store.get("r.0")
    assert record is not None
    assert record.failures == 1


async def test_reopen_sets_a_rejected_promise_pending_and_keeps_history(store: Store) -> None:
    error = ErrorInfo("E", "x")
    await store.apply(
        WriteBatch(
            creates=[new("r"), new("r.0", "r", 0)],
            failures=[AttemptFailure("r.0", 1, 1.0, 1.5, error.to_json())],
            settlements=[reject("r.0", error)],
        )
    )
    await store.apply(WriteBatch(reopens=["r.0"]))
    record = await store.get("r.0")
    assert record is not None
    assert (record.state, record.error, record.failures) == ("pending", None, 0)
    assert len(await store.failed_attempts("r")) == 1


async def test_children_come_in_launch_order_and_sub_steps_under_their_parent(
    store: Store,
) -> None:
    sub = NewPromise(
        "r.1.0", "r.1", 0, "create_job", encode_args({}), 1.0, "{}", "resolved", '{"id":"j"}'
    )
    await store.apply(WriteBatch(creates=[new("r"), new("r.1", "r", 1), new("r.0", "r", 0), sub]))
    assert [c.id for c in await store.children("r")] == ["r.0", "r.1"]
    [step] = await store.children("r.1")
    assert (step.state, step.value) == ("resolved", {"id": "j"})


async def test_child_columns_read_a_run_back_column_by_column(store: Store) -> None:
    failed = ErrorInfo("Boom", "no", retryable=False)
    branches = [new("r.1", "r", 1, style="b"), new("r.0", "r", 0, style="a"), new("r.2", "r", 2)]
    await store.apply(WriteBatch(creates=[new("r"), *branches, new("r.0.0", "r.0", 0)]))
    await store.apply(
        WriteBatch(settlements=[resolve("r.0", '{"url":"u","n":1}'), reject("r.1", failed)])
    )
    columns = await ChildColumns.collect(store.where, store.child_rows("r"))
    assert len(columns) == 3
    assert columns.ids == ["r.0", "r.1", "r.2"]
    assert columns.states == ["resolved", "rejected", "pending"]
    assert columns.values == [{"url": "u", "n": 1}, None, None]
    assert columns.value_texts == ['{"url":"u","n":1}', None, None]
    assert columns.errors == [None, failed, None]
    assert columns.args(1) == {"version": 1, "kwargs": {"style": "b"}}
    assert len(await ChildColumns.collect(store.where, store.child_rows("nobody"))) == 0


async def test_child_rows_come_a_chunk_at_a_time_in_launch_order(store: Store) -> None:
    await store.apply(WriteBatch(creates=[new("r"), *(new(f"r.{i}", "r", i) for i in range(2500))]))
    chunks = [[row.id for row in rows] async for rows in store.child_rows("r")]
    assert [len(rows) for rows in chunks] == [1000, 1000, 500]
    assert [promise_id for rows in chunks for promise_id in rows] == [f"r.{i}" for i in range(2500)]


async def test_roots_list_runs_newest_first_with_counts(store: Store) -> None:
    older = NewPromise("a", None, None, "wf", encode_args({"p": 1}), 1.0)
    newer = NewPromise("b", None, None, "wf", encode_args({"p": 2}), 2.0)
    await store.apply(WriteBatch(creates=[older, newer, new("a.0", "a", 0), new("a.1", "a", 1)]))
    await store.apply(WriteBatch(settlements=[resolve("a.0", "1")]))
    roots = await store.roots()
    assert [r.id for r in roots] == ["b", "a"]
    assert roots[1].counts == {"pending": 1, "resolved": 1}
    assert roots[0].counts == {}
    assert [r.id for r in await store.roots(limit=1)] == ["b"]


async def test_a_settled_root_keeps_its_counts_until_it_is_reopened(store: Store) -> None:
    failed = ErrorInfo("Boom", "no")
    await store.apply(WriteBatch(creates=[new("r"), new("r.0", "r", 0), new("r.1", "r", 1)]))
    await store.apply(WriteBatch(settlements=[resolve("r.0", "1"), reject("r.1", failed)]))
    await store.apply(WriteBatch(settlements=[reject("r", failed)]))
    [root] = await store.roots()
    assert (root.state, root.counts) == ("rejected", {"resolved": 1, "rejected": 1})
    await store.apply(WriteBatch(reopens=["r.1", "r"]))
    [root] = await store.roots()
    assert (root.state, root.counts) == ("pending", {"resolved": 1, "pending": 1})
    await store.apply(WriteBatch(settlements=[resolve("r.1", "2"), resolve("r", "3")]))
    [root] = await store.roots()
    assert (root.state, root.counts) == ("resolved", {"resolved": 2})


async def test_errors_round_trip_intact(store: Store) -> None:
    error = ErrorInfo("Weird:Type", "line\nwith 'quotes' and é", retryable=False)
    await store.apply(WriteBatch(creates=[new("r")], settlements=[reject("r", error)]))
    record = await store.get("r")
    assert record is not None
    assert record.error == error


# -- leases and fencing -------------------------------------------------------------


def claim(owner: str, pid: int | None = None, host: str | None = None) -> Lease:
    return Lease("r", owner, pid or os.getpid(), host or socket.gethostname())


def never_gone(holder: Lease) -> bool:
    return False


async def test_every_acquisition_increments_the_epoch(store: Store) -> None:
    first = await store.acquire_lease(claim("a"), stale_after=10, holder_gone=never_gone)
    await store.release_lease(first)
    second = await store.acquire_lease(claim("b"), stale_after=10, holder_gone=never_gone)
    assert (first.epoch, second.epoch) == (1, 2)


async def test_a_live_holder_keeps_the_lease(store: Store) -> None:
    held = await store.acquire_lease(claim("a"), stale_after=10, holder_gone=never_gone)
    with pytest.raises(LeaseHeld) as refused:
        await store.acquire_lease(claim("b"), stale_after=10, holder_gone=never_gone)
    assert refused.value.holder.owner == "a"
    holder = await store.lease_holder("r")
    assert holder is not None
    assert holder.epoch == held.epoch
    assert holder.age < 5


async def test_a_gone_or_silent_holder_is_taken_over(store: Store) -> None:
    await store.acquire_lease(claim("a"), stale_after=10, holder_gone=never_gone)
    taken = await store.acquire_lease(claim("b"), stale_after=10, holder_gone=lambda h: True)
    assert taken.epoch == 2
    # stale by the store's clock: a negative limit makes any heartbeat too old
    again = await store.acquire_lease(claim("c"), stale_after=-1, holder_gone=never_gone)
    assert again.epoch == 3


async def test_a_stale_fence_refuses_the_whole_batch(store: Store) -> None:
    old = await store.acquire_lease(claim("a"), stale_after=10, holder_gone=never_gone)
    await store.apply(
        WriteBatch(fence=Fence("r", old.epoch), creates=[new("r"), new("r.0", "r", 0)])
    )
    new_owner = await store.acquire_lease(claim("b"), stale_after=10, holder_gone=lambda h: True)
    with pytest.raises(LeaseLost):
        await store.apply(
            WriteBatch(
                fence=Fence("r", old.epoch),
                starts=[AttemptStart("r.0", 1)],
                settlements=[resolve("r.0", '"stale"')],
            )
        )
    record = await store.get("r.0")
    assert record is not None
    assert (record.state, record.attempts) == ("pending", 0)
    with pytest.raises(LeaseLost):
        await store.renew_lease(old)
    await store.renew_lease(new_owner)
    await store.apply(
        WriteBatch(fence=Fence("r", new_owner.epoch), settlements=[resolve("r.0", '"ok"')])
    )


async def test_a_released_lease_is_free_and_keeps_its_epoch(store: Store) -> None:
    lease = await store.acquire_lease(claim("a"), stale_after=10, holder_gone=never_gone)
    await store.release_lease(lease)
    assert await store.lease_holder("r") is None
    with pytest.raises(LeaseLost):
        await store.apply(WriteBatch(fence=Fence("r", lease.epoch + 1), creates=[new("x")]))


# -- workers: claiming the branches of detached runs --------------------------------


def worker(owner: str) -> Lease:
    return Lease("", owner, os.getpid(), socket.gethostname())


def detached_run(run_id: str, branches: int, *, at: float = 1.0) -> list[NewPromise]:
    root = NewPromise(run_id, None, None, "f", encode_args({}), at, '{"detached":true}')
    return [root] + [new(f"{run_id}.{i}", run_id, i, i=i) for i in range(branches)]


async def test_claims_take_pending_branches_of_detached_runs_in_order(store: Store) -> None:
    await store.apply(
        WriteBatch(creates=[*detached_run("d", 3), new("plain"), new("plain.0", "plain", 0)])
    )
    await store.apply(WriteBatch(settlements=[resolve("d.0", '"done"')]))
    first = await store.claim(worker("a"), limit=1, stale_after=10)
    assert [(c.record.id, c.fence) for c in first] == [("d.1", Fence("d.1", 1))]
    rest = await store.claim(worker("b"), limit=5, stale_after=10)
    assert [c.record.id for c in rest] == ["d.2"]  # d.1 is held; plain is not detached
    assert rest[0].record.args == {"version": 1, "kwargs": {"i": 2}}
    assert await store.claim(worker("c"), limit=5, stale_after=10) == []
    holders = await store.held_leases("d.")
    assert [(h.key, h.owner, h.epoch) for h in holders] == [("d.1", "a", 1), ("d.2", "b", 1)]


async def test_a_lapsed_claim_is_taken_over_and_its_fence_refused(store: Store) -> None:
    await store.apply(WriteBatch(creates=detached_run("d", 1)))
    [old] = await store.claim(worker("a"), limit=1, stale_after=10)
    # lapsed by the store's clock: a negative limit makes any heartbeat too old
    [taken] = await store.claim(worker("b"), limit=1, stale_after=-1)
    assert (taken.record.id, taken.fence.epoch) == ("d.0", old.fence.epoch + 1)
    assert await store.renew_claims(worker("a"), [old.fence]) == [old.fence]
    assert await store.renew_claims(worker("b"), [taken.fence]) == []
    with pytest.raises(LeaseLost):
        await store.apply(WriteBatch(fence=old.fence, starts=[AttemptStart("d.0", 1)]))
    await store.apply(WriteBatch(fence=taken.fence, settlements=[resolve("d.0", '"ok"')]))
    assert await store.claim(worker("c"), limit=1, stale_after=-1) == []


async def test_a_settled_root_or_one_executed_by_its_own_lease_is_not_claimed(
    store: Store,
) -> None:
    await store.apply(WriteBatch(creates=[*detached_run("d", 1), *detached_run("e", 1, at=2)]))
    await store.apply(WriteBatch(settlements=[resolve("d", "1")]))
    held = Lease("e", "runner", os.getpid(), socket.gethostname())
    await store.acquire_lease(held, stale_after=10, holder_gone=never_gone)
    assert await store.claim(worker("a"), limit=5, stale_after=10) == []
    [claimed] = await store.claim(worker("a"), limit=5, stale_after=-1)  # the run's lease lapsed
    assert claimed.record.id == "e.0"


async def test_a_claim_for_one_run_takes_only_that_runs_branches(store: Store) -> None:
    await store.apply(WriteBatch(creates=[*detached_run("d", 2), *detached_run("e", 2, at=2)]))
    [held] = await store.claim(worker("a"), limit=1, stale_after=10)
    assert held.record.id == "d.0"
    got = await store.claim(worker("b"), limit=5, stale_after=10, run_id="e")
    assert [c.record.id for c in got] == ["e.0", "e.1"]  # d, the older run, is left alone
    assert await store.claim(worker("b"), limit=5, stale_after=10, run_id="e") == []
    [rest] = await store.claim(worker("b"), limit=5, stale_after=10, run_id="d")
    assert rest.record.id == "d.1"  # d.0 is a's, live
    assert await store.claim(worker("c"), limit=5, stale_after=10, run_id="nobody") == []


async def test_claims_of_concurrent_workers_never_overlap(store: Store, reopen: Reopen) -> None:
    import asyncio

    await store.apply(WriteBatch(creates=detached_run("d", 40)))
    others = [await reopen() for _ in range(3)]
    # Claimers at once never take the same branch. One may come away with fewer than its
    # limit (PostgreSQL: the branches it picked were leased by another as it went), so they
    # claim again until nothing is left: every branch, once.
    ids: list[str] = []
    for _ in range(10):
        got = await asyncio.gather(
            *(s.claim(worker(f"w{i}"), limit=15, stale_after=10) for i, s in enumerate(others))
        )
        ids += [c.record.id for claims in got for c in claims]
        if not any(got):
            break
    assert len(ids) == len(set(ids)) == 40


async def test_any_pending_tells_whether_a_run_has_a_pending_branch(store: Store) -> None:
    await store.apply(WriteBatch(creates=detached_run("d", 2)))
    assert await store.any_pending("d")
    await store.apply(WriteBatch(settlements=[resolve("d.1", '"ok"')]))
    assert await store.any_pending("d")
    await store.apply(WriteBatch(settlements=[reject("d.0", ErrorInfo("E", "no"))]))
    assert not await store.any_pending("d")
    assert not await store.any_pending("nobody")


# -- apply_each: a worker's branches share one transaction, each under its own fence ----


async def test_apply_each_leaves_out_only_the_batches_whose_fence_is_stale(
    store: Store,
) -> None:
    await store.apply(WriteBatch(creates=detached_run("d", 3)))
    first, second, third = await store.claim(worker("a"), limit=3, stale_after=10)
    await store.apply(WriteBatch(settlements=[resolve("d.2", '"earlier"')]))
    # d.1 lapses and is taken over: a's fence on it is stale from now on
    taken = await store.acquire_lease(
        Lease("d.1", "b", 1, "h"), stale_after=10, holder_gone=lambda h: True
    )
    got = await store.apply_each(
        [
            WriteBatch(fence=first.fence, starts=[AttemptStart("d.0", 1)]),
            WriteBatch(fence=second.fence, settlements=[resolve("d.1", '"stale"')]),
            WriteBatch(fence=third.fence, settlements=[resolve("d.2", '"late"')]),
        ]
    )
    assert got[0] == {}
    assert isinstance(got[1], LeaseLost)
    assert got[1].key == "d.1"
    assert isinstance(got[2], dict)
    assert got[2]["d.2"].value == "earlier"
    d0, d1 = await store.get("d.0"), await store.get("d.1")
    assert d0 is not None
    assert d0.attempts == 1
    assert d1 is not None
    assert d1.state == "pending"
    holders = {h.key: h for h in await store.held_leases("d.")}
    assert holders["d.1"].epoch == taken.epoch == second.fence.epoch + 1


async def test_apply_each_ends_a_claim_with_its_settlement(store: Store) -> None:
    await store.apply(WriteBatch(creates=detached_run("d", 2)))
    first, second = await store.claim(worker("a"), limit=2, stale_after=10)
    assert await store.apply_each(
        [
            WriteBatch(fence=first.fence, settlements=[resolve("d.0", '"ok"')]),
            WriteBatch(fence=second.fence, starts=[AttemptStart("d.1", 1)]),
        ]
    ) == [{}, {}]
    assert [h.key for h in await store.held_leases("d.")] == ["d.1"]  # d.0's claim ended
    # ended by its own settlement, not taken: a renewal does not call it lost (issue 19,
    # item 12: a worker reported branches it had resolved itself as lost)
    assert await store.renew_claims(worker("a"), [first.fence, second.fence]) == []
    assert [h.key for h in await store.held_leases("d.")] == ["d.1"]  # not renewed back
    assert await store.any_pending("d")  # d.1 is still pending


async def test_apply_each_refuses_every_batch_on_a_conflict(store: Store) -> None:
    await store.apply(WriteBatch(creates=detached_run("d", 2)))
    first, second = await store.claim(worker("a"), limit=2, stale_after=10)
    with pytest.raises(StoreConflict):
        await store.apply_each(
            [
                WriteBatch(fence=first.fence, settlements=[resolve("d.0", '"ok"')]),
                WriteBatch(fence=second.fence, creates=[new("d.0", "d", 0)]),
            ]
        )
    d0 = await store.get("d.0")
    assert d0 is not None
    assert d0.state == "pending"
    assert [h.key for h in await store.held_leases("d.")] == ["d.0", "d.1"]
    assert await store.apply_each([]) == []


async def test_forget_leases_deletes_released_or_silent_rows_under_the_prefix_only(
    store: Store,
) -> None:
    here = (os.getpid(), socket.gethostname())
    live = Lease("worker:a", "a", *here)
    await store.acquire_lease(live, stale_after=10, holder_gone=never_gone)
    done = await store.acquire_lease(
        Lease("worker:b", "b", *here), stale_after=10, holder_gone=never_gone
    )
    await store.release_lease(done)
    branch = await store.acquire_lease(
        Lease("d.0", "c", *here), stale_after=10, holder_gone=never_gone
    )
    await store.release_lease(branch)
    assert await store.forget_leases("worker:", older_than=3600) == 1  # worker:b, released
    assert [h.key for h in await store.held_leases()] == ["worker:a"]
    assert await store.forget_leases("worker:", older_than=-1) == 1  # silent past the limit
    assert await store.held_leases() == []
    # a branch's row is never deleted: its epoch goes on
    again = await store.acquire_lease(
        Lease("d.0", "e", *here), stale_after=10, holder_gone=never_gone
    )
    assert again.epoch == branch.epoch + 1
    with pytest.raises(ValueError, match="prefix"):
        await store.forget_leases("", older_than=0)
