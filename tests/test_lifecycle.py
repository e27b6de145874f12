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
from imagepipe.durable.records import Spending

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
