"""Commands that turn a run's images into something to use: ``export`` and ``gallery``."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from imagepipe.cli.common import DbOption, reports_errors, store_url

if TYPE_CHECKING:
    from imagepipe.runs import Branch, RunOutcome

IdArgument = Annotated[str, typer.Argument(metavar="ID", help="The run.")]


def _prompt_of(outcome: RunOutcome, branch: Branch) -> str:
    return branch.args.prompt if branch.args.prompt != "?" else outcome.spec.prompt


def export(
    run_id: IdArgument,
    directory: Annotated[
        Path, typer.Argument(metavar="DIR", help="An empty or new directory to export into.")
    ],
    link: Annotated[
        bool, typer.Option("--link", help="Hard-link the images instead of copying them.")
    ] = False,
    fmt: Annotated[
        str,
        typer.Option("--format", metavar="jsonl|csv", help="metadata.jsonl or metadata.csv."),
    ] = "jsonl",
    db: DbOption = None,
) -> None:
    """Export a run's images as a Hugging Face `imagefolder` data set: DIR/train/ holds the
    files and a metadata.jsonl (file_name, prompt, style, variation, provider, model, size,
    seed, sha256, attempts, request_id, cost_micro_usd, cost_currency). Load it with
    datasets.load_dataset("imagefolder", data_dir=DIR). Rejected branches are listed on
    stderr and left out."""
    from imagepipe.errors import BadInput
    from imagepipe.export import ExportItem, export_dataset
    from imagepipe.run_costs import cost_line, image_micro_usd
    from imagepipe.service import show_run
    from imagepipe.text import escape_control, quoted

    if fmt not in ("jsonl", "csv"):
        raise BadInput(f"--format must be jsonl or csv, not {quoted(fmt)}")
    outcome = show_run(store_url(db), run_id)
    items = []
    for b in outcome.images:
        value = b.value or {}
        if not value.get("path"):
            continue
        width, height = value.get("width"), value.get("height")
        items.append(
            ExportItem(
                source=str(value["path"]),
                prompt=_prompt_of(outcome, b),
                style=b.style,
                variation=b.variation,
                provider=str(value.get("provider") or outcome.spec.provider),
                model=str(value.get("model") or ""),
                size=f"{width}x{height}" if width and height else None,
                seed=value.get("seed"),
                sha256=str(value["sha256"]),
                attempts=b.attempts,
                request_id=value.get("request_id"),
                cost_micro_usd=image_micro_usd(value),
            )
        )
    for b in outcome.branches:
        if b.state != "resolved":
            error = f": {b.error.type}: {b.error.message}" if b.error else ""
            print(
                escape_control(f"not exported: {b.id} ({b.label}) {b.state}{error}"),
                file=sys.stderr,
            )
    if not items:
        raise BadInput(f"run {quoted(run_id)} has no image files to export")
    report = export_dataset(items, directory, link=link, fmt="csv" if fmt == "csv" else "jsonl")
    verb = "linked" if report.linked else "copied"
    print(
        escape_control(
            f"{len(report.files)} images {verb} to {report.data_dir}; metadata: {report.metadata}"
        )
    )
    if cost := cost_line(outcome, attempts=True):
        print(escape_control(cost))


def gallery(
    run_id: IdArgument,
    open_it: Annotated[
        bool, typer.Option("--open", help="Open the page in the web browser.")
    ] = False,
    db: DbOption = None,
) -> None:
    """Write index.html next to a run's images: prompts as rows, styles as columns, each
    cell with its attempts and time (a rejected branch shows its error). The page opens from
    disk, with no server and no network."""
    from imagepipe.errors import BadInput
    from imagepipe.gallery import GalleryCell, GalleryRun, open_in_browser, write_gallery
    from imagepipe.run_costs import branch_cost, cost_line
    from imagepipe.service import show_run
    from imagepipe.text import escape_control, quoted

    outcome = show_run(store_url(db), run_id)
    cells = []
    folders = set()
    for b in outcome.branches:
        value = b.value or {}
        path = value.get("path")
        if path:
            folders.add(Path(path).parent)
        cells.append(
            GalleryCell(
                prompt_index=b.args.prompt_index or 0,
                prompt=_prompt_of(outcome, b),
                style=b.style,
                variation=b.variation,
                state="resolved" if b.state == "resolved" else b.state,  # type: ignore[arg-type]
                image=Path(path) if path else None,
                attempts=b.attempts,
                duration_ms=value.get("duration_ms"),
                error=None if b.error is None else f"{b.error.type}: {b.error.message}",
                cost=None if (cost := branch_cost(b)) is None else f"cost {cost}",
            )
        )
    if not folders:
        raise BadInput(
            f"run {quoted(run_id)} has no image files (a --sim-latency 0 run draws none)"
        )
    target = sorted(folders)[0]
    run = GalleryRun(
        outcome.id, outcome.created_at, tuple(cells), cost=cost_line(outcome, attempts=True)
    )
    page = write_gallery(run, target)
    print(escape_control(str(page)))
    if open_it and not open_in_browser(page):
        print("no web browser could be started; open the file above", file=sys.stderr)


def register(app: typer.Typer) -> None:
    app.command(name="export")(reports_errors(export))
    app.command(name="gallery")(reports_errors(gallery))
