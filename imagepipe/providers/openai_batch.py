"""OpenAI's Batch API for image generations: the ``openai`` provider's batch mode
(``run --batch``, see docs/internals/batch.md), following :class:`~imagepipe.providers.
batch.BatchProvider`; the records and file lines any provider's batch mode shares are in
:mod:`imagepipe.providers.batch` (re-exported here).

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
A second batch provider (Gemini's batch mode) would implement
:class:`~imagepipe.providers.batch.BatchProvider` as a plugin, named by its provider class's
``batch_mode``. httpx is imported only when a request is made.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
from collections.abc import AsyncIterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Self
from urllib.parse import quote

from imagepipe.providers.base import (
    AnswerTooLarge,
    InvalidRequest,
    ProviderError,
    ProviderProtocolError,
    ProviderRequest,
    ProviderTimeout,
)
from imagepipe.providers.batch import (
    STATUSES,
    TERMINAL,
    UNFINISHED_CODES,
    BatchInfo,
    BatchProblem,
    BatchProvider,
    BatchResult,
    InputFile,
    Line,
    RequestCounts,
    RequestLine,
    StoredFile,
    group_lines,
    shape_error,
    split_lines,
    stamp_field,
    text_field,
    write_input_file,
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
#: the image models that have a batch mode (OpenAI, 2026: "GPT Image models")
BATCH_MODEL_PREFIXES = ("gpt-image-", "chatgpt-image-")


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
                raise shape_error("listing's data", "a list", data)
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
        raise shape_error("line's response.status_code", "a number", status)
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


def _stored_file(data: Any) -> StoredFile:
    if not isinstance(data, dict):
        raise shape_error("file", "an object", data)
    size = data.get("bytes")
    created = stamp_field(data, "created_at")
    if isinstance(size, bool) or not isinstance(size, int):
        raise shape_error("file's bytes", "a number", size)
    return StoredFile(
        id=text_field(data, "id", "file", required=True) or "",
        bytes=size,
        filename=text_field(data, "filename", "file") or "",
        purpose=text_field(data, "purpose", "file") or "",
        created_at=created or 0,
    )


if TYPE_CHECKING:
    # mypy checks that the OpenAI client is a BatchProvider
    _provider: type[BatchProvider] = OpenAIBatchClient
