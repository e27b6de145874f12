"""What the durable core tells its observers. Plain data; renderers live elsewhere."""

from __future__ import annotations

from typing import Any, NamedTuple

from imagepipe.durable.store import ErrorInfo

__all__ = [
    "AttemptFailed",
    "AttemptStarted",
    "Event",
    "PromiseQueued",
    "PromiseRejectedEvent",
    "PromiseReplayed",
    "PromiseResolved",
]


class PromiseQueued(NamedTuple):
    """A child promise exists in the store and its task waits to run."""

    id: str
    func: str
    args: list[Any]
    attempts: int


class PromiseReplayed(NamedTuple):
    """A child was already settled in the store: its outcome is read, not recomputed."""

    id: str
    func: str
    args: list[Any]
    state: str
    value: Any
    error: ErrorInfo | None
    attempts: int


class AttemptStarted(NamedTuple):
    id: str
    func: str
    attempt: int


class AttemptFailed(NamedTuple):
    """An attempt failed; ``retry_in`` is the back-off in seconds, None if it gives up."""

    id: str
    func: str
    attempt: int
    error: ErrorInfo
    retry_in: float | None


class PromiseResolved(NamedTuple):
    id: str
    value: Any
    attempts: int


class PromiseRejectedEvent(NamedTuple):
    id: str
    error: ErrorInfo
    attempts: int


Event = (
    PromiseQueued
    | PromiseReplayed
    | AttemptStarted
    | AttemptFailed
    | PromiseResolved
    | PromiseRejectedEvent
)
