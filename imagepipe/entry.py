"""The ``imagepipe`` console script and ``python -m imagepipe``: Ctrl-C at start-up is exit 130.

This module imports nothing heavy at its top level, so that a SIGINT arriving while the
command line, typer, rich or the durable core are still being imported (the first ~0.1 s
of the process) ends the process with exit 130 instead of a KeyboardInterrupt traceback.
While a run executes, :func:`imagepipe.execution.run_command` turns signals into ``Interrupted``.
"""

from imagepipe.interrupts import interrupted

__all__ = ["main"]


def main() -> None:
    try:
        from imagepipe.cli import main as cli_main

        cli_main()
    except KeyboardInterrupt:
        # Outside a run (imports, argument parsing, opening the store): nothing is
        # half-written, SQLite rolls back an open transaction.
        raise interrupted() from None
