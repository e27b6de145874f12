"""Commands that execute a run: ``run``, ``resume`` and ``retry``."""

import dataclasses
from typing import TYPE_CHECKING, Annotated

import typer

from imagepipe.cli.common import (
    DbOption,
    JsonOption,
    NoColorOption,
    QuietOption,
    check_prices,
    execute_and_report,
    execution_options,
    print_dry_run,
    reports_errors,
    store_url,
)
from imagepipe.errors import BadInput

if TYPE_CHECKING:
    from imagepipe.runs.model import Invocation, RunSpec

IdArgument = Annotated[str, typer.Argument(metavar="ID", help="The run's id.")]


def run(
    prompt: Annotated[
        str | None,
        typer.Argument(
            metavar="[PROMPT]",
            help='What to draw, e.g. "A futuristic city skyline" (or give --prompts FILE).',
            show_default=False,
        ),
    ] = None,
    style: Annotated[
        list[str] | None,
        typer.Option(
            "--style",
            "-s",
            metavar="STYLE",
            help="A style to generate; repeat for several [default: photorealistic, cartoon, "
            "abstract; also built in: watercolor, pixel-art, sketch; or any style text, or "
            "your own template: see `imagepipe styles`].",
            show_default=False,
        ),
    ] = None,
    variations: Annotated[
        int,
        typer.Option(
            "--variations",
            "-n",
            metavar="N",
            help="Images per style; each is its own durable branch.",
        ),
    ] = 1,
    run_id: Annotated[
        str | None,
        typer.Option(
            "--id",
            metavar="ID",
            help="Name the run [default: pipeline-<unix ms>]. Reusing the id of a finished run "
            "shows it; of an unfinished one, resumes it.",
            show_default=False,
        ),
    ] = None,
    crash: Annotated[
        bool,
        typer.Option("--crash", help="Demo: the abstract branch fails its first attempt."),
    ] = False,
    provider: Annotated[
        str,
        typer.Option(
            "--provider",
            "-p",
            metavar="NAME",
            help="Who makes the images: simulated (no key), openai, replicate, or a plugin; "
            "see `imagepipe providers`.",
        ),
    ] = "simulated",
    prompts: Annotated[
        str | None,
        typer.Option(
            "--prompts",
            metavar="FILE",
            help="Many prompts: a .txt file (one a line; # comments), a .csv with a prompt "
            "column or a .jsonl with a prompt key (CSV and JSONL rows may give style and "
            "variations). One run: prompts x styles x variations.",
            show_default=False,
        ),
    ] = None,
    out: Annotated[
        str | None,
        typer.Option(
            "--out",
            metavar="DIR",
            help="Where the image files go [default: <user data dir>/images/<run id>/].",
            show_default=False,
        ),
    ] = None,
    db: DbOption = None,
    detach: Annotated[
        bool,
        typer.Option(
            "--detach",
            help="Record the run and its branches as pending, print its id and exit: "
            "`imagepipe worker` processes execute it; `imagepipe watch ID` follows it.",
        ),
    ] = False,
    dry_run: Annotated[
        bool,
        typer.Option(
            "--dry-run",
            help="Print what the run would do: its branches and requests, its estimated "
            "cost and time; send nothing, write nothing.",
        ),
    ] = False,
    json_out: JsonOption = False,
    quiet: QuietOption = False,
    no_color: NoColorOption = False,
    *,
    invocation: "Invocation",
) -> None:
    """Generate the styles of PROMPT in parallel, each branch a durable promise."""
    from imagepipe.runs.model import RunSpec, new_run_id
    from imagepipe.service import start_run
    from imagepipe.styles import DEFAULT_STYLES

    styles = tuple(style) if style else DEFAULT_STYLES
    if prompts is not None:
        spec = _prompt_file_spec(prompt, prompts, styles, crash, variations, provider)
    elif prompt is None:
        raise BadInput('say what to draw: imagepipe run "a lighthouse", or --prompts FILE')
    else:
        spec = RunSpec(prompt, styles, crash, variations, provider=provider)
    prices = check_prices()  # a broken prices file is bad input before anything starts
    if dry_run:
        print_dry_run(run_id, spec, invocation, prices, json_out=json_out)
        return
    if out is not None:
        invocation = dataclasses.replace(invocation, out_dir=out)
    path, chosen_id = store_url(db), new_run_id() if run_id is None else run_id
    if detach:
        if invocation.batch:
            raise BadInput(
                "--batch and --detach: choose one (workers collect a batch run's results too)"
            )
        from imagepipe.detached import detach_run

        print(detach_run(path, chosen_id, spec, invocation))
        return
    execute_and_report(
        lambda reporter: start_run(path, chosen_id, spec, invocation, reporter),
        json_out=json_out,
        quiet=quiet,
        no_color=no_color,
    )


def _prompt_file_spec(
    prompt: str | None,
    path: str,
    styles: tuple[str, ...],
    crash: bool,
    variations: int,
    provider: str,
) -> "RunSpec":
    """The spec of a run over a prompt file; every row is checked before anything starts."""
    from pathlib import Path

    from imagepipe.prompts import load_prompts, prompts_identity
    from imagepipe.runs.model import RunSpec

    if prompt is not None:
        raise BadInput("give a PROMPT or --prompts FILE, not both")
    rows = load_prompts(Path(path), styles=len(styles), variations=variations)
    label = f"{Path(path).name} ({len(rows):,} prompts)"
    return RunSpec(
        label,
        styles,
        crash,
        variations,
        provider=provider,
        prompts=tuple(prompts_identity(rows)),
    )


def resume(
    run_id: IdArgument,
    db: DbOption = None,
    retry_failed: Annotated[
        bool,
        typer.Option("--retry-failed", help="If the run failed, re-run its rejected branches."),
    ] = False,
    json_out: JsonOption = False,
    quiet: QuietOption = False,
    no_color: NoColorOption = False,
    *,
    invocation: "Invocation",
) -> None:
    """Finish an interrupted run: settled branches are read from the store, not redone."""
    from imagepipe.service import resume_run

    check_prices()
    path = store_url(db)
    execute_and_report(
        lambda reporter: resume_run(path, run_id, invocation, reporter, retry_failed=retry_failed),
        json_out=json_out,
        quiet=quiet,
        no_color=no_color,
    )


def retry(
    run_id: IdArgument,
    db: DbOption = None,
    json_out: JsonOption = False,
    quiet: QuietOption = False,
    no_color: NoColorOption = False,
    *,
    invocation: "Invocation",
) -> None:
    """Re-run only the rejected branches of a failed run; resolved ones stay untouched.

    Same as `imagepipe resume ID --retry-failed`. The branches continue their attempt
    numbers with a fresh budget; `imagepipe show ID` keeps the earlier failures."""
    resume(
        run_id,
        db=db,
        retry_failed=True,
        json_out=json_out,
        quiet=quiet,
        no_color=no_color,
        invocation=invocation,
    )


def register(app: typer.Typer) -> None:
    for command in (run, resume, retry):
        app.command(name=command.__name__)(reports_errors(execution_options(command)))
