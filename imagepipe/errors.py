"""The one exception tree of imagepipe.

Every error a user can meet is an :class:`ImagepipeError`: it builds its own one-line
message and carries the process exit code. The CLI has a single handler that prints the
message on stderr and exits with the code; nothing else prints errors.

Exit codes (also in docs/reference/exit-codes.md):

====  ==========================================================================
0     success
1     the run failed: a branch was rejected (others still finished)
2     bad input: arguments, unknown run id, reused id, unusable ``--db`` path
3     the run stopped at its spending cap (``--max-cost``, ``--max-images``), its
      unfinished branches pending; raise the cap with resume
4     a provider's batch ended without running some branches (it expired, was
      cancelled, or failed its validation): they are pending; ``resume`` sends them in a
      new batch, ``resume --no-batch`` runs them one by one
65    the stored run does not match what the code produces now (non-determinism)
74    the store, or the run's image folder, cannot be read or written (read-only, disk
      full, corrupt, newer)
75    the run or the store is busy in another process, or the store's server stayed
      unreachable, or a provider's batch could not be sent, polled, read or cancelled;
      try again later
78    the provider met an error of the account or the set-up (a refused key, no credit
      left, an unknown model, a base URL that cannot be used): the run stopped after the
      requests in flight, its unfinished branches pending; fix it, then resume
130   interrupted by Ctrl-C (143 for SIGTERM); the run is resumable
====  ==========================================================================
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from imagepipe.text import escape_control, quoted

if TYPE_CHECKING:
    from imagepipe.durable.errors import DurableError

__all__ = [
    "AccountStopped",
    "BadInput",
    "BatchCancelFailed",
    "BatchTrouble",
    "BatchUnfinished",
    "CapReached",
    "CredentialsRejected",
    "ImagepipeError",
    "Interrupted",
    "NonDeterminism",
    "RunBusy",
    "RunConflict",
    "RunFailed",
    "RunLost",
    "StoreBusy",
    "StoreFailed",
    "StoreUnreachable",
    "UnknownRun",
    "UnusableStore",
    "from_core",
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


#: characters of a value that an error message shows: a 4,000-character prompt is cut
_SHOWN = 80


def _shown(value: object) -> str:
    """A value a user gave or a store held, shortened, quoted and escaped for an error
    message."""
    text = value if isinstance(value, str) else repr(value)
    if len(text) > _SHOWN:
        text = text[: _SHOWN - 1] + "…"
    return quoted(text) if isinstance(value, str) else escape_control(text)


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


class StoreFailed(ImagepipeError):
    """The store cannot be read or written (read-only, disk full, corrupt, newer)."""

    exit_code = 74


class StoreBusy(StoreFailed):
    """Another process holds the store's write lock for too long."""

    exit_code = 75


class StoreUnreachable(StoreFailed):
    """The store's server went away mid-use and did not come back in time
    (``IMAGEPIPE_DB_RECONNECT``): nothing is lost, resume once it is back."""

    exit_code = 75

    def __init__(self, store_error: str, run_id: str | None = None) -> None:
        resume = f": imagepipe resume {escape_control(run_id)}" if run_id else ""
        super().__init__(f"{store_error}; try again once it is back{resume}")
        #: the store's own words, without what to do about them
        self.store_error = store_error


class RunBusy(ImagepipeError):
    """A live process is executing this run right now."""

    exit_code = 75

    def __init__(self, run_id: str, owner: str) -> None:
        super().__init__(
            f"run {quoted(run_id)} is being executed by {escape_control(owner)}; wait for it "
            f"to finish or stop that process, then `imagepipe resume {escape_control(run_id)}`"
        )
        self.run_id = run_id


class RunLost(ImagepipeError):
    """This process was taken over (it was stopped or silent for too long): fencing refuses
    its writes, and it stops."""

    exit_code = 75

    def __init__(self, run_id: str) -> None:
        super().__init__(
            f"lost run {run_id!r}: another process took it over while this one was stopped "
            "or could not reach the store; this process wrote nothing more and stops"
        )
        self.run_id = run_id


class NonDeterminism(ImagepipeError):
    """Replay produced a different branch list than the one in the store."""

    exit_code = 65


class RunFailed(ImagepipeError):
    """The run ended with at least one rejected branch."""

    exit_code = 1


class CredentialsRejected(RunFailed):
    """The run failed because the provider refused its key (401, 403): bad input, exit 2.

    Nothing was retried; fix the key and ``imagepipe retry`` the run."""

    exit_code = 2


class AccountStopped(ImagepipeError):
    """The provider met an error of the account or the set-up (a refused key, no credit
    left, an unknown model, a base URL that cannot be used): no new request was sent, the
    requests in flight finished and were recorded, and the rest of the run is pending.
    Fix what is named, then resume (not ``retry``: nothing was rejected)."""

    exit_code = 78

    def __init__(
        self, reason: str, fix: str | None, run_id: str | None, *, worker: bool = False
    ) -> None:
        what = escape_control(reason) + ("" if fix is None else f" ({escape_control(fix)})")
        resume = f"`imagepipe resume {escape_control(run_id)}`" if run_id else "resume the run"
        if worker:
            super().__init__(
                f"worker stopped, the run's unfinished branches pending: {what}; "
                f"fix it, then {resume} or start the workers again"
            )
        else:
            stopped = f"run {quoted(run_id)}" if run_id else "the run"
            super().__init__(
                f"{stopped} stopped, its unfinished branches pending: {what}; fix it, then {resume}"
            )
        self.run_id = run_id


class CapReached(ImagepipeError):
    """The run stopped at one of its spending caps (``--max-cost``, ``--max-images``): the
    requests in flight finished, its unfinished branches are pending; raise the cap and
    resume."""

    exit_code = 3


class BatchUnfinished(ImagepipeError):
    """A provider's batch ended without running some of the run's branches (it expired,
    was cancelled, or failed its validation): nothing was paid for them, and they are
    pending. The user decides how they go on: in a new batch, or one by one."""

    exit_code = 4

    def __init__(self, run_id: str, count: int, why: str) -> None:
        rid = escape_control(run_id)
        super().__init__(
            f"run {quoted(run_id)}: {count} branch{'es' if count != 1 else ''} not run "
            f"({escape_control(why)}), pending and not paid for; `imagepipe resume {rid}` "
            f"sends them in a new batch, `imagepipe resume {rid} --no-batch` runs them one "
            "by one"
        )
        self.run_id = run_id


class BatchTrouble(ImagepipeError):
    """A provider's batch could not be sent, polled or read (an answer not of the
    documented shape, a batch the provider no longer knows): the run is pending, and
    nothing recorded is lost."""

    exit_code = 75

    def __init__(self, run_id: str, what: str) -> None:
        super().__init__(
            f"run {quoted(run_id)} stopped, pending: {escape_control(what)}; "
            f"`imagepipe resume {escape_control(run_id)}` goes on from there"
        )
        self.run_id = run_id


class BatchCancelFailed(ImagepipeError):
    """``imagepipe cancel``: the provider did not cancel one of the run's batches (exit 75;
    78 for an error of the account or the set-up, a refused key say). The store is
    unchanged; the batches cancelled before it stay cancelled."""

    exit_code = 75

    def __init__(self, run_id: str, batch_id: str, what: str, exit_code: int) -> None:
        super().__init__(
            f"run {quoted(run_id)}: batch {quoted(batch_id)} was not cancelled: "
            f"{escape_control(what)}; `imagepipe cancel {escape_control(run_id)}` tries again"
        )
        self.exit_code = exit_code


class Interrupted(ImagepipeError):
    """The run was stopped by a signal; it is pending and resumable."""

    def __init__(self, run_id: str, signal_name: str = "SIGINT") -> None:
        super().__init__(
            f"interrupted by {signal_name}: run {quoted(run_id)} is saved. "
            f"Resume with: imagepipe resume {escape_control(run_id)}"
        )
        self.run_id = run_id
        self.exit_code = 143 if signal_name == "SIGTERM" else 130


def from_core(exc: DurableError, run_id: str | None = None) -> ImagepipeError:
    """The one place where an error of the durable core becomes imagepipe's: its exit code
    and the words that tell a user what to do."""
    from imagepipe.durable import errors as core  # loaded already: ``exc`` is one of them

    again = f"imagepipe resume {run_id}" if run_id else "resume the run"
    if isinstance(exc, core.StoreUnusable):
        return UnusableStore(f"cannot use --db: {exc}")
    if isinstance(exc, core.StoreBusy):
        return StoreBusy(f"{exc}; try again")
    if isinstance(exc, core.StoreUnreachable):
        return StoreUnreachable(str(exc), run_id)
    if isinstance(exc, core.StoreReadOnly):
        return StoreFailed(f"{exc}; check its permissions")
    if isinstance(exc, core.StoreFull):
        return StoreFailed(f"the disk holding {exc.where} is full; free space and resume")
    if isinstance(exc, core.StoreWriteFailed):
        return StoreFailed(
            f"{exc}: the disk may be full or failing, or a quota or file-size limit "
            f"(ulimit -f) reached; free space or raise the limit, then {again}"
        )
    if isinstance(exc, core.StoreCorrupt):
        return StoreFailed(f"{exc}; restore it from a backup")
    if isinstance(exc, core.StoreNewer):
        return StoreFailed(
            f"the store {exc.where} has schema version {exc.found}, newer than this "
            f"imagepipe knows ({exc.known}); upgrade imagepipe"
        )
    if isinstance(exc, core.StoreConflict):
        return RunBusy(run_id or "?", "another process writing the same run")
    if isinstance(exc, core.StoreError):
        return StoreFailed(str(exc))
    if isinstance(exc, core.SpendingCapReached):
        name = "--max-cost" if exc.meter == "micro_usd" else "--max-images"
        return CapReached(
            f"{escape_control(str(exc))}; its unfinished branches are pending: raise the cap "
            f"with imagepipe resume {quoted(run_id or '?')} {name} ..."
        )
    if isinstance(exc, core.DrainRun):
        return AccountStopped(str(exc), getattr(exc.__cause__, "fix", None), run_id)
    if isinstance(exc, core.StopRun):
        return StoreFailed(
            f"{escape_control(str(exc))}; the run stopped and its unfinished branches stay "
            f"pending (nothing is paid again for them until you resume): fix it, then {again}"
        )
    if isinstance(exc, core.LeaseHeld):
        return RunBusy(exc.key, f"process {exc.holder.pid} on {exc.holder.host}")
    if isinstance(exc, core.LeaseLost):
        return RunLost(exc.key)
    if isinstance(exc, core.NonDeterminism):
        return NonDeterminism(f"{exc}; this run cannot be resumed by this version")
    return ImagepipeError(str(exc))
