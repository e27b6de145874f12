"""The command line: a thin Typer layer over :mod:`imagepipe.service`.

- :mod:`.common` — error handling, consoles, reporters, shared options
- :mod:`.execute` — ``run``, ``resume``, ``retry``: commands that execute a run
- :mod:`.inspect` — ``list``, ``show``, ``db-path``: commands that only read
"""

from imagepipe.cli import execute, inspect
from imagepipe.cli.common import app

__all__ = ["app", "main"]

execute.register(app)
inspect.register(app)


def main() -> None:
    app()
