"""``calllog``: a provider for the tests, registered the way any plugin is (the entry point
of ``imagepipe_calllog-1.0.dist-info`` beside this module, found once ``tests/plugins`` is
on ``PYTHONPATH``; see ``conftest.PLUGINS``).

It is the simulated provider (same options, same images, same faults) whose calls a test
can count and hold, per process, through its environment:

- ``IMAGEPIPE_TEST_CALL_LOG``: a file to which every provider call appends a line
  ``<branch id> <attempt> <pid>`` before it runs (none: nothing is logged);
- ``IMAGEPIPE_TEST_CALL_GATE``: with the log, every call then waits until this file
  exists (a test holds a process's calls in flight, its claims live, until it says so).
"""

from __future__ import annotations

import asyncio
import os
from typing import ClassVar

from imagepipe.providers.base import ProviderImage, ProviderRequest, SubSteps
from imagepipe.providers.contract import ProviderSettings
from imagepipe.providers.options import ProviderOptions
from imagepipe.providers.simulated import SimulatedOptions, SimulatedProvider

CALL_LOG = "IMAGEPIPE_TEST_CALL_LOG"
CALL_GATE = "IMAGEPIPE_TEST_CALL_GATE"


class CallLogProvider:
    """The simulated provider, each call logged (and held by the gate) when asked to."""

    name: ClassVar[str] = "calllog"
    description: ClassVar[str] = (
        "tests only: the simulated provider, each call logged to IMAGEPIPE_TEST_CALL_LOG"
    )
    Options: ClassVar[type[ProviderOptions]] = SimulatedOptions
    default_concurrency: ClassVar[int] = SimulatedProvider.default_concurrency
    guarantee: ClassVar[str] = SimulatedProvider.guarantee

    def __init__(self, inner: SimulatedProvider) -> None:
        self.inner = inner
        path = os.environ.get(CALL_LOG)
        # line-buffered: every line is on disk before the call, even if kill -9 follows
        self.log = open(path, "a", buffering=1) if path else None  # noqa: SIM115 (aclose)
        self.gate = os.environ.get(CALL_GATE) if path else None

    @staticmethod
    def check_credentials(options: ProviderOptions) -> None:
        """No key needed."""

    @classmethod
    def create(cls, options: ProviderOptions, settings: ProviderSettings) -> CallLogProvider:
        return cls(SimulatedProvider.create(options, settings))

    async def generate(self, request: ProviderRequest, steps: SubSteps) -> ProviderImage:
        if self.log is not None:
            self.log.write(f"{request.idempotency_key} {request.attempt} {os.getpid()}\n")
        # another process's file: no event to wait on, so poll
        while self.gate and not os.path.exists(self.gate):  # noqa: ASYNC110
            await asyncio.sleep(0.01)
        return await self.inner.generate(request, steps)

    async def aclose(self) -> None:
        if self.log is not None:
            self.log.close()
        await self.inner.aclose()
