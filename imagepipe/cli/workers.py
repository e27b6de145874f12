"""Commands for detached runs on many processes: ``worker``, ``watch`` and ``workers``."""

import json
import socket
import sys
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
    make_console,
    reports_errors,
    store_url,
)
from imagepipe.text import escape_control

if TYPE_CHECKING:
    from imagepipe.runs.model import Invocation

__all__ = ["register", "watch", "worker", "workers"]


def worker(
    db: DbOption = None,
    once: Annotated[
        bool,
        typer.Option(
            "--once",
            help="Exit once no detached run is left pending and no batch run has a batch "
            "open (tests, cron).",
        ),
    ] = False,
    *,
    invocation: "Invocation",
) -> None:
    """Execute the branches of detached runs (`run --detach`), shared with other workers.

    Claims up to --concurrency branches at a time under leases it renews; a branch whose
    worker died is claimed again once its lease lapses (IMAGEPIPE_LEASE_TIMEOUT). The
    provider and its options come from each run; keys from this worker's environment.
    It also collects the batches of runs sent with `run --batch` (one process a run)."""
    from imagepipe.detached import run_worker

    def lost(branch_id: str) -> None:
        print(
            f"worker: lost branch {escape_control(branch_id)}: another worker took it over; "
            "nothing more of it is written here",
            file=sys.stderr,
        )

    def batch_stop(line: str) -> None:
        print(f"worker: {escape_control(line)}", file=sys.stderr)

    check_prices()  # a broken prices file: exit 2 before any branch is claimed
    stats = run_worker(store_url(db), invocation, once=once, on_lost=lost, on_batch_stop=batch_stop)
    print(
        f"worker {socket.gethostname()}: {stats.claimed} branches claimed, "
        f"{stats.resolved} resolved, {stats.rejected} rejected, {stats.lost} lost; "
        f"{stats.runs_settled} runs settled"
    )


def watch(
    run_id: Annotated[str, typer.Argument(metavar="ID", help="The run to follow.")],
    db: DbOption = None,
    json_out: JsonOption = False,
    quiet: QuietOption = False,
    no_color: NoColorOption = False,
) -> None:
    """Follow a run that other processes execute, until it settles (its exit code).

    A run sent with `run --batch` that nobody else follows is collected here: its batches
    polled and their results recorded as they end (no new batch is sent)."""
    from imagepipe.detached import watch_run

    path = store_url(db)
    execute_and_report(
        lambda reporter: watch_run(path, run_id, reporter),
        json_out=json_out,
        quiet=quiet,
        no_color=no_color,
    )


def workers(
    db: DbOption = None,
    json_out: Annotated[bool, typer.Option("--json", help="Print a JSON array.")] = False,
    no_color: NoColorOption = False,
) -> None:
    """List live workers: host, pid, claimed branches, last heartbeat."""
    from rich.table import Table
    from rich.text import Text

    from imagepipe.detached import list_workers

    found = list_workers(store_url(db))
    if json_out:
        print(
            json.dumps(
                [
                    {
                        "host": w.host,
                        "pid": w.pid,
                        "claimed": w.claimed,
                        "heartbeat_age_s": round(w.heartbeat_age, 3),
                    }
                    for w in found
                ]
            )
        )
        return
    console = make_console(no_color)
    if not found:
        console.print("No live workers. Start one with: imagepipe worker", markup=False)
        return
    table = Table(box=None, header_style="bold")
    for name in ("host", "pid", "claimed", "last heartbeat"):
        table.add_column(name, no_wrap=True)
    for w in found:
        table.add_row(
            Text(escape_control(w.host)), str(w.pid), str(w.claimed), f"{w.heartbeat_age:.1f} s ago"
        )
    console.print(table)


def register(app: typer.Typer) -> None:
    app.command(name="worker")(reports_errors(execution_options(worker)))
    app.command(name="watch")(reports_errors(watch))
    app.command(name="workers")(reports_errors(workers))
