"""What a run holds in memory per branch, and the outcome that reads its branches from the
handles (issue 11: at most 1 KB a branch, a 100,000-branch run under 120 MB)."""

from __future__ import annotations

import contextlib
import json
import tracemalloc
from typing import Any

from imagepipe.durable import Execution, PromiseRejected, RetryPolicy, RunContext, Step, Store
from imagepipe.durable.lease import LeaseKeeper
from imagepipe.durable.records import NewPromise, WriteBatch, encode_args
from imagepipe.runs.json_output import result_json, show_json
from imagepipe.runs.model import Branch, RunSpec
from imagepipe.runs.outcome import LaunchedBranches, RunOutcome

#: every FAIL_EVERY-th branch is rejected
FAIL_EVERY = 250


async def item(step: Step[None], n: int, label: str) -> dict[str, Any]:
    if n % FAIL_EVERY == FAIL_EVERY - 1:
        raise ValueError(f"no item {n}")
    return {"n": n, "style": label, "duration_ms": n}


async def fan_out(ctx: RunContext[None], label: str, count: int) -> int:
    handles = [ctx.begin_run(item, n=n, label=label) for n in range(count)]
    total = 0
    for handle in handles:
        with contextlib.suppress(PromiseRejected):
            total += (await handle)["n"]
    return total


async def run_context(store: Store) -> tuple[RunContext[None], LeaseKeeper]:
    await store.apply(WriteBatch(creates=[NewPromise("run", None, None, "wf", encode_args({}), 1)]))
    keeper = LeaseKeeper(store, "run")
    retry = RetryPolicy(max_attempts=1, jitter=False, time_scale=0)
    how = Execution(retry=retry, concurrency=4)
    ctx: RunContext[None] = RunContext(store, "run", None, how, lease=keeper)
    await ctx.load()
    return ctx, keeper


async def test_a_fan_out_past_the_limit_holds_under_1_kb_a_branch_at_its_peak(
    store: Store,
) -> None:
    # Every branch is created in one batch and all but 4 wait for a slot: the peak is
    # the fan-out and its first commit (~1,400 B a branch when the commit's parameters
    # were one list and each queued branch a closure; ~760 B since, at 5,000 branches).
    ctx, keeper = await run_context(store)
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        total = await ctx.run_workflow(fan_out, label="x", count=2_000)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
        await keeper.release()
    assert total == _resolved_sum(2_000)
    assert (peak - before) / 2_000 < 1_000


async def test_an_executed_runs_branches_read_from_its_handles_are_the_branches(
    store: Store,
) -> None:
    ctx, keeper = await run_context(store)
    try:
        await ctx.run_workflow(fan_out, label="x", count=1_000)
    finally:
        await keeper.release()
    listed = [Branch.from_handle(h) for h in ctx.launched]
    launched = LaunchedBranches(ctx.launched)
    assert len(launched) == 1_000
    assert list(launched) == listed
    assert launched[0] == listed[0]
    assert launched[-1] == listed[-1]
    assert launched[10:20] == listed[10:20]
    assert launched[::-100] == listed[::-100]
    assert [b.state for b in launched[248:251]] == ["resolved", "rejected", "resolved"]

    def outcome(branches: Any) -> RunOutcome:
        spec = RunSpec("p", ("x",))
        return RunOutcome("run", "failed", spec, branches, wall_ms=5, created_at=1.0)

    as_list, as_view = outcome(listed), outcome(launched)
    assert "".join(result_json(as_view, {})) == "".join(result_json(as_list, {}))
    assert "".join(show_json(as_view, {})) == "".join(show_json(as_list, {}))
    assert as_view.sequential_ms == _resolved_sum(1_000)
    assert len(as_view.failures) == 4
    assert len(as_view.images) == 996
    assert json.loads("".join(result_json(as_view, {})))["images"][0]["style"] == "x"


def _resolved_sum(count: int) -> int:
    return sum(n for n in range(count) if n % FAIL_EVERY != FAIL_EVERY - 1)
