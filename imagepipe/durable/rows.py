"""Rows of the SQL backends as records: one decoder per kind of row, shared by the SQLite
and PostgreSQL stores, so that a damaged column is the same :class:`StoreCorrupt` on both.

``where`` names the store in messages; the decoders add which promise or attempt."""

from __future__ import annotations

from typing import Any

from imagepipe.durable.errors import StoreCorrupt
from imagepipe.durable.records import (
    AttemptRecord,
    ErrorInfo,
    PromiseRecord,
    RootRecord,
    decode_json,
    stored_object,
    stored_state,
)

__all__ = [
    "CLAIM_COLUMNS",
    "PROMISE_COLUMNS",
    "attempt_from_row",
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


def promise_from_row(
    row: tuple[Any, ...], where: str, json_values: list[Any] | None = None
) -> PromiseRecord:
    """A row of :data:`PROMISE_COLUMNS`; ``json_values``: its args and value, if the caller
    has decoded them already."""
    (promise_id, parent_id, seq, func, args, state, value, error) = row[:8]
    (attempts, failures, created_at, settled_at, options) = row[8:13]
    where = f"{where}, promise {promise_id!r},"
    if not isinstance(attempts, int) or not isinstance(failures, int):
        raise StoreCorrupt(where, "holds a damaged attempt count")
    if json_values is None:
        args = decode_json(args, "argument list", where)
        value = None if value is None else decode_json(value, "value", where)
    else:
        args, value = json_values
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


def root_from_row(row: tuple[Any, ...], counts: dict[str, int], where: str) -> RootRecord:
    """A row of ``id, func, args, state, created_at, settled_at, options``."""
    promise_id, func, args, state, created_at, settled_at, options = row
    where = f"{where}, run {promise_id!r},"
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
