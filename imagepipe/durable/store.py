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
from dataclasses import dataclass, field
from typing import Any, Literal, NamedTuple, Protocol

__all__ = [
    "AttemptRecord",
    "AttemptStart",
    "ErrorInfo",
    "Lease",
    "NewPromise",
    "PromiseRecord",
    "PromiseState",
    "Settled",
    "Settlement",
    "Store",
    "WriteBatch",
    "canonical_json",
]

PromiseState = Literal["pending", "resolved", "rejected"]


def _canonical_encoder() -> Callable[[Any], str]:
    """``JSONEncoder(sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode``,
    built once. The stdlib builds its C encoder anew on every call, which is half the cost
    of encoding a small value (twice per branch); if that private constructor is missing
    or does not agree with the public encoder, use the public one."""
    public = json.JSONEncoder(sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    make = getattr(json.encoder, "c_make_encoder", None)
    try:
        fast = make(  # type: ignore[misc]
            None, public.default, json.encoder.encode_basestring, None, ":", ",", True, False, True
        )
        sample = {"b": [1, 2.5, None, True, {"z": "é\n", "y": -0.0}], "a": "x"}
        if "".join(fast(sample, 0)) != public.encode(sample):
            return public.encode
    except Exception:
        return public.encode

    def encode(value: Any) -> str:
        return "".join(fast(value, 0))

    return encode


canonical_json: Callable[[Any], str] = _canonical_encoder()
"""One stable text per JSON value, so stored and replayed arguments compare equal."""


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


class PromiseRecord(NamedTuple):
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


class Settled(NamedTuple):
    """The outcome of a promise as stored after ``resolve`` or ``reject``."""

    state: PromiseState
    value: Any
    error: ErrorInfo | None
    attempts: int


class AttemptRecord(NamedTuple):
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


class NewPromise(NamedTuple):
    """A child promise to create (pending, no attempt yet)."""

    id: str
    parent_id: str
    seq: int
    func: str
    args_json: str
    created_at: float


class AttemptStart(NamedTuple):
    """Attempt ``attempt`` of a pending promise has started (it is the new count)."""

    attempt: int
    id: str


class Settlement(NamedTuple):
    """Settle a promise unless it is settled already (the first settle wins)."""

    state: PromiseState
    value_json: str | None
    error_json: str | None
    settled_at: float
    id: str


@dataclass(slots=True)
class WriteBatch:
    """Writes collected while the event loop ran, applied together by :meth:`Store.apply`.

    Each list keeps the order the writes were made in. A promise is created before its
    attempts start and an attempt starts before the promise settles, so applying all
    creates, then all starts, then all settlements keeps every promise's history in order.
    """

    creates: list[NewPromise] = field(default_factory=list)
    starts: list[AttemptStart] = field(default_factory=list)
    settlements: list[Settlement] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.creates) + len(self.starts) + len(self.settlements)


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
        """Settle as resolved. The first settle wins: a settled promise's outcome stays.

        Returns the outcome: ``value`` itself if this call settled the promise, else the
        stored outcome, decoded from JSON."""
        ...

    def reject(self, promise_id: str, error: ErrorInfo) -> Settled:
        """Settle as rejected. The first settle wins."""
        ...

    def apply(self, batch: WriteBatch) -> dict[str, Settled]:
        """Apply a batch of writes in the current transaction (durable at the next commit).

        Returns, by promise id, the stored outcome of each settlement that did not take
        effect because the promise was settled before: that outcome stands. A create whose id exists
        already, or a start for a promise that is not pending, means another process
        writes the same run: that is a :class:`~imagepipe.errors.StoreError`."""
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
