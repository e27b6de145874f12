"""What a run is: plain data, validated, that neither executes nor prints anything.

- :class:`RunSpec` — the identity of a run (prompt, styles, crash, variations, provider)
- :class:`Invocation` — how this process executes it (budget, concurrency, options)
- :class:`BranchArgs` — a branch's arguments, read from the store or from an event
- :class:`Branch` — one branch as a command shows it, with its label

The workflow (:mod:`imagepipe.pipeline`) is called with these arguments; this module does
not import it, so that whatever shows a run (the console, the gallery) needs only the
model. Stored arguments are named by the core's one reader, :func:`bind_args`, from the
workflow's signatures as written here (:func:`_run_parameters`,
:func:`_branch_parameters`); tests/test_runs_model.py holds them equal to the workflow's.
"""

from __future__ import annotations

import re
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from imagepipe.durable import ErrorInfo, Handle, PromiseRecord, bind_args
from imagepipe.errors import BadInput
from imagepipe.styles import validate_style
from imagepipe.text import quoted

__all__ = [
    "DEFAULT_CONCURRENCY",
    "DEFAULT_MAX_ATTEMPTS",
    "Branch",
    "BranchArgs",
    "Invocation",
    "RunSpec",
    "image_location",
    "new_run_id",
    "validate_run_id",
    "variation_label",
]

#: Provider calls in flight by default. Image APIs limit concurrent requests per key (a
#: handful to a few dozen); 16 keeps a burst within common tiers while the default three
#: styles, and any few variations, still all run at once.
DEFAULT_CONCURRENCY = 16
#: failed attempts a branch may have before it is rejected, unless the run says otherwise
DEFAULT_MAX_ATTEMPTS = 5
MAX_PROMPT = 4000
MAX_VARIATIONS = 100_000
#: what one run may hold: a branch costs under 1 KB while it runs (measured), so a run of
#: this size stays well under 1 GB
MAX_BRANCHES = 200_000
#: a day: longer is a typo, and nan or inf would make asyncio's timeout meaningless
MAX_ATTEMPT_TIMEOUT = 86_400.0
_RUN_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.:-]{0,199}")
_CHILD_SUFFIX = re.compile(r"\.\d+$")


def _run_parameters(
    ctx: object,
    prompt: str,
    styles: list[str],
    crash: bool = False,
    variations: int = 1,
    provider: str = "simulated",
    options: Mapping[str, Any] | None = None,
    templates: Mapping[str, str] | None = None,
    prompts: list[dict[str, Any]] | None = None,
) -> None:
    """The signature of the workflow (``image_pipeline``), by which :func:`bind_args`
    names a run's stored arguments and fills in their defaults."""


def _branch_parameters(
    step: object,
    prompt: str,
    style: str,
    variation: int = 0,
    crash: bool = False,
    prompt_index: int | None = None,
) -> None:
    """The signature of the workflow's branch (``generate_image``), by which
    :func:`bind_args` names a branch's stored arguments and fills in their defaults."""


# -- what a run is -------------------------------------------------------------------


@dataclass(frozen=True)
class RunSpec:
    """The identity of a run: reusing an id with a different spec is refused. Its fields
    are the workflow's arguments (``image_pipeline``)."""

    prompt: str
    styles: tuple[str, ...]
    crash: bool = False
    variations: int = 1
    #: the provider and the options that change the image (not its connection settings)
    provider: str = "simulated"
    options: Mapping[str, Any] = field(default_factory=dict)
    #: the template of each style, fixed when the run starts
    templates: Mapping[str, str] = field(default_factory=dict)
    #: the rows of a prompt file (``prompts.prompts_identity``); empty for one prompt
    prompts: tuple[Mapping[str, Any], ...] = ()

    #: what ``imagepipe run`` with another spec for the same id is refused over, in order
    FIELDS = (
        "prompts",
        "prompt",
        "styles",
        "crash",
        "variations",
        "provider",
        "options",
        "templates",
    )

    @property
    def branch_count(self) -> int:
        if not self.prompts:
            return len(self.styles) * self.variations
        return sum(
            (1 if row.get("style") else len(self.styles))
            * (row.get("variations") or self.variations)
            for row in self.prompts
        )

    @property
    def all_styles(self) -> list[str]:
        """Every style a branch uses, in first-use order."""
        seen = dict.fromkeys(self.styles if not self.prompts else ())
        for row in self.prompts:
            for style in [row["style"]] if row.get("style") else self.styles:
                seen.setdefault(style)
        return list(seen)

    def kwargs(self) -> dict[str, Any]:
        """The workflow's arguments by name, as the run's root stores them."""
        return {
            "prompt": self.prompt,
            "styles": list(self.styles),
            "crash": self.crash,
            "variations": self.variations,
            "provider": self.provider,
            "options": dict(self.options),
            "templates": dict(self.templates),
            **({"prompts": [dict(row) for row in self.prompts]} if self.prompts else {}),
        }

    @classmethod
    def from_stored(cls, args: Mapping[str, Any]) -> RunSpec:
        """The spec of a stored run, from its root's stored arguments. Runs stored before
        styles were templates get the templates they were made with: none."""
        named = bind_args(_run_parameters, args)
        return cls(
            str(named["prompt"]),
            tuple(named["styles"]),
            bool(named["crash"]),
            int(named["variations"]),
            str(named["provider"]),
            dict(named["options"] or {}),
            dict(named["templates"] or {}),
            tuple(named["prompts"] or ()),
        )

    def validate(self) -> None:
        if not self.prompt.strip():
            raise BadInput('the prompt is empty; say what to draw: imagepipe run "a lighthouse"')
        if len(self.prompt) > MAX_PROMPT:
            raise BadInput(f"the prompt has {len(self.prompt)} characters; at most {MAX_PROMPT}")
        if not self.styles:
            raise BadInput("no style chosen; pass --style at least once")
        seen: set[str] = set()
        for style in self.styles:
            validate_style(style)
            if style in seen:
                raise BadInput(f"style {quoted(style)} is given twice")
            seen.add(style)
        if not 1 <= self.variations <= MAX_VARIATIONS:
            raise BadInput(
                f"--variations must be between 1 and {MAX_VARIATIONS}, not {self.variations}"
            )
        branches = self.branch_count
        if branches > MAX_BRANCHES:
            raise BadInput(
                f"this run would have {branches:,} branches; one run holds at most "
                f"{MAX_BRANCHES:,}: split it into several runs"
            )


@dataclass(frozen=True)
class Invocation:
    """How this process executes a run. Not part of the run's identity."""

    max_attempts: int | None = None  # None: the value stored with the run (default 5)
    concurrency: int | None = None
    time_scale: float = 1.0
    sim_latency_ms: int | None = None
    attempt_timeout: float | None = None
    #: ``-o KEY VALUE`` pairs as given (identity options are checked against the run's)
    option_pairs: tuple[tuple[str, str], ...] = ()
    #: client-side requests per minute to the provider, shared by all branches
    rpm: int | None = None
    #: where to write the images (default: the run's own directory)
    out_dir: str | None = None
    #: ``--max-cost`` as typed (US dollars) and ``--max-images``: the run's caps, kept
    #: with it (None: keep the stored ones)
    max_cost: str | None = None
    max_images: int | None = None
    #: ``--batch`` (True) or ``--no-batch`` (False); None: the run's own way
    batch: bool | None = None

    def validate(self) -> None:
        """The settings checked (the caps are, by :func:`imagepipe.budget.caps_of`)."""
        if self.max_attempts is not None and self.max_attempts < 1:
            raise BadInput(f"--max-attempts must be at least 1, not {self.max_attempts}")
        if self.concurrency is not None and self.concurrency < 1:
            raise BadInput(f"--concurrency must be at least 1, not {self.concurrency}")
        if self.sim_latency_ms is not None and self.sim_latency_ms < 0:
            raise BadInput(f"--sim-latency must be 0 or more, not {self.sim_latency_ms}")
        timeout = self.attempt_timeout
        if timeout is not None and not (0 < timeout <= MAX_ATTEMPT_TIMEOUT):
            raise BadInput(
                f"--attempt-timeout must be a number of seconds above 0 and at most "
                f"{MAX_ATTEMPT_TIMEOUT:g}, not {timeout}"
            )
        if self.rpm is not None and self.rpm < 1:
            raise BadInput(f"--rpm must be at least 1, not {self.rpm}")


def validate_run_id(run_id: str) -> None:
    if not run_id:
        raise BadInput("the run id is empty; name the run or omit --id for a generated one")
    if not _RUN_ID.fullmatch(run_id):
        raise BadInput(
            f"run id {quoted(run_id)} is not valid: use up to 200 letters, digits and _ . : -"
        )
    if _CHILD_SUFFIX.search(run_id):
        raise BadInput(f"run id {quoted(run_id)} ends like a branch id (.N); choose another")


def new_run_id() -> str:
    return f"pipeline-{int(time.time() * 1000)}"


# -- its branches --------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class BranchArgs:
    """A branch's arguments, by name, defaults filled in: those of the workflow's branch
    (``generate_image``)."""

    prompt: str
    style: str
    variation: int = 0
    crash: bool = False
    #: the row of a prompt file, None for a run of one prompt
    prompt_index: int | None = None

    @classmethod
    def read(cls, args: Mapping[str, Any]) -> BranchArgs:
        """From a branch's arguments: the stored object (``{"version": ..}``) or the
        call's keyword arguments (an event's)."""
        named = args if "version" not in args else bind_args(_branch_parameters, args)
        try:
            index = named.get("prompt_index")
            return cls(
                str(named["prompt"]),
                str(named["style"]),
                int(named.get("variation", 0)),
                bool(named.get("crash", False)),
                None if index is None else int(index),
            )
        except (KeyError, TypeError, ValueError):
            return cls("?", "?", 0, False)

    @property
    def label(self) -> str:
        """``style#n``, after ``#row`` for a prompt file's branch: ``#3 cartoon#1``."""
        label = variation_label(self.style, self.variation)
        return label if self.prompt_index is None else f"#{self.prompt_index + 1} {label}"


def variation_label(style: str, variation: int) -> str:
    """How a branch is named on screen: its style, with ``#n`` for variations n > 0."""
    return style if variation == 0 else f"{style}#{variation}"


def image_location(value: Mapping[str, Any]) -> str | None:
    """Where a branch's image is, as a line of output shows it: the provider's URL where
    there is one (the simulated provider keeps the reference's), else the file."""
    location = value.get("url") or value.get("path")
    return None if location is None else str(location)


@dataclass(frozen=True, slots=True)
class Branch:
    """One branch as a command shows it. Its arguments are read only when asked for
    (``args``): listing a resolved run of 100,000 branches needs their values, not them."""

    id: str
    #: the branch's arguments as stored or as called; read them with ``args``
    raw_args: Mapping[str, Any]
    state: str
    attempts: int
    value: dict[str, Any] | None
    error: ErrorInfo | None
    #: True when the outcome was read from the store, not computed by this invocation
    replayed: bool

    @property
    def args(self) -> BranchArgs:
        return BranchArgs.read(self.raw_args)

    @property
    def style(self) -> str:
        value = self.value
        return str(value["style"]) if value and "style" in value else self.args.style

    @property
    def variation(self) -> int:
        return self.args.variation

    @property
    def label(self) -> str:
        return self.args.label

    @classmethod
    def from_record(cls, record: PromiseRecord) -> Branch:
        """A branch as stored."""
        return cls(
            record.id,
            record.args,
            record.state,
            record.attempts,
            record.value,
            record.error,
            True,
        )

    @classmethod
    def from_handle(cls, handle: Handle[Any]) -> Branch:
        """A branch as this invocation launched it (and settled it, or read it)."""
        return cls(
            handle.id,
            handle.args,
            handle.state,
            handle.attempts,
            handle.value,
            handle.error,
            handle.replayed,
        )
