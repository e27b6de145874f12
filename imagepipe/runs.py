"""What a run is and what it produced: plain data, validated, with its JSON shapes.

- :class:`RunSpec` — the identity of a run (prompt, styles, crash, variations)
- :class:`Invocation` — how this process executes it (budget, concurrency, faults)
- :class:`RunOutcome` / :class:`Branch` — the stored result, as ``run``/``show`` print it
- :class:`Reporter` — what the commands tell while they work
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol, overload

from imagepipe.cost import cost_json_of
from imagepipe.durable import ErrorInfo, Handle, PromiseRecord, bind_args
from imagepipe.durable.events import Event
from imagepipe.durable.records import AttemptRecord, ChildColumns
from imagepipe.errors import BadInput, StoreFailed
from imagepipe.json_stream import EncodedItems, json_chunks
from imagepipe.pipeline import BranchArgs, image_pipeline
from imagepipe.providers import Faults
from imagepipe.styles import validate_style
from imagepipe.text import quoted

if TYPE_CHECKING:
    from imagepipe.budget import Caps
    from imagepipe.cost import Spending

__all__ = [
    "DEFAULT_CONCURRENCY",
    "DEFAULT_MAX_ATTEMPTS",
    "Branch",
    "Invocation",
    "LaunchedBranches",
    "QuietReporter",
    "Reporter",
    "RunInfo",
    "RunOutcome",
    "RunSpec",
    "RunSummary",
    "StoredBranches",
    "duration_ms",
    "new_run_id",
    "run_state",
    "validate_run_id",
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
_encode = json.JSONEncoder().encode


# -- what a run is -------------------------------------------------------------------


@dataclass(frozen=True)
class RunSpec:
    """The identity of a run: reusing an id with a different spec is refused."""

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
        named = bind_args(image_pipeline, args)
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
    faults: Faults = field(default_factory=Faults)
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

    def caps(self) -> Caps:
        """The caps given, checked: bad input otherwise."""
        from imagepipe.budget import Caps, parse_max_cost

        max_cost = None if self.max_cost is None else parse_max_cost(self.max_cost)
        caps = Caps(max_cost, self.max_images)
        caps.validate()
        return caps

    def validate(self) -> None:
        self.caps()
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
        for style in sorted(self.faults.fail_styles):
            validate_style(style)
        if self.rpm is not None and self.rpm < 1:
            raise BadInput(f"--rpm must be at least 1, not {self.rpm}")
        for name, rate in (
            ("--fail-rate", self.faults.fail_rate),
            ("--hang-rate", self.faults.hang_rate),
        ):
            if not 0 <= rate <= 1:
                raise BadInput(f"{name} must be between 0 and 1, not {rate}")


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


# -- what a run produced -------------------------------------------------------------


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


class _BranchView(Sequence[Branch]):
    """A run's branches, each built only when it is asked for (by :meth:`branch`)."""

    __slots__ = ()

    def branch(self, index: int) -> Branch:
        raise NotImplementedError

    @overload
    def __getitem__(self, index: int) -> Branch: ...

    @overload
    def __getitem__(self, index: slice) -> list[Branch]: ...

    def __getitem__(self, index: int | slice) -> Branch | list[Branch]:
        if isinstance(index, slice):
            return [self.branch(i) for i in range(len(self))[index]]
        return self.branch(index)


class LaunchedBranches(_BranchView):
    """The branches of a run this invocation executed, read from its handles as they are
    asked for: a 100,000-branch run then holds its handles, not also a :class:`Branch`
    for each (~10 MB at the end of the run, its peak memory, measured)."""

    __slots__ = ("_handles",)

    def __init__(self, handles: Sequence[Handle[Any]]) -> None:
        self._handles = handles

    def __len__(self) -> int:
        return len(self._handles)

    def branch(self, index: int) -> Branch:
        return Branch.from_handle(self._handles[index])

    def __iter__(self) -> Iterator[Branch]:
        return map(Branch.from_handle, self._handles)


class StoredBranches(_BranchView):
    """The branches of a run read back from the store, column by column: a
    :class:`Branch` is built only for a branch asked for, and the JSON shapes are written
    from the columns (``show --json`` of a resolved run of 100,000 branches: 3.8 s as
    records, ~1 s so; measured)."""

    def __init__(self, columns: ChildColumns) -> None:
        self.columns = columns

    __slots__ = ("columns",)

    def __len__(self) -> int:
        return len(self.columns)

    def branch(self, index: int) -> Branch:
        c = self.columns
        return Branch(
            c.ids[index],
            c.args(index),
            c.states[index],
            c.attempts[index],
            c.values[index],
            c.errors[index],
            True,
        )

    def in_state(self, state: str) -> list[Branch]:
        return [self.branch(i) for i, s in enumerate(self.columns.states) if s == state]

    def style(self, index: int) -> str:
        value = self.columns.values[index]
        return str(value["style"]) if value and "style" in value else self.branch(index).style

    def sequential_ms(self) -> int:
        c = self.columns
        return sum(
            duration_ms(promise_id, value)
            for promise_id, state, value in zip(c.ids, c.states, c.values, strict=True)
            if state == "resolved" and value
        )

    def image_items(self) -> Iterator[dict[str, Any]]:
        """The ``run --json`` items of the resolved branches, one at a time."""
        c = self.columns
        for i, state in enumerate(c.states):
            if state == "resolved" and (value := c.values[i]):
                yield _image_item(c.ids[i], self.style(i), value, c.attempts[i], replayed=True)

    def show_items_reusing_stored_text(self) -> Iterator[str]:
        """The ``show --json`` items as JSON text, written from the columns: each value as
        the text stored rather than decoded and encoded again, and ids and styles of plain
        ASCII without a call of the encoder. The same items written by the encoder made
        ``show --json`` of a resolved run of 10,000 branches take 170 ms of CPU against
        149 (1.14x), of 100,000 branches 766 against 545 (1.40x; ``farm-bench``,
        interleaved, medians; see docs/performance.md).

        A value that holds other than ASCII is encoded again (with ``ensure_ascii``), so
        that no control character of another alphabet reaches a terminal."""
        c = self.columns
        for i, error in enumerate(c.errors):
            text = c.value_texts[i]
            value = text if text is not None and text.isascii() else _encode(c.values[i])
            yield (
                f'{{"id": {_plain_string(c.ids[i])}, "style": {_plain_string(self.style(i))}, '
                f'"state": "{c.states[i]}", "attempts": {c.attempts[i]}, "value": {value}, '
                f'"error": {"null" if error is None else _encode(_error_text(error))}}}'
            )


def _plain_string(text: str) -> str:
    """A JSON string, as the encoder writes it (part of
    :meth:`StoredBranches.show_items_reusing_stored_text`)."""
    if text.isascii() and text.isprintable() and '"' not in text and "\\" not in text:
        return f'"{text}"'
    return _encode(text)


def _error_text(error: ErrorInfo) -> str:
    return f"{error.type}: {error.message}"


def run_state(root_state: str) -> str:
    """A run's state as users see it, from its root promise's state."""
    return {"resolved": "resolved", "rejected": "failed"}.get(root_state, "pending")


@dataclass(frozen=True, repr=False)
class RunOutcome:
    id: str
    state: str
    spec: RunSpec
    #: as executed (:class:`LaunchedBranches`), or as read back from the store
    #: (:class:`StoredBranches`), or a list
    branches: Sequence[Branch]
    wall_ms: int
    created_at: float
    #: False when the run was already settled and only read from the store
    executed: bool = True
    #: failed attempts of every branch, oldest first (filled in by ``show``)
    history: list[AttemptRecord] = field(default_factory=list)

    def __repr__(self) -> str:
        # Short on purpose: asyncio formats the main task's result (this object) while
        # shutting down, and a 10,000-branch repr cost ~0.1 s there.
        return f"RunOutcome(id={self.id!r}, state={self.state!r}, branches={len(self.branches)})"

    @property
    def images(self) -> list[Branch]:
        return self._in_state("resolved")

    @property
    def failures(self) -> list[Branch]:
        return self._in_state("rejected")

    def _in_state(self, state: str) -> list[Branch]:
        if isinstance(self.branches, StoredBranches):
            return self.branches.in_state(state)
        return [b for b in self.branches if b.state == state]

    @property
    def sequential_ms(self) -> int:
        if isinstance(self.branches, StoredBranches):
            return self.branches.sequential_ms()
        # one branch at a time: a list of every image was the end of a run's peak memory
        resolved = (b for b in self.branches if b.state == "resolved")
        return sum(duration_ms(b.id, b.value) for b in resolved if b.value)

    def result_json(self) -> dict[str, Any]:
        """The ``run --json`` / ``resume --json`` shape."""
        return json.loads("".join(self.result_json_text()))  # type: ignore[no-any-return]

    def result_json_text(self) -> Iterator[str]:
        """The ``run --json`` shape as text, a thousand branches at a time: a run of
        100,000 images is never a list of dicts and one 11 MB string at once (that was its
        peak memory)."""
        if isinstance(self.branches, StoredBranches):
            images = self.branches.image_items()
        else:
            images = (
                _image_item(b.id, b.style, b.value, b.attempts, b.replayed)
                for b in self.branches
                if b.value and b.state == "resolved"
            )
        return json_chunks(
            {
                "id": self.id,
                "state": self.state,
                "prompt": self.spec.prompt,
                "images": images,
                "wall_ms": self.wall_ms,
                "sequential_ms": self.sequential_ms,
                "cost": self._cost_json(attempts=False),
            }
        )

    def _cost_json(self, *, attempts: bool) -> dict[str, Any]:
        from imagepipe.run_costs import cost_json  # prices are read only for a report

        return cost_json(self, attempts=attempts)

    def show_json(self) -> dict[str, Any]:
        """The ``show --json`` shape."""
        return json.loads("".join(self.show_json_text()))  # type: ignore[no-any-return]

    def show_json_text(self) -> Iterator[str]:
        """The ``show --json`` shape as text, a thousand branches at a time (see
        result_json_text)."""
        branches: Iterator[dict[str, Any]] | EncodedItems
        if isinstance(self.branches, StoredBranches):
            branches = EncodedItems(self.branches.show_items_reusing_stored_text())
        else:
            branches = map(_show_item, self.branches)
        head = {"id": self.id, "state": self.state, "prompt": self.spec.prompt}
        cost = self._cost_json(attempts=True)  # ``show`` has read the attempts' history
        return json_chunks(head | {"cost": cost, "branches": branches})


def duration_ms(branch_id: str, value: Mapping[str, Any]) -> int:
    """An image's duration as its value holds it. A value without a whole number of
    milliseconds was damaged in the store: exit 74 with one line, not a traceback."""
    ms = value.get("duration_ms")
    if type(ms) is not int:
        raise StoreFailed(
            f"the store is corrupt: branch {quoted(branch_id)} holds a damaged value"
            " (its duration_ms)"
        )
    return ms


def _image_item(
    branch_id: str, style: str, value: dict[str, Any], attempts: int, replayed: bool
) -> dict[str, Any]:
    return {
        "style": style,
        "url": value.get("url"),
        "path": value.get("path"),
        "duration_ms": duration_ms(branch_id, value),
        "attempts": attempts,
        "replayed": replayed,
        "cost": cost_json_of(value),
    }


def _show_item(b: Branch) -> dict[str, Any]:
    return {
        "id": b.id,
        "style": b.style,
        "state": b.state,
        "attempts": b.attempts,
        "value": b.value,
        "error": None if b.error is None else _error_text(b.error),
    }


@dataclass(frozen=True)
class RunSummary:
    id: str
    state: str
    prompt: str
    created_at: float
    counts: dict[str, int]
    #: what its images cost (:class:`imagepipe.cost.Spending`)
    spent: Spending | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "state": self.state,
            "prompt": self.prompt,
            "created_at": _iso(self.created_at),
            "cost": None if self.spent is None else self.spent.to_json(),
        }


def _iso(ts: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ts))


@dataclass(frozen=True)
class RunInfo:
    """What a reporter is told when execution starts."""

    id: str
    spec: RunSpec
    resumed: bool
    max_attempts: int


class Reporter(Protocol):
    def run_started(self, info: RunInfo) -> None: ...

    @property
    def on_event(self) -> Callable[[Event], None] | None:
        """Where the core's events go; None for a reporter that ignores them."""
        ...


class QuietReporter:
    """Reports nothing; ``on_event`` is None so the core does not even build events."""

    on_event = None

    def run_started(self, info: RunInfo) -> None:
        pass
