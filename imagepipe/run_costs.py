"""A run's cost as the commands show it: what it was estimated to cost, what it spent.

- estimated: one paid attempt a branch, at today's prices (:func:`run_estimate`);
- spent: the costs stored with its images, plus the worst case of each failed attempt
  that may have been paid (its history, read by ``show``; see
  :func:`imagepipe.cost.failed_attempt_cost`).

Everything here reads what :mod:`imagepipe.runs` holds; its JSON output, ``render``, the
gallery and the export call it for their one line or key each.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping
from typing import Any

from imagepipe.cost import (
    FREE,
    Cost,
    CostRange,
    Spending,
    attempt_range,
    failed_attempt_cost,
    format_usd,
    spending,
)
from imagepipe.durable import Store
from imagepipe.durable.records import RootRecord
from imagepipe.prices import CURRENCY, FREE_PROVIDERS, PriceTable, prices_if_readable
from imagepipe.runs.model import Branch, BranchArgs, RunSpec
from imagepipe.runs.outcome import RunOutcome, StoredBranches
from imagepipe.styles import render

__all__ = [
    "batch_estimates",
    "branch_cost",
    "cost_json",
    "cost_line",
    "image_micro_usd",
    "is_batch_run",
    "range_text",
    "run_estimate",
    "run_spending",
    "spent_cell",
    "stored_spending",
]


def _sent(spec: RunSpec, args: BranchArgs) -> str:
    return render(spec.templates.get(args.style, "{prompt}"), args.prompt, args.style)


def run_estimate(spec: RunSpec, prices: PriceTable | None, *, batch: bool = False) -> CostRange:
    """What the run's branches cost at one paid attempt each, at today's prices (with
    ``batch``, at the provider's batch rate)."""
    if spec.provider in FREE_PROVIDERS:
        return CostRange(0, 0)
    if prices is None:
        return CostRange(None, None)
    from imagepipe.dryrun import sent_prompts

    total = CostRange(0, 0)
    for text, _style, count in sent_prompts(spec):
        one = attempt_range(spec.provider, spec.options, text, prices, batch=batch)
        total = total + one.times(count)
    return total


def batch_estimates(outcome: RunOutcome) -> tuple[CostRange, CostRange]:
    """A run sent in batches: its estimate at batch prices, and one by one."""
    prices = prices_if_readable()
    return (
        run_estimate(outcome.spec, prices, batch=True),
        run_estimate(outcome.spec, prices),
    )


def is_batch_run(outcome: RunOutcome) -> bool:
    """Whether the run went through a provider's batches: its estimate is at batch prices."""
    return outcome.batches is not None


def _states(outcome: RunOutcome) -> Iterable[str]:
    branches = outcome.branches
    if isinstance(branches, StoredBranches):
        return branches.columns.states
    return (b.state for b in branches)


def _resolved_values(outcome: RunOutcome) -> Iterable[Mapping[str, Any] | None]:
    branches = outcome.branches
    if isinstance(branches, StoredBranches):
        c = branches.columns
        return (v for s, v in zip(c.states, c.values, strict=True) if s == "resolved")
    return (b.value for b in branches if b.state == "resolved")


def run_spending(outcome: RunOutcome, prices: PriceTable | None, *, attempts: bool) -> Spending:
    """What the run spent: its images' stored costs and, with ``attempts`` (its history
    read, by ``show``), the worst case of each attempt that failed or never ended and may
    have been paid. An attempt never ended when its process was killed mid-request: a
    branch's started attempts that are neither in its history nor its value."""
    if outcome.spec.provider in FREE_PROVIDERS:  # nothing to read: every image cost 0
        images = sum(1 for state in _states(outcome) if state == "resolved")
        return Spending(0, images, 0, 0, 0, 0)
    failed: list[int | None] = []
    batched: list[int] = []
    if attempts:
        spec = outcome.spec
        failures: dict[str, list[str | None]] = {}
        for attempt in outcome.history:
            error = attempt.error.type if attempt.error else None
            failures.setdefault(attempt.promise_id, []).append(error)
        for index, branch_id, started, state in _attempt_counts(outcome):
            errors = failures.get(branch_id, [])
            unended = max(started - len(errors) - (state == "resolved"), 0)
            if unended and outcome.attempt_costs:
                # the spending ledger knows what some of these cost: a request the provider
                # refused (an account-wide error, say) gave its reservation back
                unended = _unended_unpaid_left_out(outcome, branch_id, started, state, unended)
            if not errors and not unended:
                continue
            if prices is None:
                failed += [None] * (len(errors) + unended)
                continue
            text = _sent(spec, outcome.branches[index].args)  # built only for these
            for error in errors:
                failed.append(failed_attempt_cost(error, spec.provider, spec.options, text, prices))
            # an attempt in a batch that is open (or about to be sent) has not run yet: it
            # is paid once it does, at the batch price
            held = outcome.batches is not None and outcome.batches.holds(branch_id)
            for _ in range(unended):
                if held:
                    batch = attempt_range(spec.provider, spec.options, text, prices, batch=True)
                    batched.append(batch.high or 0)
                else:
                    cost = failed_attempt_cost(None, spec.provider, spec.options, text, prices)
                    failed.append(cost)
    found = spending(_resolved_values(outcome), failed)
    return dataclasses.replace(found, batched_micro_usd=sum(batched), batched=len(batched))


def _unended_unpaid_left_out(
    outcome: RunOutcome, branch_id: str, started: int, state: str, unended: int
) -> int:
    """How many of a branch's ``unended`` attempts (started, neither failed nor resolved)
    may have been paid: those the spending ledger holds at a cost of 0 are not."""
    failed = {a.attempt for a in outcome.history if a.promise_id == branch_id}
    last = started if state == "resolved" else None
    unpaid = sum(
        1
        for attempt in range(1, started + 1)
        if attempt not in failed
        and attempt != last
        and outcome.attempt_costs.get((branch_id, attempt)) == 0
    )
    return max(unended - unpaid, 0)


def _attempt_counts(outcome: RunOutcome) -> Iterable[tuple[int, str, int, str]]:
    """(index, id, attempts started, state) of each branch, without building the stored
    ones (``show --json`` of a 100,000-branch run)."""
    branches = outcome.branches
    if isinstance(branches, StoredBranches):
        c = branches.columns
        return zip(range(len(c)), c.ids, c.attempts, c.states, strict=True)
    return ((i, b.id, b.attempts, b.state) for i, b in enumerate(branches))


def cost_json(outcome: RunOutcome, *, attempts: bool) -> dict[str, Any]:
    """The ``cost`` key of ``run --json`` and (``attempts``: failed ones counted)
    ``show --json``."""
    prices = prices_if_readable()
    return {
        "currency": CURRENCY,
        "estimated": run_estimate(outcome.spec, prices, batch=is_batch_run(outcome)).to_json(),
        "spent": run_spending(outcome, prices, attempts=attempts).to_json(),
    }


def cost_line(outcome: RunOutcome, *, attempts: bool) -> str | None:
    """``Cost: $0.0327 for 3 images (estimated $0.0330 to $0.5018)``; None for a provider
    that costs nothing (the simulated one: its demo output stays as it was)."""
    if outcome.spec.provider in FREE_PROVIDERS:
        return None
    prices = prices_if_readable()
    batch = is_batch_run(outcome)
    estimated = range_text(run_estimate(outcome.spec, prices, batch=batch))
    spent = run_spending(outcome, prices, attempts=attempts)
    at = " at batch prices" if batch else ""
    return f"Cost: {spent.line()} (estimated {estimated}{at})"


def range_text(estimate: CostRange) -> str:
    """``$0.0315`` or ``$0.0315 to $0.5033``."""
    if estimate.low == estimate.high:
        return format_usd(estimate.low)
    return f"{format_usd(estimate.low)} to {format_usd(estimate.high)}"


def branch_cost(branch: Branch) -> str | None:
    """One image's cost as a line shows it (``$0.0109``, ``unknown``); None when its value
    holds none (stored by an older version, or not resolved) or it was free."""
    cost = Cost.of_value(branch.value)
    return None if cost is None or cost.basis == FREE.basis else format_usd(cost.micro_usd)


#: ``list`` sums the costs of runs of up to this many branches: reading a run's values
#: costs ~10 ms a thousand branches, and ``list`` must not grow with the runs' sizes
#: (docs/performance.md). A larger run's cost is in ``show``.
LIST_COST_BRANCHES = 2_000


async def stored_spending(store: Store, root: RootRecord) -> Spending | None:
    """What a stored run's images cost, for ``list`` (failed attempts are counted by
    ``show``); None for a run of more than :data:`LIST_COST_BRANCHES` branches."""
    if sum(root.counts.values()) > LIST_COST_BRANCHES:
        return None
    values = [
        row.value
        async for rows in store.child_rows(root.id)
        for row in rows
        if row.state == "resolved"
    ]
    return spending(values)


def spent_cell(spent: Spending | None) -> str:
    """A run's cost in ``list``: ``$0.0327``, with ``+?`` when some images' is unknown;
    ``see show`` for a run too large to sum here."""
    if spent is None:
        return "see show"
    if spent.images and spent.unknown_images == spent.images:
        return "unknown"
    return format_usd(spent.images_micro_usd) + ("+?" if spent.unknown_images else "")


def image_micro_usd(value: Mapping[str, Any] | None) -> int | None:
    """What an image cost in micro-dollars, as its value stores it; None when unknown."""
    cost = Cost.of_value(value)
    return None if cost is None else cost.micro_usd
