"""The retry policy as data, run by tenacity, with a fake sleep that records the waits."""

from __future__ import annotations

import asyncio
import random

import pytest
from test_context import context

from imagepipe.durable import ErrorInfo, PromiseRejected, RetryPolicy, RunContext, Step, Store
from imagepipe.durable.errors import DrainRun
from imagepipe.durable.events import AttemptFailed, Event
from imagepipe.durable.records import (
    AttemptFailure,
    AttemptStart,
    NewPromise,
    WriteBatch,
    encode_args,
)
from imagepipe.providers import InvalidRequest, TransientProviderError


class FakeSleep:
    def __init__(self) -> None:
        self.waits: list[float] = []

    async def __call__(self, seconds: float) -> None:
        self.waits.append(seconds)


def test_delays_double_from_two_seconds_and_cap_at_thirty() -> None:
    policy = RetryPolicy(jitter=False)
    assert [policy.delay(n) for n in range(1, 8)] == [2, 4, 8, 16, 30, 30, 30]
    assert RetryPolicy(jitter=False, time_scale=0.01).delay(1) == pytest.approx(0.02)
    assert RetryPolicy(jitter=False, initial=1, multiplier=3, cap=100).delay(3) == 9


def test_full_jitter_spreads_the_waits_below_the_backoff() -> None:
    policy = RetryPolicy(random=random.Random(7).random)
    waits = [policy.delay(3) for _ in range(200)]
    assert all(0 <= w <= 8 for w in waits)
    assert len({round(w, 3) for w in waits}) > 150, "not in lockstep"
    assert 3 < sum(waits) / len(waits) < 5  # uniform on [0, 8]


def test_retry_after_lengthens_a_wait_but_never_shortens_it() -> None:
    class RateLimited(Exception):
        retry_after = 20.0

    policy = RetryPolicy(jitter=False)
    assert policy.delay(1, RateLimited()) == 20
    RateLimited.retry_after = 0.5
    assert policy.delay(2, RateLimited()) == 4


def test_what_is_retried() -> None:
    policy = RetryPolicy()
    assert policy.should_retry(TransientProviderError("busy"))
    assert policy.should_retry(RuntimeError("anything"))
    assert not policy.should_retry(InvalidRequest("bad prompt"))
    assert not policy.should_retry(asyncio.CancelledError())
    assert not policy.should_retry(KeyboardInterrupt())
    only_timeouts = RetryPolicy(retryable=lambda e: isinstance(e, TimeoutError))
    assert only_timeouts.should_retry(TimeoutError())
    assert not only_timeouts.should_retry(RuntimeError("x"))


def failing(times: int, error: type[Exception] = TransientProviderError) -> object:
    calls: list[int] = []

    async def step(s: Step[None]) -> str:
        calls.append(s.attempt)
        if len(calls) <= times:
            raise error(f"failure {len(calls)}")
        return "ok"

    step.calls = calls  # type: ignore[attr-defined]
    return step


async def run_one(store: Store, step: object, policy: RetryPolicy, sleep: FakeSleep) -> object:
    events: list[Event] = []
    run_one.events = events  # type: ignore[attr-defined]
    ctx = await context(store, events, retry=policy, sleep=sleep)
    return await ctx.begin_run(step)  # type: ignore[arg-type]


async def test_retries_with_exponential_waits_until_success(store: Store) -> None:
    sleep = FakeSleep()
    step = failing(3)
    assert await run_one(store, step, RetryPolicy(jitter=False), sleep) == "ok"
    assert sleep.waits == [2, 4, 8]
    assert step.calls == [1, 2, 3, 4]  # type: ignore[attr-defined]
    failed = [e for e in run_one.events if isinstance(e, AttemptFailed)]  # type: ignore[attr-defined]
    assert [(e.attempt, e.retry_in) for e in failed] == [(1, 2), (2, 4), (3, 8)]


async def test_gives_up_after_max_attempts_with_the_real_error(store: Store) -> None:
    sleep = FakeSleep()
    with pytest.raises(PromiseRejected) as info:
        await run_one(store, failing(10), RetryPolicy(max_attempts=3, jitter=False), sleep)
    assert (info.value.error.type, info.value.error.message) == (
        "TransientProviderError",
        "failure 3",
    )
    assert isinstance(info.value.__cause__, TransientProviderError)
    assert sleep.waits == [2, 4]
    record = await store.get("run.0")
    assert record is not None
    assert (record.state, record.attempts, record.failures) == ("rejected", 3, 3)


async def test_non_retryable_error_rejects_at_once(store: Store) -> None:
    sleep = FakeSleep()
    step = failing(10, InvalidRequest)
    with pytest.raises(PromiseRejected, match="InvalidRequest"):
        await run_one(store, step, RetryPolicy(), sleep)
    assert sleep.waits == []
    assert step.calls == [1]  # type: ignore[attr-defined]


async def test_budget_and_backoff_continue_from_the_store_after_resume(store: Store) -> None:
    # A previous process made two failed attempts, then died.
    errors = [ErrorInfo("TransientProviderError", f"failure {n}").to_json() for n in (1, 2)]
    await store.apply(
        WriteBatch(
            creates=[
                NewPromise("run", None, None, "wf", encode_args({}), 0.0),
                NewPromise("run.0", "run", 0, "step", encode_args({}), 0.0),
            ],
            starts=[AttemptStart("run.0", 2)],
            failures=[AttemptFailure("run.0", n, 0.0, 0.0, errors[n - 1]) for n in (1, 2)],
        )
    )
    sleep = FakeSleep()
    calls: list[int] = []

    async def step(s: Step[None]) -> str:
        calls.append(s.attempt)
        raise TransientProviderError("still down")

    ctx = await context(store, retry=RetryPolicy(max_attempts=4, jitter=False), sleep=sleep)
    with pytest.raises(PromiseRejected):
        await ctx.begin_run(step)
    assert calls == [3, 4]  # attempt numbers continue; only 2 of the 4 remain
    assert sleep.waits == [8]  # the wait after attempt 3, not tenacity's first (2 s)


class Wait(Exception):
    """A failure that is a wait, not a failed attempt (as a provider's rate limit is)."""

    counts_as_attempt = False
    retry_after: float | None = 3.0


async def test_a_wait_is_not_a_failed_attempt(store: Store) -> None:
    sleep = FakeSleep()
    step = failing(4, Wait)
    policy = RetryPolicy(max_attempts=1, jitter=False)
    assert await run_one(store, step, policy, sleep) == "ok"
    assert step.calls == [1, 1, 1, 1, 1]  # type: ignore[attr-defined]  # all in attempt 1
    assert sleep.waits == [3, 3, 3, 3]  # each wait as long as it asks for
    failed = [e for e in run_one.events if isinstance(e, AttemptFailed)]  # type: ignore[attr-defined]
    assert [(e.attempt, e.retry_in) for e in failed] == [(1, 3)] * 4
    record = await store.get("run.0")
    assert record is not None
    assert (record.state, record.attempts, record.failures) == ("resolved", 1, 0)
    assert await store.failed_attempts("run.0") == []


async def test_a_wait_that_names_no_time_backs_off_by_the_waits_so_far(store: Store) -> None:
    class Unnamed(Wait):
        retry_after = None

    sleep = FakeSleep()
    policy = RetryPolicy(max_attempts=1, jitter=False, time_scale=0.5)
    assert await run_one(store, failing(3, Unnamed), policy, sleep) == "ok"
    assert sleep.waits == [1, 2, 4]  # 2, 4, 8 s scaled


async def test_a_branch_waiting_out_a_wait_sends_nothing_more_once_the_run_drains(
    store: Store,
) -> None:
    """Branch 0 meets a wait; while it waits, branch 1 makes the run drain. Waiting, branch
    0 had nothing in flight, so the drain does not wait for it, and it does not call its
    step again: the run stops, branch 0 pending in its one attempt, not failed."""
    calls: list[int] = []
    waiting = asyncio.Event()  # branch 0 is in its wait
    drained = asyncio.Event()  # branch 1 has raised DrainRun
    over = asyncio.Event()  # the test ends branch 0's wait

    async def step(s: Step[None], i: int) -> str:
        calls.append(i)
        if i == 1:
            await waiting.wait()
            drained.set()
            raise DrainRun("the key is refused")
        raise Wait("slow down")

    async def sleep(seconds: float) -> None:
        waiting.set()
        await over.wait()
        await asyncio.sleep(0)  # a turn of the loop, as a real wait takes

    async def workflow(ctx: RunContext[None]) -> list[str]:
        handles = [ctx.begin_run(step, i=i) for i in range(2)]
        return [await h for h in handles]

    ctx = await context(store, lease=False, concurrency=2, retry=RetryPolicy(), sleep=sleep)
    running = asyncio.ensure_future(ctx.run_workflow(workflow))
    await drained.wait()
    with pytest.raises(DrainRun, match="the key is refused"):
        await running  # the drain did not wait for the branch in its wait
    over.set()  # its wait ends: the loop runs what is ready (no I/O off the loop here)
    for _ in range(200):
        await asyncio.sleep(0)
    assert calls == [0, 1]  # branch 0 never called again
    await ctx.cancel_all()
    states = {c.id: (c.state, c.attempts) for c in await store.children("run")}
    assert states == {"run.0": ("pending", 1), "run.1": ("pending", 1)}
    assert await store.failed_attempts("run") == []


async def test_cancellation_is_not_retried(store: Store) -> None:
    sleep = FakeSleep()
    started = asyncio.Event()

    async def hangs(s: Step[None]) -> None:
        started.set()
        await asyncio.Event().wait()

    ctx = await context(store, sleep=sleep)
    ctx.begin_run(hangs)
    await started.wait()
    await ctx.cancel_all()
    record = await store.get("run.0")
    assert record is not None
    assert (record.state, record.attempts, record.failures) == ("pending", 1, 0)
    assert sleep.waits == []
