"""Which providers exist: the built-ins and third-party ones from the entry-point group.

Built-ins: ``simulated`` (the default, no key), ``openai`` and ``replicate``. A plugin
registers a provider class in its own packaging metadata, as llm's plugins do::

    [project.entry-points."imagepipe.providers"]
    myprovider = "imagepipe_myprovider:MyProvider"

A provider class has the class attributes ``name``, ``description``, ``Options`` (a
:class:`~imagepipe.providers.options.ProviderOptions` dataclass), ``default_concurrency``
and ``guarantee``, and is built as ``cls(options, pacer=..., time_scale=...)``; its
instances follow :class:`~imagepipe.providers.base.ImageProvider`. A built-in name cannot be
taken by a plugin. Provider modules are imported only when asked for.
"""

from __future__ import annotations

import importlib
import warnings
from dataclasses import dataclass
from typing import Any

from imagepipe.errors import BadInput
from imagepipe.providers.base import one_line
from imagepipe.providers.options import (
    OptionInfo,
    ProviderOptions,
    build_options,
    describe_options,
)

__all__ = [
    "ENTRY_POINT_GROUP",
    "ProviderInfo",
    "ProviderLoadError",
    "UnknownProvider",
    "get_provider_class",
    "list_providers",
    "parse_options",
]

ENTRY_POINT_GROUP = "imagepipe.providers"
REQUIRED = ("name", "description", "Options", "default_concurrency", "guarantee")


class UnknownProvider(BadInput):
    def __init__(self, name: str, known: list[str]) -> None:
        super().__init__(
            f"unknown provider '{one_line(name, 80)}'; known providers: {', '.join(known)}"
        )
        self.name = name


class ProviderLoadError(BadInput):
    """A plugin's entry point cannot be imported or does not describe a provider."""


BUILTINS = {
    "simulated": "imagepipe.providers.simulated:SimulatedProvider",
    "openai": "imagepipe.providers.openai:OpenAIProvider",
    "replicate": "imagepipe.providers.replicate:ReplicateProvider",
}


@dataclass(frozen=True)
class ProviderInfo:
    """One provider as ``imagepipe providers`` lists it."""

    name: str
    description: str
    options: list[OptionInfo]
    default_concurrency: int
    guarantee: str
    plugin: str | None  # the distribution that provides it; None for a built-in


def _load(target: str) -> Any:
    module, _, attr = target.partition(":")
    obj: Any = importlib.import_module(module)
    for part in attr.split("."):
        obj = getattr(obj, part)
    return obj


def _check(name: str, cls: Any) -> type:
    missing = [a for a in REQUIRED if not hasattr(cls, a)]
    if not isinstance(cls, type) or missing:
        raise ProviderLoadError(
            f"provider {name!r} is not a provider class (missing: {', '.join(missing) or 'class'})"
        )
    return cls


def _plugins() -> dict[str, Any]:
    found: dict[str, Any] = {}
    from importlib.metadata import entry_points  # ~20 ms: only when a plugin is looked for

    for ep in entry_points(group=ENTRY_POINT_GROUP):
        if ep.name not in BUILTINS and ep.name not in found:
            found[ep.name] = ep
    return found


def _known() -> list[str]:
    return [*BUILTINS, *sorted(_plugins())]


def get_provider_class(name: str) -> type:
    """The provider class registered under ``name``; an unknown name lists the known ones."""
    if name in BUILTINS:
        return _check(name, _load(BUILTINS[name]))
    ep = _plugins().get(name)
    if ep is None:
        raise UnknownProvider(name, _known())
    try:
        cls = ep.load()
    except Exception as exc:  # a broken plugin must not take the CLI down with a traceback
        detail = one_line(f"{type(exc).__name__}: {exc}", 200)
        raise ProviderLoadError(f"provider {name!r} cannot be loaded: {detail}") from exc
    return _check(name, cls)


def _info(name: str, cls: Any, plugin: str | None) -> ProviderInfo:
    return ProviderInfo(
        name=name,
        description=str(cls.description),
        options=describe_options(cls.Options),
        default_concurrency=int(cls.default_concurrency),
        guarantee=str(cls.guarantee),
        plugin=plugin,
    )


def list_providers() -> list[ProviderInfo]:
    """Every provider: the built-ins first, then plugins by name (a broken one is warned)."""
    infos = [_info(name, get_provider_class(name), None) for name in BUILTINS]
    for name, ep in sorted(_plugins().items()):
        try:
            cls = get_provider_class(name)
        except ProviderLoadError as exc:
            warnings.warn(exc.message, stacklevel=2)
            continue
        dist = ep.dist.name if ep.dist is not None else None
        infos.append(_info(name, cls, dist))
    return infos


def parse_options(provider_name: str, raw: list[tuple[str, str]]) -> ProviderOptions:
    """Validate ``-o KEY VALUE`` pairs for ``provider_name``: BadOption, UnknownProvider."""
    cls: Any = get_provider_class(provider_name)
    return build_options(cls.Options, provider_name, raw)
