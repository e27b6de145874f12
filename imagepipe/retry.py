"""The retry policy of a branch: exponential back-off through tenacity, counted durably.

- Back-off after durable attempt *n* fails: ``min(cap, initial * 2 ** (n - 1))``, so
  2 s, 4 s, 8 s, ... capped at 30 s, then multiplied by the time scale
  (``IMAGEPIPE_TIME_SCALE``) so tests and demos run fast without patching sleep.
- At most ``max_attempts`` failed attempts per branch. The count comes from the store,
  not from tenacity (which starts at 1 in every process), so a resumed branch keeps its
  budget and its next delay.
- Errors with ``retryable = False`` (the provider says the request itself is bad) are not
  retried. Anything that is not an ``Exception`` (``CancelledError``, Ctrl-C) is never
  retried: tenacity's custom predicates would otherwise retry cancellation (jd/tenacity#529).
- A fresh ``AsyncRetrying`` per branch: a shared one miscounts across tasks (jd/tenacity#93).
  It is built only once a first attempt has failed: see :meth:`ExponentialRetry.retry`.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, TypeVar

from imagepipe.errors import ImagepipeError

if TYPE_CHECKING:  # imported when first needed: most runs never retry
    from tenacity import AsyncRetrying, RetryCallState

__all__ = ["DEFAULT_MAX_ATTEMPTS", "ExponentialRetry", "is_retryable"]

T = TypeVar("T")
DEFAULT_MAX_ATTEMPTS = 5


def is_retryable(exc: BaseException) -> bool:
    """Retry ordinary failures; never cancellation, imagepipe's own errors or bad requests."""
    if not isinstance(exc, Exception) or isinstance(exc, ImagepipeError):
        return False
    return bool(getattr(exc, "retryable", True))


@dataclass(frozen=True)
class ExponentialRetry:
    """A :class:`~imagepipe.durable.RetryPolicy`."""

    max_attempts: int = DEFAULT_MAX_ATTEMPTS
    initial: float = 2.0
    cap: float = 30.0
    time_scale: float = 1.0
    sleep: Callable[[float], Awaitable[None]] = field(default=asyncio.sleep, repr=False)

    def delay(self, attempt: int) -> float:
        """Seconds to wait after durable attempt ``attempt`` (1, 2, ...) failed."""
        return float(min(self.cap, self.initial * 2 ** (attempt - 1)) * self.time_scale)

    def allows(self, failures: int) -> bool:
        return failures < self.max_attempts

    async def retry(
        self,
        attempt: Callable[[], Awaitable[T]],
        error: Exception,
        *,
        failures: int,
        last_attempt: Callable[[], int],
        before_sleep: Callable[[BaseException, float], None],
    ) -> T:
        # Only a failed first attempt comes here: building and driving an AsyncRetrying
        # costs ~0.2 ms per branch (measured), most of a 10,000-branch run if every
        # branch paid it. The first back-off is ours; tenacity takes it from there.
        if not is_retryable(error) or failures >= self.max_attempts:
            raise error
        delay = self.delay(last_attempt())
        before_sleep(error, delay)
        await self.sleep(delay)
        return await self._retrying(failures, last_attempt, before_sleep)(attempt)

    def _retrying(
        self,
        failures: int,
        last_attempt: Callable[[], int],
        before_sleep: Callable[[BaseException, float], None],
    ) -> AsyncRetrying:
        from tenacity import AsyncRetrying, retry_if_exception, stop_after_attempt

        def wait(state: RetryCallState) -> float:
            return self.delay(last_attempt())

        def announce(state: RetryCallState) -> None:
            assert state.outcome is not None
            assert state.next_action is not None
            exc = state.outcome.exception()
            assert exc is not None
            before_sleep(exc, state.next_action.sleep)

        return AsyncRetrying(
            stop=stop_after_attempt(self.max_attempts - failures),
            wait=wait,
            retry=retry_if_exception(is_retryable),
            sleep=self.sleep,
            before_sleep=announce,
            reraise=True,
        )
