"""Commands that describe what imagepipe can use: ``providers`` and ``styles``."""

from __future__ import annotations

import json
from typing import Annotated

import typer

from imagepipe.cli.common import NoColorOption, make_console, reports_errors

JsonFlag = Annotated[bool, typer.Option("--json", help="Print JSON.")]


def providers(json_out: JsonFlag = False, no_color: NoColorOption = False) -> None:
    """List the image providers (built-in and plugins) with their -o options.

    Example: imagepipe run "a lighthouse" --provider openai -o quality low"""
    import sys
    import warnings
    from dataclasses import asdict

    from imagepipe.providers.registry import list_providers
    from imagepipe.text import escape_control

    # A plugin that cannot be loaded is left out and named, one line each (not Python's
    # two-line warning with a file name).
    with warnings.catch_warnings(record=True) as broken:
        warnings.simplefilter("always")
        infos = list_providers()
    for warning in broken:
        print(f"warning: {escape_control(str(warning.message))}", file=sys.stderr)
    if json_out:
        print(json.dumps([asdict(info) for info in infos], default=str))
        return
    from rich.table import Table
    from rich.text import Text

    console = make_console(no_color)
    for info in infos:
        origin = f"plugin from {info.plugin}" if info.plugin else "built-in"
        console.print(
            Text.assemble(
                (info.name, "bold"),
                f"  {escape_control(info.description)}  ({origin}; default concurrency "
                f"{info.default_concurrency}; {escape_control(info.guarantee)})",
            )
        )
        table = Table(box=None, pad_edge=False, show_edge=False, padding=(0, 2, 0, 2))
        for column in ("option", "default", "identity", "meaning"):
            table.add_column(column)
        for opt in info.options:
            meaning = opt.help + (f" [{', '.join(opt.choices)}]" if opt.choices else "")
            table.add_row(
                opt.name,
                "-" if opt.default is None else str(opt.default),
                "yes" if opt.identity else "no",
                escape_control(meaning),
            )
        console.print(table)


def styles(json_out: JsonFlag = False, no_color: NoColorOption = False) -> None:
    """List the style templates: the built-in six, your own from styles.toml in the config
    directory (name = "template with {prompt}"), and what any other style text becomes."""
    from imagepipe.styles import list_styles, user_styles_path

    listed = list_styles()
    if json_out:
        print(
            json.dumps(
                [{"name": s.name, "template": s.template, "source": s.source} for s in listed]
            )
        )
        return
    from rich.table import Table

    from imagepipe.text import escape_control

    console = make_console(no_color)
    table = Table(box=None, pad_edge=False, show_edge=False)
    for column in ("style", "template", "from"):
        table.add_column(column)
    for style in listed:
        table.add_row(*(escape_control(x) for x in (style.name, style.template, style.source)))
    console.print(table)
    console.print(f"Your own styles: {user_styles_path()}", markup=False, highlight=False)


def register(app: typer.Typer) -> None:
    app.command(name="providers")(reports_errors(providers))
    app.command(name="styles")(reports_errors(styles))
