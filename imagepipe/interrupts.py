"""Ctrl-C outside a run: exit 130 with one line, whoever catches it (the console script
while it is still importing, or a command before or after its run). Imports nothing but
the standard library, so that :mod:`imagepipe.entry` can use it before anything heavy."""

import signal
import sys

__all__ = ["INTERRUPTED", "interrupted"]

#: the conventional exit status of a process stopped by Ctrl-C (128 + SIGINT)
INTERRUPTED = 130


def interrupted() -> SystemExit:
    """Exit 130 for a Ctrl-C outside a run; further Ctrl-Cs are ignored from here on.

    Ignored, not left to Python: a second KeyboardInterrupt during the exit would print a
    traceback, and one during interpreter shutdown kills the process with -2."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    print("error: interrupted by SIGINT", file=sys.stderr)
    return SystemExit(INTERRUPTED)
