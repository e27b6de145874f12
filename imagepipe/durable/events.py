"""What the durable core tells its observers. Plain data; renderers live elsewhere."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from imagepipe.durable.records import ErrorInfo

__all__ = [
    "AttemptFailed",
    "AttemptStarted",
    "Event",
    "PromiseQueued",
    "PromiseRejectedEvent",
    "PromiseReplayed",
    "PromiseResolved",
    "RunDraining",
]


@dataclass(frozen=True, slots=True)
class PromiseQueued:
    """A child promise exists in the store and its task waits to run."""

    id: str
    func: str
    args: dict[str, Any]
    attempts: int


@dataclass(frozen=True, slots=True)
class PromiseReplayed:
    """A child was already settled in the store: its outcome is read, not recomputed."""

    id: str
    func: str
    args: dict[str, Any]
    state: str
    value: Any
    error: ErrorInfo | None
    attempts: int


@dataclass(frozen=True, slots=True)
class AttemptStarted:
    id: str
    func: str
    attempt: int


@dataclass(frozen=True, slots=True)
class AttemptFailed:
    """An attempt failed; ``retry_in`` is the back-off in seconds, None if it gives up."""

    id: str
    func: str
    attempt: int
    error: ErrorInfo
    retry_in: float | None


@dataclass(frozen=True, slots=True)
class PromiseResolved:
    id: str
    value: Any
    attempts: int


@dataclass(frozen=True, slots=True)
class PromiseRejectedEvent:
    id: str
    error: ErrorInfo
    attempts: int


@dataclass(frozen=True, slots=True)
class RunDraining:
    """The run stops (``reason``): no attempt starts from now on, and it ends once the
    ``in_flight`` attempts under way have ended and been recorded."""

    reason: str
    in_flight: int


Event = (
    PromiseQueued
    | PromiseReplayed
    | AttemptStarted
    | AttemptFailed
    | PromiseResolved
    | PromiseRejectedEvent
    | RunDraining
)
