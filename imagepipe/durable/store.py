"""The durable-promise model and the storage interface every backend implements.

A *promise* is one durable call: an id, the function name and JSON arguments, a state
(pending, resolved, rejected), a value or an error, and a count of started attempts. A
run is a root promise; its children get the ids ``<run>.0``, ``<run>.1``, ... in launch
order.

Writes made through a :class:`Store` join the store's current transaction and become
durable at the next :meth:`Store.commit`; nothing may be reported to a user before that.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal, Protocol

__all__ = [
    "AttemptRecord",
    "ErrorInfo",
    "Lease",
    "PromiseRecord",
    "PromiseState",
    "Settled",
    "Store",
    "canonical_json",
]

PromiseState = Literal["pending", "resolved", "rejected"]


_CANONICAL = json.JSONEncoder(sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def canonical_json(value: Any) -> str:
    """One stable text per JSON value, so stored and replayed arguments compare equal."""
    return _CANONICAL.encode(value)


@dataclass(frozen=True, slots=True)
class ErrorInfo:
    """An exception as it is stored: its type name, message and whether to retry it."""

    type: str
    message: str
    retryable: bool = True

    @classmethod
    def from_exception(cls, exc: BaseException) -> ErrorInfo:
        type_name = str(getattr(exc, "type_name", "") or exc.__class__.__name__)
        message = str(exc) or type_name
        return cls(type_name, message, bool(getattr(exc, "retryable", True)))

    def to_json(self) -> str:
        return canonical_json(
            {"type": self.type, "message": self.message, "retryable": self.retryable}
        )

    @classmethod
    def from_json(cls, text: str) -> ErrorInfo:
        data = json.loads(text)
        return cls(str(data["type"]), str(data["message"]), bool(data.get("retryable", True)))


@dataclass(frozen=True, slots=True)
class PromiseRecord:
    id: str
    parent_id: str | None
    seq: int | None
    func: str
    args: list[Any]
    state: PromiseState
    value: Any
    error: ErrorInfo | None
    attempts: int
    failures: int
    created_at: float
    settled_at: float | None
    options: dict[str, Any]

    @property
    def settled(self) -> bool:
        return self.state != "pending"


@dataclass(frozen=True, slots=True)
class Settled:
    """The outcome of a promise as stored after ``resolve`` or ``reject``."""

    state: PromiseState
    value: Any
    error: ErrorInfo | None
    attempts: int


@dataclass(frozen=True, slots=True)
class AttemptRecord:
    promise_id: str
    attempt: int
    started_at: float
    finished_at: float | None
    error: ErrorInfo | None


@dataclass(frozen=True, slots=True)
class Lease:
    """Who executes a run: a process (pid on host) that renews ``heartbeat_at``."""

    run_id: str
    owner: str
    pid: int
    host: str
    heartbeat_at: float


class Store(Protocol):
    """Storage of durable promises. Implementations: :mod:`imagepipe.durable.sqlite`."""

    path: str

    def create(
        self,
        promise_id: str,
        *,
        func: str,
        args: Sequence[Any],
        parent_id: str | None = None,
        seq: int | None = None,
        options: dict[str, Any] | None = None,
    ) -> tuple[PromiseRecord, bool]:
        """Create a pending promise, or return the stored one. The flag is True if new."""
        ...

    def get(self, promise_id: str) -> PromiseRecord | None: ...

    def children(self, parent_id: str) -> list[PromiseRecord]:
        """The children of a promise in launch order."""
        ...

    def roots(self, limit: int | None = None) -> list[PromiseRecord]:
        """Root promises (runs), newest first."""
        ...

    def child_counts(self, parent_ids: Sequence[str]) -> dict[str, dict[str, int]]:
        """For each parent, how many children are in each state."""
        ...

    def start_attempt(self, promise_id: str) -> int:
        """Count one more started attempt and return its number (1, 2, ...)."""
        ...

    def fail_attempt(
        self, promise_id: str, attempt: int, error: ErrorInfo, started_at: float
    ) -> None:
        """Record that an attempt ended with an error (the promise stays pending)."""
        ...

    def attempts(self, promise_id: str) -> list[AttemptRecord]:
        """The failed attempts of a promise, oldest first. (Attempts that succeeded or
        were cut off by a crash are counted in ``PromiseRecord.attempts`` only.)"""
        ...

    def failed_attempts(self, parent_id: str) -> list[AttemptRecord]:
        """Every failed attempt of the children of ``parent_id``, in launch order."""
        ...

    def resolve(self, promise_id: str, value: Any) -> Settled:
        """Settle as resolved. The first settle wins: a settled promise's outcome stays."""
        ...

    def reject(self, promise_id: str, error: ErrorInfo) -> Settled:
        """Settle as rejected. The first settle wins."""
        ...

    def reopen(self, promise_id: str) -> None:
        """Set a rejected promise back to pending (``imagepipe retry``); history stays."""
        ...

    def acquire_lease(self, lease: Lease, *, is_stale: Callable[[Lease], bool]) -> Lease | None:
        """Take the run's lease and commit. If another owner holds it and ``is_stale`` says
        that holder is alive, take nothing and return the holder."""
        ...

    def renew_lease(self, run_id: str, owner: str, now: float) -> bool: ...

    def release_lease(self, run_id: str, owner: str) -> None:
        """Delete the lease and commit, even after a failed transaction."""
        ...

    def commit(self) -> None:
        """Make every write so far durable."""
        ...

    def rollback(self) -> None: ...

    def close(self) -> None: ...
