"""Commands that only read the store: ``list``, ``show`` and ``db-path``."""

from __future__ import annotations

from typing import Annotated

import typer

from imagepipe.cli.common import (
    DbOption,
    NoColorOption,
    make_console,
    reports_errors,
    store_url,
    write_lines,
)


def list_runs(
    db: DbOption = None,
    json_out: Annotated[bool, typer.Option("--json", help="Print a JSON array.")] = False,
    limit: Annotated[
        int | None,
        typer.Option("--limit", "-n", metavar="N", help="Show at most N runs.", show_default=False),
    ] = None,
    no_color: NoColorOption = False,
) -> None:
    """List the runs in the store, newest first."""
    from imagepipe.errors import BadInput
    from imagepipe.render import print_run_list
    from imagepipe.service import list_runs as listing

    if limit is not None and limit < 1:
        raise BadInput(f"--limit must be at least 1, not {limit}")
    runs = listing(store_url(db), limit)
    if json_out:
        from imagepipe.runs.json_output import list_json

        print(list_json(runs))
    else:
        print_run_list(make_console(no_color), runs)


def show(
    run_id: Annotated[str, typer.Argument(metavar="ID", help="The run to show.")],
    db: DbOption = None,
    json_out: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
    prompt: Annotated[
        int | None,
        typer.Option(
            "--prompt",
            metavar="N",
            help="Of a run over a prompt file: only the branches of its N-th prompt (1 = "
            "the first).",
            show_default=False,
        ),
    ] = None,
    no_color: NoColorOption = False,
) -> None:
    """Show a stored run and each branch: durable id, state, attempts, value or error."""
    import dataclasses

    from imagepipe.errors import BadInput
    from imagepipe.service import show_run

    outcome = show_run(store_url(db), run_id)
    if prompt is not None:
        count = len(outcome.spec.prompts)
        if not 1 <= prompt <= count:
            where = f"1 to {count}" if count else "none: this run has one prompt"
            raise BadInput(f"--prompt must be {where}, not {prompt}")
        chosen = [b for b in outcome.branches if b.args.prompt_index == prompt - 1]
        history = [a for a in outcome.history if a.promise_id in {b.id for b in chosen}]
        outcome = dataclasses.replace(outcome, branches=chosen, history=history)
    if json_out:
        from imagepipe.run_costs import cost_json
        from imagepipe.runs.json_output import show_json

        # ``show`` has read the attempts' history: its failed attempts are counted
        write_lines(show_json(outcome, cost_json(outcome, attempts=True)))
    else:
        from imagepipe.render import print_show  # rich: only for a table

        print_show(make_console(no_color), outcome)


def verify(
    run_id: Annotated[str, typer.Argument(metavar="ID", help="The run whose files to check.")],
    db: DbOption = None,
    fix: Annotated[
        bool,
        typer.Option(
            "--fix",
            help="First finish what a kill left behind: rename images the store recorded "
            "but a killed process had not yet put in place, and remove orphans (images of "
            "attempts whose result was never recorded) and temporary files.",
        ),
    ] = False,
) -> None:
    """Re-hash a run's image files: exit 1 naming each one that is missing or changed."""
    from imagepipe.errors import RunFailed
    from imagepipe.files import verify_images
    from imagepipe.service import fix_run_images, show_run
    from imagepipe.text import escape_control

    if fix:
        report = fix_run_images(store_url(db), run_id)
        print(
            f"run {escape_control(run_id)}: {report.promoted} recorded images put in place, "
            f"{report.removed} orphaned or temporary files removed"
        )
    outcome = show_run(store_url(db), run_id)
    files = [
        (str(b.value["path"]), str(b.value["sha256"]))
        for b in outcome.images
        if b.value and b.value.get("path")
    ]
    problems = verify_images(files)
    for problem in problems:
        print(escape_control(problem.description))
    if problems:
        raise RunFailed(
            f"{len(problems)} of {len(files)} files of run {run_id} are missing or changed"
        )
    print(
        f"{len(files)} files of run {escape_control(run_id)} verified: every one matches its sha256"
    )


def db_path(db: DbOption = None) -> None:
    """Print the store's path; open it with: sqlite3 "$(imagepipe db-path)". A URL is
    printed without its password."""
    from imagepipe.durable.secrets import mask_password
    from imagepipe.text import escape_control

    url = store_url(db)
    print(escape_control(mask_password(url, url)))


def register(app: typer.Typer) -> None:
    app.command(name="list")(reports_errors(list_runs))
    app.command(name="show")(reports_errors(show))
    app.command(name="verify")(reports_errors(verify))
    app.command(name="db-path")(reports_errors(db_path))
