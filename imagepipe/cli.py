"""The command line: parse, call :mod:`imagepipe.service`, render, map errors to exit codes."""

from __future__ import annotations

import functools
import json
import os
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, ParamSpec, TypeVar

import typer

from imagepipe.errors import ImagepipeError, RunFailed

if TYPE_CHECKING:
    from rich.console import Console

    from imagepipe.service import Invocation, Reporter, RunOutcome

P = ParamSpec("P")
R = TypeVar("R")

app = typer.Typer(
    name="imagepipe",
    help=(
        "Ask an image provider for several style variations of one prompt, in parallel. "
        "Every branch is a durable promise in a SQLite store: a run killed at any moment "
        "is finished by `imagepipe resume ID` without redoing what already succeeded."
    ),
    epilog=(
        'Example: imagepipe run "A futuristic city skyline"   '
        "Settings: IMAGEPIPE_DB (the store), IMAGEPIPE_TIME_SCALE (e.g. 0.01 for a fast demo)."
    ),
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
    context_settings={"help_option_names": ["-h", "--help"]},
)

DbOption = Annotated[
    Path | None,
    typer.Option(
        "--db",
        envvar="IMAGEPIPE_DB",
        help="SQLite store to use [env: IMAGEPIPE_DB; default: imagepipe.db in the user "
        "data directory, see `imagepipe db-path`].",
        show_default=False,
        show_envvar=False,
    ),
]
JsonOption = Annotated[
    bool, typer.Option("--json", help="Print one JSON object on stdout and nothing live.")
]
QuietOption = Annotated[
    bool, typer.Option("--quiet", "-q", help="No live output; print only the final result.")
]
NoColorOption = Annotated[
    bool, typer.Option("--no-color", help="No colours (NO_COLOR=1 does the same).")
]
MaxAttemptsOption = Annotated[
    int | None,
    typer.Option(
        "--max-attempts",
        help="Failed attempts a branch may have before it is rejected [default: 5; on "
        "resume: the run's own].",
        show_default=False,
    ),
]


def _fail(message: str, code: int) -> typer.Exit:
    print(f"error: {message}", file=sys.stderr)
    return typer.Exit(code)


def reports_errors(command: Callable[P, R]) -> Callable[P, R]:
    """The one place an :class:`ImagepipeError` becomes a line on stderr and an exit code."""

    @functools.wraps(command)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return command(*args, **kwargs)
        except ImagepipeError as exc:
            raise _fail(exc.message, exc.exit_code) from None

    return wrapper


def _db(db: Path | None) -> Path:
    from imagepipe.settings import default_db_path

    if db is not None:
        return db.expanduser()
    path = default_db_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


def _console(no_color: bool) -> Console:
    from rich.console import Console

    console = Console(no_color=True if no_color else None, highlight=False)
    if not console.is_terminal and "COLUMNS" not in os.environ:
        console.width = 200  # piped: do not cut URLs at rich's default of 80 columns
    return console


@contextmanager
def _reporter(console: Console, *, json_out: bool, quiet: bool) -> Iterator[Reporter]:
    from imagepipe.ui import LiveReporter, PlainReporter, QuietReporter

    if json_out or quiet:
        yield QuietReporter()
    elif console.is_terminal and not console.is_dumb_terminal:
        with LiveReporter(console) as live:
            yield live
    else:
        yield PlainReporter(console)


def _finish(console: Console, outcome: RunOutcome, *, json_out: bool) -> None:
    from imagepipe.render import print_outcome

    if json_out:
        print(json.dumps(outcome.result_json()))
    else:
        print_outcome(console, outcome)
    if outcome.state == "failed":
        failed = outcome.failures
        first = failed[0]
        detail = f"{first.style} ({first.id}): {first.error.message}" if first.error else first.id
        raise RunFailed(
            f"run {outcome.id} failed: {len(failed)} of {len(outcome.branches)} branches "
            f"rejected, first {detail}"
        )


def _invocation(max_attempts: int | None, **extra: Any) -> Invocation:
    from imagepipe.service import Invocation
    from imagepipe.settings import time_scale

    return Invocation(max_attempts=max_attempts, time_scale=time_scale(), **extra)


@app.command()
@reports_errors
def run(
    prompt: Annotated[str, typer.Argument(help='What to draw, e.g. "A futuristic city skyline".')],
    style: Annotated[
        list[str] | None,
        typer.Option(
            "--style",
            "-s",
            help="A style to generate; repeat for several [default: photorealistic, cartoon, "
            "abstract; also known: watercolor, pixel-art, sketch].",
            show_default=False,
        ),
    ] = None,
    run_id: Annotated[
        str | None,
        typer.Option(
            "--id",
            help="Name the run [default: pipeline-<unix ms>]. Reusing the id of a finished run "
            "shows it; of an unfinished one, resumes it.",
            show_default=False,
        ),
    ] = None,
    crash: Annotated[
        bool,
        typer.Option("--crash", help="Demo: the abstract branch fails its first attempt."),
    ] = False,
    max_attempts: MaxAttemptsOption = None,
    db: DbOption = None,
    json_out: JsonOption = False,
    quiet: QuietOption = False,
    no_color: NoColorOption = False,
) -> None:
    """Generate the styles of PROMPT in parallel, each branch a durable promise."""
    from imagepipe.providers import DEFAULT_STYLES
    from imagepipe.service import RunSpec, new_run_id, start_run

    spec = RunSpec(prompt, tuple(style) if style else DEFAULT_STYLES, crash)
    invocation = _invocation(max_attempts)
    spec.validate()
    invocation.validate()
    console = _console(no_color)
    with _reporter(console, json_out=json_out, quiet=quiet) as reporter:
        outcome = start_run(_db(db), run_id or new_run_id(), spec, invocation, reporter)
    _finish(console, outcome, json_out=json_out)


@app.command()
@reports_errors
def resume(
    run_id: Annotated[str, typer.Argument(metavar="ID", help="The run to finish.")],
    max_attempts: MaxAttemptsOption = None,
    db: DbOption = None,
    json_out: JsonOption = False,
    quiet: QuietOption = False,
    no_color: NoColorOption = False,
) -> None:
    """Finish an interrupted run: settled branches are read from the store, not redone."""
    from imagepipe.service import resume_run

    invocation = _invocation(max_attempts)
    console = _console(no_color)
    with _reporter(console, json_out=json_out, quiet=quiet) as reporter:
        outcome = resume_run(_db(db), run_id, invocation, reporter)
    _finish(console, outcome, json_out=json_out)


@app.command(name="list")
@reports_errors
def list_(
    db: DbOption = None,
    json_out: Annotated[bool, typer.Option("--json", help="Print a JSON array.")] = False,
    limit: Annotated[
        int | None, typer.Option("--limit", "-n", help="Show at most N runs.", show_default=False)
    ] = None,
    no_color: NoColorOption = False,
) -> None:
    """List the runs in the store, newest first."""
    from imagepipe.errors import BadInput
    from imagepipe.render import print_run_list
    from imagepipe.service import list_runs

    if limit is not None and limit < 1:
        raise BadInput(f"--limit must be at least 1, not {limit}")
    runs = list_runs(_db(db), limit)
    if json_out:
        print(json.dumps([r.to_json() for r in runs]))
    else:
        print_run_list(_console(no_color), runs)


@app.command()
@reports_errors
def show(
    run_id: Annotated[str, typer.Argument(metavar="ID", help="The run to show.")],
    db: DbOption = None,
    json_out: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
    no_color: NoColorOption = False,
) -> None:
    """Show a stored run and each branch: durable id, state, attempts, value or error."""
    from imagepipe.render import print_show
    from imagepipe.service import show_run

    outcome = show_run(_db(db), run_id)
    if json_out:
        print(json.dumps(outcome.show_json()))
    else:
        print_show(_console(no_color), outcome)


@app.command(name="db-path")
def db_path(db: DbOption = None) -> None:
    """Print the store's path; open it with: sqlite3 "$(imagepipe db-path)"."""
    print(_db(db))


def main() -> None:
    app()
