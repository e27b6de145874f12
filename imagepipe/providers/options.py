"""Provider options: declared as frozen dataclasses, given on the command line as ``-o KEY VALUE``.

Each provider has an ``Options`` class, a frozen dataclass subclassing
:class:`ProviderOptions`, whose fields are declared with :func:`option`::

    @dataclass(frozen=True)
    class MyOptions(ProviderOptions):
        model: str = option("m-1", "model name")
        steps: int = option(4, "denoising steps", minimum=1)
        base_url: str | None = option(None, "server URL", identity=False)

An option is part of the run's IDENTITY (it changes the image: model, size, quality, ...) or a
CONNECTION setting (base URL, timeout: it does not). :func:`identity` returns the former, so
that the core can refuse to resume a run with other image-changing options.

Supported field types: ``str``, ``int``, ``float``, and each of them ``| None``.
"""

from __future__ import annotations

import dataclasses
import re
import typing
import unicodedata
from dataclasses import dataclass
from typing import Any

from imagepipe.errors import BadInput
from imagepipe.text import one_line

__all__ = [
    "BadOption",
    "OptionInfo",
    "ProviderOptions",
    "build_options",
    "describe_options",
    "identity",
    "option",
]


class BadOption(BadInput):
    """A ``-o KEY VALUE`` pair a provider does not accept: exit 2, one line."""

    def __init__(self, provider: str, key: str, problem: str) -> None:
        super().__init__(f"provider {provider}: option {_show(key)}: {problem}")
        self.provider = provider
        self.key = key


@dataclass(frozen=True)
class ProviderOptions:
    """Base of every provider's options dataclass (it has no options of its own)."""


@dataclass(frozen=True)
class OptionInfo:
    """One option, as ``imagepipe providers`` shows it."""

    name: str
    type: str  # "str", "int", "float"
    default: str | int | float | None
    help: str
    identity: bool
    choices: tuple[str, ...] | None = None


def option(
    default: Any,
    help: str,
    *,
    identity: bool = True,
    choices: tuple[str, ...] | None = None,
    pattern: str | None = None,
    minimum: float | None = None,
    maximum: float | None = None,
    positive: bool = False,
) -> Any:
    """Declare one option field: its default, a one-sentence help, and how to validate it.

    ``identity=False`` marks a connection setting. ``choices`` lists the allowed values,
    ``pattern`` is a regular expression a string must match in full (its description is the
    help text), ``minimum`` and ``maximum`` bound a number, ``positive`` requires it above 0.
    """
    meta = {
        "help": help,
        "identity": identity,
        "choices": choices,
        "pattern": pattern,
        "minimum": minimum,
        "maximum": maximum,
        "positive": positive,
    }
    return dataclasses.field(default=default, metadata=meta)


def _show(value: str) -> str:
    return f"'{one_line(value, limit=80)}'"


def _base_type(cls: type[ProviderOptions], name: str) -> tuple[type, bool]:
    hint = typing.get_type_hints(cls)[name]
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    if args:  # X | None
        if len(args) != 1:
            raise TypeError(f"{cls.__name__}.{name}: only X or X | None options are supported")
        return args[0], True
    return hint, False


def describe_options(cls: type[ProviderOptions]) -> list[OptionInfo]:
    """The options of ``cls`` in declaration order, for listings and help."""
    infos = []
    for f in dataclasses.fields(cls):
        base, _ = _base_type(cls, f.name)
        infos.append(
            OptionInfo(
                name=f.name,
                type=base.__name__,
                default=f.default,  # type: ignore[arg-type]
                help=str(f.metadata.get("help", "")),
                identity=bool(f.metadata.get("identity", True)),
                choices=f.metadata.get("choices"),
            )
        )
    return infos


def _convert(provider: str, f: dataclasses.Field[Any], base: type, raw: str) -> Any:
    meta = f.metadata
    choices: tuple[str, ...] | None = meta.get("choices")
    if choices is not None and raw not in choices:
        raise BadOption(provider, f.name, f"{_show(raw)} is not one of {', '.join(choices)}")
    value: Any
    if base is int or base is float:
        try:
            value = base(raw)
        except ValueError:
            kind = "an integer" if base is int else "a number"
            raise BadOption(provider, f.name, f"{_show(raw)} is not {kind}") from None
        if meta.get("positive") and not value > 0:
            raise BadOption(provider, f.name, f"{_show(raw)} must be positive")
        minimum = meta.get("minimum")
        if minimum is not None and not value >= minimum:
            raise BadOption(provider, f.name, f"{_show(raw)} must be at least {minimum:g}")
        maximum = meta.get("maximum")
        if maximum is not None and not value <= maximum:
            raise BadOption(provider, f.name, f"{_show(raw)} must be at most {maximum:g}")
        return value
    if base is not str:
        raise TypeError(f"option {f.name}: unsupported type {base!r}")
    pattern = meta.get("pattern")
    if pattern is not None and not re.fullmatch(pattern, raw):
        raise BadOption(provider, f.name, f"{_show(raw)} is not {meta.get('help', 'valid')}")
    if not raw or any(unicodedata.category(ch) == "Cc" for ch in raw):
        raise BadOption(provider, f.name, f"{_show(raw)} is empty or has control characters")
    return raw


def build_options(
    cls: type[ProviderOptions], provider: str, raw: list[tuple[str, str]]
) -> ProviderOptions:
    """Validate ``-o KEY VALUE`` pairs into an instance of ``cls``; a later pair wins.

    Unknown keys and bad values raise :class:`BadOption` naming the provider, the key and
    what is allowed.
    """
    fields = {f.name: f for f in dataclasses.fields(cls)}
    values: dict[str, Any] = {}
    for key, text in raw:
        f = fields.get(key)
        if f is None:
            known = ", ".join(fields) or "none"
            raise BadOption(provider, key, f"unknown; this provider's options are: {known}")
        base, _ = _base_type(cls, key)
        values[key] = _convert(provider, f, base, text)
    return cls(**values)


def identity(options: ProviderOptions) -> dict[str, str | int | float]:
    """The options that change the image (not ``None``), for the run's identity."""
    out: dict[str, str | int | float] = {}
    for f in dataclasses.fields(options):
        value = getattr(options, f.name)
        if f.metadata.get("identity", True) and value is not None:
            out[f.name] = value
    return out
