"""The durable-promise model: what a store holds and what a write batch carries.

A *promise* is one durable call: an id, the function's name and its arguments by name, a
state (pending, resolved, rejected), a value or an error, and a count of started attempts.
A run is a root promise; its children get the ids ``<run>.0``, ``<run>.1``, ... in launch
order, and a child's durable sub-steps get ``<child>.0``, ``<child>.1``, ...

Every write goes through one path: a :class:`WriteBatch` given to ``Store.apply``, which
applies it in one transaction, fenced by the epoch of the lease it was made under.
"""

from __future__ import annotations

import functools
import inspect
import json
from collections.abc import AsyncIterable, Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from imagepipe.durable.errors import StoreCorrupt

__all__ = [
    "ARGS_VERSION",
    "AttemptFailure",
    "AttemptRecord",
    "AttemptStart",
    "ChildColumns",
    "ChildRow",
    "ChildRows",
    "ErrorInfo",
    "Fence",
    "Lease",
    "NewPromise",
    "Note",
    "PromiseRecord",
    "PromiseState",
    "RootRecord",
    "Settled",
    "Settlement",
    "Spending",
    "WriteBatch",
    "bind_args",
    "canonical_json",
    "decode_json",
    "encode_args",
    "named_params",
    "stored_object",
    "stored_state",
]

PromiseState = Literal["pending", "resolved", "rejected"]

#: Version of the stored argument object ``{"version": 1, "kwargs": {...}}``. Version 0 is
#: what schema 2 held, a positional list; migration 3 wraps it as ``{"version": 0,
#: "positional": [...]}`` and :func:`bind_args` names it from the function's signature.
ARGS_VERSION = 1

_encode = json.JSONEncoder(sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode


def canonical_json(value: Any) -> str:
    """One stable text per JSON value, so that stored and replayed arguments compare equal."""
    return _encode(value)


def decode_json(text: str, what: str, where: str) -> Any:
    """Decode a stored JSON column; a damaged one is :class:`StoreCorrupt`, never a traceback."""
    try:
        return json.loads(text)
    except (ValueError, TypeError) as exc:
        raise StoreCorrupt(where, f"holds a damaged {what} ({type(exc).__name__})") from None


def stored_state(value: Any, where: str) -> PromiseState:
    """A state column as read from a store; anything else is :class:`StoreCorrupt`."""
    if value not in ("pending", "resolved", "rejected"):
        raise StoreCorrupt(where, "holds a damaged state")
    state: PromiseState = value
    return state


def stored_object(value: Any, where: str) -> dict[str, Any]:
    """A JSON object column as decoded; anything else is :class:`StoreCorrupt`."""
    if not isinstance(value, dict):
        raise StoreCorrupt(where, "holds a damaged row")
    return value


def named_params(item: Any) -> dict[str, Any]:
    """A write record's fields (a slots dataclass) as named SQL parameters."""
    return {name: getattr(item, name) for name in type(item).__slots__}


def encode_args(kwargs: Mapping[str, Any]) -> str:
    """Arguments as they are stored: by name, with the format's version."""
    return canonical_json({"version": ARGS_VERSION, "kwargs": dict(kwargs)})


def bind_args(fn: Callable[..., Any], stored: Mapping[str, Any]) -> dict[str, Any]:
    """The arguments of a stored call by name, completed with ``fn``'s defaults.

    This is the one reader of stored arguments: it names a version-0 positional list from
    ``fn``'s parameters (after the first one, the step or context), and fills in defaults,
    so that adding a parameter with a default keeps older runs replayable."""
    params = _parameters(fn)[1:]
    if stored.get("version") == 0:
        values = list(stored.get("positional", []))
        named = {p.name: v for p, v in zip(params, values, strict=False)}
    else:
        named = dict(stored.get("kwargs", {}))
    for p in params:
        if p.name not in named and p.default is not inspect.Parameter.empty:
            named[p.name] = p.default
    return named


@functools.cache
def _parameters(fn: Callable[..., Any]) -> list[inspect.Parameter]:
    return list(inspect.signature(fn).parameters.values())


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
    def from_json(cls, text: str, where: str) -> ErrorInfo:
        data = decode_json(text, "error", where)
        try:
            return cls(str(data["type"]), str(data["message"]), bool(data.get("retryable", True)))
        except (KeyError, TypeError, AttributeError):
            raise StoreCorrupt(where, "holds a damaged error") from None


@dataclass(frozen=True, slots=True)
class PromiseRecord:
    """A promise as stored. ``args`` is the stored argument object (see :func:`bind_args`)."""

    id: str
    parent_id: str | None
    seq: int | None
    func: str
    args: dict[str, Any]
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


@dataclass(slots=True)
class ChildRow:
    """A child of a promise as a report reads it (``Store.child_rows``): no full record,
    its arguments left as stored text, and its value kept as the text stored besides the
    decoded object, for a report that repeats it."""

    id: str
    state: PromiseState
    attempts: int
    #: the value, decoded: an object, or None while pending or when rejected
    value: dict[str, Any] | None
    #: the value as stored: the JSON text of ``value``
    value_text: str | None
    error: ErrorInfo | None
    #: the argument object as stored, JSON text
    arguments: str


@dataclass(frozen=True, slots=True)
class ChildRows:
    """A chunk of a promise's children, in launch order, as ``Store.child_rows`` yields
    them: iterating it gives a :class:`ChildRow` each. It holds one sequence per column,
    which :meth:`ChildColumns.collect` takes whole: a record made for every row cost
    ``resume --json`` of a resolved run of 100,000 branches 5-7% more CPU (0.78 -> 0.83 s,
    interleaved runs), of 10,000 branches 2-3%."""

    ids: Sequence[str]
    states: Sequence[PromiseState]
    attempts: Sequence[int]
    values: Sequence[dict[str, Any] | None]
    value_texts: Sequence[str | None]
    errors: Sequence[ErrorInfo | None]
    arguments: Sequence[str]

    def __len__(self) -> int:
        return len(self.ids)

    def __iter__(self) -> Iterator[ChildRow]:
        return map(
            ChildRow,
            self.ids,
            self.states,
            self.attempts,
            self.values,
            self.value_texts,
            self.errors,
            self.arguments,
        )


@dataclass(frozen=True)
class ChildColumns:
    """The children of a promise in launch order, one list per column, gathered from the
    chunks ``Store.child_rows`` yields (:meth:`collect`): what a report of a run holds.
    There is no record per child kept, arguments are left as stored text, and each value
    is kept as the text stored besides, for a report that repeats it: reading back a run
    of 100,000 branches as records cost seconds."""

    where: str
    ids: list[str] = field(default_factory=list)
    states: list[PromiseState] = field(default_factory=list)
    attempts: list[int] = field(default_factory=list)
    #: each value, decoded: an object, or None while pending or when rejected
    values: list[dict[str, Any] | None] = field(default_factory=list)
    #: each value as stored: the JSON text of the object in ``values``
    value_texts: list[str | None] = field(default_factory=list)
    errors: list[ErrorInfo | None] = field(default_factory=list)
    #: each argument object as stored, JSON text: decode one with :meth:`args`
    arguments: list[str] = field(default_factory=list)

    @classmethod
    async def collect(cls, where: str, chunks: AsyncIterable[ChildRows]) -> ChildColumns:
        """The rows of ``chunks`` (``store.child_rows(parent_id)``) as columns; ``where``
        names the store in messages."""
        columns = cls(where)
        async for rows in chunks:
            columns.ids.extend(rows.ids)
            columns.states.extend(rows.states)
            columns.attempts.extend(rows.attempts)
            columns.values.extend(rows.values)
            columns.value_texts.extend(rows.value_texts)
            columns.errors.extend(rows.errors)
            columns.arguments.extend(rows.arguments)
        return columns

    def __len__(self) -> int:
        return len(self.ids)

    def args(self, index: int) -> dict[str, Any]:
        """The stored argument object of the child at ``index`` (see :func:`bind_args`)."""
        where = f"{self.where}, promise {self.ids[index]!r},"
        return stored_object(decode_json(self.arguments[index], "argument list", where), where)


@dataclass(frozen=True, slots=True)
class RootRecord:
    """A run's root promise without its value: what listing runs needs."""

    id: str
    func: str
    args: dict[str, Any]
    state: PromiseState
    created_at: float
    settled_at: float | None
    options: dict[str, Any]
    #: how many children are in each state
    counts: dict[str, int]


@dataclass(frozen=True, slots=True)
class Settled:
    """The outcome of a promise as stored."""

    state: PromiseState
    value: Any
    error: ErrorInfo | None
    attempts: int


@dataclass(frozen=True, slots=True)
class Spending:
    """What a run may spend and has spent, in the app's units (micro-dollars, say): every
    attempt's reservation until its actual cost replaced it. ``limit`` None: no cap."""

    limit: int | None
    spent: int

    def allows(self, units: int) -> bool:
        return self.limit is None or self.spent + units <= self.limit


@dataclass(frozen=True, slots=True)
class AttemptRecord:
    """A failed attempt, kept as history (successful ones are counted in ``attempts``)."""

    promise_id: str
    attempt: int
    started_at: float
    finished_at: float | None
    error: ErrorInfo | None


@dataclass(frozen=True, slots=True)
class Lease:
    """Who holds a key (a run's id): an owner (pid on host), fenced by ``epoch``.

    ``age`` is the seconds since its last heartbeat by the store's clock, when read."""

    key: str
    owner: str
    pid: int
    host: str
    epoch: int = 0
    age: float = 0.0


@dataclass(frozen=True, slots=True)
class Fence:
    """The lease a batch was made under: the store refuses it once ``epoch`` is stale."""

    key: str
    epoch: int


@dataclass(frozen=True, slots=True)
class NewPromise:
    """A promise to create. A sub-step is created already resolved (``state``/``value``)."""

    id: str
    parent_id: str | None
    seq: int | None
    func: str
    args_json: str
    created_at: float
    options_json: str = "{}"
    state: PromiseState = "pending"
    value_json: str | None = None


@dataclass(frozen=True, slots=True)
class AttemptStart:
    """Attempt number ``attempt`` of a pending promise starts (it is the new count)."""

    id: str
    attempt: int


@dataclass(frozen=True, slots=True)
class Note:
    """A run's note ``key`` holds ``value_json`` from now on: what an app keeps beside a
    run's promises (the result of a run-level step, the latest progress it observed),
    written in the same fenced transactions as they are."""

    run_id: str
    key: str
    value_json: str
    updated_at: float


@dataclass(frozen=True, slots=True)
class AttemptFailure:
    """Attempt ``attempt`` of a promise failed: kept as history; the promise stays pending."""

    id: str
    attempt: int
    started_at: float
    finished_at: float
    error_json: str


@dataclass(frozen=True, slots=True)
class Settlement:
    """Settle a promise unless it is settled already (the first settle wins)."""

    id: str
    state: PromiseState
    value_json: str | None
    error_json: str | None
    settled_at: float


@dataclass(slots=True)
class WriteBatch:
    """Writes applied together, in one transaction, by ``Store.apply``.

    Applied in this order, which keeps every promise's history in order: reopens (a
    rejected promise back to pending), creates, attempt starts, failed attempts,
    settlements, then the run's notes. A batch with a ``fence`` is refused whole when the
    lease's epoch has moved on; a create whose id exists, or a start of a promise that is
    not pending, refuses it whole too (:class:`~imagepipe.durable.errors.StoreConflict`)."""

    fence: Fence | None = None
    reopens: list[str] = field(default_factory=list)
    creates: list[NewPromise] = field(default_factory=list)
    starts: list[AttemptStart] = field(default_factory=list)
    failures: list[AttemptFailure] = field(default_factory=list)
    settlements: list[Settlement] = field(default_factory=list)
    #: a run's notes, written (or overwritten) after everything else
    notes: list[Note] = field(default_factory=list)

    def __len__(self) -> int:
        return (
            len(self.reopens)
            + len(self.creates)
            + len(self.starts)
            + len(self.failures)
            + len(self.settlements)
            + len(self.notes)
        )
