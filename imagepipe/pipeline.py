"""The workflow: fan out one durable branch per style (and variation), fan in, return.

It reads like the reference's ``runImagePipeline``: no retries, no try/except, no
storage here. Parallelism, per-branch retry, replay after a crash and failure isolation
all live below, in :mod:`imagepipe.durable`.

A branch asks the run's provider for one image (sub-steps, such as a job's creation, go
through the branch's durable :class:`~imagepipe.durable.Step`), saves it to disk
atomically, and returns what the store keeps of it: the file's path, hash and size, never
its bytes. The arguments of both functions are the fields of the run's model
(:class:`~imagepipe.runs.model.RunSpec`, :class:`~imagepipe.runs.model.BranchArgs`), which
reads them back from the store without importing this module.
"""

from __future__ import annotations

import asyncio
import functools
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, TypedDict

from imagepipe.cost import UNKNOWN, image_cost
from imagepipe.durable import (
    BranchOutcome,
    ErrorInfo,
    Handle,
    PromiseRejected,
    RunContext,
    Step,
    StopRun,
    Workflow,
)
from imagepipe.durable.errors import DrainRun
from imagepipe.errors import BadInput
from imagepipe.prices import FREE_PROVIDERS, current_prices
from imagepipe.providers import AccountError, ImageProvider, ProviderImage, ProviderRequest
from imagepipe.providers.options import ProviderOptions, identity
from imagepipe.styles import render

__all__ = [
    "IMAGE_RUN",
    "BatchMode",
    "Deps",
    "ImageValue",
    "PipelineResult",
    "branch_request",
    "generate_image",
    "image_pipeline",
    "image_value",
    "recorded_images",
]


@dataclass(frozen=True)
class Deps:
    """What branches need from this invocation (not part of the run's identity)."""

    provider: ImageProvider
    options: ProviderOptions
    #: the template of each style, as the run stored them
    templates: Mapping[str, str] = field(default_factory=dict)
    #: where the images go
    out_dir: Path | None = None
    #: how the branches go through a provider's batch mode; None: one request each
    batches: BatchMode | None = None


class ImageValue(TypedDict, total=False):
    """What a resolved branch's promise holds (never the image's bytes)."""

    style: str
    variation: int
    prompt_index: int
    url: str | None
    duration_ms: int
    path: str | None
    sha256: str
    bytes: int
    mime: str
    width: int
    height: int
    provider: str
    model: str | None
    request_id: str | None
    seed: int | None
    revised_prompt: str | None
    usage: dict[str, Any] | None
    #: what the attempt cost (:meth:`imagepipe.cost.Cost.to_json`); none when it was free
    cost: dict[str, Any]
    #: the provider's batch that made it, if one did
    batch: str


class PipelineResult(TypedDict):
    prompt: str
    images: list[ImageValue]
    total_ms: int


class BatchMode(Protocol):
    """How a run's branches go through a provider's batch mode
    (:class:`imagepipe.batches.driver.BatchDriver`): it gets the run's held branches,
    sends them, and settles each with its result as it collects them."""

    async def drive(self, ctx: RunContext[Deps], handles: Sequence[Handle[ImageValue]]) -> None: ...


def branch_request(
    deps: Deps,
    branch_id: str,
    attempt: int,
    prompt: str,
    style: str,
    variation: int = 0,
    crash: bool = False,
) -> ProviderRequest:
    """What the provider is asked for a branch: its style's template applied to its
    prompt, keyed by the branch's durable id."""
    template = deps.templates.get(style, "{prompt}")
    return ProviderRequest(
        prompt=render(template, prompt, style),
        idempotency_key=branch_id,
        attempt=attempt,
        options=deps.options,
        style=style,
        variation=variation,
        subject=prompt,
        crash=crash,
    )


async def generate_image(
    step: Step[Deps],
    prompt: str,
    style: str,
    variation: int = 0,
    crash: bool = False,
    prompt_index: int | None = None,
) -> ImageValue:
    """One branch: one image from the provider, keyed by the branch's durable id, written
    to disk before the branch resolves. ``prompt_index``: the row of a prompt file.

    An error of the account or the set-up (a refused key, no credit, an unknown model, a
    base URL that cannot be used) is not this image's: every branch would meet it, so the
    run drains and stops (:class:`~imagepipe.durable.errors.DrainRun`), this branch and
    the ones not started left pending, for a ``resume`` once it is fixed."""
    deps = step.deps
    request = branch_request(deps, step.id, step.attempt, prompt, style, variation, crash)
    started = time.perf_counter()
    try:
        image = await deps.provider.generate(request, step)
    except AccountError as exc:
        raise DrainRun(exc.message) from exc
    elapsed_ms = round((time.perf_counter() - started) * 1000)
    value, promote = await image_value(
        deps, step.id, image, style, variation, prompt_index, elapsed_ms=elapsed_ms
    )
    if promote is not None:
        # a failed rename leaves it staged, for the next reconciliation to promote
        step.after_recorded(promote)
    if value.get("cost", {}).get("micro_usd") is not None:
        step.cost = {"micro_usd": value["cost"]["micro_usd"]}  # replaces its reservation
    return value


async def image_value(
    deps: Deps,
    branch_id: str,
    image: ProviderImage,
    style: str,
    variation: int,
    prompt_index: int | None,
    *,
    elapsed_ms: int = 0,
    batch_id: str | None = None,
) -> tuple[ImageValue, Callable[[], object] | None]:
    """What a branch that got ``image`` stores, with its image written under a staged
    name; and what makes the staged file the final one, to run once the value is
    recorded (None: no file). ``batch_id``: the provider's batch that made it (priced at
    the batch rate)."""
    value: ImageValue = {
        "style": style,
        "variation": variation,
        "url": image.source_url,
        "duration_ms": elapsed_ms if image.duration_ms is None else image.duration_ms,
        "provider": deps.provider.name,
        "model": image.model,
        "request_id": image.request_id,
    }
    if prompt_index is not None:
        value["prompt_index"] = prompt_index
    if batch_id is not None:
        value["batch"] = batch_id
    promote = None
    if image.data:
        staged, promote = await _stage(
            branch_id, image, deps.out_dir, style, variation, prompt_index
        )
        value.update(staged)
    else:
        value["path"] = None
    for key in ("seed", "revised_prompt", "usage"):
        if getattr(image, key) is not None:
            value[key] = getattr(image, key)
    if deps.provider.name not in FREE_PROVIDERS:  # a free image's value holds no cost
        value["cost"] = _cost(deps, image, batch=batch_id is not None)
    return value, promote


def _cost(deps: Deps, image: ProviderImage, *, batch: bool) -> dict[str, Any]:
    """What the image cost, as its value stores it (see :mod:`imagepipe.cost`). A prices
    file broken since the run was checked leaves the cost unknown, not the image lost."""
    try:
        prices = current_prices()
    except BadInput:
        return UNKNOWN.to_json()
    options = identity(deps.options)
    provider = deps.provider.name
    return image_cost(provider, options, image.model, image.usage, prices, batch=batch).to_json()


async def _stage(
    branch_id: str,
    image: ProviderImage,
    out_dir: Path | None,
    style: str,
    variation: int,
    index: int | None,
) -> tuple[Any, Callable[[], object]]:
    """Write the image under a staged name (in a thread: fsync blocks) and describe its
    final file, which it becomes once the store has recorded this value (the returned
    callable renames it): a process that was taken over meanwhile has its record refused,
    and never replaces the file of the process that took over (see :mod:`imagepipe.files`).

    A disk that refuses the write stops the run, the branch left pending: retrying would
    pay the provider again for an image that cannot be kept."""
    from imagepipe.files import MIME_EXTENSIONS, image_file_name, promote, sniff_mime, stage_image

    assert out_dir is not None, "a run that makes images has an output directory"
    mime = sniff_mime(image.data)
    name = image_file_name(style, variation, MIME_EXTENSIONS[mime], index)
    try:
        staged = await asyncio.to_thread(stage_image, out_dir, name, image.data)
    except OSError as exc:
        raise StopRun(
            f"cannot write the image of {branch_id} to {str(out_dir)!r}: "
            f"{exc.strerror or type(exc).__name__}"
        ) from exc
    described = {key: value for key, value in staged.items() if key != "staged"}
    return described, functools.partial(promote, staged["staged"], staged["path"])


async def image_pipeline(
    ctx: RunContext[Deps],
    prompt: str,
    styles: list[str],
    crash: bool = False,
    variations: int = 1,
    provider: str = "simulated",
    options: Mapping[str, Any] | None = None,
    templates: Mapping[str, str] | None = None,
    prompts: list[dict[str, Any]] | None = None,
) -> PipelineResult:
    # Fan-out: start every generation at once; begin_run returns a handle immediately.
    # A prompt file's row may name its own style and count; its index names its branches.
    # Through a batch, the branches are held (ctx.promise): the batch's results settle them.
    batches = None if ctx.deps is None else ctx.deps.batches  # None: a detached run planned
    launch = ctx.begin_run if batches is None else ctx.promise
    handles: list[Handle[ImageValue]] = []
    for index, row in enumerate(prompts or [{"prompt": prompt}]):
        rows_index = {"prompt_index": index} if prompts else {}
        for style in [row["style"]] if row.get("style") else styles:
            for variation in range(row.get("variations") or variations):
                handles.append(
                    launch(
                        generate_image,
                        prompt=row["prompt"],
                        style=style,
                        variation=variation,
                        crash=crash,
                        **rows_index,
                    )
                )
    if batches is not None:
        await batches.drive(ctx, handles)

    # Fan-in: wait for each result. A failing branch is retried on its own meanwhile.
    images: list[ImageValue] = []
    for handle in handles:
        images.append(await handle)

    return {"prompt": prompt, "images": images, "total_ms": sum(i["duration_ms"] for i in images)}


def summarize_run(branches: Sequence[BranchOutcome]) -> tuple[Any, ErrorInfo | None]:
    """What a run's root settles with, whoever settles it: the images' count and time, or
    the first rejected branch (in launch order) as the run's error."""
    for branch in branches:
        if branch.state == "rejected":
            error = branch.error or ErrorInfo("Error", "rejected")
            message = str(PromiseRejected(branch.id, error))
            return None, ErrorInfo("BranchRejected", message, retryable=False)
    total = sum(int((b.value or {}).get("duration_ms", 0)) for b in branches)
    return {"images": len(branches), "total_ms": total}, None


#: the run the core executes: :func:`image_pipeline`, settled by :func:`summarize_run`
IMAGE_RUN = Workflow(image_pipeline, summarize=summarize_run)


def recorded_images(directory: Path, outcomes: Iterable[tuple[str, Any]]) -> dict[str, str]:
    """The file name and sha256 of each resolved branch's image in ``directory``, from the
    branches' (state, value)."""
    recorded: dict[str, str] = {}
    for state, value in outcomes:
        if state == "resolved" and isinstance(value, Mapping) and value.get("path"):
            path = Path(str(value["path"]))
            if path.parent == directory:
                recorded[path.name] = str(value.get("sha256", ""))
    return recorded
