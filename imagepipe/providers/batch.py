"""A provider's batch mode, whoever the provider: the records a durable batch run is made
of, the :class:`BatchProvider` protocol a batch client follows (OpenAI's is
:class:`~imagepipe.providers.openai_batch.OpenAIBatchClient`; Gemini's batch mode would be a
plugin's), and the input and output files' lines.

- :class:`RequestLine`, :class:`StoredFile`, :class:`BatchInfo` (in the shape of OpenAI's
  batch object, which a second provider maps its own onto), :class:`BatchResult`
- :func:`group_lines` and :func:`write_input_file`: a run's requests in batches, within a
  provider's limits, each file written atomically
- :func:`split_lines`: a batch file's lines from a byte stream, memory bounded by the
  longest line allowed
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import secrets
from collections.abc import AsyncIterator, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple, Protocol

from imagepipe.providers.base import (
    InvalidRequest,
    ProviderError,
    ProviderImage,
    ProviderProtocolError,
    ProviderRequest,
    one_line,
)
from imagepipe.providers.http import json_type

__all__ = [
    "LINE_PREFIX",
    "STATUSES",
    "TERMINAL",
    "UNFINISHED_CODES",
    "BatchInfo",
    "BatchProblem",
    "BatchProvider",
    "BatchResult",
    "InputFile",
    "Line",
    "RequestCounts",
    "RequestLine",
    "StoredFile",
    "group_lines",
    "shape_error",
    "split_lines",
    "stamp_field",
    "text_field",
    "write_input_file",
]

#: every status a batch may have, as published
STATUSES = (
    "validating",
    "failed",
    "in_progress",
    "finalizing",
    "completed",
    "expired",
    "cancelling",
    "cancelled",
)
#: the statuses a batch never leaves
TERMINAL = frozenset({"completed", "failed", "expired", "cancelled"})
#: a line's error code that says its request never ran (the branch may go in another
#: batch, nothing was paid for it)
UNFINISHED_CODES = frozenset({"batch_expired", "batch_cancelled", "batch_failed"})

# ---------------------------------------------------------------------------- records


@dataclass(frozen=True)
class RequestLine:
    """One request of an input file: its ``custom_id`` (the branch id) and its JSONL line,
    newline included."""

    custom_id: str
    data: bytes


@dataclass(frozen=True)
class InputFile:
    """An input file written by :func:`write_input_file`."""

    path: str
    requests: int
    bytes: int
    sha256: str


@dataclass(frozen=True)
class StoredFile:
    """A file on the provider (``POST /files`` answers one)."""

    id: str
    bytes: int
    filename: str
    purpose: str
    created_at: int


@dataclass(frozen=True)
class RequestCounts:
    total: int = 0
    completed: int = 0
    failed: int = 0


@dataclass(frozen=True)
class BatchProblem:
    """Why a batch failed its validation (one of its ``errors.data``)."""

    code: str | None
    message: str
    line: int | None = None
    param: str | None = None


#: the batch object's timestamps, besides ``created_at``
_STAMPS = (
    "expires_at",
    "in_progress_at",
    "finalizing_at",
    "completed_at",
    "failed_at",
    "expired_at",
    "cancelling_at",
    "cancelled_at",
)


@dataclass(frozen=True)
class BatchInfo:
    """A batch as the provider last described it. :meth:`as_json` and :meth:`from_json`
    carry it through the store (a sub-step's result) in the API's own shape."""

    id: str
    status: str
    input_file_id: str | None = None
    output_file_id: str | None = None
    error_file_id: str | None = None
    counts: RequestCounts = field(default_factory=RequestCounts)
    created_at: int | None = None
    #: Unix seconds of each step the batch reached (``expires_at``, ``in_progress_at``...)
    stamps: Mapping[str, int] = field(default_factory=dict)
    errors: tuple[BatchProblem, ...] = ()
    metadata: Mapping[str, str] = field(default_factory=dict)

    @property
    def terminal(self) -> bool:
        """Whether the batch will not change any more."""
        return self.status in TERMINAL

    @property
    def result_files(self) -> tuple[str, ...]:
        """Its output and error files that exist (partial results of an expired or
        cancelled batch included)."""
        return tuple(f for f in (self.output_file_id, self.error_file_id) if f)

    def as_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "object": "batch",
            "status": self.status,
            "input_file_id": self.input_file_id,
            "output_file_id": self.output_file_id,
            "error_file_id": self.error_file_id,
            "request_counts": {
                "total": self.counts.total,
                "completed": self.counts.completed,
                "failed": self.counts.failed,
            },
            "created_at": self.created_at,
            **{name: self.stamps.get(name) for name in _STAMPS},
            "errors": {
                "object": "list",
                "data": [
                    {"code": p.code, "message": p.message, "line": p.line, "param": p.param}
                    for p in self.errors
                ],
            }
            if self.errors
            else None,
            "metadata": dict(self.metadata) or None,
        }

    @classmethod
    def from_json(cls, data: Any) -> BatchInfo:
        """A batch object (the API's answer, or :meth:`as_json`'s); a
        :class:`ProviderProtocolError` naming what is not of the documented shape."""
        if not isinstance(data, dict):
            raise shape_error("batch", "an object", data)
        batch_id = text_field(data, "id", "batch", required=True)
        status = text_field(data, "status", "batch", required=True)
        assert batch_id is not None
        assert status is not None
        counts = data.get("request_counts") or {}
        if not isinstance(counts, dict):
            raise shape_error("batch's request_counts", "an object", counts)
        stamps = {name: stamp_field(data, name) for name in _STAMPS}
        metadata = data.get("metadata") or {}
        if not isinstance(metadata, dict):
            raise shape_error("batch's metadata", "an object", metadata)
        return cls(
            id=batch_id,
            status=status,
            input_file_id=text_field(data, "input_file_id", "batch"),
            output_file_id=text_field(data, "output_file_id", "batch"),
            error_file_id=text_field(data, "error_file_id", "batch"),
            counts=RequestCounts(
                total=_count(counts, "total"),
                completed=_count(counts, "completed"),
                failed=_count(counts, "failed"),
            ),
            created_at=stamp_field(data, "created_at"),
            stamps={name: value for name, value in stamps.items() if value is not None},
            errors=_problems(data.get("errors")),
            metadata={str(k): str(v) for k, v in metadata.items()},
        )


@dataclass(frozen=True)
class BatchResult:
    """One line of a batch's output or error file: exactly one of ``image`` (the request
    succeeded), ``error`` (it failed: classified as a synchronous answer would be, so its
    ``retryable`` says whether another attempt may succeed) or ``unfinished`` (the code,
    e.g. ``batch_expired``: the request never ran and was not paid for)."""

    custom_id: str
    image: ProviderImage | None = None
    error: ProviderError | None = None
    unfinished: str | None = None


# -------------------------------------------------------------- the plugin interface


class BatchProvider(Protocol):
    """What a durable batch run needs of a provider's batch mode.

    The run writes each batch's input file from :meth:`request_line` (grouped by
    :func:`group_lines` within :attr:`max_requests` and :attr:`max_file_bytes`), uploads it,
    creates the batch, polls it with :meth:`get_batch` and, once it is terminal, reads
    :meth:`results`. Every method is safe to call again after a kill: :meth:`find_upload`
    and :meth:`find_batch` find what was sent but not recorded, :meth:`cancel_batch` of a batch
    that has already stopped returns it, :meth:`delete_file` of a missing file returns
    False. A provider whose batch mode takes its requests inline (Gemini's, for small
    batches) uploads nothing: its :meth:`upload_file` may keep the file's content for
    :meth:`create_batch` to send. A run makes its instance as it makes a provider's:
    ``create(options, settings)`` (see :class:`~imagepipe.providers.contract.
    ProviderClass`).
    """

    @property
    def name(self) -> str: ...

    max_requests: int
    max_file_bytes: int

    def request_line(self, request: ProviderRequest) -> RequestLine: ...

    async def upload_file(self, path: Path, *, filename: str) -> StoredFile: ...

    async def find_upload(self, filename: str, *, not_before: int = 0) -> StoredFile | None: ...

    async def create_batch(
        self, input_file_id: str, *, metadata: Mapping[str, str] | None = None
    ) -> BatchInfo: ...

    async def find_batch(self, input_file_id: str, *, not_before: int = 0) -> BatchInfo | None: ...

    async def get_batch(self, batch_id: str) -> BatchInfo: ...

    async def cancel_batch(self, batch_id: str) -> BatchInfo: ...

    async def delete_file(self, file_id: str) -> bool: ...

    def results(self, batch: BatchInfo) -> AsyncIterator[BatchResult]: ...

    async def aclose(self) -> None: ...


# ------------------------------------------------------------------ input files


def group_lines(
    lines: Iterable[RequestLine],
    *,
    max_requests: int,
    max_bytes: int,
) -> Iterator[list[RequestLine]]:
    """The lines in order, in groups (one a batch) of at most ``max_requests`` lines and
    ``max_bytes`` bytes. A custom_id met twice is a ``ValueError`` (a branch in two
    batches); a line larger than ``max_bytes`` alone is an :class:`InvalidRequest`."""
    seen: set[str] = set()
    group: list[RequestLine] = []
    size = 0
    for line in lines:
        if line.custom_id in seen:
            raise ValueError(f"custom_id {line.custom_id!r} is in more than one line")
        seen.add(line.custom_id)
        if len(line.data) > max_bytes:
            raise InvalidRequest(
                f"the request of {one_line(line.custom_id, 80)} takes {len(line.data)} bytes, "
                f"more than a batch file may hold ({max_bytes})"
            )
        if group and (len(group) >= max_requests or size + len(line.data) > max_bytes):
            yield group
            group, size = [], 0
        group.append(line)
        size += len(line.data)
    if group:
        yield group


def write_input_file(path: Path, lines: Iterable[RequestLine]) -> InputFile:
    """Write ``lines`` to ``path`` atomically: to a temporary file beside it, fsynced,
    then renamed over ``path`` (and the folder fsynced). After a kill there is either the
    whole file or none under ``path``."""
    digest = hashlib.sha256()
    count = size = 0
    temp = path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp")
    try:
        with open(temp, "xb") as out:
            for line in lines:
                out.write(line.data)
                digest.update(line.data)
                count += 1
                size += len(line.data)
            out.flush()
            os.fsync(out.fileno())
        os.replace(temp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            temp.unlink()
        raise
    folder = os.open(path.parent, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(folder)
    finally:
        os.close(folder)
    return InputFile(str(path), count, size, digest.hexdigest())


# ------------------------------------------------------------------ reading files


#: what is kept of a line longer than the limit: enough to find its custom_id (OpenAI
#: writes it second, after the line's own id)
LINE_PREFIX = 4096


class Line(NamedTuple):
    """A line of a batch file, numbered from 1, without its newline. ``whole`` False: it
    was longer than the limit, and ``data`` is only its first bytes."""

    number: int
    data: bytes
    whole: bool = True


async def split_lines(chunks: AsyncIterator[bytes], limit: int) -> AsyncIterator[Line]:
    """The non-blank lines of a byte stream. Memory: at most one line of ``limit`` bytes
    (and the chunk being read). A longer line is read through but not kept: it comes as
    its first :data:`LINE_PREFIX` bytes, ``whole`` False, and the lines after it follow."""
    pending = bytearray()
    number = 0
    cut = False  # the line being read is longer than the limit: only its prefix is kept
    keep = min(limit, LINE_PREFIX)
    async for chunk in chunks:
        start = 0
        while (end := chunk.find(b"\n", start)) >= 0:
            number += 1
            if not cut and len(pending) + end - start > limit:
                cut = True
            if cut:
                pending += chunk[start : start + max(0, keep - len(pending))]
                yield Line(number, bytes(pending[:keep]), whole=False)
            elif pending:
                pending += chunk[start:end]
                if pending.strip():
                    yield Line(number, bytes(pending))
            elif chunk[start:end].strip():
                yield Line(number, chunk[start:end])
            pending.clear()
            cut = False
            start = end + 1
        if not cut and len(pending) + len(chunk) - start > limit:
            cut = True
        if cut:
            pending += chunk[start : start + max(0, keep - len(pending))]
            del pending[keep:]
        else:
            pending += chunk[start:]
    if cut:
        yield Line(number + 1, bytes(pending[:keep]), whole=False)
    elif pending.strip():
        yield Line(number + 1, bytes(pending))


def shape_error(what: str, expected: str, value: Any) -> ProviderProtocolError:
    return ProviderProtocolError(f"the provider's {what} is {json_type(value)}, not {expected}")


def text_field(data: dict[str, Any], name: str, what: str, *, required: bool = False) -> str | None:
    value = data.get(name)
    if value is None and not required:
        return None
    if not isinstance(value, str) or not value:
        raise shape_error(f"{what}'s {name}", "a string", value)
    return value


def stamp_field(data: dict[str, Any], name: str) -> int | None:
    value = data.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise shape_error(f"batch's {name}", "a number", value)
    return int(value)


def _count(counts: dict[str, Any], name: str) -> int:
    value = counts.get(name, 0)
    if isinstance(value, bool) or not isinstance(value, int):
        raise shape_error(f"batch's request_counts.{name}", "a number", value)
    return value


def _problems(errors: Any) -> tuple[BatchProblem, ...]:
    if errors is None:
        return ()
    data = errors.get("data") if isinstance(errors, dict) else None
    if not isinstance(data, list):
        raise shape_error("batch's errors", "a list of errors", errors)
    problems = []
    for item in data:
        if not isinstance(item, dict):
            raise shape_error("batch's errors.data item", "an object", item)
        code, line, param = item.get("code"), item.get("line"), item.get("param")
        problems.append(
            BatchProblem(
                code=str(code) if code is not None else None,
                message=one_line(str(item.get("message") or code or "invalid batch")),
                line=line if isinstance(line, int) and not isinstance(line, bool) else None,
                param=str(param) if param is not None else None,
            )
        )
    return tuple(problems)
