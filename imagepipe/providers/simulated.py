"""A provider that needs no API key: it sleeps for the style's duration and returns a URL.

Durations, the crash mode and the URL shape follow the reference example; fault
injection (failure rate, a style that always fails, hangs) is for tests and demos.
Every random choice is seeded by ``(seed, branch id, attempt)``, so a test can tell in
advance which attempt fails.
"""

from __future__ import annotations

import asyncio
import hashlib
import random
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from imagepipe.providers.base import (
    GeneratedImage,
    ImageRequest,
    InvalidRequest,
    ProviderTimeout,
    TransientProviderError,
)

__all__ = [
    "DEFAULT_STYLES",
    "KNOWN_STYLES",
    "Faults",
    "SimulatedProvider",
    "image_url",
    "nominal_duration_ms",
]

STYLE_DURATIONS_MS = {"photorealistic": 1200, "cartoon": 800, "abstract": 1000}
OTHER_DURATION_MS = 1000
CRASH_AFTER_MS = 300
DEFAULT_STYLES = ("photorealistic", "cartoon", "abstract")
KNOWN_STYLES = (*DEFAULT_STYLES, "watercolor", "pixel-art", "sketch")


def nominal_duration_ms(style: str) -> int:
    return STYLE_DURATIONS_MS.get(style, OTHER_DURATION_MS)


def image_url(prompt: str, style: str, variation: int = 0) -> str:
    """A stable URL per (prompt, style, variation).

    The reference used the first 8 characters of base64("prompt:style"), which gives every
    style the same hash once the prompt is longer than 6 characters; a SHA-256 prefix
    keeps the shape and tells the images apart."""
    key = f"{prompt}:{style}" if variation == 0 else f"{prompt}:{style}:{variation}"
    digest = hashlib.sha256(key.encode()).hexdigest()[:8]
    return f"https://images.example.com/{style}-{digest}.png"


@dataclass(frozen=True)
class Faults:
    """How the simulated provider misbehaves during one invocation (not the run's identity)."""

    fail_rate: float = 0.0
    seed: int = 0
    fail_styles: frozenset[str] = frozenset()
    hang_rate: float = 0.0

    def draw(self, request: ImageRequest, what: str) -> float:
        """A number in [0, 1), the same for the same seed, branch, attempt and purpose."""
        rng = random.Random(f"{self.seed}:{request.idempotency_key}:{request.attempt}:{what}")
        return rng.random()

    def fails(self, request: ImageRequest) -> bool:
        return self.fail_rate > 0 and self.draw(request, "fail") < self.fail_rate

    def hangs(self, request: ImageRequest) -> bool:
        return self.hang_rate > 0 and self.draw(request, "hang") < self.hang_rate


@dataclass
class SimulatedProvider:
    """The reference's simulated provider, with optional faults."""

    time_scale: float = 1.0
    latency_ms: int | None = None
    faults: Faults = field(default_factory=Faults)
    sleep: Callable[[float], Awaitable[None]] = asyncio.sleep
    name: str = "simulated"

    async def _pause(self, ms: float) -> None:
        if ms > 0 and self.time_scale > 0:
            await self.sleep(ms / 1000 * self.time_scale)

    def fault_for(self, request: ImageRequest) -> str | None:
        """Which fault this attempt meets, if any: ``crash`` (the demo's first-attempt
        timeout), ``refuse`` (non-retryable), ``hang`` or ``transient``. Deterministic."""
        if request.fail_first_attempt and request.style == "abstract" and request.attempt == 1:
            return "crash"
        if request.style in self.faults.fail_styles:
            return "refuse"
        if self.faults.hangs(request):
            return "hang"
        if self.faults.fails(request):
            return "transient"
        return None

    async def generate(self, request: ImageRequest) -> GeneratedImage:
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
        return {
            "style": style,
            "variation": request.variation,
            "url": image_url(request.prompt, style, request.variation),
            "duration_ms": duration,
        }
