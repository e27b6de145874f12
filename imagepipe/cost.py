"""What an attempt cost, and what one may cost: in whole micro-dollars, or unknown.

- :func:`image_cost`: the cost of an attempt that returned an image, from what the
  provider answered: the ``usage`` tokens where the API returns them (gpt-image models),
  else the per-image price by model, size and quality, else Replicate's
  ``metrics.predict_time`` times the model's hardware price per second. The simulated
  provider costs 0. A model without a known price costs *unknown* (``None``), never 0.
- :func:`attempt_range`: what one paid attempt may cost before it is made, low to high:
  ``high`` is the worst case (what a budget must reserve for the attempt).
- :func:`failed_attempt_cost`: what a failed attempt may have cost. An attempt the
  provider answered with a refusal (a 4xx or 5xx error, a rate limit, a content policy
  refusal) was not billed and costs 0; one whose outcome is not known (a timeout, a
  dropped connection, an answer that could not be used, a process killed mid-request)
  may have been billed and counts at its worst case, as an estimate. A Replicate
  prediction that failed costs 0 on a model billed by output, its worst case on one
  billed by the second.

A branch's cost is stored in its value (``ImageValue["cost"]``, :meth:`Cost.to_json`);
a failed attempt's is worked out from its stored error when the run is shown.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

from imagepipe.prices import (
    BATCH_RATES,
    CURRENCY,
    FREE_PROVIDERS,
    MICRO,
    ModelPrice,
    PriceTable,
    micros,
)

__all__ = [
    "FREE",
    "NOT_BILLED",
    "UNKNOWN",
    "UNKNOWN_RANGE",
    "Cost",
    "CostRange",
    "Spending",
    "attempt_range",
    "batch_rate",
    "cost_json_of",
    "failed_attempt_cost",
    "format_usd",
    "image_cost",
    "spending",
    "worst_case_attempt",
]

#: error types of an attempt the provider answered without billing it
NOT_BILLED = frozenset(
    {
        "InvalidRequest",
        "ContentRejected",
        "QuotaExceeded",
        "CredentialsError",
        "AuthenticationFailed",
        "MissingCredentials",
        "RateLimited",
        "ServerError",
        "BranchRejected",
        # a request that its batch did not run (expired, cancelled, failed validation)
        "BatchUnfinished",
    }
)
_MILLION = Decimal(1_000_000)


@dataclass(frozen=True)
class Cost:
    """What one attempt cost: whole micro-dollars, or None when the price is unknown."""

    micro_usd: int | None
    #: how it was found: usage, per-image, predict-time, free or unknown
    basis: str

    def to_json(self) -> dict[str, Any]:
        return {"micro_usd": self.micro_usd, "currency": CURRENCY, "basis": self.basis}

    @classmethod
    def of_value(cls, value: Mapping[str, Any] | None) -> Cost | None:
        """The cost a branch's stored value holds (a free provider's image holds none: it
        cost 0); None for a value stored without one (by an older version) or damaged."""
        stored = value.get("cost") if value else None
        if stored is None and value and value.get("provider") in FREE_PROVIDERS:
            return FREE
        if not isinstance(stored, Mapping) or stored.get("currency") != CURRENCY:
            return None
        amount = stored.get("micro_usd")
        if amount is not None and (type(amount) is not int or amount < 0):
            return None
        return cls(amount, str(stored.get("basis", "")))


UNKNOWN = Cost(None, "unknown")
FREE = Cost(0, "free")


def cost_json_of(value: Mapping[str, Any]) -> dict[str, Any] | None:
    """An image's ``cost`` as ``run --json`` gives it; None when it is not known."""
    cost = Cost.of_value(value)
    return None if cost is None else cost.to_json()


@dataclass(frozen=True)
class CostRange:
    """What something may cost, low to high, in micro-dollars; None where unknown."""

    low: int | None
    high: int | None

    @property
    def known(self) -> bool:
        return self.low is not None and self.high is not None

    def times(self, n: int) -> CostRange:
        return CostRange(
            None if self.low is None else self.low * n,
            None if self.high is None else self.high * n,
        )

    def __add__(self, other: CostRange) -> CostRange:
        def add(a: int | None, b: int | None) -> int | None:
            return None if a is None or b is None else a + b

        return CostRange(add(self.low, other.low), add(self.high, other.high))

    def to_json(self) -> dict[str, Any]:
        return {"low_micro_usd": self.low, "high_micro_usd": self.high, "currency": CURRENCY}


UNKNOWN_RANGE = CostRange(None, None)


def format_usd(micro_usd: int | None) -> str:
    """``$0.0420``: four decimals below a dollar, two above; ``unknown`` for None."""
    if micro_usd is None:
        return "unknown"
    usd = Decimal(micro_usd) / MICRO
    return f"${usd:,.2f}" if usd >= 1 or not micro_usd else f"${usd:.4f}"


def _quality(options: Mapping[str, Any]) -> str | None:
    quality = options.get("quality")
    return None if quality in (None, "auto") else str(quality)


def _size(options: Mapping[str, Any]) -> str | None:
    size = options.get("size")
    return None if size in (None, "auto") else str(size)


def _image_prices(price: ModelPrice, options: Mapping[str, Any]) -> list[Decimal]:
    """The per-image prices that may apply: one where quality and size are given, every
    priced quality (or size) where it is unset or ``auto``."""
    quality, size = _quality(options), _size(options)
    exact = price.image_price(quality, size) if quality else None
    if exact is not None:
        return [exact]
    found = []
    for key, value in price.per_image.items():
        key_quality, _, key_size = key.rpartition("/")  # "1024x1024": no quality
        if key == "*" or (
            (quality is None or key_quality == quality) and (size is None or key_size == size)
        ):
            found.append(value)
    return found


def image_cost(
    provider: str,
    options: Mapping[str, Any],
    model: str | None,
    usage: Mapping[str, Any] | None,
    prices: PriceTable,
    *,
    batch: bool = False,
) -> Cost:
    """What an attempt that returned an image cost (see the module's docstring); with
    ``batch``, at the provider's batch rate (:data:`~imagepipe.prices.BATCH_RATES`)."""
    if provider in FREE_PROVIDERS:
        return FREE
    price = prices.get(provider, model) or prices.get(provider, options.get("model"))
    if price is None:
        return UNKNOWN
    rate = batch_rate(provider) if batch else Decimal(1)
    suffix = " (batch)" if batch else ""
    if price.bills_tokens and usage:
        tokens = _token_cost(price, usage)
        if tokens is not None:
            return Cost(micros(tokens * rate), "usage" + suffix)
    images = _image_prices(price, options)
    if images:
        # unset quality, several prices: the highest, as the provider's default may be it
        return Cost(micros(max(images) * rate), "per-image" + suffix)
    seconds = _seconds(usage.get("predict_time")) if usage else None
    if price.per_second is not None and seconds is not None:
        return Cost(micros(price.per_second * seconds * rate), "predict-time" + suffix)
    return UNKNOWN


def batch_rate(provider: str) -> Decimal:
    """The share of its synchronous price that ``provider``'s batch mode charges."""
    return BATCH_RATES.get(provider, Decimal(1))


def _count(value: Any) -> int | None:
    """A token count as an answer gives it: an int of 0 or more."""
    return value if type(value) is int and value >= 0 else None


def _seconds(value: Any) -> Decimal | None:
    """Seconds as an answer gives them: a finite number of 0 or more."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    seconds = Decimal(str(value))
    return seconds if seconds.is_finite() and seconds >= 0 else None


def _token_cost(price: ModelPrice, usage: Mapping[str, Any]) -> Decimal | None:
    """Tokens times their prices: text and image input (input tokens without details are
    text: a generation's input is its prompt), image output."""
    output = _count(usage.get("output_tokens"))
    total_in = _count(usage.get("input_tokens"))
    details = usage.get("input_tokens_details")
    if output is None or total_in is None or price.image_output_per_1m is None:
        return None
    text_in, image_in = total_in, 0
    if isinstance(details, Mapping):
        text_in = _count(details.get("text_tokens")) or 0
        image_in = _count(details.get("image_tokens")) or 0
    text_rate = price.text_input_per_1m
    image_rate = price.image_input_per_1m
    if (text_in and text_rate is None) or (image_in and image_rate is None):
        return None
    cost = Decimal(output) * price.image_output_per_1m
    cost += Decimal(text_in) * (text_rate or 0) + Decimal(image_in) * (image_rate or 0)
    return cost / _MILLION


def attempt_range(
    provider: str,
    options: Mapping[str, Any],
    prompt: str,
    prices: PriceTable,
    *,
    batch: bool = False,
) -> CostRange:
    """What one paid attempt for ``prompt`` (the text sent) may cost, low to high.

    gpt-image models: the image output at the published per-image price of the quality
    and size (every priced one when unset or ``auto``; give or take half a unit of the
    figure's last digit, which its rounding may have added or taken off), plus the
    prompt's text tokens: none at the low end, one a byte of UTF-8 at the high end (a
    byte-level tokenizer makes no more). Per-image models: the price of the quality and
    size. Per-second models: the row's ``seconds`` times the price per second; unknown
    without them. With ``batch``, at the provider's batch rate."""
    if provider in FREE_PROVIDERS:
        return CostRange(0, 0)
    if batch:
        rate = batch_rate(provider)
        full = attempt_range(provider, options, prompt, prices)
        return CostRange(
            None if full.low is None else int(full.low * rate),
            None if full.high is None else -int(-full.high * rate),  # rounded up
        )
    price = prices.get(provider, options.get("model"))
    if price is None:
        return UNKNOWN_RANGE
    images = _image_prices(price, options)
    if images:
        low, high = min(images), max(images)
        if price.bills_tokens:
            low -= _rounding(low)
            if price.text_input_per_1m is None:
                return CostRange(micros(low), None)
            high += _rounding(high)
            high += Decimal(len(prompt.encode("utf-8"))) * price.text_input_per_1m / _MILLION
        return CostRange(micros(low), micros(high))
    if price.per_second is not None and price.seconds is not None:
        fast, slow = price.seconds
        return CostRange(micros(fast * price.per_second), micros(slow * price.per_second))
    return UNKNOWN_RANGE


def worst_case_attempt(
    provider: str,
    options: Mapping[str, Any],
    prompt: str,
    prices: PriceTable,
    *,
    batch: bool = False,
) -> int | None:
    """The most one paid attempt for ``prompt`` may cost, in micro-dollars; None when the
    price is unknown (what a spending cap must reserve before the attempt starts)."""
    return attempt_range(provider, options, prompt, prices, batch=batch).high


def _rounding(figure: Decimal) -> Decimal:
    """Half a unit of ``figure``'s last digit: a token-billed model's per-image figure is
    its output tokens' price rounded (gpt-image-1's medium square image is 1056 tokens at
    $40 a million, $0.04224, published as $0.042; a low one 272 tokens, $0.01088,
    published as $0.011), so the range widens by what the rounding may have changed."""
    exponent = figure.as_tuple().exponent
    return Decimal(5).scaleb(int(exponent) - 1) if isinstance(exponent, int) else Decimal(0)


def failed_attempt_cost(
    error_type: str | None,
    provider: str,
    options: Mapping[str, Any],
    prompt: str,
    prices: PriceTable,
) -> int | None:
    """What a failed attempt may have cost, in micro-dollars (its worst case); 0 when the
    provider refused it, None when it may have been paid at an unknown price.
    ``error_type`` None: the attempt never ended (its process was killed)."""
    if provider in FREE_PROVIDERS or error_type in NOT_BILLED:
        return 0
    if error_type == "PredictionFailed":  # billed by its time, if at all: not by output
        price = prices.get(provider, options.get("model"))
        if price is not None and price.per_image:
            return 0
    return attempt_range(provider, options, prompt, prices).high


@dataclass(frozen=True)
class Spending:
    """What a run's images cost, and what its failed attempts may have."""

    #: the sum of the known costs of the images
    images_micro_usd: int
    images: int
    #: images whose cost is unknown (not in the sum)
    unknown_images: int
    #: the worst case of the failed attempts that may have been paid
    failed_micro_usd: int
    failed_attempts: int
    #: failed attempts that may have been paid at an unknown price
    unknown_failed: int
    #: the worst case of the requests in open batches (not run yet: paid once they are),
    #: and how many there are
    batched_micro_usd: int = 0
    batched: int = 0

    @property
    def micro_usd(self) -> int:
        return self.images_micro_usd + self.failed_micro_usd

    @property
    def complete(self) -> bool:
        return not self.unknown_images and not self.unknown_failed

    def to_json(self) -> dict[str, Any]:
        return {
            "micro_usd": self.images_micro_usd,
            "currency": CURRENCY,
            "images": self.images,
            "unknown_images": self.unknown_images,
            "failed_attempts_micro_usd": self.failed_micro_usd,
            "failed_attempts": self.failed_attempts,
            "unknown_failed_attempts": self.unknown_failed,
            "open_batch_requests": self.batched,
            "open_batch_micro_usd": self.batched_micro_usd,
        }

    def line(self) -> str:
        """``$0.1260 for 3 images (1 of unknown cost); up to $0.1670 more for 1 failed
        attempt that may have been paid``."""
        images = "1 image" if self.images == 1 else f"{self.images} images"
        text = f"{format_usd(self.images_micro_usd)} for {images}"
        if self.unknown_images:
            text += f" ({self.unknown_images} of unknown cost, not counted)"
        if self.failed_attempts:
            more = format_usd(self.failed_micro_usd)
            text += f"; up to {more} more for {self.failed_attempts} failed attempts"
            text += " that may have been paid"
            if self.unknown_failed:
                text += f" ({self.unknown_failed} at an unknown price)"
        if self.batched:
            more = format_usd(self.batched_micro_usd)
            text += f"; up to {more} more for {self.batched} requests in open batches"
        return text


def spending(
    values: Iterable[Mapping[str, Any] | None], failed: Iterable[int | None] = ()
) -> Spending:
    """The sum of the images' stored costs (``values`` of resolved branches) and of the
    failed attempts' worst cases (:func:`failed_attempt_cost` of each)."""
    total = count = unknown = 0
    for value in values:
        count += 1
        cost = Cost.of_value(value)
        if cost is None or cost.micro_usd is None:
            unknown += 1
        else:
            total += cost.micro_usd
    failed_total = paid = unknown_failed = 0
    for amount in failed:
        if amount is None:
            paid += 1
            unknown_failed += 1
        elif amount:
            paid += 1
            failed_total += amount
    return Spending(total, count, unknown, failed_total, paid, unknown_failed)
