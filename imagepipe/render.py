"""Static output: a run's results, a stored run (``show``) and the run list (``list``)."""

from __future__ import annotations

import itertools
import time
from pathlib import PurePath
from typing import TYPE_CHECKING

from rich.console import Console
from rich.table import Table
from rich.text import Text

from imagepipe.run_costs import branch_cost, cost_line, range_text, spent_cell
from imagepipe.runs.batches import RunBatches
from imagepipe.runs.model import Branch, image_location
from imagepipe.runs.outcome import RunOutcome, RunSummary, duration_ms
from imagepipe.text import escape_control
from imagepipe.ui import Board, Row, batch_line, batches_summary, board_renderable

if TYPE_CHECKING:
    from imagepipe.cost import CostRange

__all__ = ["print_outcome", "print_run_list", "print_show", "print_submitted", "speedup_line"]

RUN_STATE_STYLE = {"resolved": "green", "failed": "bold red", "pending": "magenta"}


def speedup_line(wall_ms: int, sequential_ms: int, *, retried: bool = True) -> str | None:
    if wall_ms <= 0 or sequential_ms <= 0:
        return None
    ratio = sequential_ms / wall_ms
    if ratio < 1:
        why = "retry back-off" if retried else "waiting for the provider and the disk"
        return f"{1 / ratio:.1f}× the sequential time: {why} outweighed the parallelism"
    return f"{ratio:.1f}× faster than sequential"


RESULTS_SHOWN = 20


def _results_shown(outcome: RunOutcome) -> list[Branch]:
    """All results of a small run; of a large one, the failures first, then the first few
    (read no further than that: a stored branch is built only when it is read)."""
    branches = outcome.branches
    if len(branches) <= RESULTS_SHOWN:
        return list(branches)
    failed = outcome.failures[: RESULTS_SHOWN // 2]
    others = (b for b in branches if b.state != "rejected")
    rest = list(itertools.islice(others, RESULTS_SHOWN - len(failed)))
    return sorted(failed + rest, key=_seq)


def _seq(branch: Branch) -> int:
    return int(branch.id.rsplit(".", 1)[1])


def print_submitted(
    console: Console, outcome: RunOutcome, estimate: CostRange, one_by_one: CostRange
) -> None:
    """``run --batch``: the batches it created, what they are estimated to cost (at batch
    prices, beside one by one) and how to follow the run."""
    run_id = escape_control(outcome.id)
    batches = outcome.batches or RunBatches()
    requests = sum(group.requests for group in batches)
    count = len(batches.groups)
    say = [
        f"Run {run_id}: {requests:,} requests sent in {count} batch{'es' if count != 1 else ''}"
        " (results within 24 hours, at batch prices).",
        *(f"  {escape_control(batch_line(group))}" for group in batches),
        f"Estimated cost: {range_text(estimate)} at batch prices "
        f"({range_text(one_by_one)} one by one).",
        *(
            [
                f"{waiting:,} branches not sent: their worst case does not fit in the run's "
                "caps; once the batches are collected (at their actual cost), those that fit "
                "then are sent, and the run stops at its cap (exit 3)."
            ]
            if (waiting := outcome.not_sent)
            else []
        ),
        f"Follow it: imagepipe watch {run_id}",
        f"or come back any time: imagepipe resume {run_id} collects what the batches have done",
    ]
    console.print("\n".join(say), markup=False, highlight=False, soft_wrap=True)


def print_outcome(console: Console, outcome: RunOutcome) -> None:
    """Results in style order, then wall time against the sequential sum."""
    run_id = escape_control(outcome.id)  # a stored id: anything a store may hold
    if not outcome.executed:
        console.print(
            f"Run {run_id} is already {outcome.state}; showing its stored result "
            "(nothing was executed).",
            markup=False,
        )
    rows: list[tuple[str, ...]] = [("style", "result", "file", "duration", "attempts", "source")]
    shown = _results_shown(outcome)
    folders: set[str] = set()
    for b in shown:
        file = ""
        if b.state == "resolved" and b.value:
            path = b.value.get("path")
            url = image_location(b.value) or "?"
            duration = f"{duration_ms(b.id, b.value)}ms"
            if path:
                file = PurePath(path).name
                folders.add(str(PurePath(path).parent))
        elif b.state == "rejected" and b.error:
            url, duration = f"failed: {b.error.type}: {b.error.message}", "-"
        else:
            url, duration = "pending", "-"
        source = "replayed" if b.replayed else "computed"
        rows.append(
            (
                escape_control(b.label),
                escape_control(url),
                escape_control(file),
                duration,
                str(b.attempts),
                source,
            )
        )
    # Plain aligned lines, never truncated: URLs must stay whole in any terminal width.
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]) - 1)]
    lines = [
        "  "
        + "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=False))
        + "  "
        + row[-1]
        for row in rows
    ]
    console.print(f"Results of {run_id}:", markup=False)
    console.print(Text(lines[0], style="bold"))
    console.print("\n".join(lines[1:]), markup=False, soft_wrap=True)
    if len(folders) == 1:
        console.print(f"Images in: {escape_control(folders.pop())}", markup=False, soft_wrap=True)
    hidden = len(outcome.branches) - len(shown)
    if hidden:
        console.print(
            f"  … and {hidden:,} more: imagepipe show {run_id} --json lists them all",
            markup=False,
        )
    if outcome.executed:
        console.print(f"Wall time: {outcome.wall_ms}ms (parallel execution)", markup=False)
    if outcome.batches is None:  # a batch's images have no time of their own
        console.print(f"Sequential would: {outcome.sequential_ms}ms", markup=False)
    replayed = sum(b.replayed for b in outcome.images)
    if outcome.executed and replayed:
        console.print(
            f"{replayed} of {len(outcome.branches)} branches replayed from the store, "
            "not recomputed",
            markup=False,
        )
    elif outcome.executed and (
        speedup := speedup_line(
            outcome.wall_ms,
            outcome.sequential_ms,
            retried=any(b.attempts > 1 for b in outcome.branches),
        )
    ):
        console.print(speedup, markup=False)
    if cost := cost_line(outcome, attempts=False):
        console.print(cost, markup=False, highlight=False)
    if outcome.state == "failed":
        failed = outcome.failures
        console.print(
            Text(
                f"Run {run_id} failed: {len(failed)} of {len(outcome.branches)} branches rejected.",
                style="bold red",
            )
        )


def print_show(console: Console, outcome: RunOutcome) -> None:
    """The live table, frozen: the run and every branch with its durable id."""
    board = Board()
    for b in outcome.branches:
        state = {"resolved": "resolved", "rejected": "rejected"}.get(b.state, "pending")
        board.add(
            Row(
                b.id,
                b.label,
                state=state,
                attempt=b.attempts,
                url=image_location(b.value) if b.value else None,
                error=None if b.error is None else f"{b.error.type}: {b.error.message}",
            )
        )
    state_style = RUN_STATE_STYLE.get(outcome.state, "")
    console.print(
        Text.assemble(
            (escape_control(outcome.id), "bold"),
            "  ",
            (outcome.state, state_style),
            f"  created {time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(outcome.created_at))}",
        )
    )
    console.print(Text(f"prompt: {escape_control(outcome.spec.prompt)}"))
    spec = outcome.spec
    rows = {b.args.prompt_index for b in outcome.branches if b.args.prompt_index is not None}
    if len(rows) == 1:  # one prompt of a prompt file (show --prompt N)
        line = f"prompt #{rows.pop() + 1}: {outcome.branches[0].args.prompt}"
        console.print(Text(escape_control(line)))
    options = ", ".join(f"{k} {v}" for k, v in sorted(spec.options.items()))
    console.print(
        Text(escape_control(f"provider: {spec.provider}" + (f" ({options})" if options else "")))
    )
    if outcome.batches:
        console.print(Text("Batches:", style="bold"))
        for group in outcome.batches:
            line = f"  {escape_control(batch_line(group))}"
            console.print(line, markup=False, highlight=False, soft_wrap=True)
    console.print(board_renderable(board, live=False))
    files = [b for b in outcome.branches if b.value and b.value.get("path")]
    if files:
        console.print(Text("Files:", style="bold"))
        for b in files:
            assert b.value is not None
            value = b.value
            details = [f"{value.get('width')}x{value.get('height')}", f"{value.get('bytes'):,} B"]
            details += [f"request {value['request_id']}"] if value.get("request_id") else []
            details += [f"cost {cost}"] if (cost := branch_cost(b)) else []
            line = f"  {b.label}  {value['path']}  ({', '.join(details)})"
            console.print(escape_control(line), markup=False, highlight=False, soft_wrap=True)
            if value.get("revised_prompt"):
                revised = f"    revised prompt: {value['revised_prompt']}"
                console.print(escape_control(revised), markup=False, highlight=False)
    if cost := cost_line(outcome, attempts=True):
        console.print(cost, markup=False, highlight=False)
    if outcome.history:
        console.print(Text("Failed attempts:", style="bold"))
        for attempt in outcome.history:
            assert attempt.error is not None
            when = time.strftime("%H:%M:%S", time.localtime(attempt.started_at))
            console.print(
                escape_control(
                    f"  {attempt.promise_id} attempt {attempt.attempt} at {when}: "
                    f"{attempt.error.type}: {attempt.error.message}"
                ),
                markup=False,
                highlight=False,
            )


def print_run_list(console: Console, runs: list[RunSummary]) -> None:
    if not runs:
        console.print('No runs yet. Start one with: imagepipe run "a prompt"', markup=False)
        return
    table = Table(box=None, header_style="bold")
    batched = any(run.batches for run in runs)  # the column only when a run has batches
    columns = ("id", "state", "branches", *(["batches"] if batched else []), "cost", "created")
    for name in (*columns, "prompt"):
        table.add_column(name, no_wrap=name != "prompt", overflow="ellipsis")
    for run in runs:
        total = sum(run.counts.values())
        done = run.counts.get("resolved", 0)
        failed = run.counts.get("rejected", 0)
        branches = f"{done}/{total}" + (f" ({failed} failed)" if failed else "")
        created = time.strftime("%Y-%m-%d %H:%M", time.localtime(run.created_at))
        prompt = escape_control(" ".join(run.prompt.split()))
        prompt = prompt if len(prompt) <= 50 else prompt[:49] + "…"
        table.add_row(
            Text(escape_control(run.id)),  # Text: no rich markup in stored strings
            Text(run.state, RUN_STATE_STYLE.get(run.state, "")),
            branches,
            *([Text(batches_summary(run.batches) if run.batches else "")] if batched else []),
            spent_cell(run.spent),
            created,
            Text(prompt),
        )
    console.print(table)
