"""An in-memory :class:`~imagepipe.providers.base.SubSteps` and a tiny retry loop, for tests.

``MemorySteps(stored)`` replays ``stored[n]`` for the n-th call without calling the function,
as the durable core does on a resume; ``results`` holds every step's (JSON) result, so a
test can "resume" with the results of an earlier execution.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from imagepipe.providers.base import ImageProvider, ProviderError, ProviderImage, ProviderRequest

__all__ = ["MemorySteps", "generate_with_retries"]

T = TypeVar("T")


class MemorySteps:
    def __init__(self, stored: list[Any] | None = None) -> None:
        self.results: list[Any] = list(stored or [])
        self.executed = 0  # how many step functions really ran
        self._next = 0

    def restart(self) -> None:
        """A new attempt of the same branch: steps are counted from the first again."""
        self._next = 0

    async def run(self, fn: Callable[..., Awaitable[T]], /, **kwargs: Any) -> T:
        n = self._next
        self._next += 1
        if n < len(self.results):
            stored: T = self.results[n]
            return stored
        result = await fn(**kwargs)
        self.results.append(json.loads(json.dumps(result)))  # must be a JSON value
        self.executed += 1
        return result


async def generate_with_retries(
    provider: ImageProvider, request: ProviderRequest, steps: MemorySteps, attempts: int = 5
) -> ProviderImage:
    """Retry retryable errors at once (the provider's Pacer does any waiting)."""
    for attempt in range(1, attempts + 1):
        steps.restart()
        try:
            return await provider.generate(request, steps)
        except ProviderError as exc:
            if not exc.retryable or attempt == attempts:
                raise
    raise AssertionError("unreachable")
