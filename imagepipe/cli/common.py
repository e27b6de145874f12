"""What every command shares: the app, the error handler, consoles and options."""

import functools
import inspect
import os
import stat
import sys
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, ParamSpec, TypeVar

import typer
from typer.core import TyperGroup

from imagepipe.errors import (
    BadInput,
    CredentialsRejected,
    ImagepipeError,
    RunFailed,
    UnusableStore,
)
from imagepipe.text import escape_control, invalid_utf8, quoted

if TYPE_CHECKING:
    from rich.console import Console

    from imagepipe.prices import PriceTable
    from imagepipe.runs.model import Invocation, RunSpec
    from imagepipe.runs.outcome import RunOutcome
    from imagepipe.runs.reporting import Reporter

P = ParamSpec("P")
R = TypeVar("R")


class _Group(TyperGroup):
    """Takes llm's ``-o KEY VALUE`` form: click options take one value each, so the pair is
    joined into ``KEY=VALUE`` before parsing (``-o KEY=VALUE`` works as it is)."""

    def parse_args(self, ctx: Any, args: list[str]) -> list[str]:  # typer's own click Context
        return super().parse_args(ctx, join_option_pairs(args))


def join_option_pairs(args: list[str]) -> list[str]:
    joined: list[str] = []
    rest = iter(args)
    for arg in rest:
        joined.append(arg)
        if arg in ("-o", "--option"):
            key = next(rest, None)
            if key is None:
                break
            if "=" in key:
                joined.append(key)
                continue
            value = next(rest, None)
            joined.append(key if value is None else f"{key}={value}")
        elif arg == "--":
            joined.extend(rest)
    return joined


def _pair(joined: str) -> tuple[str, str]:
    key, sep, value = joined.partition("=")
    if not sep:
        from imagepipe.errors import BadInput

        raise BadInput(f"-o {joined!r} needs a value: -o KEY VALUE")
    return key, value


app = typer.Typer(
    cls=_Group,
    name="imagepipe",
    help=(
        "Ask an image provider for many variations of a prompt (or of a file of prompts), "
        "in parallel, and save every image to disk. Every branch is a durable promise in a "
        "store (SQLite by default, or PostgreSQL): a run killed at any moment is finished "
        "by `imagepipe resume ID` without redoing, or paying again for, what succeeded."
    ),
    epilog=(
        'Example: imagepipe run "A futuristic city skyline"   '
        "Settings: IMAGEPIPE_DB (the store). For tests and demos only: IMAGEPIPE_TIME_SCALE "
        "(e.g. 0.01) scales every simulated duration and every real retry back-off."
    ),
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
    context_settings={"help_option_names": ["-h", "--help"]},
)

DbOption = Annotated[
    str | None,
    typer.Option(
        "--db",
        metavar="URL",
        envvar="IMAGEPIPE_DB",
        help="The store: a SQLite file path (or sqlite:///path), or "
        "postgresql://user:password@host/db [env: IMAGEPIPE_DB; default: imagepipe.db in "
        "the user data directory, see `imagepipe db-path`].",
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


def _fail(message: str, code: int) -> typer.Exit:
    # The last guard: whatever user or stored text a message quotes, it stays one line
    # and cannot drive the terminal.
    print(f"error: {escape_control(message)}", file=sys.stderr)
    return typer.Exit(code)


#: how an error names each text parameter a command takes
_TEXT_PARAMETERS = {
    "prompt": "the prompt",
    "run_id": "the run id",
    "style": "--style",
    "db": "--db",
    "out": "--out",  # stored with the run, and in each image's path
    "prompts": "--prompts",  # its file name is stored as the run's label
    "provider": "--provider",
}


def _check_utf8(arguments: dict[str, Any]) -> None:
    """Refuse text that was not valid UTF-8 on the command line (or in IMAGEPIPE_DB).

    Python keeps such bytes as lone surrogates, which SQLite and the terminal cannot
    encode: refused here, before anything opens or creates the store."""
    for name, label in _TEXT_PARAMETERS.items():
        value = arguments.get(name)
        for text in value if isinstance(value, list) else [value]:
            if text is not None and invalid_utf8(str(text)):
                if name == "db":  # a URL: shown without its password
                    from imagepipe.durable.secrets import mask_password

                    text = mask_password(str(text), str(text))
                raise BadInput(f"{label} is not valid UTF-8: {quoted(str(text))}")
    for joined in arguments.get("option") or ():  # -o KEY VALUE, joined as KEY=VALUE
        key, _, value = str(joined).partition("=")
        if invalid_utf8(key):
            raise BadInput(f"-o: the option name is not valid UTF-8: {quoted(key)}")
        if invalid_utf8(value):
            raise BadInput(f"-o {escape_control(key)} is not valid UTF-8: {quoted(value)}")


def reports_errors(command: Callable[P, R]) -> Callable[P, R]:
    """The one place an :class:`ImagepipeError` becomes a line on stderr and an exit code."""

    @functools.wraps(command)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            _check_utf8(kwargs)
            return command(*args, **kwargs)
        except ImagepipeError as exc:
            raise _fail(exc.message, exc.exit_code) from None
        except KeyboardInterrupt:  # before or after a run: typer would say "Aborted!", exit 1
            from imagepipe.interrupts import interrupted

            raise interrupted() from None
        except Exception as exc:
            from imagepipe.durable import DurableError
            from imagepipe.errors import from_core

            if not isinstance(exc, DurableError):
                raise
            error = from_core(exc)
            raise _fail(error.message, error.exit_code) from None

    return wrapper


# -- execution options: how this invocation runs, not what the run is -----------------

_EXECUTION_OPTIONS: dict[str, tuple[Any, Any]] = {
    "max_attempts": (
        int | None,
        typer.Option(
            "--max-attempts",
            metavar="N",
            help="Failed attempts a branch may have before it is rejected [default: 5; on "
            "resume: the run's own].",
            show_default=False,
        ),
    ),
    "concurrency": (
        int | None,
        typer.Option(
            "--concurrency",
            "-c",
            metavar="K",
            help="At most this many provider calls in flight; the rest wait as queued "
            "[default: the provider's own: 16 simulated, 4 openai, 8 replicate].",
            show_default=False,
        ),
    ),
    "attempt_timeout": (
        float | None,
        typer.Option(
            "--attempt-timeout",
            metavar="SECONDS",
            help="Seconds one attempt may take; a timeout is a retryable failure [default: none].",
            show_default=False,
        ),
    ),
    "sim_latency": (
        int | None,
        typer.Option(
            "--sim-latency",
            metavar="MS",
            help="Simulated provider latency in ms for every style (0 = no sleep), for "
            "benchmarks [default: the style's own: 1200/800/1000].",
            show_default=False,
        ),
    ),
    "option": (
        list[str] | None,
        typer.Option(
            "--option",
            "-o",
            metavar="KEY VALUE",
            help="A provider option, repeatable: -o model gpt-image-1 -o size 1024x1024. "
            "Options that change the image are part of the run's identity; connection "
            "settings (base_url, timeout) are not. See `imagepipe providers`.",
            show_default=False,
        ),
    ),
    "rpm": (
        int | None,
        typer.Option(
            "--rpm",
            metavar="N",
            help="At most N provider requests a minute, shared by all branches: one every "
            "60/N seconds, never a burst [default: the provider's stated limit, if any].",
            show_default=False,
        ),
    ),
    "max_cost": (
        str | None,
        typer.Option(
            "--max-cost",
            metavar="USD",
            help="Spend at most this many US dollars on the run, across crashes, resumes "
            "and workers: an attempt starts only if its worst case fits; then the run "
            "stops, the rest pending. Kept with the run; resume --max-cost raises it.",
            show_default=False,
        ),
    ),
    "max_images": (
        int | None,
        typer.Option(
            "--max-images",
            metavar="N",
            help="Pay for at most N images on the run (attempts that may have been paid "
            "count), kept with it as --max-cost is.",
            show_default=False,
        ),
    ),
    "batch": (
        bool | None,
        typer.Option(
            "--batch/--no-batch",
            help="--batch: send the branches through the provider's Batch API (openai, "
            "GPT Image models): half the price, results within 24 hours; the command "
            "returns once the batches are created, and `imagepipe watch ID` or `imagepipe "
            "resume ID` collects them. On resume, --no-batch runs the branches no batch "
            "holds one by one instead [default: the run's own way].",
            show_default=False,
        ),
    ),
}


def execution_options(command: Callable[..., R]) -> Callable[..., R]:
    """Give a command the execution options above, delivered as ``invocation=``."""
    # The commands' modules do not use ``from __future__ import annotations``: their
    # annotations are the real types typer reads, all but ``invocation``'s, which stays
    # the string "Invocation" so that --help need not import the run model (and the
    # durable core and asyncio behind it); typer never sees it.
    signature = inspect.signature(command)
    own = [p for p in signature.parameters.values() if p.name != "invocation"]
    extra = [
        inspect.Parameter(
            name,
            inspect.Parameter.KEYWORD_ONLY,
            default=None,
            annotation=Annotated[kind, option],
        )
        for name, (kind, option) in _EXECUTION_OPTIONS.items()
    ]

    @functools.wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> R:
        chosen = {name: kwargs.pop(name) for name in _EXECUTION_OPTIONS}
        return command(*args, invocation=make_invocation(**chosen), **kwargs)

    parameters = own + extra
    wrapper.__signature__ = signature.replace(parameters=parameters)  # type: ignore[attr-defined]
    # typer also reads type hints; give it the resolved ones, without ``invocation``.
    wrapper.__annotations__ = {p.name: p.annotation for p in parameters} | {"return": None}
    return wrapper


def make_invocation(
    *,
    max_attempts: int | None = None,
    concurrency: int | None = None,
    attempt_timeout: float | None = None,
    sim_latency: int | None = None,
    option: list[str] | None = None,
    rpm: int | None = None,
    max_cost: str | None = None,
    max_images: int | None = None,
    batch: bool | None = None,
) -> "Invocation":
    from imagepipe.runs.model import Invocation
    from imagepipe.settings import check_provider_settings, time_scale

    check_provider_settings()
    return Invocation(  # validated by the service before it opens the store
        max_attempts=max_attempts,
        concurrency=concurrency,
        time_scale=time_scale(),
        sim_latency_ms=sim_latency,
        attempt_timeout=attempt_timeout,
        option_pairs=tuple(_pair(joined) for joined in option or ()),
        rpm=rpm,
        max_cost=max_cost,
        max_images=max_images,
        batch=batch,
    )


# -- prices and dry runs -------------------------------------------------------------


def check_prices() -> "PriceTable":
    """The price table, with the user's prices file: a broken one is bad input (exit 2)
    before anything is written."""
    from imagepipe.prices import current_prices

    return current_prices()


def print_dry_run(
    run_id: str | None,
    spec: "RunSpec",
    invocation: "Invocation",
    prices: "PriceTable",
    *,
    json_out: bool,
) -> None:
    """``run --dry-run``: the run checked as ``run`` checks it, planned, printed; no
    store opened, no folder made, nothing sent (see :mod:`imagepipe.dryrun`)."""
    from imagepipe.budget import caps_of
    from imagepipe.dryrun import plan_run, spec_for_dry_run
    from imagepipe.runs.model import validate_run_id

    if run_id is not None:
        validate_run_id(run_id)
    spec.validate()
    invocation.validate()
    spec = spec_for_dry_run(spec, invocation)
    if invocation.batch:  # refused as run refuses it: no batch mode, too many batches
        from imagepipe.batches.setup import check_spec_batchable

        check_spec_batchable(spec, invocation)
    caps_of(invocation).check_priced(spec.provider, spec.options, prices)  # as run refuses it
    plan = plan_run(run_id, spec, invocation, prices)
    if json_out:
        import json

        print(json.dumps(plan.to_json()))
    else:
        print("\n".join(plan.lines()))


# -- where things go -----------------------------------------------------------------


def store_url(db: str | None) -> str:
    """The store the command uses: ``--db`` / ``IMAGEPIPE_DB``, else the default file. A
    file path that names something other than a regular file (a directory, /dev/null, a
    fifo) is refused with exit 2, before SQLite opens it and writes a journal beside it."""
    from imagepipe.settings import default_db_path

    if db and "://" in db:
        scheme = db.partition("://")[0]
        if scheme not in ("sqlite", "postgresql", "postgres"):
            from imagepipe.durable.secrets import mask_password

            raise UnusableStore(
                f"--db {quoted(mask_password(db, db))} is not a store URL: use a file path, "
                "sqlite:///path/file.db or postgresql://user:password@host/dbname"
            )
        return db
    if db:
        path = Path(db).expanduser()
    else:
        path = default_db_path()
        path.parent.mkdir(parents=True, exist_ok=True)
    _check_regular_file(path)
    return str(path)


def _check_regular_file(path: Path) -> None:
    try:
        mode = path.stat().st_mode  # follows symlinks: a link to a database file is fine
    except OSError:
        return  # absent (created later) or unreadable: the store says which, precisely
    if stat.S_ISDIR(mode):
        raise UnusableStore(f"--db {path} is a directory, not a database file")
    if not stat.S_ISREG(mode):
        raise UnusableStore(f"--db {path} is not a regular file")


def write_lines(pieces: Iterable[str]) -> None:
    """Write a JSON document that comes in pieces, then a newline."""
    write = sys.stdout.write
    for piece in pieces:
        write(piece)
    write("\n")


def make_console(no_color: bool) -> "Console":
    from rich.console import Console

    console = Console(no_color=True if no_color else None, highlight=False)
    if not console.is_terminal and "COLUMNS" not in os.environ:
        console.width = 200  # piped: do not cut URLs at rich's default of 80 columns
    return console


def execute_and_report(
    call: Callable[["Reporter"], "RunOutcome"], *, json_out: bool, quiet: bool, no_color: bool
) -> None:
    """Run ``call`` with the right reporter, then print its outcome (rich only if needed).

    Live table in a terminal, plain lines elsewhere, nothing for --json and --quiet. A
    failed run then exits 1 naming its first rejected branch."""
    from imagepipe.runs.reporting import QuietReporter

    if json_out:
        from imagepipe.run_costs import batch_estimates, cost_json
        from imagepipe.runs.json_output import result_json, submitted_json

        outcome = call(QuietReporter())
        if outcome.submitted:  # run --batch: its batches are created, nothing to show yet
            write_lines(submitted_json(outcome, *batch_estimates(outcome)))
        else:
            write_lines(result_json(outcome, cost_json(outcome, attempts=False)))
    else:
        from imagepipe.render import print_outcome, print_submitted
        from imagepipe.run_costs import batch_estimates
        from imagepipe.ui import LiveReporter, PlainReporter

        console = make_console(no_color)
        if quiet:
            outcome = call(QuietReporter())
        elif console.is_terminal and not console.is_dumb_terminal:
            with LiveReporter(console) as live:
                outcome = call(live)
        else:
            outcome = call(PlainReporter(console))
        if outcome.submitted:
            print_submitted(console, outcome, *batch_estimates(outcome))
        else:
            print_outcome(console, outcome)
    if outcome.state == "failed":
        failed = outcome.failures
        first = failed[0]
        detail = f"{first.style} ({first.id}): {first.error.message}" if first.error else first.id
        # A missing or refused key fails every branch alike: that is bad input (exit 2),
        # not a run that failed on its own (exit 1). The exit code comes from the class of
        # the branches' errors (CredentialsError.exit_code), found by its stored name.
        from imagepipe.providers.base import exit_code_of

        code = max((exit_code_of(b.error.type) for b in failed if b.error), default=1)
        bad_key = code == CredentialsRejected.exit_code
        raise (CredentialsRejected if bad_key else RunFailed)(
            f"run {outcome.id} failed: {len(failed)} of {len(outcome.branches)} branches "
            f"rejected, first {detail}; retry them with: imagepipe retry {outcome.id}"
        )
