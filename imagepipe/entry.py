"""The ``imagepipe`` console script and ``python -m imagepipe``: Ctrl-C at start-up is exit 130.

This module imports nothing heavy at its top level, so that a SIGINT arriving while the
command line, typer, rich or the durable core are still being imported (the first ~0.1 s
of the process) ends the process with exit 130 instead of a KeyboardInterrupt traceback.
While a run executes, :func:`imagepipe.service.run_command` turns signals into ``Interrupted``.
"""

import signal
import sys

__all__ = ["INTERRUPTED", "interrupted", "main"]

#: the conventional exit status of a process stopped by Ctrl-C (128 + SIGINT)
INTERRUPTED = 130


def interrupted() -> SystemExit:
    """Exit 130 for a Ctrl-C outside a run; further Ctrl-Cs are ignored from here on.

    Ignored, not left to Python: a second KeyboardInterrupt during the exit would print a
    traceback, and one during interpreter shutdown kills the process with -2."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    print("error: interrupted by SIGINT", file=sys.stderr)
    return SystemExit(INTERRUPTED)


def main() -> None:
    try:
        from imagepipe.cli import main as cli_main

        cli_main()
    except KeyboardInterrupt:
        # Outside a run (imports, argument parsing, opening the store): nothing is
        # half-written, SQLite rolls back an open transaction.
        raise interrupted() from None
