"""Rows of the SQL backends as records: one decoder per kind of row, shared by the SQLite
and PostgreSQL stores, so that a damaged column is the same :class:`StoreCorrupt` on both.

``where`` names the store in messages; the decoders add which promise or attempt."""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from imagepipe.durable.errors import StoreCorrupt
from imagepipe.durable.records import (
    AttemptRecord,
    ChildRows,
    ErrorInfo,
    Lease,
    PromiseRecord,
    RootRecord,
    decode_json,
    stored_object,
    stored_state,
)

__all__ = [
    "CHILD_COLUMNS",
    "CLAIM_COLUMNS",
    "LEASE_COLUMNS",
    "PROMISE_COLUMNS",
    "ROOT_COLUMNS",
    "attempt_from_row",
    "children_from_rows",
    "lease_from_row",
    "promise_from_row",
    "root_from_row",
]

#: the columns :func:`promise_from_row` reads, in its order
PROMISE_COLUMNS = (
    "id, parent_id, seq, func, args, state, value, error, attempts, failures, "
    "created_at, settled_at, options"
)
#: the same, of a branch ``p`` joined with its run (the workers' claims)
CLAIM_COLUMNS = ", ".join(f"p.{name.strip()}" for name in PROMISE_COLUMNS.split(","))

#: the columns :func:`children_from_rows` reads (``Store.child_rows``), in its order
CHILD_COLUMNS = "id, state, attempts, value, error, args"


def promise_from_row(row: tuple[Any, ...], where: str) -> PromiseRecord:
    """A row of :data:`PROMISE_COLUMNS`."""
    (promise_id, parent_id, seq, func, args, state, value, error) = row[:8]
    (attempts, failures, created_at, settled_at, options) = row[8:13]
    where = f"{where}, promise {promise_id!r},"
    if not isinstance(attempts, int) or not isinstance(failures, int):
        raise StoreCorrupt(where, "holds a damaged attempt count")
    args = decode_json(args, "argument list", where)
    value = None if value is None else decode_json(value, "value", where)
    return PromiseRecord(
        id=promise_id,
        parent_id=parent_id,
        seq=seq,
        func=func,
        args=stored_object(args, where),
        state=stored_state(state, where),
        value=value,
        error=None if error is None else ErrorInfo.from_json(error, where),
        attempts=attempts,
        failures=failures,
        created_at=created_at,
        settled_at=settled_at,
        options={}
        if options == "{}"
        else stored_object(decode_json(options, "options", where), where),
    )


def _options(text: str, where: str) -> dict[str, Any]:
    return stored_object(decode_json(text, "options", where), where)


#: the columns :func:`root_from_row` reads, in its order
ROOT_COLUMNS = "id, func, args, state, created_at, settled_at, options, child_counts"


def root_from_row(row: tuple[Any, ...], counts: dict[str, int] | None, where: str) -> RootRecord:
    """A row of :data:`ROOT_COLUMNS`; ``counts``: its children's, counted, if the row does
    not hold them (a root holds them once it has settled)."""
    promise_id, func, args, state, created_at, settled_at, options, stored_counts = row
    where = f"{where}, run {promise_id!r},"
    if counts is None:
        counts = _counts(decode_json(stored_counts, "count of branches", where), where)
    return RootRecord(
        id=promise_id,
        func=func,
        args=stored_object(decode_json(args, "argument list", where), where),
        state=stored_state(state, where),
        created_at=created_at,
        settled_at=settled_at,
        options=stored_object(decode_json(options, "option list", where), where),
        counts=counts,
    )


def _counts(value: Any, where: str) -> dict[str, int]:
    counts = stored_object(value, where)
    if not all(state in _STATES and type(n) is int and n >= 0 for state, n in counts.items()):
        raise StoreCorrupt(where, "holds a damaged count of branches")
    return counts


def attempt_from_row(row: tuple[Any, ...], where: str) -> AttemptRecord:
    """A row of ``promise_id, attempt, started_at, finished_at, error``."""
    promise_id, attempt, started, finished, error = row
    where = f"{where}, attempt {attempt} of {promise_id!r},"
    return AttemptRecord(
        promise_id=promise_id,
        attempt=attempt,
        started_at=started,
        finished_at=finished,
        error=None if error is None else ErrorInfo.from_json(error, where),
    )


def children_from_rows(rows: Sequence[tuple[Any, ...]], where: str) -> ChildRows:
    """Rows of :data:`CHILD_COLUMNS`, as one chunk. Each value is decoded on its own: one
    ``json.loads`` over many rows is faster, but damaged texts could merge or split there,
    and a value is written out again as the text stored."""
    if not rows:
        return ChildRows((), (), (), (), (), (), ())
    ids, states, attempts, texts, errors, arguments = zip(*rows, strict=True)
    for promise_id, state, count, args in zip(ids, states, attempts, arguments, strict=True):
        if state not in _STATES or type(count) is not int or type(args) is not str:
            raise StoreCorrupt(f"{where}, promise {promise_id!r},", "holds a damaged row")
    values = [
        None if text is None else _stored_value(text, promise_id, where)
        for promise_id, text in zip(ids, texts, strict=True)
    ]
    decoded_errors = [
        None if error is None else ErrorInfo.from_json(error, f"{where}, promise {id_!r},")
        for id_, error in zip(ids, errors, strict=True)
    ]
    return ChildRows(ids, states, attempts, values, texts, decoded_errors, arguments)


#: the columns :func:`lease_from_row` reads, in its order (the age by the store's clock
#: follows them, as an expression of the dialect)
LEASE_COLUMNS = "owner, pid, host, epoch"


def lease_from_row(key: str, row: tuple[Any, ...]) -> Lease:
    """A row of :data:`LEASE_COLUMNS` and the lease's age: ``key``'s holder."""
    owner, pid, host, epoch, age = row
    return Lease(key=key, owner=owner, pid=pid, host=host, epoch=epoch, age=age)


_STATES = frozenset(("pending", "resolved", "rejected"))
#: ``json.loads`` without its checks of the argument's type and surrounding white space,
#: which cost as much as decoding a value of a branch (100,000 of them: 0.25 of 0.6 s)
_decode_document = json.JSONDecoder().raw_decode


def _stored_value(text: str, promise_id: str, where: str) -> dict[str, Any]:
    try:
        value, end = _decode_document(text)
        if end != len(text):
            value = json.loads(text)  # text after the object: only white space may be
    except (ValueError, TypeError):
        value = None
    if type(value) is not dict:  # the message is built only for a damaged value
        raise StoreCorrupt(f"{where}, promise {promise_id!r},", "holds a damaged value")
    return value
