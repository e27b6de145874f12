"""How a failed attempt is retried: a policy as data, run by tenacity in one loop.

- Back-off after durable attempt *n* fails: ``min(cap, initial * multiplier ** (n - 1))``
  (2 s, 4 s, 8 s, ... capped at 30 s by default). With ``jitter`` the wait is drawn
  uniformly from ``[0, back-off]`` ("full jitter", as tenacity's
  ``wait_random_exponential``), so branches that meet the same rate limit do not retry in
  lockstep. An error's ``retry_after`` (seconds a provider asked for) lengthens the wait.
- At most ``max_attempts`` failed attempts. The count comes from the store, not from
  tenacity (which starts at 1 in every process), so a resumed promise keeps its budget and
  its next delay.
- A failure that is a wait, not a failed attempt (an error whose ``counts_as_attempt``
  attribute is False and that may be retried: a provider's rate limit), does not end the
  attempt: :func:`waited_out` waits its ``retry_after`` (else the back-off, jittered, by
  the number of waits so far) and calls again, in the same durable attempt, so it never
  uses up ``max_attempts``. Whoever raises such errors bounds how long they go on (a
  provider's pacer gives up after the run's patience with an error that counts).
- ``retryable`` decides which errors are retried; anything that is not an ``Exception``
  (cancellation, Ctrl-C) never is (tenacity's custom predicates would retry it:
  jd/tenacity#529), nor are the core's own errors.
- ``time_scale`` multiplies every wait: a switch for tests and demos (0 = no waiting).
- The first attempt is awaited directly (building tenacity's machinery costs ~45 µs, more
  than the rest of a branch); once it has failed, :func:`retry_failed` hands its error to
  one tenacity loop, which decides, waits and runs every later attempt. A fresh
  ``AsyncRetrying`` per promise: a shared one miscounts across tasks (jd/tenacity#93).
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, TypeVar

from imagepipe.durable.errors import DurableError

if TYPE_CHECKING:
    from tenacity import RetryCallState

__all__ = ["RetryPolicy", "retry_failed", "waited_out"]

T = TypeVar("T")


def retry_unless_marked(exc: BaseException) -> bool:
    """The default: retry an exception unless its ``retryable`` attribute is False."""
    return bool(getattr(exc, "retryable", True))


@dataclass(frozen=True)
class RetryPolicy:
    """Which errors to retry, how often, and how long to wait in between."""

    max_attempts: int = 5
    initial: float = 2.0
    multiplier: float = 2.0
    cap: float = 30.0
    jitter: bool = True
    retryable: Callable[[BaseException], bool] = retry_unless_marked
    time_scale: float = 1.0
    #: the source of the jitter; a seeded ``random.Random`` makes the waits repeatable
    random: Callable[[], float] = field(default=random.random, repr=False, compare=False)

    def allows(self, failures: int) -> bool:
        """Whether a promise that failed ``failures`` times may be tried again."""
        return failures < self.max_attempts

    def should_retry(self, exc: BaseException) -> bool:
        if not isinstance(exc, Exception) or isinstance(exc, DurableError):
            return False
        return self.retryable(exc)

    def is_wait(self, exc: BaseException) -> bool:
        """Whether ``exc`` is a wait, not a failed attempt: a retryable error whose
        ``counts_as_attempt`` attribute is False."""
        return getattr(exc, "counts_as_attempt", True) is False and self.should_retry(exc)

    def wait_delay(self, waits: int, error: BaseException) -> float:
        """Seconds to wait before calling again after the ``waits``-th wait in a row of one
        attempt: the ``retry_after`` the error asks for, else the jittered back-off."""
        retry_after = getattr(error, "retry_after", None)
        if isinstance(retry_after, int | float):
            return float(retry_after) * self.time_scale
        wait = self.backoff(waits)
        if self.jitter:
            wait *= self.random()
        return wait * self.time_scale

    def backoff(self, attempt: int) -> float:
        """The longest wait after durable attempt ``attempt`` (1, 2, ...) failed, unscaled."""
        return float(min(self.cap, self.initial * self.multiplier ** (attempt - 1)))

    def delay(self, attempt: int, error: BaseException | None = None) -> float:
        """Seconds to wait after durable attempt ``attempt`` failed with ``error``."""
        wait = self.backoff(attempt)
        if self.jitter:
            wait *= self.random()
        retry_after = getattr(error, "retry_after", None)
        if isinstance(retry_after, int | float) and retry_after > wait:
            wait = float(retry_after)
        return wait * self.time_scale


async def retry_failed(
    policy: RetryPolicy,
    attempt: Callable[[], Awaitable[T]],
    error: Exception,
    *,
    failures: int,
    last_attempt: Callable[[], int],
    before_sleep: Callable[[BaseException, float], None],
    sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
) -> T:
    """``attempt`` just failed with ``error``: retry it under ``policy`` until it succeeds
    or the policy gives up, then re-raise the real error.

    ``failures`` counts the failed attempts so far, this one included; ``last_attempt()``
    is the durable number of the attempt that just failed, which sets the back-off."""
    from tenacity import AsyncRetrying, retry_if_exception, stop_after_attempt

    def wait(state: RetryCallState) -> float:
        assert state.outcome is not None
        return policy.delay(last_attempt(), state.outcome.exception())

    def announce(state: RetryCallState) -> None:
        assert state.outcome is not None
        assert state.next_action is not None
        exc = state.outcome.exception()
        assert exc is not None
        before_sleep(exc, state.next_action.sleep)

    # tenacity's first attempt is the one that already failed: it re-raises that error, so
    # the decision to retry and the first wait are tenacity's like every other.
    already_failed: list[Exception] = [error]
    retrying = AsyncRetrying(
        stop=stop_after_attempt(max(1, policy.max_attempts - failures + 1)),
        wait=wait,
        retry=retry_if_exception(policy.should_retry),
        sleep=sleep,
        before_sleep=announce,
        reraise=True,
    )
    async for state in retrying:
        with state:
            if already_failed:
                raise already_failed.pop()
            result = await attempt()
    return result


async def waited_out(
    policy: RetryPolicy,
    call: Callable[[], Awaitable[T]],
    *,
    before_wait: Callable[[BaseException, float], None],
    sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
) -> T:
    """``call()``, called again after every failure that is a wait (:meth:`RetryPolicy.
    is_wait`) once ``before_wait(error, delay)`` is told and the delay has passed; any
    other outcome is returned or raised as it is. One durable attempt: nothing is counted."""
    waits = 0
    while True:
        try:
            return await call()
        except Exception as exc:
            if not policy.is_wait(exc):
                raise
            waits += 1
            delay = policy.wait_delay(waits, exc)
            before_wait(exc, delay)
            await sleep(delay)
