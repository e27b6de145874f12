"""Commands about a run's provider batches: ``cancel``."""

from typing import Annotated

import typer

from imagepipe.cli.common import DbOption, reports_errors, store_url


def cancel(
    run_id: Annotated[str, typer.Argument(metavar="ID", help="The run whose batches to cancel.")],
    db: DbOption = None,
    json_out: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
) -> None:
    """Cancel a run's open batches at the provider (a run sent with --batch).

    The branches stay pending and nothing of the run is changed in the store: the next
    `imagepipe resume ID` (or a `watch` already following the run) collects what the
    cancelled batches finished, then exits 4 for the rest, which `resume` sends in a new
    batch or `resume --no-batch` runs one by one. A run with no open batch: nothing to do."""
    from imagepipe.cancel import cancel_batches
    from imagepipe.text import escape_control

    cancelled = cancel_batches(store_url(db), run_id)
    if json_out:
        import json

        print(json.dumps({"id": run_id, "cancelled": [group.to_json() for group in cancelled]}))
        return
    rid = escape_control(run_id)
    if not cancelled:
        print(f"Run {rid} has no open batch: nothing to cancel.")
        return
    from imagepipe.ui import batch_line

    for group in cancelled:
        print(escape_control(batch_line(group)))
    print(
        f"The run stays pending: `imagepipe resume {rid}` collects what the batches finished; "
        "the branches they did not run stay pending (exit 4), for `resume` to send in a new "
        "batch or `resume --no-batch` to run one by one."
    )


def register(app: typer.Typer) -> None:
    app.command(name="cancel")(reports_errors(cancel))
