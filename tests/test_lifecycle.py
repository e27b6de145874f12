"""The core's run lifecycle (record_run, execute_run) and the spending cap it enforces."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import pytest

from imagepipe.durable import (
    BranchOutcome,
    ErrorInfo,
    Execution,
    RetryPolicy,
    RunContext,
    Step,
    Store,
    Workflow,
    execute_run,
    record_run,
)
from imagepipe.durable.errors import SpendingCapReached
from imagepipe.durable.records import NewPromise, Spending, WriteBatch, encode_args

calls: list[int] = []


async def paid(step: Step[None], i: int) -> int:
    calls.append(i)
    step.cost = {"usd": 60}  # cheaper than its worst case (100): the rest is given back
    return i


class Refused(Exception):
    retryable = False
    unpaid = True  # refused before any work: it cost nothing


async def refused(step: Step[None], i: int) -> int:
    calls.append(i)
    raise Refused("no")


async def fan_out(ctx: RunContext[None], n: int, fn: str = "paid") -> list[int]:
    step = {"paid": paid, "refused": refused}[fn]
    handles = [ctx.begin_run(step, i=i) for i in range(n)]
    return [await h for h in handles]


def summarize(branches: Sequence[BranchOutcome]) -> tuple[Any, ErrorInfo | None]:
    rejected = [b for b in branches if b.state == "rejected"]
    if rejected:
        return None, ErrorInfo("BranchRejected", rejected[0].id, retryable=False)
    return {"sum": sum(b.value for b in branches)}, None


WORKFLOW = Workflow(fan_out, summarize=summarize)


def worst_case(func: str, kwargs: Mapping[str, Any]) -> dict[str, int]:
    return {"usd": 100}


HOW = Execution(retry=RetryPolicy(max_attempts=1), concurrency=1, cost_of_attempt=worst_case)


@pytest.fixture(autouse=True)
def fresh_calls() -> None:
    calls.clear()


async def test_a_run_is_recorded_once_and_settled_from_its_branches(store: Store) -> None:
    root, written = await record_run(store, "r", WORKFLOW, {"n": 3}, options={"x": 1})
    again, written_again = await record_run(store, "r", WORKFLOW, {"n": 9}, options={})
    assert (written, written_again) == (True, False)
    assert again.args == root.args, "the stored run is the one"
    executed = await execute_run(store, root, WORKFLOW, None, Execution())
    assert executed.root.state == "resolved"
    assert executed.root.value == {"sum": 3}
    stored = await store.get("r")
    assert stored is not None
    assert stored.value == {"sum": 3}


async def test_a_cap_that_fits_k_attempts_starts_exactly_k(store: Store) -> None:
    root, _ = await record_run(store, "r", WORKFLOW, {"n": 5}, options={})
    # 100 reserved per attempt, 60 actually spent: 60 + 60 + 100 <= 250, a fourth does not fit
    await store.set_spending_limit("r", "usd", 250)
    with pytest.raises(SpendingCapReached) as reached:
        await execute_run(store, root, WORKFLOW, None, HOW)
    assert calls == [0, 1, 2]
    assert (reached.value.spent, reached.value.cap) == (180, 250)
    states = [c.state for c in await store.children("r")]
    assert states == ["resolved", "resolved", "resolved", "pending", "pending"]
    assert await store.spending("r") == {"usd": Spending(250, 180)}
    root = await store.get("r")  # type: ignore[assignment]
    assert root is not None
    assert root.state == "pending", "a capped run stays resumable"

    # the cap raised, the rest is made and nothing is paid twice
    await store.set_spending_limit("r", "usd", 1000)
    executed = await execute_run(store, root, WORKFLOW, None, HOW)
    assert executed.root.state == "resolved"
    assert calls == [0, 1, 2, 3, 4]
    assert await store.spending("r") == {"usd": Spending(1000, 300)}


async def test_an_unpaid_failure_gives_its_reservation_back(store: Store) -> None:
    root, _ = await record_run(store, "r", WORKFLOW, {"n": 3, "fn": "refused"}, options={})
    await store.set_spending_limit("r", "usd", 100)
    executed = await execute_run(store, root, WORKFLOW, None, HOW)
    assert executed.root.state == "rejected"
    assert calls == [0, 1, 2], "each refusal gave back its 100: the next one fit"
    assert await store.spending("r") == {"usd": Spending(100, 0)}


# -- children settled from outside, and the run's own steps (a provider's batch) -------

made: list[str] = []


class Outside:
    """What a batch provider is to the core: it answers many children at once, later."""

    def __init__(self, stop_after_send: bool) -> None:
        self.stop_after_send = stop_after_send


class Paused(Exception):
    """The workflow stops, the run pending: its batch is not done yet."""


async def batched(ctx: RunContext[Outside], n: int) -> list[int]:
    handles = [ctx.promise(paid, i=i) for i in range(n)]

    async def create() -> dict[str, Any]:
        made.append("batch")  # paid for once: a replay must find the step's result
        return {"id": f"batch_{len(made)}", "ids": [h.id for h in handles]}

    batch = await ctx.step("created", create)
    pending = [h for h in handles if not h.settled]
    await ctx.start_attempts([(h, 1, {"usd": 100}) for h in pending])  # again: no-op
    await ctx.note("status", {"batch": batch["id"], "status": "in_progress"})
    if ctx.deps.stop_after_send:
        raise Paused
    for i, handle in enumerate(handles):
        if not handle.settled:
            ctx.settle(handle, value=i * 10)
    await ctx.settle_costs([(h, {"usd": 50}) for h in handles])
    return [await h for h in handles]


BATCHED = Workflow(batched, summarize=summarize)


async def test_held_children_are_settled_from_outside_and_the_run_s_step_runs_once(
    store: Store,
) -> None:
    made.clear()
    calls.clear()
    root, _ = await record_run(store, "run", BATCHED, {"n": 3}, options={})
    with pytest.raises(Paused):
        await execute_run(store, root, BATCHED, Outside(stop_after_send=True), Execution())
    children = await store.children("run")
    assert [(c.state, c.attempts) for c in children] == [("pending", 1)] * 3, (
        "held, not run: each child's attempt started with its reservation"
    )
    assert await store.spending("run") == {"usd": Spending(None, 300)}
    notes = await store.notes("run")
    assert notes["created"]["id"] == "batch_1"
    assert notes["status"]["status"] == "in_progress"

    executed = await execute_run(store, root, BATCHED, Outside(stop_after_send=False), Execution())
    assert made == ["batch"], "the step's result was read back, not made again"
    assert executed.root.state == "resolved"
    assert executed.root.value == {"sum": 30}
    assert [(c.state, c.value, c.attempts) for c in await store.children("run")] == [
        ("resolved", 0, 1),
        ("resolved", 10, 1),
        ("resolved", 20, 1),
    ]
    assert calls == [], "no held child ran in a lane"
    assert await store.spending("run") == {"usd": Spending(None, 150)}, (
        "the actual costs replaced the reservations, each once"
    )


async def held_then_run_here(ctx: RunContext[None], n: int) -> list[int]:
    handles = [ctx.promise(paid, i=i) for i in range(n)]
    for handle in handles:
        if not handle.settled:
            ctx.run_held(handle)  # its outcome will not come from elsewhere after all
    return [await h for h in handles]


async def test_a_held_child_can_still_be_run_here_continuing_its_attempts(store: Store) -> None:
    calls.clear()
    workflow = Workflow(held_then_run_here, summarize=summarize)
    root, _ = await record_run(store, "run", workflow, {"n": 2}, options={})
    await store.apply(
        WriteBatch(creates=[NewPromise("run.0", "run", 0, "paid", encode_args({"i": 0}), 1.0)])
    )
    assert await store.reserve_attempts(None, "run", [("run.0", 1, {})]) is None  # a batch's
    executed = await execute_run(store, root, workflow, None, Execution())
    assert executed.root.value == {"sum": 1}
    assert sorted(calls) == [0, 1]
    assert [(c.id, c.attempts) for c in await store.children("run")] == [
        ("run.0", 2),
        ("run.1", 1),
    ]
