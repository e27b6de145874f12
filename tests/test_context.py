"""The run context: deterministic ids, create-before-start, replay, cancellation."""

from __future__ import annotations

import asyncio
import sqlite3
from pathlib import Path
from typing import Any

import pytest

from imagepipe.durable import (
    AttemptStarted,
    Event,
    PromiseQueued,
    PromiseReplayed,
    PromiseResolved,
    RunContext,
    SQLiteStore,
    Step,
)
from imagepipe.errors import NonDeterminism, PromiseRejected
from imagepipe.retry import ExponentialRetry

Calls = list[tuple[str, int]]


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


async def no_sleep(seconds: float) -> None:
    return None


def make_ctx(
    store: SQLiteStore, events: list[Event] | None = None, **kwargs: Any
) -> RunContext[None]:
    store.create("run", func="wf", args=[])
    store.commit()
    sink = events.append if events is not None else None
    return RunContext(
        store, "run", None, retry=ExponentialRetry(sleep=no_sleep), on_event=sink, **kwargs
    )


async def test_children_get_deterministic_ids_and_are_stored_before_they_start(
    store: SQLiteStore, db_path: Path
) -> None:
    rec = Recorder()
    rec.gate = asyncio.Event()
    ctx = make_ctx(store)
    handles = [ctx.begin_run(rec.double, x) for x in (1, 2, 3)]
    assert [h.id for h in handles] == ["run.0", "run.1", "run.2"]
    # begin_run returned without running anything: the promises go to the store with
    # the next group commit, which comes before any of them can start.
    assert rec.calls == []
    await rec.wait_calls(3)
    # Before any step is called, its promise and started attempt are committed.
    other = sqlite3.connect(db_path)
    rows = other.execute("SELECT id, attempts FROM promises WHERE parent_id = 'run'").fetchall()
    assert sorted(rows) == [("run.0", 1), ("run.1", 1), ("run.2", 1)]
    rec.gate.set()
    assert [await h for h in handles] == [2, 4, 6]


async def test_a_result_is_committed_before_it_is_reported(
    store: SQLiteStore, db_path: Path
) -> None:
    rec = Recorder()
    other = sqlite3.connect(db_path)
    seen_in_db: list[str | None] = []

    def on_event(event: Event) -> None:
        if isinstance(event, PromiseResolved):
            row = other.execute("SELECT value FROM promises WHERE id = ?", (event.id,)).fetchone()
            seen_in_db.append(row[0])

    store.create("run", func="wf", args=[])
    store.commit()
    ctx = RunContext(store, "run", None, retry=ExponentialRetry(), on_event=on_event)
    assert await ctx.begin_run(rec.double, 21) == 42
    assert seen_in_db == ["42"]


async def test_replay_reads_settled_children_without_running_them(store: SQLiteStore) -> None:
    rec = Recorder()
    ctx = make_ctx(store)
    assert await ctx.begin_run(rec.double, 5) == 10
    assert rec.calls == [("run.0", 1)]

    events: list[Event] = []
    replay = RunContext(store, "run", None, retry=ExponentialRetry(), on_event=events.append)
    handle = replay.begin_run(rec.double, 5)
    assert handle.replayed
    assert await handle == 10
    assert rec.calls == [("run.0", 1)]
    assert isinstance(events[0], PromiseReplayed)
    assert events[0].attempts == 1
    assert replay.computed == set()


async def test_a_rejected_child_raises_on_await_and_on_replay(store: SQLiteStore) -> None:
    async def bad(step: Step[None]) -> None:
        raise ValueError("no such thing")

    ctx = make_ctx(store)
    ctx._retry = ExponentialRetry(max_attempts=2, sleep=no_sleep)
    with pytest.raises(PromiseRejected, match="ValueError: no such thing"):
        await ctx.begin_run(bad)
    record = store.get("run.0")
    assert record is not None
    assert (record.state, record.attempts, record.failures) == ("rejected", 2, 2)

    replay = RunContext(store, "run", None, retry=ExponentialRetry())
    with pytest.raises(PromiseRejected) as info:
        await replay.begin_run(bad)
    assert (info.value.error_type, info.value.error) == ("ValueError", "no such thing")


async def test_different_call_at_a_stored_position_is_non_determinism(
    store: SQLiteStore,
) -> None:
    rec = Recorder()
    ctx = make_ctx(store)
    await ctx.begin_run(rec.double, 1)
    replay = RunContext(store, "run", None, retry=ExponentialRetry())
    with pytest.raises(NonDeterminism, match=r"run\.0.*double\[1\].*double\[2\]"):
        replay.begin_run(rec.double, 2)


async def test_fewer_branches_than_stored_is_non_determinism(store: SQLiteStore) -> None:
    rec = Recorder()
    ctx = make_ctx(store)
    await ctx.begin_run(rec.double, 1)
    await ctx.begin_run(rec.double, 2)
    replay = RunContext(store, "run", None, retry=ExponentialRetry())
    await replay.begin_run(rec.double, 1)
    with pytest.raises(NonDeterminism, match="store has 2 branches but the code now launches 1"):
        replay.check_no_leftovers()
    # ...and a workflow that now launches nothing at all
    empty = RunContext(store, "run", None, retry=ExponentialRetry())
    with pytest.raises(NonDeterminism, match="store has 2 branches but the code now launches 0"):
        empty.check_no_leftovers()


async def test_cancelled_child_stays_pending_and_resumes_with_next_attempt(
    store: SQLiteStore,
) -> None:
    rec = Recorder()
    rec.gate = asyncio.Event()
    ctx = make_ctx(store)
    ctx.begin_run(rec.double, 7)
    await rec.wait_calls(1)
    assert rec.calls == [("run.0", 1)]
    await ctx.cancel_all()  # as Ctrl-C does
    record = store.get("run.0")
    assert record is not None
    assert (record.state, record.attempts) == ("pending", 1)

    rec.gate.set()
    events: list[Event] = []
    resumed = RunContext(store, "run", None, retry=ExponentialRetry(), on_event=events.append)
    assert await resumed.begin_run(rec.double, 7) == 14
    assert rec.calls == [("run.0", 1), ("run.0", 2)]
    assert [type(e) for e in events] == [PromiseQueued, AttemptStarted, PromiseResolved]


async def test_concurrency_bounds_calls_in_flight(store: SQLiteStore) -> None:
    in_flight = 0
    peak = 0

    async def step(s: Step[None], i: int) -> int:
        nonlocal in_flight, peak
        in_flight += 1
        peak = max(peak, in_flight)
        await asyncio.sleep(0)
        in_flight -= 1
        return i

    ctx = make_ctx(store, concurrency=3)
    handles = [ctx.begin_run(step, i) for i in range(20)]
    assert [await h for h in handles] == list(range(20))
    assert peak == 3


async def test_a_failing_heartbeat_does_not_hide_the_runs_own_error(
    store: SQLiteStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    from imagepipe.durable import lease as lease_module
    from imagepipe.errors import StoreError

    failed = asyncio.Event()

    def broken_renew(*args: object) -> bool:
        failed.set()
        raise StoreError("heartbeat write failed")

    monkeypatch.setattr(lease_module, "HEARTBEAT", 0)
    monkeypatch.setattr(store, "renew_lease", broken_renew)

    async def run_that_fails() -> None:
        async with lease_module.hold_lease(store, "run"):
            await failed.wait()  # the heartbeat has died of its store error
            raise ValueError("the run's own failure")

    # The run's error comes out, and (autouse fixture) the heartbeat's is not left
    # unretrieved.
    with pytest.raises(ValueError, match="the run's own failure"):
        await run_that_fails()


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
    store: SQLiteStore, returned: Any, seen: Any
) -> None:
    kept: list[Any] = []

    async def step(s: Step[None]) -> Any:
        kept.append(returned)
        return returned

    live = await make_ctx(store).begin_run(step)
    replayed = await RunContext(store, "run", None, retry=ExponentialRetry()).begin_run(step)
    assert live == replayed == seen
    assert type(live) is type(seen)
    assert len(kept) == 1, "the replay read the store"
