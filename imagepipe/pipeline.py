"""The workflow: fan out one durable branch per style (and variation), fan in, return.

It reads like the reference's ``runImagePipeline``: no retries, no try/except, no
storage here. Parallelism, per-branch retry, replay after a crash and failure isolation
all live below, in :mod:`imagepipe.durable`.

Branches are called with arguments by name; :class:`BranchArgs` is the one reader of a
stored branch's arguments (the UI, the renderer and the scripts use it, never indexes).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, TypedDict

from imagepipe.durable import Handle, RunContext, Step, bind_args
from imagepipe.providers import GeneratedImage, ImageRequest, Provider

__all__ = [
    "BranchArgs",
    "Deps",
    "PipelineResult",
    "generate_image",
    "image_pipeline",
    "variation_label",
]


@dataclass(frozen=True)
class Deps:
    """What branches need from this invocation (not part of the run's identity)."""

    provider: Provider


class PipelineResult(TypedDict):
    prompt: str
    images: list[GeneratedImage]
    total_ms: int


async def generate_image(
    step: Step[Deps], prompt: str, style: str, variation: int = 0, crash: bool = False
) -> GeneratedImage:
    """One branch: one image from the provider, keyed by the branch's durable id."""
    request = ImageRequest(prompt, style, variation, step.id, step.attempt, crash)
    return await step.deps.provider.generate(request)


async def image_pipeline(
    ctx: RunContext[Deps],
    prompt: str,
    styles: list[str],
    crash: bool = False,
    variations: int = 1,
) -> PipelineResult:
    # Fan-out: start every generation at once; begin_run returns a handle immediately.
    handles: list[Handle[GeneratedImage]] = []
    for style in styles:
        for variation in range(variations):
            handles.append(
                ctx.begin_run(
                    generate_image, prompt=prompt, style=style, variation=variation, crash=crash
                )
            )

    # Fan-in: wait for each result. A failing branch is retried on its own meanwhile.
    images: list[GeneratedImage] = []
    for handle in handles:
        images.append(await handle)

    return {"prompt": prompt, "images": images, "total_ms": sum(i["duration_ms"] for i in images)}


@dataclass(frozen=True, slots=True)
class BranchArgs:
    """A ``generate_image`` branch's arguments, by name, defaults filled in."""

    prompt: str
    style: str
    variation: int = 0
    crash: bool = False

    @classmethod
    def read(cls, args: Mapping[str, Any]) -> BranchArgs:
        """From a branch's arguments: the stored object (``{"version": ..}``) or the
        call's keyword arguments."""
        named = bind_args(generate_image, args) if "version" in args else args
        try:
            return cls(
                str(named["prompt"]),
                str(named["style"]),
                int(named.get("variation", 0)),
                bool(named.get("crash", False)),
            )
        except (KeyError, TypeError, ValueError):
            return cls("?", "?", 0, False)

    @property
    def label(self) -> str:
        return variation_label(self.style, self.variation)


def variation_label(style: str, variation: int) -> str:
    """How a branch is named on screen: its style, with ``#n`` for variations n > 0."""
    return style if variation == 0 else f"{style}#{variation}"
