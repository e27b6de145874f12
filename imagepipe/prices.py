"""What an image costs: the built-in price table and the user's ``prices.toml``.

Every row of the built-in table says where its figures were read and when. A figure that
was not found in a provider's published pricing is not in the table: such a model's price
is *unknown*, never 0. The simulated provider costs 0.

The user's file (``IMAGEPIPE_PRICES``, else ``prices.toml`` in the user config directory,
e.g. ``~/.config/imagepipe/prices.toml``) has the table's own shape. A model it names
replaces the built-in row of that model whole; other models are added. For example::

    currency = "USD"                      # the only currency known (optional)

    [openai."gpt-image-1"]
    text_input_per_1m = 5.00              # USD per million tokens (gpt-image models)
    image_input_per_1m = 10.00
    image_output_per_1m = 40.00
    per_image = { "low/1024x1024" = 0.011, "high/1024x1024" = 0.167 }

    [replicate."stability-ai/sdxl"]
    hardware = "gpu-l40s"                 # billed by second of metrics.predict_time
    seconds = [2, 8]                      # what one prediction takes, for estimates

    [replicate.hardware]                  # USD per second
    gpu-l40s = 0.000975

``per_image`` keys are ``quality/size``, ``size`` or ``*`` (any). A file that cannot be
read, is not TOML, or holds anything else (an unknown key, a negative or non-numeric
price, another currency) is bad input: one line, exit 2, before anything is written.

Money is exact: prices are :class:`~decimal.Decimal`, costs whole micro-dollars
(:data:`MICRO`), summed as integers.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from decimal import ROUND_HALF_UP, Decimal, InvalidOperation
from pathlib import Path
from typing import Any

from imagepipe.errors import BadInput
from imagepipe.text import quoted

__all__ = [
    "BATCH_RATES",
    "CURRENCY",
    "FREE_PROVIDERS",
    "MICRO",
    "ModelPrice",
    "PriceTable",
    "current_prices",
    "load_prices",
    "micros",
    "prices_if_readable",
    "user_prices_path",
]

CURRENCY = "USD"
#: micro-dollars in a dollar: costs are stored and summed as whole micro-dollars
MICRO = 1_000_000
#: providers whose images cost nothing
FREE_PROVIDERS = frozenset({"simulated"})
#: what a provider's Batch API charges, as a share of its synchronous price: OpenAI's
#: batches are "50% off" the same model's price (OpenAI's Batch API guide; the GPT Image
#: models' batch mode as announced, read 2026-12-07)
BATCH_RATES: Mapping[str, Decimal] = {"openai": Decimal("0.5")}

_TODAY = "2026-12-07"
_GPT_IMAGE_1 = "https://developers.openai.com/ja-JP/api/docs/models/gpt-image-1"
_GPT_IMAGE_1_MINI = "https://developers.openai.com/de-DE/api/docs/models/gpt-image-1-mini"
_DALLE_COPY = "https://github.com/kevinhermawan/Canvas/blob/main/model-info.json"
_REPLICATE_TRANSCRIPT = (
    "https://raw.githubusercontent.com/api-evangelist/replicate/refs/heads/main/plans/"
    "replicate-plans-pricing.yml"
)


def _gpt_image_sizes(low: tuple[str, str], medium: tuple[str, str], high: tuple[str, str]) -> Any:
    """Per-image prices of a gpt-image model: square, then portrait and landscape."""
    table = {}
    for quality, (square, oblong) in (("low", low), ("medium", medium), ("high", high)):
        table[f"{quality}/1024x1024"] = square
        table[f"{quality}/1024x1536"] = oblong
        table[f"{quality}/1536x1024"] = oblong
    return table


#: The built-in table, in the shape of the user's file. Figures are strings: exact.
BUILTIN: dict[str, Any] = {
    "openai": {
        "gpt-image-1": {
            "text_input_per_1m": "5.00",
            "image_input_per_1m": "10.00",
            "image_output_per_1m": "40.00",
            "per_image": _gpt_image_sizes(
                ("0.011", "0.016"), ("0.042", "0.063"), ("0.167", "0.25")
            ),
            "source": _GPT_IMAGE_1,
            "date": _TODAY,
            "note": "OpenAI's model page (Japanese locale); it says gpt-image-1 was retired "
            "on 2026-10-23. Per-image figures are the image output only; the prompt's "
            "text tokens are billed besides.",
        },
        "gpt-image-1-mini": {
            "text_input_per_1m": "2.00",
            "image_input_per_1m": "2.50",
            "image_output_per_1m": "8.00",
            "per_image": _gpt_image_sizes(
                ("0.005", "0.006"), ("0.011", "0.015"), ("0.036", "0.052")
            ),
            "source": _GPT_IMAGE_1_MINI,
            "date": _TODAY,
            "note": "OpenAI's model page (German locale), which marks the model deprecated.",
        },
        "dall-e-3": {
            "per_image": {
                "standard/1024x1024": "0.04",
                "standard/1024x1792": "0.08",
                "standard/1792x1024": "0.08",
                "hd/1024x1024": "0.08",
                "hd/1024x1792": "0.12",
                "hd/1792x1024": "0.12",
            },
            "source": _DALLE_COPY,
            "date": "2023-12-25",
            "note": "Not on OpenAI's own pages any more (the model page says DALL-E 3 was "
            "shut down, and gives no price): read in a copy of https://openai.com/pricing "
            "dated 2023-12-25.",
        },
        "dall-e-2": {
            "per_image": {"256x256": "0.016", "512x512": "0.018", "1024x1024": "0.02"},
            "source": _DALLE_COPY,
            "date": "2023-12-25",
            "note": "As dall-e-3: a copy of https://openai.com/pricing dated 2023-12-25.",
        },
    },
    "replicate": {
        "black-forest-labs/flux-schnell": {
            "per_image": {"*": "0.003"},
            "source": "https://internal.replicate.com/black-forest-labs/flux-schnell",
            "date": _TODAY,
            "note": "The model's page on a Replicate host: $3 per thousand output images "
            "(also so in the transcript of https://replicate.com/pricing of 2026-10-07).",
        },
        "black-forest-labs/flux-dev": {
            "per_image": {"*": "0.025"},
            "source": _REPLICATE_TRANSCRIPT,
            "date": "2026-10-07",
            "note": "$0.025 per output image, as transcribed from https://replicate.com/pricing.",
        },
        "black-forest-labs/flux-1.1-pro": {
            "per_image": {"*": "0.04"},
            "source": _REPLICATE_TRANSCRIPT,
            "date": "2026-10-07",
            "note": "$0.04 per output image, as transcribed from https://replicate.com/pricing.",
        },
        "black-forest-labs/flux-pro": {
            "per_image": {"*": "0.055"},
            "source": "https://replicate.com/black-forest-labs/flux-pro",
            "date": _TODAY,
            "note": "The model's page: $0.055 per image.",
        },
        # Public models that are not "official" are billed by the second of hardware
        # time (metrics.predict_time); which hardware a model runs on is on its page:
        # name it in prices.toml (hardware = "gpu-l40s") to price such a model. USD a
        # second, read at https://replicate.com/pricing on 2026-12-07.
        "hardware": {
            "cpu": "0.000100",
            "gpu-t4": "0.000225",
            "gpu-a40-small": "0.000575",
            "gpu-a40-large": "0.000725",
            "gpu-a40-large-2x": "0.001450",
            "gpu-a40-large-4x": "0.002900",
            "gpu-a40-large-8x": "0.005800",
            "gpu-l40s": "0.000975",
            "gpu-2x-l40s": "0.001950",
            "gpu-4x-l40s": "0.003900",
            "gpu-8x-l40s": "0.007800",
            "gpu-a100-large": "0.001400",
            "gpu-a100-large-2x": "0.002800",
            "gpu-a100-large-4x": "0.005600",
            "gpu-a100-large-8x": "0.011200",
            "gpu-h100": "0.001525",
            "gpu-h100-2x": "0.003050",
            "gpu-h100-4x": "0.006100",
            "gpu-h100-8x": "0.012200",
        },
    },
}

_ROW_KEYS = frozenset(
    {
        "text_input_per_1m",
        "image_input_per_1m",
        "image_output_per_1m",
        "per_image",
        "hardware",
        "per_second",
        "seconds",
        "currency",
        "source",
        "date",
        "note",
    }
)


@dataclass(frozen=True)
class ModelPrice:
    """What one model of one provider costs, and where that was read."""

    provider: str
    model: str
    #: USD per million tokens (gpt-image models bill tokens)
    text_input_per_1m: Decimal | None = None
    image_input_per_1m: Decimal | None = None
    image_output_per_1m: Decimal | None = None
    #: USD per image, by ``quality/size``, ``size`` or ``*``
    per_image: Mapping[str, Decimal] = field(default_factory=dict)
    #: USD per second of ``metrics.predict_time`` (Replicate's hardware-time billing)
    per_second: Decimal | None = None
    #: seconds one prediction takes (low, high), for estimates of per-second models
    seconds: tuple[Decimal, Decimal] | None = None
    source: str = ""
    date: str = ""
    note: str = ""

    @property
    def bills_tokens(self) -> bool:
        return self.image_output_per_1m is not None

    def image_price(self, quality: str | None, size: str | None) -> Decimal | None:
        """The price of one image of this quality and size, if the table has one."""
        for key in (f"{quality}/{size}", f"{size}", "*"):
            if key in self.per_image:
                return self.per_image[key]
        return None


@dataclass(frozen=True)
class PriceTable:
    """Every known price, by provider and model."""

    models: Mapping[tuple[str, str], ModelPrice]
    #: where the user's file was read, if there was one
    user_file: str | None = None

    def get(self, provider: str, model: str | None) -> ModelPrice | None:
        """The price of ``model`` at ``provider``; None when it is not known."""
        if model is None:
            return None
        return self.models.get((provider, model))


def micros(usd: Decimal) -> int:
    """``usd`` in whole micro-dollars, rounded half up."""
    return int((usd * MICRO).quantize(Decimal(1), rounding=ROUND_HALF_UP))


def user_prices_path() -> Path:
    import platformdirs

    override = os.environ.get("IMAGEPIPE_PRICES")
    if override:
        return Path(override)
    return Path(platformdirs.user_config_dir("imagepipe", appauthor=False)) / "prices.toml"


def load_prices() -> PriceTable:
    """The built-in table with the user's file over it; a broken file is :class:`BadInput`."""
    path = user_prices_path()
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return _table(BUILTIN, None)
    except (OSError, UnicodeDecodeError) as exc:
        raise BadInput(f"cannot read the prices file {quoted(str(path))}: {exc}") from None
    import tomllib

    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise BadInput(f"the prices file {quoted(str(path))} is not valid TOML: {exc}") from None
    return _table(_merged(BUILTIN, data, str(path)), str(path))


_cache: dict[tuple[str, int, int] | None, PriceTable] = {}


def current_prices() -> PriceTable:
    """:func:`load_prices`, read again only when the user's file changes."""
    path = user_prices_path()
    try:
        stat = path.stat()
        key: tuple[str, int, int] | None = (str(path), stat.st_mtime_ns, stat.st_size)
    except OSError:
        key = None
    if key not in _cache:
        _cache.clear()
        _cache[key] = load_prices()
    return _cache[key]


def prices_if_readable() -> PriceTable | None:
    """:func:`current_prices`, or None when the user's file is broken: for what runs after
    the commands have checked it (a report still shows what was spent, which is stored; a
    run reserves images only where the price is unknown)."""
    try:
        return current_prices()
    except BadInput:
        return None


def _merged(builtin: Mapping[str, Any], user: Mapping[str, Any], where: str) -> dict[str, Any]:
    """The built-in table with the user's rows over it (a model's row replaced whole, the
    hardware table merged by name)."""
    _check_currency(user.get("currency", CURRENCY), where, "")
    merged: dict[str, Any] = {p: dict(rows) for p, rows in builtin.items()}
    for provider, rows in user.items():
        if provider == "currency":
            continue
        if not isinstance(rows, dict):
            raise BadInput(
                f"the prices file {quoted(where)}: {quoted(provider)} must be a table of "
                'models, e.g. [openai."gpt-image-1"]'
            )
        into = merged.setdefault(provider, {})
        for model, row in rows.items():
            if model == "hardware" and isinstance(row, dict):
                into["hardware"] = {**into.get("hardware", {}), **row}
            elif isinstance(row, dict):
                into[model] = {"source": where, **row}
            else:
                into[model] = row  # refused, with its name, by _row
    return merged


def _table(data: Mapping[str, Any], user_file: str | None) -> PriceTable:
    where = user_file or "the built-in price table"
    models: dict[tuple[str, str], ModelPrice] = {}
    for provider, rows in data.items():
        hardware = {
            name: _price(value, where, f"{provider}.hardware.{name}")
            for name, value in _as_table(rows.get("hardware", {}), where, f"{provider}.hardware")
        }
        for model, row in rows.items():
            if model == "hardware":
                continue
            models[(provider, model)] = _row(provider, model, row, hardware, where)
    return PriceTable(models, user_file)


def _row(
    provider: str, model: str, row: Any, hardware: Mapping[str, Decimal], where: str
) -> ModelPrice:
    name = f"{provider}.{model}"
    if not isinstance(row, dict):
        raise BadInput(f"the prices file {quoted(where)}: {quoted(name)} must be a table")
    unknown = sorted(set(row) - _ROW_KEYS)
    if unknown:
        raise BadInput(
            f"the prices file {quoted(where)}: {quoted(name)} has an unknown key "
            f"{quoted(unknown[0])} (known: {', '.join(sorted(_ROW_KEYS))})"
        )
    _check_currency(row.get("currency", CURRENCY), where, name)

    def rate(key: str) -> Decimal | None:
        return None if key not in row else _price(row[key], where, f"{name}.{key}")

    per_image_raw = row.get("per_image", {})
    if not isinstance(per_image_raw, dict):  # a flat price: any size and quality
        per_image_raw = {"*": per_image_raw}
    per_image = {
        str(key): _price(value, where, f"{name}.per_image.{key}")
        for key, value in per_image_raw.items()
    }
    per_second = rate("per_second")
    if "hardware" in row:
        chosen = row["hardware"]
        if not isinstance(chosen, str) or chosen not in hardware:
            raise BadInput(
                f"the prices file {quoted(where)}: {quoted(name)} names hardware "
                f"{quoted(str(chosen))}, which has no price (known: {', '.join(sorted(hardware))})"
            )
        per_second = hardware[chosen]
    return ModelPrice(
        provider,
        model,
        rate("text_input_per_1m"),
        rate("image_input_per_1m"),
        rate("image_output_per_1m"),
        per_image,
        per_second,
        _seconds(row["seconds"], where, name) if "seconds" in row else None,
        str(row.get("source", "")),
        str(row.get("date", "")),
        str(row.get("note", "")),
    )


def _as_table(value: Any, where: str, name: str) -> list[tuple[str, Any]]:
    if not isinstance(value, dict):
        raise BadInput(f"the prices file {quoted(where)}: {quoted(name)} must be a table")
    return list(value.items())


def _price(value: Any, where: str, name: str) -> Decimal:
    """A price: a number (or a decimal string) of 0 or more."""
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise BadInput(
            f"the prices file {quoted(where)}: {quoted(name)} must be a number of USD, "
            f"not {quoted(repr(value))}"
        )
    try:
        price = Decimal(str(value))
    except InvalidOperation:
        price = Decimal("NaN")
    if not price.is_finite() or price < 0 or (isinstance(value, float) and math.isnan(value)):
        raise BadInput(
            f"the prices file {quoted(where)}: {quoted(name)} must be a number of USD >= 0, "
            f"not {quoted(str(value))}"
        )
    return price


def _seconds(value: Any, where: str, name: str) -> tuple[Decimal, Decimal]:
    if isinstance(value, list) and len(value) == 2:
        low, high = (_price(v, where, f"{name}.seconds") for v in value)
    else:
        low = high = _price(value, where, f"{name}.seconds")
    if low > high:
        raise BadInput(f"the prices file {quoted(where)}: {quoted(name)}.seconds is [high, low]")
    return low, high


def _check_currency(value: Any, where: str, name: str) -> None:
    if value != CURRENCY:
        what = f"{quoted(name)} is priced in" if name else "prices are in"
        raise BadInput(
            f"the prices file {quoted(where)}: {what} {quoted(str(value))}, an unknown "
            f"currency; only {CURRENCY} is known"
        )
