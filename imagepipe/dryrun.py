"""``imagepipe run ... --dry-run``: what a run would do, and cost, without doing it.

It builds the run's spec as ``run`` would (the prompt file read and checked, the
provider's options validated, the styles' templates looked up) and stops there: nothing
is sent to the provider, no store is opened or created, no folder is made. It does not
ask for the provider's key either: the estimate needs none.

- branches and requests: one paid request a branch when nothing fails; at most
  ``--max-attempts`` a branch when every attempt fails;
- cost: one paid attempt a branch, low to high (:func:`imagepipe.cost.attempt_range`);
  unknown when the model's price is; with ``--batch``, also at the provider's batch prices,
  and in how many batches;
- time: under ``--rpm R``, the requests spaced 60/R s apart; the simulated provider's
  own latencies over ``--concurrency``. A real provider's limit depends on the account,
  which nothing here can know: without ``--rpm`` its time is unknown. Times are real
  ones: ``IMAGEPIPE_TIME_SCALE`` is not applied.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from imagepipe.budget import caps_of
from imagepipe.cost import CostRange, attempt_range, format_usd
from imagepipe.prices import ModelPrice, PriceTable
from imagepipe.runs.model import DEFAULT_MAX_ATTEMPTS, Invocation, RunSpec
from imagepipe.styles import render, templates_for
from imagepipe.text import escape_control

__all__ = ["BatchPlan", "DryRun", "plan_run", "sent_prompts", "spec_for_dry_run"]


@dataclass(frozen=True)
class BatchPlan:
    """How ``run --batch`` would send the run: in how many of the provider's batches, and
    at what cost at its batch prices."""

    batches: int
    #: requests in one batch at most (``IMAGEPIPE_BATCH_SIZE``, within the provider's limit)
    size: int
    cost: CostRange
    per_image: CostRange

    def to_json(self) -> dict[str, Any]:
        return {
            "batches": self.batches,
            "batch_size": self.size,
            "cost": self.cost.to_json(),
            "cost_per_image": self.per_image.to_json(),
        }


@dataclass(frozen=True)
class DryRun:
    """What ``run`` would do with a spec and an invocation."""

    run_id: str | None
    spec: RunSpec
    branches: int
    max_attempts: int
    cost: CostRange
    per_image: CostRange
    price: ModelPrice | None
    concurrency: int
    rpm: int | None
    #: seconds the run would take at least; None when that cannot be known
    seconds: float | None
    time_basis: str
    #: the caps given (micro-dollars, images) and how many branches surely fit in them,
    #: each at its worst case; None without a cap
    max_cost: int | None = None
    max_images: int | None = None
    fits: int | None = None
    #: with ``--batch``: the run sent in the provider's batches
    batch: BatchPlan | None = None

    @property
    def requests(self) -> int:
        return self.branches

    def to_json(self) -> dict[str, Any]:
        return {
            "dry_run": True,
            "id": self.run_id,
            "prompt": self.spec.prompt,
            "provider": self.spec.provider,
            "options": dict(self.spec.options),
            "branches": self.branches,
            "requests": self.requests,
            "max_requests": self.requests * self.max_attempts,
            "cost": self.cost.to_json(),
            "cost_per_image": self.per_image.to_json(),
            "price_source": None
            if self.price is None
            else {"url": self.price.source, "date": self.price.date},
            "time": {
                "seconds": self.seconds,
                "rpm": self.rpm,
                "concurrency": self.concurrency,
                "basis": self.time_basis,
            },
            "cap": None
            if self.fits is None
            else {
                "max_cost_micro_usd": self.max_cost,
                "max_images": self.max_images,
                "branches_that_fit": self.fits,
            },
            **({} if self.batch is None else {"batch": self.batch.to_json()}),
        }

    def lines(self) -> list[str]:
        spec = self.spec
        options = ", ".join(f"{k} {v}" for k, v in sorted(spec.options.items()))
        lines = [
            "Dry run: nothing was sent and nothing was written.",
            f"  run:      {self.branches:,} branches, {self.requests:,} requests "
            f"(up to {self.requests * self.max_attempts:,} if every attempt failed)",
            f"  provider: {spec.provider}" + (f" ({options})" if options else ""),
            f"  cost:     {_range(self.cost)}{' one by one' if self.batch else ''} "
            f"(a paid attempt: {_range(self.per_image)})",
        ]
        batch = self.batch
        if batch is not None:
            many = "batch" if batch.batches == 1 else "batches"
            lines.append(
                f"  batch:    {_range(batch.cost)} in {batch.batches:,} {many} of at most "
                f"{batch.size:,} requests (a paid attempt: {_range(batch.per_image)})"
            )
        if self.price is not None and self.price.source:
            lines.append(f"  prices:   {self.price.source} ({self.price.date or 'no date'})")
        if batch is not None:
            lines.append("  time:     up to 24 h (the batches' completion window)")
        else:
            when = "unknown" if self.seconds is None else f"at least {_duration(self.seconds)}"
            lines.append(f"  time:     {when} ({self.time_basis})")
        if self.fits is not None:
            given = [f"--max-cost {format_usd(self.max_cost)}"] if self.max_cost is not None else []
            given += [f"--max-images {self.max_images}"] if self.max_images is not None else []
            if self.fits >= self.branches:
                said = "every branch fits, each at its worst case"
            else:
                said = (
                    f"about {self.fits:,} of {self.branches:,} branches fit at their worst "
                    "case, then the run stops (exit 3)"
                )
            lines.append(f"  cap:      {', '.join(given)}: {said}")
        return [escape_control(line) for line in lines]


def _range(cost: CostRange) -> str:
    if cost.low == cost.high:
        return format_usd(cost.low)
    return f"{format_usd(cost.low)} to {format_usd(cost.high)}"


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.1f} s"
    if seconds < 7200:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


def spec_for_dry_run(spec: RunSpec, invocation: Invocation) -> RunSpec:
    """The spec as ``run`` would store it (options validated, templates looked up), but
    without the key check: a dry run needs no key."""
    from imagepipe.providers.options import build_options, identity
    from imagepipe.providers.registry import get_provider_class

    provider_class = get_provider_class(spec.provider)
    options = build_options(provider_class.Options, spec.provider, list(invocation.option_pairs))
    return dataclasses.replace(
        spec, options=identity(options), templates=templates_for(spec.all_styles)
    )


def sent_prompts(spec: RunSpec) -> Iterator[tuple[str, str, int]]:
    """(text sent, style, branches) for each prompt and style of the run."""
    for row in spec.prompts or ({"prompt": spec.prompt},):
        for style in [row["style"]] if row.get("style") else spec.styles:
            template = spec.templates.get(style, "{prompt}")
            count = int(row.get("variations") or spec.variations)
            yield render(template, str(row["prompt"]), style), style, count


def plan_run(
    run_id: str | None, spec: RunSpec, invocation: Invocation, prices: PriceTable
) -> DryRun:
    """What running ``spec`` (already checked: :func:`spec_for_dry_run`) would do."""
    from imagepipe.providers.registry import get_provider_class
    from imagepipe.providers.simulated import nominal_duration_ms

    provider_class = get_provider_class(spec.provider)
    concurrency = invocation.concurrency or int(provider_class.default_concurrency)
    total = CostRange(0, 0)
    worst = CostRange(None, None)
    latency_ms = longest_ms = 0
    branches = 0
    worst_cases: list[tuple[int, int]] = []  # (an attempt's worst case, branches), in order
    batch_total = CostRange(0, 0)
    batch_worst = CostRange(None, None)
    for text, style, count in sent_prompts(spec):
        by_batch = None
        if invocation.batch:
            by_batch = attempt_range(spec.provider, spec.options, text, prices, batch=True)
            batch_total = batch_total + by_batch.times(count)
            batch_worst = by_batch if branches == 0 else _widen(batch_worst, by_batch)
        one = attempt_range(spec.provider, spec.options, text, prices)
        # what the caps hold back for a branch: its worst case, in a batch at batch prices
        worst_cases.append(((by_batch or one).high or 0, count))
        total = total + one.times(count)
        worst = one if branches == 0 else _widen(worst, one)
        branches += count
        if spec.provider == "simulated":
            ms = invocation.sim_latency_ms
            ms = nominal_duration_ms(style) if ms is None else ms
            latency_ms += count * ms
            longest_ms = max(longest_ms, ms)
    seconds, basis = _time(spec, invocation, branches, concurrency, latency_ms, longest_ms)
    caps = caps_of(invocation)
    return DryRun(
        run_id,
        spec,
        branches,
        invocation.max_attempts or DEFAULT_MAX_ATTEMPTS,
        total,
        worst,
        prices.get(spec.provider, spec.options.get("model")),
        concurrency,
        invocation.rpm,
        seconds,
        basis,
        caps.max_cost,
        caps.max_images,
        _fits(caps.max_cost, caps.max_images, worst_cases) if caps.given else None,
        _batch_plan(spec.provider, branches, batch_total, batch_worst)
        if invocation.batch
        else None,
    )


def _batch_plan(provider: str, branches: int, cost: CostRange, per_image: CostRange) -> BatchPlan:
    """The run in ``provider``'s batches (its batch mode checked before: it has one)."""
    from imagepipe import settings
    from imagepipe.providers.registry import get_batch_class

    cls = get_batch_class(provider)
    assert cls is not None, "a provider without a batch mode is refused before"
    size = settings.batch_size(int(cls.max_requests))
    return BatchPlan(math.ceil(branches / size), size, cost, per_image)


def _fits(max_cost: int | None, max_images: int | None, worst_cases: list[tuple[int, int]]) -> int:
    """About how many branches fit in the caps, each at its worst case, in the run's order (a
    price known: a cost cap on an unknown one is refused before)."""
    fits, left = 0, max_cost
    for worst, count in worst_cases:
        fitting = count if left is None or not worst else min(count, left // worst)
        fits += fitting
        if left is not None:
            left -= fitting * worst
        if fitting < count:
            break
    return fits if max_images is None else min(fits, max_images)


def _widen(a: CostRange, b: CostRange) -> CostRange:
    low = None if a.low is None or b.low is None else min(a.low, b.low)
    high = None if a.high is None or b.high is None else max(a.high, b.high)
    return CostRange(low, high)


def _time(
    spec: RunSpec,
    invocation: Invocation,
    requests: int,
    concurrency: int,
    latency_ms: int,
    longest_ms: int,
) -> tuple[float | None, str]:
    """The least time the run takes, and why (in real time: ``IMAGEPIPE_TIME_SCALE``, a
    switch for tests and demos, is left out)."""
    if spec.provider == "simulated":  # never paced: it has no limit to keep under
        seconds = max(latency_ms / concurrency, longest_ms) / 1000
        return round(seconds, 1), f"the simulated latencies over --concurrency {concurrency}"
    if invocation.rpm is not None:
        paced = (requests - 1) * 60 / invocation.rpm
        return math.ceil(paced * 10) / 10, f"--rpm {invocation.rpm}, plus the provider's latency"
    return None, "the provider's rate limit depends on your account: give --rpm to estimate"
