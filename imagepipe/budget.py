"""A run's spending caps: ``--max-cost USD`` and ``--max-images N``.

The caps are the core's (:class:`~imagepipe.durable.store.SpendingStore`): held by the
store, so that they hold across crashes, ``resume`` and any number of workers. Before an
attempt that may be paid starts, its worst case is reserved on two meters, in the
transaction that records its start: micro-dollars (:func:`imagepipe.cost.worst_case_attempt`
of the prompt as sent) and images (one). Once the image is made, its actual cost replaces
the micro-dollars reserved; a request the provider refused gives its reservation back; an
attempt whose outcome is unknown (killed mid-request) stays counted at its worst case.

When the next attempt does not fit, it does not start: the run lets the requests in flight
finish, leaves the rest pending, and stops with :class:`CapReached` (exit 3), which says by
how much to raise the cap to finish.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

from imagepipe.cost import format_usd, worst_case_attempt
from imagepipe.durable import PromiseRecord, Store
from imagepipe.durable.errors import SpendingCapReached
from imagepipe.durable.records import Spending
from imagepipe.errors import BadInput, CapReached
from imagepipe.prices import CURRENCY, FREE_PROVIDERS, PriceTable, micros
from imagepipe.runs.model import BranchArgs, Invocation
from imagepipe.styles import render
from imagepipe.text import quoted

__all__ = [
    "IMAGES",
    "MICRO_USD",
    "Caps",
    "cap_reached",
    "caps_of",
    "parse_max_cost",
    "reservation",
    "with_image_cap",
]

#: the meters a run's spending is counted on
MICRO_USD, IMAGES = "micro_usd", "images"

#: the most a cap may be on any meter: what both stores' 64-bit integers hold with room to
#: spare (10**18 micro-dollars: a trillion dollars)
MOST = 10**18

#: a number of dollars: ``5``, ``5.50``, ``.5``
_DOLLARS = re.compile(r"[0-9]+(?:\.[0-9]*)?|\.[0-9]+")
#: ``5``, ``5.50``, ``$5``, ``5 USD``, ``USD 5``
_AMOUNT = re.compile(r"^\s*(?:\$|([A-Za-z]{3})\s*)?\s*([^\s$A-Za-z]+)\s*([A-Za-z]{3})?\s*$")


@dataclass(frozen=True)
class Caps:
    """The caps one command gives a run (None: keep the stored one)."""

    max_cost: int | None = None  # micro-dollars
    max_images: int | None = None

    def validate(self) -> None:
        if self.max_images is not None and self.max_images < 0:
            raise BadInput(f"--max-images must be 0 or more, not {self.max_images}")
        if self.max_images is not None and self.max_images > MOST:
            raise BadInput(f"--max-images must be at most {MOST}, not {self.max_images}")

    @property
    def given(self) -> bool:
        return self.max_cost is not None or self.max_images is not None

    def check_priced(
        self,
        provider: str,
        options: Mapping[str, Any],
        prices: PriceTable,
        *,
        whose: str = "--max-cost",
    ) -> None:
        """A cost cap needs a price: a model whose price is unknown is refused (the user
        may give it one in the prices file). ``whose``: the cap, as the line names it."""
        if self.max_cost is None or provider in FREE_PROVIDERS:
            return
        if worst_case_attempt(provider, options, "", prices) is None:
            model = options.get("model")
            raise BadInput(
                f"{whose} needs a price, and the price of {provider} model "
                f"{quoted(str(model))} is unknown: give it one in the prices file "
                "(see docs/guides/costs.md)"
                if model is not None
                else f"{whose} needs a price, and {provider}'s price is unknown: give it "
                "one in the prices file (see docs/guides/costs.md)"
            )

    async def store(self, store: Store, run_id: str) -> None:
        """Keep the caps with the run (a later ``resume --max-cost`` raises them)."""
        if self.max_cost is not None:
            await store.set_spending_limit(run_id, MICRO_USD, self.max_cost)
        if self.max_images is not None:
            await store.set_spending_limit(run_id, IMAGES, self.max_images)


def caps_of(invocation: Invocation) -> Caps:
    """The caps an invocation gives, checked: bad input otherwise."""
    max_cost = None if invocation.max_cost is None else parse_max_cost(invocation.max_cost)
    caps = Caps(max_cost, invocation.max_images)
    caps.validate()
    return caps


def parse_max_cost(text: str) -> int:
    """``--max-cost``'s value in micro-dollars: a number of US dollars (``5``, ``$5.50``,
    ``5 USD``); anything else, a negative or not finite amount, or another currency, is
    bad input."""
    found = _AMOUNT.match(text)
    currency = found and (found.group(1) or found.group(3))
    if currency and currency.upper() != CURRENCY:
        raise BadInput(
            f"--max-cost is in {CURRENCY}, not {quoted(currency)}: give a number of dollars"
        )
    number = found.group(2) if found else ""
    # plain ASCII digits: Decimal also reads "1_000", "٥" and "５", which nobody means here
    amount = Decimal(number) if _DOLLARS.fullmatch(number) else Decimal("nan")
    if not amount.is_finite() or amount < 0:
        raise BadInput(
            f"--max-cost must be a number of US dollars, 0 or more (5, 2.50), not {quoted(text)}"
        )
    if micros(amount) > MOST:
        raise BadInput(
            f"--max-cost must be at most {MOST // 1_000_000} dollars, not {quoted(text)}"
        )
    return micros(amount)


def reservation(
    provider: str,
    options: Mapping[str, Any],
    templates: Mapping[str, str],
    prices: PriceTable | None,
    *,
    batch: bool = False,
) -> Callable[[str, Mapping[str, Any]], Mapping[str, int]] | None:
    """What an attempt of a branch reserves before it starts: one image, and its worst
    case in micro-dollars where the price is known (at the batch rate with ``batch``).
    None for a free provider."""
    if provider in FREE_PROVIDERS:
        return None

    def worst_case(func: str, kwargs: Mapping[str, Any]) -> Mapping[str, int]:
        args = BranchArgs.read(kwargs)
        sent = render(templates.get(args.style, "{prompt}"), args.prompt, args.style)
        high = (
            None
            if prices is None
            else worst_case_attempt(provider, options, sent, prices, batch=batch)
        )
        return {IMAGES: 1} if high is None else {IMAGES: 1, MICRO_USD: high}

    return worst_case


async def with_image_cap(
    store: Store,
    run_id: str,
    reserve: Callable[[str, Mapping[str, Any]], Mapping[str, int]] | None,
) -> Callable[[str, Mapping[str, Any]], Mapping[str, int]] | None:
    """``reserve``, or for a free provider's run with an image cap, one image an attempt
    (a free provider reserves nothing otherwise: its attempts need no transaction more)."""
    if reserve is not None or IMAGES not in await store.spending(run_id):
        return reserve
    return _one_image


def _one_image(func: str, kwargs: Mapping[str, Any]) -> Mapping[str, int]:
    return {IMAGES: 1}


def cap_reached(
    exc: SpendingCapReached,
    run_id: str,
    pending: Sequence[PromiseRecord],
    reserve: Callable[[str, Mapping[str, Any]], Mapping[str, int]] | None,
    spending: Mapping[str, Spending] | None = None,
) -> CapReached:
    """The one line for a run stopped at a cap: what it spent of what, and the caps with
    which ``resume`` would finish the ``pending`` branches (each at its worst case): the
    one reached, and any other of the run's ``spending`` caps they would reach next."""
    meters = {exc.meter: Spending(exc.cap, exc.spent)}
    for meter, spent in (spending or {}).items():
        if meter != exc.meter and spent.limit is not None:
            meters[meter] = spent
    needed = {meter: spent.spent for meter, spent in meters.items()}
    for branch in pending:
        if reserve is not None:
            units = reserve(branch.func, branch.args)
            for meter in needed:
                needed[meter] += units.get(meter, 0)
    raise_to = []
    for meter in (MICRO_USD, IMAGES):
        cap = meters.get(meter)
        if cap is None or (meter != exc.meter and cap.allows(needed[meter] - cap.spent)):
            continue  # not capped, or the pending branches fit in it
        if meter == MICRO_USD:
            # rounded up to the cent: a cap that finishes the run, not one a cent short
            cents = math.ceil(Decimal(needed[meter]) / 10_000)
            raise_to.append(f"--max-cost {Decimal(cents) / 100:.2f}")
        else:
            raise_to.append(f"--max-images {needed[meter]}")
    rid = run_id  # checked when the run was made: nothing to escape
    goes_on = f"imagepipe resume {rid} {' '.join(raise_to)} goes on"
    if exc.meter == MICRO_USD:
        return CapReached(
            f"budget reached: {format_usd(exc.spent)} spent of {format_usd(exc.cap)}; {goes_on}"
        )
    return CapReached(
        f"image cap reached: {exc.spent} of {exc.cap} images made or paid for; {goes_on}"
    )
