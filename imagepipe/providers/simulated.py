"""A provider that needs no API key: it waits for the style's duration and draws a PNG.

Durations, the crash mode and the URL shape follow the reference example; the image is a
real small PNG (a gradient with the prompt and style drawn on it, Pillow), so the default
demo leaves files to look at. At ``--sim-latency 0`` (benchmarks) it draws nothing and no
file is written, so that a benchmark measures imagepipe rather than Pillow and the disk.
Fault injection (failure rate, a style that always fails, hangs) is for tests and demos,
through its options (``-o fail_rate 0.3``); they are this invocation's, not the run's
identity. Every random choice is seeded by ``(fault_seed, branch id, attempt)``, so a test
can tell in advance which attempt fails.
"""

from __future__ import annotations

import asyncio
import hashlib
import random
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar
from urllib.parse import quote

from imagepipe.providers.base import (
    InvalidRequest,
    ProviderImage,
    ProviderRequest,
    ProviderTimeout,
    SubSteps,
    TransientProviderError,
)
from imagepipe.providers.options import ProviderOptions, option

if TYPE_CHECKING:
    from imagepipe.providers.contract import ProviderSettings
    from imagepipe.providers.http import Pacer

__all__ = [
    "Faults",
    "SimulatedOptions",
    "SimulatedProvider",
    "image_url",
    "nominal_duration_ms",
    "simulated_request",
]

STYLE_DURATIONS_MS = {"photorealistic": 1200, "cartoon": 800, "abstract": 1000}
OTHER_DURATION_MS = 1000
CRASH_AFTER_MS = 300


def nominal_duration_ms(style: str) -> int:
    return STYLE_DURATIONS_MS.get(style, OTHER_DURATION_MS)


def image_url(prompt: str, style: str, variation: int = 0) -> str:
    """A stable URL per (prompt, style, variation).

    The reference used the first 8 characters of base64("prompt:style"), which gives every
    style the same hash once the prompt is longer than 6 characters; a SHA-256 prefix
    keeps the shape and tells the images apart."""
    key = f"{prompt}:{style}" if variation == 0 else f"{prompt}:{style}:{variation}"
    digest = hashlib.sha256(key.encode()).hexdigest()[:8]
    return f"https://images.example.com/{quote(style, safe='')}-{digest}.png"


@dataclass(frozen=True)
class SimulatedOptions(ProviderOptions):
    model: str = option("sim-1", "simulated model name")
    size: str = option(
        "256x256", "WIDTHxHEIGHT of the drawn PNG", pattern=r"[1-9]\d{0,3}x[1-9]\d{0,3}"
    )
    # Faults, for tests and demos: this invocation's, not the run's identity.
    fail_rate: float = option(
        0.0,
        "share of attempts that fail with a transient error (tests, demos)",
        identity=False,
        minimum=0,
        maximum=1,
    )
    hang_rate: float = option(
        0.0,
        "share of attempts that never answer; use with --attempt-timeout (tests, demos)",
        identity=False,
        minimum=0,
        maximum=1,
    )
    fail_style: str | None = option(
        None, "a style whose every attempt is refused, not retryable (tests, demos)", identity=False
    )
    fault_seed: int = option(
        0, "seed of the faults: the same seed fails the same attempts", identity=False
    )


@dataclass(frozen=True)
class Faults:
    """How the simulated provider misbehaves: its fault options."""

    fail_rate: float = 0.0
    seed: int = 0
    fail_styles: frozenset[str] = frozenset()
    hang_rate: float = 0.0

    @classmethod
    def of(cls, options: SimulatedOptions) -> Faults:
        styles = frozenset([options.fail_style] if options.fail_style else [])
        return cls(options.fail_rate, options.fault_seed, styles, options.hang_rate)

    def draw(self, request: ProviderRequest, what: str) -> float:
        """A number in [0, 1), the same for the same seed, branch, attempt and purpose."""
        rng = random.Random(f"{self.seed}:{request.idempotency_key}:{request.attempt}:{what}")
        return rng.random()

    def fails(self, request: ProviderRequest) -> bool:
        return self.fail_rate > 0 and self.draw(request, "fail") < self.fail_rate

    def hangs(self, request: ProviderRequest) -> bool:
        return self.hang_rate > 0 and self.draw(request, "hang") < self.hang_rate


def simulated_request(
    prompt: str, style: str, variation: int, key: str, attempt: int, crash: bool = False
) -> ProviderRequest:
    """The request a branch makes of the simulated provider (to predict its faults)."""
    return ProviderRequest(
        prompt=prompt,
        idempotency_key=key,
        attempt=attempt,
        options=SimulatedOptions(),
        style=style,
        variation=variation,
        subject=prompt,
        crash=crash,
    )


class SimulatedProvider:
    """The reference's simulated provider, with optional faults."""

    name: ClassVar[str] = "simulated"
    description: ClassVar[str] = "simulated images drawn locally, no key needed (the default)"
    Options: ClassVar[type[ProviderOptions]] = SimulatedOptions
    default_concurrency: ClassVar[int] = 16
    guarantee: ClassVar[str] = "nothing is paid"

    def __init__(
        self,
        options: ProviderOptions | None = None,
        *,
        pacer: Pacer | None = None,
        time_scale: float = 1.0,
        latency_ms: int | None = None,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        self.options = options if isinstance(options, SimulatedOptions) else SimulatedOptions()
        self.time_scale = time_scale
        self.latency_ms = latency_ms
        self.faults = Faults.of(self.options)
        self.sleep = sleep
        width, _, height = self.options.size.partition("x")
        self.size = (int(width), int(height))

    @staticmethod
    def check_credentials(options: ProviderOptions | None = None) -> None:
        """No key needed."""

    @classmethod
    def create(cls, options: ProviderOptions, settings: ProviderSettings) -> SimulatedProvider:
        """No pacer (nothing to rate-limit); the invocation's latency."""
        return cls(options, time_scale=settings.time_scale, latency_ms=settings.sim_latency_ms)

    async def aclose(self) -> None:
        pass

    async def _pause(self, ms: float) -> None:
        if ms > 0 and self.time_scale > 0:
            await self.sleep(ms / 1000 * self.time_scale)

    def fault_for(self, request: ProviderRequest) -> str | None:
        """Which fault this attempt meets, if any: ``crash`` (the demo's first-attempt
        timeout), ``refuse`` (non-retryable), ``hang`` or ``transient``. Deterministic."""
        if request.crash and request.style == "abstract" and request.attempt == 1:
            return "crash"
        if request.style in self.faults.fail_styles:
            return "refuse"
        if self.faults.hangs(request):
            return "hang"
        if self.faults.fails(request):
            return "transient"
        return None

    async def generate(self, request: ProviderRequest, steps: SubSteps) -> ProviderImage:
        style = request.style
        duration = nominal_duration_ms(style) if self.latency_ms is None else self.latency_ms
        fault = self.fault_for(request)
        if fault == "crash":
            await self._pause(CRASH_AFTER_MS)
            raise ProviderTimeout(f"Image generation service timeout for style '{style}'")
        if fault == "refuse":
            raise InvalidRequest(f"the provider refuses style '{style}' (simulated bad request)")
        if fault == "hang":
            await asyncio.Event().wait()  # never answers; only the attempt timeout ends it
        if fault == "transient":
            await self._pause(duration / 2)
            raise TransientProviderError(
                f"simulated transient failure for style '{style}' (attempt {request.attempt})"
            )
        if duration > 0:  # skip even creating the coroutine at --sim-latency 0
            await self._pause(duration)
        data = b""
        if self.latency_ms != 0:  # the benchmark mode draws nothing
            from imagepipe.providers.sim_image import draw_png

            data = await asyncio.to_thread(
                draw_png, request.subject, style, request.variation, *self.size
            )
        return ProviderImage(
            data=data,
            mime="image/png",
            model=self.options.model,
            request_id=None,
            source_url=image_url(request.subject, style, request.variation),
            duration_ms=duration,
        )
