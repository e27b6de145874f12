"""OpenAI's Batch API for image generations: the pieces a durable batch run is made of.

Not yet used by any command: ``run --batch`` (docs/internals/batch.md) will build on it.

- :meth:`OpenAIBatchClient.request_line` makes a branch's JSONL line ``{"custom_id",
  "method": "POST", "url": "/v1/images/generations", "body"}``: ``custom_id`` is the
  branch id and ``body`` is what the synchronous ``openai`` provider would send
  (:func:`~imagepipe.providers.openai.image_request_body`).
- :func:`group_lines` packs lines into batches within the published limits (50,000
  requests and 200 MB a file); :func:`write_input_file` writes one batch's file
  atomically.
- :meth:`~OpenAIBatchClient.upload_file` (``POST /files``, multipart, ``purpose=batch``),
  :meth:`~OpenAIBatchClient.create_batch` (``POST /batches``), :meth:`~OpenAIBatchClient.get_batch`,
  :meth:`~OpenAIBatchClient.cancel_batch` and :meth:`~OpenAIBatchClient.delete_file`; after a
  kill, :meth:`~OpenAIBatchClient.find_upload` and :meth:`~OpenAIBatchClient.find_batch`
  find what an earlier process sent but never recorded.
- :meth:`~OpenAIBatchClient.results` streams a batch's output and error files line by
  line, each parsed into a :class:`BatchResult`, with memory bounded by the longest line
  allowed (a base64 image of ``-o max_image_mb``), never by the file's size; a longer
  line rejects its branch (:class:`~imagepipe.providers.base.AnswerTooLarge`) and the
  reading goes on.

Errors are raised as the synchronous provider's are (:func:`~imagepipe.providers.http.
classify`: 429, 5xx and timeouts retryable; 400, 401, 403 and 404 not), the key redacted.
:class:`BatchProvider` is the interface a second batch provider (Gemini's batch mode)
would implement as a plugin. httpx is imported only when a request is made.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import re
import secrets
from collections.abc import AsyncIterator, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, NamedTuple, Protocol, Self
from urllib.parse import quote

from imagepipe.providers.base import (
    AnswerTooLarge,
    InvalidRequest,
    ProviderError,
    ProviderImage,
    ProviderProtocolError,
    ProviderRequest,
    ProviderTimeout,
)
from imagepipe.providers.client import HTTPProvider
from imagepipe.providers.http import (
    ERROR_BODY_LIMIT,
    MB,
    BodyLimit,
    Pacer,
    classify,
    json_type,
    read_body,
    redact_json,
    send,
    transport_error,
)
from imagepipe.providers.openai import (
    OpenAIOptions,
    OpenAIProvider,
    b64_image,
    image_item,
    image_request_body,
    provider_image,
)
from imagepipe.providers.options import ProviderOptions
from imagepipe.text import one_line, quoted

if TYPE_CHECKING:
    import httpx

    from imagepipe.providers.contract import ProviderSettings

__all__ = [
    "COMPLETION_WINDOW",
    "ENDPOINT",
    "MAX_FILE_BYTES",
    "MAX_REQUESTS",
    "STATUSES",
    "TERMINAL",
    "UNFINISHED_CODES",
    "BatchInfo",
    "BatchProblem",
    "BatchProvider",
    "BatchResult",
    "InputFile",
    "Line",
    "OpenAIBatchClient",
    "RequestCounts",
    "RequestLine",
    "StoredFile",
    "group_lines",
    "split_lines",
    "write_input_file",
]

#: the endpoint of every line and of the batch
ENDPOINT = "/v1/images/generations"
#: the only completion window the API takes
COMPLETION_WINDOW = "24h"
#: requests in one batch, at most (published)
MAX_REQUESTS = 50_000
#: bytes of one input file, at most: the published 200 MB, counted the smaller way
MAX_FILE_BYTES = 200 * MB
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
#: the image models that have a batch mode (OpenAI, 2026: "GPT Image models")
BATCH_MODEL_PREFIXES = ("gpt-image-", "chatgpt-image-")


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
            raise _shape("batch", "an object", data)
        batch_id = _text(data, "id", "batch", required=True)
        status = _text(data, "status", "batch", required=True)
        assert batch_id is not None
        assert status is not None
        counts = data.get("request_counts") or {}
        if not isinstance(counts, dict):
            raise _shape("batch's request_counts", "an object", counts)
        stamps = {name: _stamp(data, name) for name in _STAMPS}
        metadata = data.get("metadata") or {}
        if not isinstance(metadata, dict):
            raise _shape("batch's metadata", "an object", metadata)
        return cls(
            id=batch_id,
            status=status,
            input_file_id=_text(data, "input_file_id", "batch"),
            output_file_id=_text(data, "output_file_id", "batch"),
            error_file_id=_text(data, "error_file_id", "batch"),
            counts=RequestCounts(
                total=_count(counts, "total"),
                completed=_count(counts, "completed"),
                failed=_count(counts, "failed"),
            ),
            created_at=_stamp(data, "created_at"),
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
    max_requests: int = MAX_REQUESTS,
    max_bytes: int = MAX_FILE_BYTES,
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


def _too_long(number: int, limit: int) -> AnswerTooLarge:
    return AnswerTooLarge(
        f"line {number} of the provider's batch file is longer than {limit / MB:g} MB; "
        "refused (-o max_image_mb sets the limit)"
    )


#: a line's custom_id, as a JSON string, where it starts
_CUSTOM_ID = re.compile(rb'"custom_id"\s*:\s*("(?:[^"\\]|\\.)*")')


def _cut_result(line: Line, limit: int) -> BatchResult:
    """The result of a line longer than ``limit``: its branch is rejected as an image
    over the limit would be, if its custom_id can be read from the line's first bytes;
    else the whole file is refused."""
    error = _too_long(line.number, limit)
    found = _CUSTOM_ID.search(line.data)
    if found is None:
        raise error
    try:
        custom_id = json.loads(found.group(1))
    except ValueError:
        raise error from None
    if not isinstance(custom_id, str) or not custom_id:
        raise error
    return BatchResult(custom_id, error=error)


# ------------------------------------------------------------------- the client


class OpenAIBatchClient(HTTPProvider):
    """OpenAI's Files and Batches APIs for image generations; one per run.

    Key, base URL and options as the ``openai`` provider's (``OPENAI_API_KEY``,
    ``-o base_url`` / ``OPENAI_BASE_URL``, :class:`~imagepipe.providers.openai.
    OpenAIOptions`); ``-o timeout`` bounds each request, and each read of a download.
    """

    name: ClassVar[str] = "openai"
    Options: ClassVar[type[ProviderOptions]] = OpenAIOptions
    key_variable: ClassVar[str] = OpenAIProvider.key_variable
    base_url_variable: ClassVar[str] = OpenAIProvider.base_url_variable
    default_base_url: ClassVar[str] = OpenAIProvider.default_base_url
    options: OpenAIOptions
    max_requests: int = MAX_REQUESTS
    max_file_bytes: int = MAX_FILE_BYTES
    #: items a page when :meth:`find_upload` and :meth:`find_batch` list (the most each
    #: listing allows)
    file_page: int = 10_000
    batch_page: int = 100

    @classmethod
    def create(cls, options: ProviderOptions, settings: ProviderSettings) -> Self:
        """The run's batch client. Its pacer is its own: the Batch API has rate limits of
        its own, so ``--rpm`` (the images API's) does not slow its polls."""
        pacer = Pacer(coordinated=settings.coordinated_backoff, time_scale=settings.time_scale)
        return cls(options, pacer=pacer, time_scale=settings.time_scale)

    @staticmethod
    def refusal(options: OpenAIOptions) -> str | None:
        """Why a run with ``options`` cannot go through the Batch API, or None."""
        if not options.model.startswith(BATCH_MODEL_PREFIXES):
            return f"the model {quoted(options.model)} has no batch mode (GPT Image models do)"
        if options.response_format == "url":
            return "a batch answers with b64_json only, not a URL (-o response_format)"
        return None

    def request_line(self, request: ProviderRequest) -> RequestLine:
        """The branch's line: its id as ``custom_id``, the synchronous request's body."""
        line = {
            "custom_id": request.idempotency_key,
            "method": "POST",
            "url": ENDPOINT,
            "body": image_request_body(request, self.options),
        }
        data = json.dumps(line, ensure_ascii=False, separators=(",", ":")).encode() + b"\n"
        return RequestLine(request.idempotency_key, data)

    # -------------------------------------------------------------------- files

    async def upload_file(self, path: Path, *, filename: str) -> StoredFile:
        """``POST /files`` (multipart, ``purpose=batch``) of the file at ``path``, read
        from disk as it is sent, named ``filename`` (for :meth:`find_upload`)."""
        content = await asyncio.to_thread(path.open, "rb")
        with content:
            size = os.fstat(content.fileno()).st_size
            reply = await send(
                self.http(),
                "POST",
                f"{self.base_url}/files",
                pacer=self.pacer,
                limit=self.answer_limit,
                # a slow link still moves a megabyte a second
                deadline=self.timeout + size / MB,
                secret=self.api_key(),
                headers=self.auth_headers(),
                data={"purpose": "batch"},
                files={"file": (filename, content, "application/jsonl")},
            )
        return _stored_file(reply.json())

    async def find_upload(self, filename: str, *, not_before: int = 0) -> StoredFile | None:
        """The newest batch file named ``filename`` created at ``not_before`` or later,
        or None: after a kill during :meth:`upload_file`, whether the file got there."""
        query = {"purpose": "batch", "limit": str(self.file_page)}
        async for item in self._pages("/files", query):
            stored = _stored_file(item)
            if stored.created_at < not_before:
                break
            if stored.filename == filename:
                return stored
        return None

    async def delete_file(self, file_id: str) -> bool:
        """``DELETE /files/{id}``; False if there was no such file (already deleted)."""
        try:
            await self.request(
                "DELETE", f"{self.base_url}/files/{_id(file_id)}", headers=self.auth_headers()
            )
        except InvalidRequest as exc:
            if exc.status == 404:
                return False
            raise
        return True

    # ------------------------------------------------------------------ batches

    async def create_batch(
        self,
        input_file_id: str,
        *,
        metadata: Mapping[str, str] | None = None,
        endpoint: str = ENDPOINT,
    ) -> BatchInfo:
        """``POST /batches`` for an uploaded file, with ``metadata`` (at most 16 pairs)."""
        body: dict[str, Any] = {
            "input_file_id": input_file_id,
            "endpoint": endpoint,
            "completion_window": COMPLETION_WINDOW,
        }
        if metadata:
            body["metadata"] = dict(metadata)
        reply = await self.request(
            "POST", f"{self.base_url}/batches", json=body, headers=self.auth_headers()
        )
        return BatchInfo.from_json(reply.json())

    async def find_batch(self, input_file_id: str, *, not_before: int = 0) -> BatchInfo | None:
        """The newest batch made from ``input_file_id`` (created at ``not_before`` or
        later), or None: after a kill during :meth:`create_batch`, whether the batch exists."""
        async for item in self._pages("/batches", {"limit": str(self.batch_page)}):
            batch = BatchInfo.from_json(item)
            if batch.created_at is not None and batch.created_at < not_before:
                break
            if batch.input_file_id == input_file_id:
                return batch
        return None

    async def get_batch(self, batch_id: str) -> BatchInfo:
        reply = await self.request(
            "GET", f"{self.base_url}/batches/{_id(batch_id)}", headers=self.auth_headers()
        )
        return BatchInfo.from_json(reply.json())

    async def cancel_batch(self, batch_id: str) -> BatchInfo:
        """``POST /batches/{id}/cancel``. A batch that is already cancelling or has
        stopped is returned as it is (the API refuses to cancel it)."""
        try:
            reply = await self.request(
                "POST",
                f"{self.base_url}/batches/{_id(batch_id)}/cancel",
                headers=self.auth_headers(),
            )
        except InvalidRequest as exc:
            if exc.status not in (400, 409):
                raise
            batch = await self.get_batch(batch_id)
            if batch.status == "cancelling" or batch.terminal:
                return batch
            raise
        return BatchInfo.from_json(reply.json())

    async def _pages(self, path: str, query: dict[str, str]) -> AsyncIterator[Any]:
        """The items of a listing, newest first, page after page."""
        after: str | None = None
        while True:
            params = {**query, **({"after": after} if after else {})}
            reply = await self.request(
                "GET", f"{self.base_url}{path}", params=params, headers=self.auth_headers()
            )
            page = reply.json()
            data = page.get("data") if isinstance(page, dict) else None
            if not isinstance(data, list):
                raise _shape("listing's data", "a list", data)
            for item in data:
                yield item
            last = page.get("last_id")
            if not page.get("has_more") or not data or not isinstance(last, str):
                return
            after = last

    # ------------------------------------------------------------------ results

    @property
    def line_limit(self) -> int:
        """The longest line read from a batch file: an image of ``-o max_image_mb`` in
        base64, and a megabyte for the rest (as a synchronous answer's limit)."""
        return self.answer_limit.bytes

    async def results(self, batch: BatchInfo) -> AsyncIterator[BatchResult]:
        """Every line of the batch's output file, then of its error file, as
        :class:`BatchResult`; a request in neither file did not run. A line that names
        no custom_id, or is not JSON, raises :class:`ProviderProtocolError`."""
        for file_id in batch.result_files:
            async for result in self.read_file(file_id):
                yield result

    async def read_file(self, file_id: str) -> AsyncIterator[BatchResult]:
        """One output or error file, streamed (see :meth:`results`). A line longer than
        :attr:`line_limit` rejects its branch with :class:`AnswerTooLarge` (the file
        goes on), or, when no custom_id starts it, stops the file with that error."""
        secret = self.api_key()
        model = self.options.model
        async for line in self._lines(file_id):
            if not line.whole:
                yield _cut_result(line, self.line_limit)
                continue
            yield _result(
                line.data, line.number, secret=secret, model=model, limit=self.image_limit
            )

    async def _lines(self, file_id: str) -> AsyncIterator[Line]:
        import httpx

        url = f"{self.base_url}/files/{_id(file_id)}/content"
        headers = {**self.auth_headers(), "Accept-Encoding": "identity"}
        await self.pacer.backoff()
        try:
            async with self.http().stream("GET", url, headers=headers) as response:
                await self._check(response)
                async for line in split_lines(response.aiter_raw(), self.line_limit):
                    yield line
        except httpx.TransportError as exc:
            raise transport_error(exc) from exc

    async def _check(self, response: httpx.Response) -> None:
        """Raise the classified error of an error answer, or of an encoded body."""
        if not 200 <= response.status_code < 300:
            body = await read_body(response, ERROR_BODY_LIMIT, truncate=True)
            error = classify(response.status_code, response.headers, body, secret=self.api_key())
            self.pacer.observe(error)
            raise error
        encoding = response.headers.get("content-encoding", "").strip().lower()
        if encoding not in ("", "identity"):
            raise ProviderProtocolError(
                f"the provider's batch file is encoded as '{one_line(encoding, 40)}', "
                "which was not asked for (identity)"
            )


# ------------------------------------------------------------------ parsing lines


def _result(line: bytes, number: int, *, secret: str, model: str, limit: BodyLimit) -> BatchResult:
    """The :class:`BatchResult` of one line (``limit``: the largest image)."""
    where = f"line {number} of the provider's batch file"
    try:
        record = redact_json(json.loads(line), secret)
    except (ValueError, UnicodeDecodeError):
        raise ProviderProtocolError(f"{where} is not JSON") from None
    except RecursionError:
        raise ProviderProtocolError(f"{where} is JSON nested too deeply") from None
    if not isinstance(record, dict):
        raise ProviderProtocolError(f"{where} is {json_type(record)}, not an object")
    custom_id = record.get("custom_id")
    if not isinstance(custom_id, str) or not custom_id:
        raise ProviderProtocolError(f"{where} has no custom_id")
    response = record.get("response")
    error = record.get("error")
    try:
        if isinstance(response, dict):
            return _answered(custom_id, response, model=model, limit=limit, secret=secret)
        if isinstance(error, dict):
            code = error.get("code")
            message = str(error.get("message") or code or "the request failed")
            if code in UNFINISHED_CODES:
                return BatchResult(custom_id, unfinished=str(code))
            if code == "timeout":
                return BatchResult(custom_id, error=ProviderTimeout(message, code=code))
            return BatchResult(
                custom_id,
                error=InvalidRequest(message, code=code if isinstance(code, str) else None),
            )
        raise ProviderProtocolError(f"{where} has neither a response nor an error")
    except ProviderError as exc:
        return BatchResult(custom_id, error=exc)


def _answered(
    custom_id: str, response: dict[str, Any], *, model: str, limit: BodyLimit, secret: str
) -> BatchResult:
    status = response.get("status_code")
    body = response.get("body")
    request_id = response.get("request_id")
    request_id = request_id if isinstance(request_id, str) else None
    if not isinstance(status, int):
        raise _shape("line's response.status_code", "a number", status)
    if not 200 <= status < 300:
        text = json.dumps(body).encode()
        return BatchResult(custom_id, error=classify(status, {}, text, secret=secret))
    answer, item = image_item(body)
    if not item.get("b64_json"):
        raise ProviderProtocolError("the provider's batch answer has no b64_json")
    data = b64_image(item, limit)
    return BatchResult(
        custom_id, image=provider_image(answer, item, data, model=model, request_id=request_id)
    )


# ------------------------------------------------------------------------ helpers


def _id(value: str) -> str:
    """An id from the provider, made safe as one path segment."""
    return quote(value, safe="")


def _shape(what: str, expected: str, value: Any) -> ProviderProtocolError:
    return ProviderProtocolError(f"the provider's {what} is {json_type(value)}, not {expected}")


def _text(data: dict[str, Any], name: str, what: str, *, required: bool = False) -> str | None:
    value = data.get(name)
    if value is None and not required:
        return None
    if not isinstance(value, str) or not value:
        raise _shape(f"{what}'s {name}", "a string", value)
    return value


def _stamp(data: dict[str, Any], name: str) -> int | None:
    value = data.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise _shape(f"batch's {name}", "a number", value)
    return int(value)


def _count(counts: dict[str, Any], name: str) -> int:
    value = counts.get(name, 0)
    if isinstance(value, bool) or not isinstance(value, int):
        raise _shape(f"batch's request_counts.{name}", "a number", value)
    return value


def _problems(errors: Any) -> tuple[BatchProblem, ...]:
    if errors is None:
        return ()
    data = errors.get("data") if isinstance(errors, dict) else None
    if not isinstance(data, list):
        raise _shape("batch's errors", "a list of errors", errors)
    problems = []
    for item in data:
        if not isinstance(item, dict):
            raise _shape("batch's errors.data item", "an object", item)
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


def _stored_file(data: Any) -> StoredFile:
    if not isinstance(data, dict):
        raise _shape("file", "an object", data)
    size = data.get("bytes")
    created = _stamp(data, "created_at")
    if isinstance(size, bool) or not isinstance(size, int):
        raise _shape("file's bytes", "a number", size)
    return StoredFile(
        id=_text(data, "id", "file", required=True) or "",
        bytes=size,
        filename=_text(data, "filename", "file") or "",
        purpose=_text(data, "purpose", "file") or "",
        created_at=created or 0,
    )


if TYPE_CHECKING:
    # mypy checks that the OpenAI client is a BatchProvider
    _provider: type[BatchProvider] = OpenAIBatchClient
