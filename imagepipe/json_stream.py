"""One JSON writer for documents too large to hold whole: ``run --json`` and ``show --json``
of a run of 100,000 branches."""

from __future__ import annotations

import itertools
import json
from collections.abc import Iterator, Mapping
from typing import Any

__all__ = ["json_chunks"]

#: items of an array written at a time
_BATCH = 1000


def json_chunks(document: Mapping[str, Any]) -> Iterator[str]:
    """The text ``json.dumps(document)`` would write, in pieces. A member whose value is an
    iterator is written as a JSON array, a thousand items at a time, each item by
    ``json.dumps``, so that its items are never all held at once, neither as objects nor
    as text."""
    yield "{"
    for n, (key, value) in enumerate(document.items()):
        yield (", " if n else "") + json.dumps(key) + ": "
        if isinstance(value, Iterator):
            yield from _array(value)
        else:
            yield json.dumps(value)
    yield "}"


def _array(items: Iterator[Any]) -> Iterator[str]:
    yield "["
    separator = ""
    while batch := list(itertools.islice(items, _BATCH)):
        yield separator + items_encoded_in_one_call(batch)
        separator = ", "
    yield "]"


def items_encoded_in_one_call(batch: list[Any]) -> str:
    """The items of ``batch`` as ``json.dumps`` writes them in an array, separated by
    ``", "``: the array encoded by one call, its brackets left out. One call a thousand
    items rather than one an item (each call sets the C encoder up again): ``show --json``
    of a resolved 50,000-branch run takes 506 ms of CPU so, 549 ms with a call an item
    (0.92x; ``farm-bench``, interleaved medians of 8)."""
    return json.dumps(batch)[1:-1]
