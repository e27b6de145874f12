"""A step that raises DrainRun: the run starts no attempt any more, lets the attempts in
flight end (their outcomes recorded as usual), then stops, the rest left pending."""

from __future__ import annotations

import asyncio
from collections import Counter
from typing import Any

import pytest
from test_context import NO_WAIT, context

from imagepipe.durable import RunContext, Step, Store
from imagepipe.durable.errors import DrainRun
from imagepipe.durable.records import NewPromise, PromiseRecord, WriteBatch, encode_args
from imagepipe.durable.worker import BranchJob, Worker


class AccountGone(Exception):
    """Stands for what a step meets that every attempt would meet alike."""


async def ready_callbacks_run() -> None:
    """Let the loop run what is ready: a run (or worker) that stopped at once instead of
    draining would have finished by then. Not a wait in time: nothing here does I/O off
    the loop (the SQLite store is synchronous), so the count of turns is what matters."""
    for _ in range(200):
        await asyncio.sleep(0)


async def test_a_drain_lets_the_attempts_in_flight_end_and_starts_nothing_more(
    store: Store,
) -> None:
    calls: list[tuple[int, int]] = []
    in_flight: set[int] = set()
    both_in_flight = asyncio.Event()
    drained = asyncio.Event()  # branch 2 has raised DrainRun
    answer = asyncio.Event()  # the test lets branches 0 and 1 answer

    async def step(s: Step[None], i: int) -> int:
        calls.append((i, s.attempt))
        if i == 2:
            await both_in_flight.wait()
            drained.set()
            raise DrainRun("the key is refused") from AccountGone("401")
        in_flight.add(i)
        if in_flight >= {0, 1}:
            both_in_flight.set()
        await answer.wait()
        if i == 1:
            raise ConnectionError("flaky")  # retryable: but no retry starts in a drain
        return i

    async def workflow(ctx: RunContext[None]) -> list[int]:
        handles = [ctx.begin_run(step, i=i) for i in range(6)]
        return [await h for h in handles]

    ctx = await context(store, lease=False, concurrency=3, retry=NO_WAIT)
    running = asyncio.ensure_future(ctx.run_workflow(workflow))
    await drained.wait()  # branch 2's task handled its DrainRun before this wakes
    await ready_callbacks_run()
    assert not running.done(), "the run waits for the attempts in flight"
    answer.set()
    with pytest.raises(DrainRun, match="the key is refused") as info:
        await running
    assert isinstance(info.value.__cause__, AccountGone)
    await ctx.cancel_all()

    assert sorted(calls) == [(0, 1), (1, 1), (2, 1)], "no queued branch, no retry started"
    children = {c.id: c for c in await store.children("run")}
    states = {i: (c.state, c.attempts) for i, c in children.items()}
    assert states == {
        "run.0": ("resolved", 1),  # in flight: its result is recorded
        "run.1": ("pending", 1),  # in flight: its failure is recorded, its retry never starts
        "run.2": ("pending", 1),  # met the drain: not a failed attempt
        **{f"run.{i}": ("pending", 0) for i in range(3, 6)},
    }
    assert children["run.0"].value == 0
    failed = Counter(a.promise_id for a in await store.failed_attempts("run"))
    assert failed == {"run.1": 1}


async def test_a_drain_with_nothing_else_in_flight_stops_at_once(store: Store) -> None:
    async def step(s: Step[None], i: int) -> int:
        if i == 0:
            raise DrainRun("out of credit")
        return i

    async def workflow(ctx: RunContext[None]) -> Any:
        handles = [ctx.begin_run(step, i=i) for i in range(4)]
        return [await h for h in handles]

    ctx = await context(store, lease=True, concurrency=1, retry=NO_WAIT)
    with pytest.raises(DrainRun, match="out of credit"):
        await ctx.run_workflow(workflow)
    await ctx.cancel_all()
    states = {c.id: (c.state, c.attempts) for c in await store.children("run")}
    assert states == {"run.0": ("pending", 1), **{f"run.{i}": ("pending", 0) for i in (1, 2, 3)}}
    assert await store.failed_attempts("run") == []


async def test_a_worker_drains_its_branches_then_stops_with_the_error(store: Store) -> None:
    """The same in a worker, where each claimed branch runs in a context of its own: the
    branch that met the error makes every other branch the worker holds drain; it claims
    nothing more; then it stops with the error, naming the run."""
    root = NewPromise("run", None, None, "wf", encode_args({}), 1.0, '{"detached": true}')
    branches = [
        NewPromise(f"run.{i}", "run", i, "step", encode_args({"i": i}), 1.0) for i in range(5)
    ]
    await store.apply(WriteBatch(creates=[root, *branches]))
    calls: list[tuple[int, int]] = []
    in_flight: set[int] = set()
    both_in_flight = asyncio.Event()
    drained = asyncio.Event()
    answer = asyncio.Event()

    async def step(s: Step[None], i: int) -> int:
        calls.append((i, s.attempt))
        if i == 2:
            await both_in_flight.wait()
            drained.set()
            raise DrainRun("the key is refused") from AccountGone("401")
        in_flight.add(i)
        if in_flight >= {0, 1}:
            both_in_flight.set()
        await answer.wait()
        if i == 1:
            raise ConnectionError("flaky")
        return i

    async def job_for(record: PromiseRecord) -> BranchJob[None]:
        return BranchJob(fn=step, deps=None, retry=NO_WAIT, summarize=lambda c: (None, None))

    worker = Worker(store, job_for, concurrency=3, stale_after=30, poll=0.01, once=True)
    running = asyncio.ensure_future(worker.run())
    await drained.wait()
    await ready_callbacks_run()
    assert not running.done(), "the worker waits for the attempts in flight"
    answer.set()
    with pytest.raises(DrainRun, match="the key is refused"):
        await running
    assert sorted(calls) == [(0, 1), (1, 1), (2, 1)], "no claim, no retry after the error"
    children = {c.id: (c.state, c.attempts) for c in await store.children("run")}
    assert children == {
        "run.0": ("resolved", 1),
        "run.1": ("pending", 1),
        "run.2": ("pending", 1),
        "run.3": ("pending", 0),
        "run.4": ("pending", 0),
    }
    failed = Counter(a.promise_id for a in await store.failed_attempts("run"))
    assert failed == {"run.1": 1}
    held = [lease for lease in await store.held_leases() if lease.key.startswith("run.")]
    assert held == []  # every claim released: any worker may take the branches
    assert worker.drained == "run"
