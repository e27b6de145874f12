"""The JSON that ``run --json``, ``show --json`` and ``list --json`` print.

Each shape is built here from the outcome, item by item, and written by the one streaming
writer (:func:`imagepipe.json_stream.json_chunks`): a run of 100,000 images is never a
list of dicts and one large string at once.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

from imagepipe.cost import cost_json_of
from imagepipe.json_stream import json_chunks
from imagepipe.runs.outcome import BranchRow, RunOutcome, RunSummary, duration_ms, iso_time

__all__ = ["list_json", "result_json", "show_json"]


def result_json(outcome: RunOutcome, cost: Mapping[str, Any]) -> Iterator[str]:
    """The ``run --json`` / ``resume --json`` document, as pieces of text; ``cost`` is the
    run's (:func:`imagepipe.run_costs.cost_json`)."""
    images = (_image_item(row) for row in outcome.view.rows() if row.state == "resolved")
    return json_chunks(
        {
            "id": outcome.id,
            "state": outcome.state,
            "prompt": outcome.spec.prompt,
            "images": (item for item in images if item is not None),
            "wall_ms": outcome.wall_ms,
            "sequential_ms": outcome.sequential_ms,
            "cost": cost,
        }
    )


def show_json(outcome: RunOutcome, cost: Mapping[str, Any]) -> Iterator[str]:
    """The ``show --json`` document, as pieces of text; ``cost`` is the run's, its failed
    attempts counted (:func:`imagepipe.run_costs.cost_json`)."""
    return json_chunks(
        {
            "id": outcome.id,
            "state": outcome.state,
            "prompt": outcome.spec.prompt,
            "cost": cost,
            "branches": map(_show_item, outcome.view.rows()),
        }
    )


def list_json(runs: Iterable[RunSummary]) -> str:
    """The ``list --json`` document: an array, one object a run."""
    return json.dumps([_summary_item(summary) for summary in runs])


def _image_item(row: BranchRow) -> dict[str, Any] | None:
    value = row.value
    if not value:
        return None
    return {
        "style": row.style,
        "url": value.get("url"),
        "path": value.get("path"),
        "duration_ms": duration_ms(row.id, value),
        "attempts": row.attempts,
        "replayed": row.replayed,
        "cost": cost_json_of(value),
    }


def _show_item(row: BranchRow) -> dict[str, Any]:
    error = row.error
    return {
        "id": row.id,
        "style": row.style,
        "state": row.state,
        "attempts": row.attempts,
        "value": row.value,
        "error": None if error is None else f"{error.type}: {error.message}",
    }


def _summary_item(summary: RunSummary) -> dict[str, Any]:
    return {
        "id": summary.id,
        "state": summary.state,
        "prompt": summary.prompt,
        "created_at": iso_time(summary.created_at),
        "cost": None if summary.spent is None else summary.spent.to_json(),
    }
