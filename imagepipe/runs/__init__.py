"""A run, as the commands see it, in three rooms and a speaker:

- :mod:`imagepipe.runs.model` — what a run is: its spec, this invocation, its branches
  and their labels (plain data; it does not import the workflow)
- :mod:`imagepipe.runs.outcome` — what it produced: its branches read from the handles or
  from the store, its outcome, its summary
- :mod:`imagepipe.runs.json_output` — the JSON the commands print, streamed
- :mod:`imagepipe.runs.reporting` — what the commands tell while they work

The names below are re-exported for convenience; the app imports them from their room.
"""

from imagepipe.runs.json_output import list_json, result_json, show_json
from imagepipe.runs.model import (
    DEFAULT_CONCURRENCY,
    DEFAULT_MAX_ATTEMPTS,
    Branch,
    BranchArgs,
    Invocation,
    RunSpec,
    image_location,
    new_run_id,
    validate_run_id,
    variation_label,
)
from imagepipe.runs.outcome import (
    BranchView,
    LaunchedBranches,
    RunOutcome,
    RunSummary,
    StoredBranches,
    duration_ms,
    run_state,
)
from imagepipe.runs.reporting import QuietReporter, Reporter, RunInfo

__all__ = [
    "DEFAULT_CONCURRENCY",
    "DEFAULT_MAX_ATTEMPTS",
    "Branch",
    "BranchArgs",
    "BranchView",
    "Invocation",
    "LaunchedBranches",
    "QuietReporter",
    "Reporter",
    "RunInfo",
    "RunOutcome",
    "RunSpec",
    "RunSummary",
    "StoredBranches",
    "duration_ms",
    "image_location",
    "list_json",
    "new_run_id",
    "result_json",
    "run_state",
    "show_json",
    "validate_run_id",
    "variation_label",
]
