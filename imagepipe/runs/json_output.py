"""The JSON that ``run --json`` (``run --batch --json``), ``show --json`` and ``list --json``
print.

Each shape is built here from the outcome, item by item, and written by the one streaming
writer (:func:`imagepipe.json_stream.json_chunks`): a run of 100,000 images is never a
list of dicts and one large string at once.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

from imagepipe.cost import CostRange, cost_json_of
from imagepipe.json_stream import json_chunks
from imagepipe.runs.batches import RunBatches
from imagepipe.runs.outcome import BranchRow, RunOutcome, RunSummary, duration_ms, iso_time

__all__ = ["list_json", "result_json", "show_json", "submitted_json"]


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
            **_batches_item(outcome.batches),
        }
    )


def submitted_json(
    outcome: RunOutcome, estimate: CostRange, one_by_one: CostRange
) -> Iterator[str]:
    """The ``run --batch --json`` document: the run, the batches it created, what they are
    estimated to cost (at batch prices, and one by one) and how to follow the run."""
    return json_chunks(
        {
            "id": outcome.id,
            "state": outcome.state,
            "prompt": outcome.spec.prompt,
            "batches": (outcome.batches or RunBatches()).to_json(),
            "not_sent": outcome.not_sent,
            "estimate": {"batch": estimate.to_json(), "one_by_one": one_by_one.to_json()},
            "follow": [f"imagepipe watch {outcome.id}", f"imagepipe resume {outcome.id}"],
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
            **_batches_item(outcome.batches),
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
        **_batches_item(summary.batches),
    }


def _batches_item(batches: RunBatches | None) -> dict[str, Any]:
    """The ``batches`` key of a run sent through a provider's batches: each batch's
    status, counts and age (:meth:`GroupProgress.to_json`); none for any other run."""
    return {} if batches is None else {"batches": batches.to_json()}
