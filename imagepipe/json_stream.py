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
        yield separator + ", ".join(map(json.dumps, batch))
        separator = ", "
    yield "]"
