"""The retry policy, with a fake sleep that records the waits instead of sleeping."""

from __future__ import annotations

import asyncio

import pytest

from imagepipe.durable import AttemptFailed, Event, RunContext, SQLiteStore, Step
from imagepipe.errors import PromiseRejected
from imagepipe.providers import InvalidRequest, TransientProviderError
from imagepipe.retry import ExponentialRetry, is_retryable


class FakeSleep:
    def __init__(self) -> None:
        self.waits: list[float] = []

    async def __call__(self, seconds: float) -> None:
        self.waits.append(seconds)


def test_delays_double_from_two_seconds_and_cap_at_thirty() -> None:
    policy = ExponentialRetry()
    assert [policy.delay(n) for n in range(1, 8)] == [2, 4, 8, 16, 30, 30, 30]
    assert ExponentialRetry(time_scale=0.01).delay(1) == pytest.approx(0.02)


def test_what_is_retried() -> None:
    assert is_retryable(TransientProviderError("busy"))
    assert is_retryable(RuntimeError("anything"))
    assert not is_retryable(InvalidRequest("bad prompt"))
    assert not is_retryable(asyncio.CancelledError())
    assert not is_retryable(KeyboardInterrupt())


def failing(times: int, error: type[Exception] = TransientProviderError) -> object:
    calls: list[int] = []

    async def step(s: Step[None]) -> str:
        calls.append(s.attempt)
        if len(calls) <= times:
            raise error(f"failure {len(calls)}")
        return "ok"

    step.calls = calls  # type: ignore[attr-defined]
    return step


async def run_one(store: SQLiteStore, step: object, policy: ExponentialRetry) -> object:
    store.create("run", func="wf", args=[])
    events: list[Event] = []
    ctx = RunContext(store, "run", None, retry=policy, on_event=events.append)
    try:
        return await ctx.begin_run(step)  # type: ignore[arg-type]
    finally:
        run_one.events = events  # type: ignore[attr-defined]


async def test_retries_with_exponential_waits_until_success(store: SQLiteStore) -> None:
    sleep = FakeSleep()
    step = failing(3)
    assert await run_one(store, step, ExponentialRetry(sleep=sleep)) == "ok"
    assert sleep.waits == [2, 4, 8]
    assert step.calls == [1, 2, 3, 4]  # type: ignore[attr-defined]
    failed = [e for e in run_one.events if isinstance(e, AttemptFailed)]  # type: ignore[attr-defined]
    assert [(e.attempt, e.retry_in) for e in failed] == [(1, 2), (2, 4), (3, 8)]


async def test_gives_up_after_max_attempts_with_the_real_error(store: SQLiteStore) -> None:
    sleep = FakeSleep()
    with pytest.raises(PromiseRejected) as info:
        await run_one(store, failing(10), ExponentialRetry(max_attempts=3, sleep=sleep))
    assert info.value.error_type == "TransientProviderError"
    assert info.value.error == "failure 3"
    assert isinstance(info.value.__cause__, TransientProviderError)
    assert sleep.waits == [2, 4]
    record = store.get("run.0")
    assert record is not None
    assert (record.state, record.attempts, record.failures) == ("rejected", 3, 3)


async def test_non_retryable_error_rejects_at_once(store: SQLiteStore) -> None:
    sleep = FakeSleep()
    step = failing(10, InvalidRequest)
    with pytest.raises(PromiseRejected, match="InvalidRequest"):
        await run_one(store, step, ExponentialRetry(sleep=sleep))
    assert sleep.waits == []
    assert step.calls == [1]  # type: ignore[attr-defined]


async def test_budget_and_backoff_continue_from_the_store_after_resume(
    store: SQLiteStore,
) -> None:
    # A previous process made two failed attempts, then died.
    store.create("run", func="wf", args=[])
    store.create("run.0", func="step", args=[], parent_id="run", seq=0)
    for n in (1, 2):
        store.start_attempt("run.0")
        from imagepipe.durable import ErrorInfo

        error = ErrorInfo("TransientProviderError", f"failure {n}")
        store.fail_attempt("run.0", n, error, started_at=0.0)
    store.commit()

    sleep = FakeSleep()
    calls: list[int] = []

    async def step(s: Step[None]) -> str:
        calls.append(s.attempt)
        raise TransientProviderError("still down")

    ctx = RunContext(store, "run", None, retry=ExponentialRetry(max_attempts=4, sleep=sleep))
    with pytest.raises(PromiseRejected):
        await ctx.begin_run(step)
    assert calls == [3, 4]  # attempt numbers continue; only 2 of the 4 remain
    assert sleep.waits == [8]  # the wait after attempt 3, not tenacity's first (2 s)


async def test_cancellation_is_not_retried(store: SQLiteStore) -> None:
    sleep = FakeSleep()
    started = asyncio.Event()

    async def hangs(s: Step[None]) -> None:
        started.set()
        await asyncio.Event().wait()

    store.create("run", func="wf", args=[])
    ctx = RunContext(store, "run", None, retry=ExponentialRetry(sleep=sleep))
    ctx.begin_run(hangs)
    await started.wait()
    await ctx.cancel_all()
    record = store.get("run.0")
    assert record is not None
    assert (record.state, record.attempts, record.failures) == ("pending", 1, 0)
    assert sleep.waits == []
