"""How the simulated provider misbehaves during one invocation, for tests and demos.

Its own module so that :mod:`imagepipe.providers.contract` can name it in
:class:`~imagepipe.providers.contract.ProviderSettings` without importing the simulated
provider."""

from __future__ import annotations

import random
from dataclasses import dataclass

from imagepipe.providers.base import ProviderRequest

__all__ = ["Faults"]


@dataclass(frozen=True)
class Faults:
    """How the simulated provider misbehaves during one invocation (not the run's identity)."""

    fail_rate: float = 0.0
    seed: int = 0
    fail_styles: frozenset[str] = frozenset()
    hang_rate: float = 0.0

    def draw(self, request: ProviderRequest, what: str) -> float:
        """A number in [0, 1), the same for the same seed, branch, attempt and purpose."""
        rng = random.Random(f"{self.seed}:{request.idempotency_key}:{request.attempt}:{what}")
        return rng.random()

    def fails(self, request: ProviderRequest) -> bool:
        return self.fail_rate > 0 and self.draw(request, "fail") < self.fail_rate

    def hangs(self, request: ProviderRequest) -> bool:
        return self.hang_rate > 0 and self.draw(request, "hang") < self.hang_rate
