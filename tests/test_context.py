"""The run context: deterministic ids, create-before-start, replay by name, nested steps,
cancellation, and nothing written before the replay check."""

from __future__ import annotations

import asyncio
import sqlite3
from pathlib import Path
from typing import Any

import pytest

from imagepipe.durable import (
    Execution,
    NonDeterminism,
    PromiseRejected,
    RetryPolicy,
    RunContext,
    Step,
    Store,
)
from imagepipe.durable.events import (
    AttemptStarted,
    Event,
    PromiseQueued,
    PromiseReplayed,
    PromiseResolved,
)
from imagepipe.durable.lease import LeaseKeeper
from imagepipe.durable.records import NewPromise, WriteBatch, encode_args

Calls = list[tuple[str, int]]
_keepers: list[LeaseKeeper] = []
NO_WAIT = RetryPolicy(jitter=False, time_scale=0)


class Recorder:
    """Counts every real execution of a step: replays must not add to it."""

    def __init__(self) -> None:
        self.calls: Calls = []
        self.gate: asyncio.Event | None = None
        self.changed = asyncio.Condition()

    async def wait_calls(self, n: int) -> None:
        async with self.changed:
            await self.changed.wait_for(lambda: len(self.calls) >= n)

    async def double(self, step: Step[None], x: int) -> int:
        self.calls.append((step.id, step.attempt))
        async with self.changed:
            self.changed.notify_all()
        if self.gate is not None:
            await self.gate.wait()
        return x * 2


@pytest.fixture(autouse=True)
async def released() -> Any:
    yield
    while _keepers:
        await _keepers.pop().release()


async def context(
    store: Store, events: list[Event] | None = None, *, lease: bool = True, **kwargs: Any
) -> RunContext[None]:
    """A context for run ``run`` (created if new), loaded from the store like a resume.
    The previous context's lease is released first, as its process would on exit."""
    while _keepers:
        await _keepers.pop().release()
    if await store.get("run") is None:
        root = NewPromise("run", None, None, "wf", encode_args({}), 1.0)
        await store.apply(WriteBatch(creates=[root]))
    keeper = LeaseKeeper(store, "run") if lease else None
    if keeper is not None:
        _keepers.append(keeper)
    execution = Execution(
        retry=kwargs.pop("retry", NO_WAIT),
        on_event=kwargs.pop("on_event", events.append if events is not None else None),
        concurrency=kwargs.pop("concurrency", None),
        attempt_timeout=kwargs.pop("attempt_timeout", None),
    )
    ctx: RunContext[None] = RunContext(store, "run", None, execution, lease=keeper, **kwargs)
    await ctx.load()
    return ctx


async def test_children_get_deterministic_ids_and_are_stored_before_they_start(
    store: Store, db_path: Path
) -> None:
    rec = Recorder()
    rec.gate = asyncio.Event()
    ctx = await context(store)
    handles = [ctx.begin_run(rec.double, x=x) for x in (1, 2, 3)]
    assert [h.id for h in handles] == ["run.0", "run.1", "run.2"]
    assert rec.calls == []  # begin_run returned without running anything
    await rec.wait_calls(3)
    # Before any step is called, its promise and started attempt are committed.
    with sqlite3.connect(db_path) as other:
        rows = other.execute("SELECT id, attempts FROM promises WHERE parent_id = 'run'").fetchall()
    assert sorted(rows) == [("run.0", 1), ("run.1", 1), ("run.2", 1)]
    rec.gate.set()
    assert [await h for h in handles] == [2, 4, 6]


async def test_a_result_is_committed_before_it_is_reported(store: Store, db_path: Path) -> None:
    rec = Recorder()
    other = sqlite3.connect(db_path)
    seen_in_db: list[str | None] = []

    def on_event(event: Event) -> None:
        if isinstance(event, PromiseResolved):
            row = other.execute("SELECT value FROM promises WHERE id = ?", (event.id,)).fetchone()
            seen_in_db.append(row[0])

    ctx = await context(store, on_event=on_event)
    assert await ctx.begin_run(rec.double, x=21) == 42
    assert seen_in_db == ["42"]
    other.close()


async def test_replay_reads_settled_children_without_running_them(store: Store) -> None:
    rec = Recorder()
    ctx = await context(store)
    assert await ctx.begin_run(rec.double, x=5) == 10
    assert rec.calls == [("run.0", 1)]

    events: list[Event] = []
    replay = await context(store, events)
    handle = replay.begin_run(rec.double, x=5)
    assert handle.replayed
    assert await handle == 10
    assert rec.calls == [("run.0", 1)]
    assert isinstance(events[0], PromiseReplayed)
    assert events[0].attempts == 1


async def test_a_rejected_child_raises_on_await_and_on_replay(store: Store) -> None:
    async def bad(step: Step[None]) -> None:
        raise ValueError("no such thing")

    ctx = await context(store, retry=RetryPolicy(max_attempts=2, time_scale=0))
    with pytest.raises(PromiseRejected, match="ValueError: no such thing"):
        await ctx.begin_run(bad)
    record = await store.get("run.0")
    assert record is not None
    assert (record.state, record.attempts, record.failures) == ("rejected", 2, 2)

    replay = await context(store)
    with pytest.raises(PromiseRejected) as info:
        await replay.begin_run(bad)
    assert (info.value.error.type, info.value.error.message) == ("ValueError", "no such thing")


async def test_a_different_call_at_a_stored_position_is_non_determinism(store: Store) -> None:
    rec = Recorder()
    await (await context(store)).begin_run(rec.double, x=1)
    replay = await context(store)
    with pytest.raises(NonDeterminism, match=r'run\.0.*"x":1.*"x":2'):
        replay.begin_run(rec.double, x=2)


async def test_an_argument_added_with_a_default_keeps_old_runs_replayable(store: Store) -> None:
    async def old(step: Step[None], x: int) -> int:
        return x

    async def step_fn(step: Step[None], x: int, scale: int = 1) -> int:
        return x * scale

    step_fn.__name__ = old.__name__
    await (await context(store)).begin_run(old, x=3)
    replay = await context(store)
    handle = replay.begin_run(step_fn, x=3, scale=1)
    assert handle.replayed
    assert await handle == 3
    with pytest.raises(NonDeterminism):
        (await context(store)).begin_run(step_fn, x=3, scale=2)


async def test_waiting_before_every_stored_child_is_launched_is_non_determinism_and_writes_nothing(
    store: Store, db_path: Path
) -> None:
    rec = Recorder()
    rec.gate = asyncio.Event()
    ctx = await context(store)
    first, second = ctx.begin_run(rec.double, x=1), ctx.begin_run(rec.double, x=2)
    await rec.wait_calls(2)
    await ctx.cancel_all()  # both stay pending, attempt 1 started
    with sqlite3.connect(db_path) as db:
        before = db.execute("SELECT * FROM promises ORDER BY id").fetchall()
    replay = await context(store)
    handle = replay.begin_run(rec.double, x=1)  # the code now launches one, then waits
    with pytest.raises(NonDeterminism, match="store has 2 children but the code launched 1"):
        await handle
    await replay.cancel_all()
    replay.discard()
    await asyncio.sleep(0.05)
    with sqlite3.connect(db_path) as db:
        assert db.execute("SELECT * FROM promises ORDER BY id").fetchall() == before
        assert db.execute("SELECT count(*) FROM leases WHERE epoch > 1").fetchone() == (0,)
    assert rec.calls == [("run.0", 1), ("run.1", 1)], "nothing ran again"
    del first, second


async def test_cancelled_child_stays_pending_and_resumes_with_next_attempt(store: Store) -> None:
    rec = Recorder()
    rec.gate = asyncio.Event()
    ctx = await context(store)
    ctx.begin_run(rec.double, x=7)
    await rec.wait_calls(1)
    await ctx.cancel_all()  # as Ctrl-C does
    record = await store.get("run.0")
    assert record is not None
    assert (record.state, record.attempts) == ("pending", 1)

    rec.gate.set()
    events: list[Event] = []
    resumed = await context(store, events)
    assert await resumed.begin_run(rec.double, x=7) == 14
    assert rec.calls == [("run.0", 1), ("run.0", 2)]
    assert [type(e) for e in events] == [PromiseQueued, AttemptStarted, PromiseResolved]


async def test_concurrency_bounds_calls_in_flight(store: Store) -> None:
    in_flight = 0
    peak = 0

    async def step(s: Step[None], i: int) -> int:
        nonlocal in_flight, peak
        in_flight += 1
        peak = max(peak, in_flight)
        await asyncio.sleep(0)
        in_flight -= 1
        return i

    ctx = await context(store, concurrency=3)
    handles = [ctx.begin_run(step, i=i) for i in range(20)]
    assert [await h for h in handles] == list(range(20))
    assert peak == 3


async def test_a_finished_branch_keeps_no_task_alive(store: Store) -> None:
    ctx = await context(store)
    handles = [ctx.begin_run(Recorder().double, x=i) for i in range(10)]
    for handle in handles:
        await handle
    await asyncio.sleep(0)
    assert all(h._waiting is None for h in handles), "no waiter kept once settled"
    assert not ctx._lanes.running


@pytest.mark.parametrize(
    ("returned", "seen"),
    [
        ({"url": "u", "n": 1, "ok": True, "x": None}, {"url": "u", "n": 1, "ok": True, "x": None}),
        ((1, 2), [1, 2]),  # a tuple is stored as a JSON array
        ({1: "one"}, {"1": "one"}),  # JSON keys are strings
        ({"nested": {"a": (1,)}}, {"nested": {"a": [1]}}),
    ],
)
async def test_a_live_result_is_what_a_replay_will_read(
    store: Store, returned: Any, seen: Any
) -> None:
    kept: list[Any] = []

    async def step(s: Step[None]) -> Any:
        kept.append(returned)
        return returned

    live = await (await context(store)).begin_run(step)
    replayed = await (await context(store)).begin_run(step)
    assert live == replayed == seen
    assert type(live) is type(seen)
    assert len(kept) == 1, "the replay read the store"


# -- nested durable steps ---------------------------------------------------------------


class Jobs:
    """A job API: ``create`` is paid for; ``poll`` fails the first ``flaky`` times."""

    def __init__(self, flaky: int = 0) -> None:
        self.created = 0
        self.polls = 0
        self.flaky = flaky

    async def create(self, prompt: str) -> dict[str, str]:
        self.created += 1
        return {"job": f"job-{self.created}", "prompt": prompt}

    async def poll(self, job: str) -> str:
        self.polls += 1
        if self.polls <= self.flaky:
            raise ConnectionError("poll dropped")
        return f"image of {job}"

    async def generate(self, step: Step[None], prompt: str) -> str:
        created = await step.run(self.create, prompt=prompt)
        return await self.poll(created["job"])


async def test_a_sub_step_is_stored_as_a_child_and_a_retry_reuses_it(store: Store) -> None:
    jobs = Jobs(flaky=2)
    ctx = await context(store)
    assert await ctx.begin_run(jobs.generate, prompt="fox") == "image of job-1"
    assert (jobs.created, jobs.polls) == (1, 3), "three attempts, one paid create"
    [sub] = await store.children("run.0")
    assert (sub.id, sub.func, sub.state, sub.value) == (
        "run.0.0",
        "create",
        "resolved",
        {"job": "job-1", "prompt": "fox"},
    )


async def test_a_resumed_branch_replays_its_sub_steps(store: Store) -> None:
    jobs = Jobs()
    gate = asyncio.Event()

    async def generate(step: Step[None], prompt: str) -> str:
        created = await step.run(jobs.create, prompt=prompt)
        await gate.wait()  # the process dies here, after the create was stored
        return await jobs.poll(created["job"])

    ctx = await context(store)
    ctx.begin_run(generate, prompt="fox")
    while not await store.children("run.0"):  # noqa: ASYNC110 (the store is the event)
        await asyncio.sleep(0.01)
    await ctx.cancel_all()
    gate.set()
    resumed = await context(store)
    assert await resumed.begin_run(generate, prompt="fox") == "image of job-1"
    assert jobs.created == 1, "the resume polled the stored job, it did not pay again"


async def test_a_sub_step_called_differently_on_replay_is_non_determinism(store: Store) -> None:
    jobs = Jobs()
    await (await context(store)).begin_run(jobs.generate, prompt="fox")
    record = await store.get("run.0")
    assert record is not None

    # Reopen the branch as if it had been cut off, then replay with another prompt for
    # the sub-step: the stored create does not match.
    async def other(step: Step[None], prompt: str) -> str:
        await step.run(jobs.create, prompt="whale")
        return "x"

    other.__name__ = "generate"
    await store.apply(WriteBatch(reopens=[]))
    with sqlite3.connect(store.where) as db:
        db.execute("UPDATE promises SET state = 'pending', value = NULL WHERE id = 'run.0'")
    ctx = await context(store)
    with pytest.raises(NonDeterminism, match=r"run\.0\.0"):
        await ctx.run_workflow(_one(other))


def _one(fn: Any) -> Any:
    async def workflow(ctx: RunContext[None]) -> Any:
        return await ctx.begin_run(fn, prompt="fox")

    return workflow
