"""Provider options (-o KEY VALUE), identity, and the registry with a real installed plugin."""

from __future__ import annotations

import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest

from imagepipe.errors import BadInput
from imagepipe.providers import registry
from imagepipe.providers.base import ImageProvider
from imagepipe.providers.contract import MEMBERS, ProviderClass, missing_member
from imagepipe.providers.openai import OpenAIOptions, OpenAIProvider
from imagepipe.providers.options import BadOption, identity
from imagepipe.providers.registry import (
    ENTRY_POINT_GROUP,
    ProviderLoadError,
    UnknownProvider,
    get_provider_class,
    list_providers,
    parse_options,
)
from imagepipe.providers.replicate import ReplicateOptions, ReplicateProvider
from imagepipe.providers.simulated import SimulatedOptions


def test_defaults_and_values_are_typed() -> None:
    assert parse_options("openai", []) == OpenAIOptions()
    opts = parse_options("openai", [("quality", "low"), ("timeout", "7.5"), ("quality", "high")])
    assert opts == OpenAIOptions(quality="high", timeout=7.5)
    rep = parse_options("replicate", [("seed", "42"), ("model", "a/b")])
    assert rep == ReplicateOptions(seed=42, model="a/b")
    assert parse_options("simulated", []) == SimulatedOptions(model="sim-1", size="256x256")


@pytest.mark.parametrize(
    ("provider", "raw", "message"),
    [
        (
            "openai",
            [("colour", "red")],
            "provider openai: option 'colour': unknown; "
            "this provider's options are: model, size, quality, response_format, base_url, "
            "timeout, max_image_mb",
        ),
        (
            "openai",
            [("quality", "ultra")],
            "provider openai: option 'quality': 'ultra' is not "
            "one of low, medium, high, auto, standard, hd",
        ),
        (
            "openai",
            [("size", "big")],
            "provider openai: option 'size': 'big' is not WIDTHxHEIGHT or auto, e.g. 1024x1536",
        ),
        ("openai", [("timeout", "0")], "provider openai: option 'timeout': '0' must be positive"),
        (
            "openai",
            [("timeout", "soon")],
            "provider openai: option 'timeout': 'soon' is not a number",
        ),
        ("replicate", [("seed", "x")], "provider replicate: option 'seed': 'x' is not an integer"),
        (
            "replicate",
            [("seed", "-1")],
            "provider replicate: option 'seed': '-1' must be at least 0",
        ),
        (
            "openai",
            [("model", "gpt\x1b[2J")],
            "provider openai: option 'model': 'gpt\\x1b[2J' is empty or has control characters",
        ),
        (
            "openai",
            [("k\ney", "v")],
            "provider openai: option 'k ey': unknown; "
            "this provider's options are: model, size, quality, response_format, base_url, "
            "timeout, max_image_mb",
        ),
    ],
)
def test_bad_options_are_one_line_exit_2(
    provider: str, raw: list[tuple[str, str]], message: str
) -> None:
    with pytest.raises(BadOption) as info:
        parse_options(provider, raw)
    assert info.value.message == message
    assert info.value.exit_code == 2


def test_identity_keeps_what_changes_the_image() -> None:
    opts = parse_options("openai", [("base_url", "http://127.0.0.1:1/v1"), ("timeout", "3")])
    assert identity(opts) == {"model": "gpt-image-1", "size": "1024x1024"}
    opts = parse_options("openai", [("quality", "low")])
    assert identity(opts)["quality"] == "low"
    rep = parse_options("replicate", [("seed", "7"), ("poll_interval", "0.1")])
    assert identity(rep) == {
        "model": "black-forest-labs/flux-schnell",
        "aspect_ratio": "1:1",
        "output_format": "webp",
        "seed": 7,
    }


def test_unknown_provider_lists_the_known_ones() -> None:
    with pytest.raises(UnknownProvider) as info:
        get_provider_class("dalle\x07")
    assert info.value.message == (
        "unknown provider 'dalle\\x07'; known providers: simulated, openai, replicate"
    )
    assert isinstance(info.value, BadInput)


def test_builtins_are_listed_with_their_guarantees() -> None:
    infos = {info.name: info for info in list_providers()}
    assert list(infos)[:3] == ["simulated", "openai", "replicate"]
    assert get_provider_class("openai") is OpenAIProvider
    assert get_provider_class("replicate") is ReplicateProvider
    assert infos["openai"].guarantee == "at least once"
    assert infos["replicate"].guarantee == "exactly one paid create per image"
    assert (infos["openai"].default_concurrency, infos["replicate"].default_concurrency) == (4, 8)
    quality = next(o for o in infos["openai"].options if o.name == "quality")
    assert (quality.identity, quality.choices) == (
        True,
        ("low", "medium", "high", "auto", "standard", "hd"),
    )
    base_url = next(o for o in infos["openai"].options if o.name == "base_url")
    assert base_url.identity is False
    assert infos["simulated"].options[0].default == "sim-1"


PLUGIN = """
from dataclasses import dataclass
from imagepipe.providers.options import ProviderOptions, option

@dataclass(frozen=True)
class PlugOptions(ProviderOptions):
    steps: int = option(4, "denoising steps", minimum=1)

class PlugProvider:
    name = "plug"
    description = "a provider from a plugin"
    Options = PlugOptions
    default_concurrency = 2
    guarantee = "at least once"

    @staticmethod
    def check_credentials(options):
        pass

    @classmethod
    def create(cls, options, settings):
        return cls()

    async def generate(self, request, steps):
        raise NotImplementedError

    async def aclose(self):
        pass

NotAProvider = 3
"""


@pytest.fixture
def plugin(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """A real installed distribution: a dist-info directory on sys.path, and its module."""
    module = f"imagepipe_plug_{tmp_path.name.replace('-', '_')}"
    (tmp_path / f"{module}.py").write_text(PLUGIN)
    info = tmp_path / "imagepipe_plug-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: imagepipe-plug\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text(
        textwrap.dedent(f"""\
            [imagepipe.providers]
            plug = {module}:PlugProvider
            notaclass = {module}:NotAProvider
            missing = {module}_nope:Provider
            openai = {module}:PlugProvider
            """)
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    yield module
    sys.modules.pop(module, None)


def test_a_plugin_registers_through_its_entry_point(plugin: str) -> None:
    cls = get_provider_class("plug")
    assert cls.__module__ == plugin
    assert parse_options("plug", [("steps", "8")]) == cls.Options(steps=8)  # type: ignore[attr-defined]
    with pytest.raises(BadOption, match="'0' must be at least 1"):
        parse_options("plug", [("steps", "0")])
    # a built-in name cannot be taken by a plugin
    assert get_provider_class("openai") is OpenAIProvider
    with pytest.warns(UserWarning, match="cannot be loaded|is not a provider class") as warned:
        infos = {info.name: info for info in list_providers()}
    assert infos["plug"].plugin == "imagepipe-plug"
    assert infos["plug"].default_concurrency == 2
    assert {"missing", "notaclass"}.isdisjoint(infos)
    assert len(warned) == 2
    with pytest.raises(
        UnknownProvider,
        match="known providers: simulated, openai, replicate, missing, notaclass, plug",
    ):
        get_provider_class("nope")


def test_a_broken_plugin_is_one_line_not_a_traceback(plugin: str) -> None:
    with pytest.raises(ProviderLoadError) as info:
        get_provider_class("missing")
    assert info.value.message == (
        f"provider 'missing' cannot be loaded: ModuleNotFoundError: No module named '{plugin}_nope'"
    )
    not_a_class = r"'notaclass' \(from imagepipe-plug\) is not a provider class"
    with pytest.raises(ProviderLoadError, match=not_a_class):
        get_provider_class("notaclass")


def test_the_contract_table_names_every_member_of_the_protocols() -> None:
    """What the loader checks (MEMBERS) is exactly what the two protocols declare: the
    class's (ProviderClass) and its instances' (ImageProvider)."""

    def declared(protocol: type) -> set[str]:
        names = set(vars(protocol).get("__annotations__", {}))
        return names | {
            n for n, v in vars(protocol).items() if callable(v) or isinstance(v, property)
        }

    members = declared(ProviderClass) | declared(ImageProvider)
    assert set(MEMBERS) == {m for m in members if not m.startswith("_")}


def test_the_builtins_are_imagepipes_own_entry_points() -> None:
    """The built-ins load through the same entry-point group as plugins, and each follows
    the contract."""
    from importlib.metadata import entry_points

    ours = {
        ep.name: ep.value
        for ep in entry_points(group=ENTRY_POINT_GROUP)
        if ep.dist and ep.dist.name == "imagepipe"
    }
    assert ours == {
        "simulated": "imagepipe.providers.simulated:SimulatedProvider",
        "openai": "imagepipe.providers.openai:OpenAIProvider",
        "replicate": "imagepipe.providers.replicate:ReplicateProvider",
    }
    for name in ours:
        assert missing_member(get_provider_class(name)) is None


def test_an_install_without_the_builtin_entry_points_says_to_reinstall(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Metadata written before the built-ins were entry points (an old editable install)
    finds no built-in: one line saying to reinstall, not "unknown provider 'simulated'"."""
    monkeypatch.setattr(registry, "BUILTIN_DISTRIBUTION", "imagepipe-not-installed")
    registry._builtins_read_from_own_metadata_only.cache_clear()
    try:
        with pytest.raises(ProviderLoadError, match=r"reinstall it, e\.g\. pip install -e \.$"):
            get_provider_class("simulated")
    finally:
        registry._builtins_read_from_own_metadata_only.cache_clear()
