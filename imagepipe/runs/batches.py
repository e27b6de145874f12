"""A run's batches as its notes hold them: what the driver resumes from, and what ``show``,
``list``, ``--json`` and the live table read.

Every note of a batch run is under ``batch.`` (see :mod:`imagepipe.durable.context` for
notes and run-level steps):

- ``batch.plan.<p>`` — the ``p``-th planning: the groups it made, each a list of
  ``[branch id, attempt]``. Written once, before anything of its groups is sent: from then
  on a branch belongs to that group, so no replay can put it in a second batch.
- ``batch.g<k>.file`` — group ``k``'s input file written (its name, size and sha256)
- ``batch.g<k>.upload`` — the file on the provider (its id)
- ``batch.g<k>.created`` — the batch created (the provider's batch object)
- ``batch.g<k>.status`` — the batch as last polled (overwritten: progress, not a step)
- ``batch.g<k>.collected`` — its results read to the end: how many branches resolved,
  were rejected, or went back to pending (the batch did not run them)
- ``batch.g<k>.dropped`` — a group never sent (``resume --no-batch``): its branches are
  free again, its uploaded file deleted

A group is *open* from its creation until it is collected: its branches are the batch's
and nothing else sends them.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "DAY",
    "PREFIX",
    "BatchesSubmitted",
    "GroupProgress",
    "RunBatches",
    "group_key",
    "plan_key",
]

#: every note of a run's batches starts with this
PREFIX = "batch."
#: a batch's completion window, in seconds (OpenAI's "24h")
DAY = 24 * 3600


def plan_key(number: int) -> str:
    return f"{PREFIX}plan.{number}"


def group_key(group: int, what: str) -> str:
    return f"{PREFIX}g{group}.{what}"


@dataclass(frozen=True)
class GroupProgress:
    """One group of a run's branches, and the batch that runs it, as last noted."""

    group: int
    #: (branch id, attempt) of each branch, in the order of the input file
    members: tuple[tuple[str, int], ...]
    file: Mapping[str, Any] | None = None
    upload: Mapping[str, Any] | None = None
    #: the batch object as created, then as last polled
    batch: Mapping[str, Any] | None = None
    polled_at: float | None = None
    collected: Mapping[str, Any] | None = None
    dropped: bool = False

    @property
    def requests(self) -> int:
        return len(self.members)

    @property
    def batch_id(self) -> str | None:
        return None if self.batch is None else str(self.batch.get("id"))

    @property
    def sent(self) -> bool:
        """Whether the batch was created."""
        return self.batch is not None

    @property
    def open(self) -> bool:
        """Created and not collected yet: its branches are the batch's."""
        return self.sent and self.collected is None

    @property
    def unsent(self) -> bool:
        """Planned, not created, not dropped: the next invocation sends it."""
        return not self.sent and not self.dropped

    @property
    def status(self) -> str:
        """The batch's status, or how far the group got before it."""
        if self.dropped:
            return "dropped"
        if self.batch is not None:
            return str(self.batch.get("status", "unknown"))
        if self.upload is not None:
            return "uploaded"
        if self.file is not None:
            return "written"
        return "planned"

    @property
    def counts(self) -> Mapping[str, int]:
        """The batch's request counts (total, completed, failed) as last polled."""
        counts = (self.batch or {}).get("request_counts") or {}
        return {k: int(counts.get(k) or 0) for k in ("total", "completed", "failed")}

    @property
    def created_at(self) -> int | None:
        created = (self.batch or {}).get("created_at")
        return created if isinstance(created, int) else None

    @property
    def expires_at(self) -> int | None:
        expires = (self.batch or {}).get("expires_at")
        if isinstance(expires, int):
            return expires
        return None if self.created_at is None else self.created_at + DAY

    def age(self, now: float | None = None) -> float | None:
        """Seconds since the batch was created (of its 24-hour window)."""
        if self.created_at is None:
            return None
        return max(0.0, (time.time() if now is None else now) - self.created_at)

    def to_json(self, now: float | None = None) -> dict[str, Any]:
        return {
            "group": self.group,
            "batch_id": self.batch_id,
            "status": self.status,
            "requests": self.requests,
            "request_counts": dict(self.counts),
            "created_at": self.created_at,
            "expires_at": self.expires_at,
            "age_seconds": None if self.age(now) is None else round(self.age(now) or 0),
            "polled_at": self.polled_at,
            "collected": dict(self.collected) if self.collected is not None else None,
        }


@dataclass(frozen=True)
class RunBatches:
    """Every group of a run's branches, in the order they were planned."""

    groups: tuple[GroupProgress, ...] = ()
    #: how many plannings the notes hold
    plans: int = 0
    _held: frozenset[str] = field(default=frozenset(), repr=False)

    @classmethod
    def from_notes(cls, notes: Mapping[str, Any]) -> RunBatches:
        """The run's batches from its notes (none for a run that never used one)."""
        groups: list[GroupProgress] = []
        plans = 0
        while plan_key(plans) in notes:
            plan = notes[plan_key(plans)]
            first = int(plan["first"])
            for offset, members in enumerate(plan["groups"]):
                k = first + offset
                status = notes.get(group_key(k, "status"))
                created = notes.get(group_key(k, "created"))
                groups.append(
                    GroupProgress(
                        group=k,
                        members=tuple((str(m[0]), int(m[1])) for m in members),
                        file=notes.get(group_key(k, "file")),
                        upload=notes.get(group_key(k, "upload")),
                        batch=status["batch"] if status else created,
                        polled_at=status["polled_at"] if status else None,
                        collected=notes.get(group_key(k, "collected")),
                        dropped=group_key(k, "dropped") in notes,
                    )
                )
            plans += 1
        held = frozenset(branch for g in groups if g.open or g.unsent for branch, _ in g.members)
        return cls(tuple(groups), plans, held)

    def __bool__(self) -> bool:
        return bool(self.groups)

    def __iter__(self) -> Iterator[GroupProgress]:
        return iter(self.groups)

    @property
    def next_group(self) -> int:
        return len(self.groups)

    def holds(self, branch_id: str) -> bool:
        """Whether an open or unsent group holds the branch (nothing else may send it)."""
        return branch_id in self._held

    @property
    def open(self) -> list[GroupProgress]:
        return [g for g in self.groups if g.open]

    @property
    def unsent(self) -> list[GroupProgress]:
        return [g for g in self.groups if g.unsent]

    def to_json(self, now: float | None = None) -> list[dict[str, Any]]:
        return [g.to_json(now) for g in self.groups]


class BatchesSubmitted(Exception):
    """``run --batch`` is done: every group is sent. Carries the run's batches."""

    def __init__(self, batches: RunBatches) -> None:
        super().__init__("batches submitted")
        self.batches = batches
