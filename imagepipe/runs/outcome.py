"""What a run produced: its branches as a command reads them, and its outcome.

- :class:`LaunchedBranches` — the branches this invocation executed, from their handles
- :class:`StoredBranches` — the branches read back from the store, column by column
- :class:`RunOutcome` — the run as ``run``/``show`` report it
- :class:`RunSummary` — one run as ``list`` shows it

Each view builds a :class:`~imagepipe.runs.model.Branch` only for a branch asked for: a
run of 100,000 branches is reported without 100,000 objects at once.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, NamedTuple, Protocol, overload

from imagepipe.durable import ErrorInfo, Handle
from imagepipe.durable.records import AttemptRecord
from imagepipe.errors import StoreFailed
from imagepipe.runs.batches import RunBatches
from imagepipe.runs.model import Branch, RunSpec
from imagepipe.text import quoted

if TYPE_CHECKING:
    from imagepipe.cost import Spending

__all__ = [
    "BranchColumns",
    "BranchList",
    "BranchRow",
    "BranchView",
    "LaunchedBranches",
    "RunOutcome",
    "RunSummary",
    "StoredBranches",
    "duration_ms",
    "iso_time",
    "run_state",
]


class BranchRow(NamedTuple):
    """What a report shows of one branch: no arguments, its style from its value."""

    id: str
    style: str
    state: str
    attempts: int
    value: dict[str, Any] | None
    error: ErrorInfo | None
    replayed: bool


class BranchView(Sequence[Branch]):
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

    def in_state(self, state: str) -> list[Branch]:
        return [b for b in self if b.state == state]

    def rows(self) -> Iterator[BranchRow]:
        """Every branch as a report shows it, one at a time."""
        for b in self:
            yield BranchRow(b.id, b.style, b.state, b.attempts, b.value, b.error, b.replayed)

    def sequential_ms(self) -> int:
        """The images' durations added up: what one branch at a time would have taken."""
        # one branch at a time: a list of every image was the end of a run's peak memory
        return sum(duration_ms(b.id, b.value) for b in self if b.state == "resolved" and b.value)


class BranchList(BranchView):
    """Branches already built (a watched run, a test)."""

    __slots__ = ("_branches",)

    def __init__(self, branches: Sequence[Branch]) -> None:
        self._branches = branches

    def __len__(self) -> int:
        return len(self._branches)

    def branch(self, index: int) -> Branch:
        return self._branches[index]

    def __iter__(self) -> Iterator[Branch]:
        return iter(self._branches)


class LaunchedBranches(BranchView):
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


class BranchColumns(Protocol):
    """What :class:`StoredBranches` reads of a run's children, in launch order: one list
    per column, and each child's stored argument object on demand."""

    @property
    def ids(self) -> Sequence[str]: ...

    @property
    def states(self) -> Sequence[str]: ...

    @property
    def attempts(self) -> Sequence[int]: ...

    @property
    def values(self) -> Sequence[dict[str, Any] | None]: ...

    @property
    def errors(self) -> Sequence[ErrorInfo | None]: ...

    def __len__(self) -> int: ...

    def args(self, index: int) -> dict[str, Any]: ...


class StoredBranches(BranchView):
    """The branches of a run read back from the store, column by column: a
    :class:`Branch` (and its decoded arguments) is built only for a branch asked for
    (``show --json`` of a resolved run of 100,000 branches: 3.8 s as records, ~1 s so;
    measured)."""

    __slots__ = ("columns",)

    def __init__(self, columns: BranchColumns) -> None:
        self.columns = columns

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

    def _style(self, index: int) -> str:
        value = self.columns.values[index]
        return str(value["style"]) if value and "style" in value else self.branch(index).style

    def rows(self) -> Iterator[BranchRow]:
        c = self.columns
        for i, promise_id in enumerate(c.ids):
            yield BranchRow(
                promise_id,
                self._style(i),
                c.states[i],
                c.attempts[i],
                c.values[i],
                c.errors[i],
                True,
            )

    def sequential_ms(self) -> int:
        c = self.columns
        return sum(
            duration_ms(promise_id, value)
            for promise_id, state, value in zip(c.ids, c.states, c.values, strict=True)
            if state == "resolved" and value
        )


def run_state(root_state: str) -> str:
    """A run's state as users see it, from its root promise's state."""
    return {"resolved": "resolved", "rejected": "failed"}.get(root_state, "pending")


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
    #: what each attempt that reserved against the run's spending cost in micro-dollars,
    #: by (branch id, attempt), None while unknown (filled in by ``show``)
    attempt_costs: Mapping[tuple[str, int], int | None] = field(default_factory=dict)
    #: the provider batches of a run sent through them (None: it never was)
    batches: RunBatches | None = None

    def __repr__(self) -> str:
        # Short on purpose: asyncio formats the main task's result (this object) while
        # shutting down, and a 10,000-branch repr cost ~0.1 s there.
        return f"RunOutcome(id={self.id!r}, state={self.state!r}, branches={len(self.branches)})"

    @property
    def submitted(self) -> bool:
        """Sent in batches by this invocation, which returned once they were created
        (``run --batch``): the run is pending and its batches are at the provider."""
        return not self.executed and self.state == "pending" and bool(self.batches)

    @property
    def not_sent(self) -> int:
        """Of a run sent in batches: its pending branches that no batch holds (their worst
        case did not fit in the run's caps)."""
        batches = self.batches
        if batches is None:
            return 0
        return sum(1 for r in self.view.rows() if r.state == "pending" and not batches.holds(r.id))

    @property
    def view(self) -> BranchView:
        """The branches, read the way their source reads fastest."""
        branches = self.branches
        return branches if isinstance(branches, BranchView) else BranchList(branches)

    @property
    def images(self) -> list[Branch]:
        return self.view.in_state("resolved")

    @property
    def failures(self) -> list[Branch]:
        return self.view.in_state("rejected")

    @property
    def sequential_ms(self) -> int:
        return self.view.sequential_ms()


@dataclass(frozen=True)
class RunSummary:
    id: str
    state: str
    prompt: str
    created_at: float
    counts: dict[str, int]
    #: what its images cost (:class:`imagepipe.cost.Spending`)
    spent: Spending | None = None
    #: the provider batches of a run sent through them (None: it never was)
    batches: RunBatches | None = None


def iso_time(ts: float) -> str:
    """A time as the JSON output writes it: UTC, to the second."""
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ts))
