"""What the commands tell while they work: a :class:`Reporter` is told the run started,
then fed the core's events."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from imagepipe.durable.events import Event
from imagepipe.runs.batches import RunBatches
from imagepipe.runs.model import RunSpec

__all__ = ["QuietReporter", "Reporter", "RunInfo"]


@dataclass(frozen=True)
class RunInfo:
    """What a reporter is told when execution starts."""

    id: str
    spec: RunSpec
    resumed: bool
    max_attempts: int
    #: ``watch`` follows a run another command started (it collects its batches)
    following: bool = False


class Reporter(Protocol):
    def run_started(self, info: RunInfo) -> None: ...

    @property
    def on_event(self) -> Callable[[Event], None] | None:
        """Where the core's events go; None for a reporter that ignores them."""
        ...

    @property
    def on_batches(self) -> Callable[[RunBatches], None] | None:
        """Where a run's provider batches go whenever they change; None to ignore them."""
        ...


class QuietReporter:
    """Reports nothing; ``on_event`` is None so the core does not even build events."""

    on_event = None
    on_batches = None

    def run_started(self, info: RunInfo) -> None:
        pass
