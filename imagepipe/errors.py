"""The one exception tree of imagepipe.

Every error a user can meet is an :class:`ImagepipeError`: it builds its own one-line
message and carries the process exit code. The CLI has a single handler that prints the
message on stderr and exits with the code; nothing else prints errors.

Exit codes (also in the README):

====  ==========================================================================
0     success
1     the run failed: a branch was rejected (others still finished)
2     bad input: arguments, unknown run id, reused id, unusable ``--db`` path
65    the stored run does not match what the code produces now (non-determinism)
74    the store cannot be read or written (read-only, disk full, corrupt, newer)
75    the run or the store is busy in another process; try again later
130   interrupted by Ctrl-C (143 for SIGTERM); the run is resumable
====  ==========================================================================
"""

from __future__ import annotations

from imagepipe.text import escape_control, quoted

__all__ = [
    "BadInput",
    "ImagepipeError",
    "Interrupted",
    "NonDeterminism",
    "PromiseRejected",
    "RunBusy",
    "RunConflict",
    "RunFailed",
    "StoreBusy",
    "StoreError",
    "UnknownRun",
    "UnusableStore",
]


class ImagepipeError(Exception):
    """Base of every error imagepipe reports to a user."""

    exit_code: int = 1

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class BadInput(ImagepipeError):
    """An argument, option or environment setting is not acceptable."""

    exit_code = 2


class UnknownRun(BadInput):
    def __init__(self, run_id: str, db_path: str) -> None:
        super().__init__(f"no run with id {quoted(run_id)} in {escape_control(db_path)}")
        self.run_id = run_id


def _shown(value: object) -> str:
    """A value a user gave or a store held, quoted and escaped for an error message."""
    return quoted(value) if isinstance(value, str) else escape_control(repr(value))


class RunConflict(BadInput):
    """A run id is reused with arguments that differ from the stored run."""

    def __init__(self, run_id: str, field: str, stored: object, given: object) -> None:
        super().__init__(
            f"run {quoted(run_id)} already exists with {field}={_shown(stored)}, "
            f"not {_shown(given)}; "
            "pick another --id or omit it"
        )
        self.run_id = run_id


class UnusableStore(BadInput):
    """The ``--db`` path cannot hold an imagepipe store (missing dir, not SQLite, ...)."""


class StoreError(ImagepipeError):
    """The store failed while reading or writing (read-only, full, corrupt, newer)."""

    exit_code = 74


class StoreBusy(StoreError):
    """Another process holds the database's write lock for too long."""

    exit_code = 75


class RunBusy(ImagepipeError):
    """A live process is executing this run right now."""

    exit_code = 75

    def __init__(self, run_id: str, owner: str) -> None:
        super().__init__(
            f"run {quoted(run_id)} is being executed by {escape_control(owner)}; wait for it "
            f"to finish or stop that process, then `imagepipe resume {escape_control(run_id)}`"
        )
        self.run_id = run_id


class NonDeterminism(ImagepipeError):
    """Replay produced a different branch list than the one in the store."""

    exit_code = 65


class PromiseRejected(ImagepipeError):
    """Awaiting a durable promise that was rejected.

    ``error_type`` and ``error`` are the original exception's type name and message, as
    they were stored; the original exception is chained as ``__cause__`` when it was
    raised in this process.
    """

    def __init__(self, promise_id: str, error_type: str, error: str) -> None:
        super().__init__(f"{promise_id} rejected: {error_type}: {error}")
        self.promise_id = promise_id
        self.error_type = error_type
        self.error = error


class RunFailed(ImagepipeError):
    """The run ended with at least one rejected branch."""

    exit_code = 1


class Interrupted(ImagepipeError):
    """The run was stopped by a signal; it is pending and resumable."""

    def __init__(self, run_id: str, signal_name: str = "SIGINT") -> None:
        super().__init__(
            f"interrupted by {signal_name}: run {quoted(run_id)} is saved. "
            f"Resume with: imagepipe resume {escape_control(run_id)}"
        )
        self.run_id = run_id
        self.exit_code = 143 if signal_name == "SIGTERM" else 130
