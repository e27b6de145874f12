"""The README documents every command and option (a new one fails here until it is)."""

from __future__ import annotations

from pathlib import Path

import typer

from imagepipe.cli import app

README = (Path(__file__).parent.parent / "README.md").read_text()


def test_every_command_and_option_is_in_the_readme() -> None:
    group = typer.main.get_command(app)
    commands = group.commands  # type: ignore[attr-defined]
    assert set(commands) == {
        "run",
        "resume",
        "retry",
        "list",
        "show",
        "db-path",
        "providers",
        "styles",
        "verify",
        "export",
        "gallery",
        "worker",
        "watch",
        "workers",
    }
    missing = []
    for name, command in commands.items():
        if f"imagepipe {name}" not in README:
            missing.append(f"imagepipe {name}")
        for param in command.params:
            for opt in param.opts:
                if opt.startswith("--") and opt not in ("--help",) and f"`{opt}" not in README:
                    missing.append(f"{name} {opt}")
    assert not missing, f"undocumented in README.md: {missing}"


def test_every_setting_is_in_the_readme() -> None:
    from imagepipe import settings

    names = [word for word in (settings.__doc__ or "").split("``") if word.startswith("IMAGEPIPE_")]
    assert len(names) >= 4
    for name in names:
        assert f"`{name}`" in README, name
