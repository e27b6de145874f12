"""A loopback fake of OpenAI's Files and Batches APIs, on top of the Images API fake.

What it follows, as published (read 2026-12-07):

- Files (API reference "Files", and the official Python SDK's ``types/file_object.py``,
  ``types/file_deleted.py``): ``POST /v1/files`` is multipart with ``purpose`` and
  ``file``, and answers a file object ``{"id", "object": "file", "bytes", "created_at",
  "filename", "purpose", "status", "expires_at"}``; ``GET /v1/files`` lists them (newest
  first, ``purpose``, ``limit``, ``after``); ``GET /v1/files/{id}`` is one;
  ``GET /v1/files/{id}/content`` its bytes; ``DELETE /v1/files/{id}`` answers ``{"id",
  "object": "file", "deleted": true}``.
- Batches (API reference "Batch", openai-python ``types/batch.py`` and
  ``types/batch_create_params.py``): ``POST /v1/batches`` takes ``input_file_id``,
  ``endpoint`` (one of ``/v1/responses``, ``/v1/chat/completions``, ``/v1/embeddings``,
  ``/v1/completions``, ``/v1/moderations``, ``/v1/images/generations``,
  ``/v1/images/edits``, ``/v1/videos``), ``completion_window`` (only ``"24h"``) and
  ``metadata`` (at most 16 pairs, keys up to 64 characters, values up to 512). The input
  file holds at most 50,000 requests and 200 MB. ``GET /v1/batches/{id}``, ``POST
  /v1/batches/{id}/cancel`` ("cancelling for up to 10 minutes, before changing to
  cancelled, where it will have partial results (if any) available in the output file"),
  ``GET /v1/batches`` (``limit`` 1-100, default 20, ``after``; ``{"object": "list",
  "data", "first_id", "last_id", "has_more"}``).
- The batch object: ``id``, ``object: "batch"``, ``endpoint``, ``errors`` (``{"object":
  "list", "data": [{"code", "message", "param", "line"}]}``), ``input_file_id``,
  ``completion_window``, ``status`` (``validating``, ``failed``, ``in_progress``,
  ``finalizing``, ``completed``, ``expired``, ``cancelling``, ``cancelled``),
  ``output_file_id``, ``error_file_id``, ``created_at``, ``in_progress_at``,
  ``expires_at``, ``finalizing_at``, ``completed_at``, ``failed_at``, ``expired_at``,
  ``cancelling_at``, ``cancelled_at`` (Unix seconds or null), ``request_counts``
  (``total``, ``completed``, ``failed``), ``metadata``.
- Lines (API reference "The request input object" / "The request output object"): an
  input line is ``{"custom_id", "method": "POST", "url", "body"}``, custom_ids unique in a
  file; an output line is ``{"id", "custom_id", "response": {"status_code", "request_id",
  "body"} | null, "error": {"code", "message"} | null}``, "in no particular order".
- Expiry (Batch guide, "Batch expiration"): a batch not done within its window becomes
  ``expired``; its finished requests are in the output file (and paid), the others are
  written to the error file as ``{"response": null, "error": {"code": "batch_expired",
  "message": "This request could not be executed before the completion window
  expired."}}``.

What this fake chooses where the publication is silent: a request that the endpoint
refused (a 4xx/5xx ``response``) goes to the error file (the issue: "failed requests go to
the error file"); on cancellation the requests that never ran are left out of both files
(:attr:`OpenAIBatchFake.cancelled_unfinished` = ``"error_file"`` writes them there with
``batch_cancelled`` instead); validation error codes are its own
(``duplicate_custom_id``, ``invalid_json``, ``mismatched_url``...).

Time. Every timestamp and every status change follows :attr:`OpenAIBatchFake.clock`, a
:class:`FakeClock`: by default it stands still and a test moves it
(``fake.clock.advance(60)``), so that nothing depends on how fast the machine is; with
``FakeClock(rate=R)`` it runs R times faster than the wall clock (a process run by hand).
A batch spends :attr:`~OpenAIBatchFake.validating_seconds` validating,
:attr:`~OpenAIBatchFake.in_progress_seconds` running its requests one after another at an
even pace (in a random order, seeded), :attr:`~OpenAIBatchFake.finalizing_seconds`
finalizing, and expires :attr:`~OpenAIBatchFake.window_seconds` after it was created;
:attr:`~OpenAIBatchFake.stall_at` stops each batch after that many requests (so that
expiry and cancellation leave a known part done).

Large files. The output file is made while it is sent, line by line, never held whole:
with :attr:`~OpenAIBatchFake.image_bytes` = N every image is one cached PNG of about N
bytes (a 50,000-line file of 20 KB images is more than a gigabyte); otherwise each image
is the small PNG :func:`~tests.fakes.common.make_png` draws from the prompt, as the Images
fake answers it. :attr:`~OpenAIBatchFake.content_hold` holds a download after a number of
bytes until the test releases it (a kill halfway through a download).

Records, for the tests: :attr:`~OpenAIBatchFake.uploads`,
:attr:`~OpenAIBatchFake.created` (one :class:`CreatedBatch` a create),
:meth:`~OpenAIBatchFake.batches_of` (the batches each custom_id was sent in) and
:meth:`~OpenAIBatchFake.creates_by_input_file`. The endpoint names for
:meth:`~tests.fakes.common.FakeServer.add_fault` are ``upload``, ``file_get``,
``file_list``, ``content``, ``file_delete``, ``batch_create``, ``batch_get``,
``batch_cancel`` and ``batch_list``; the Images API's ``create`` still works beside them.

Run as a process: ``python -m tests.fakes.openai_batch_server --port 0 --rate 600``.
"""

from __future__ import annotations

import base64
import itertools
import json
import math
import random
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from email.parser import BytesParser
from email.policy import HTTP
from typing import Any
from urllib.parse import parse_qs, urlsplit

from tests.fakes.common import Answer, Fault, Request, make_png, serve_main
from tests.fakes.openai_server import OpenAIFake, _big_b64

__all__ = ["CreatedBatch", "FakeClock", "OpenAIBatchFake", "Upload"]

#: the endpoints a batch may name, as published
ENDPOINTS = (
    "/v1/responses",
    "/v1/chat/completions",
    "/v1/embeddings",
    "/v1/completions",
    "/v1/moderations",
    "/v1/images/generations",
    "/v1/images/edits",
    "/v1/videos",
)
#: the one endpoint this fake runs
IMAGES = "/v1/images/generations"
MAX_REQUESTS = 50_000
MAX_FILE_BYTES = 200 * 1024 * 1024
TERMINAL = frozenset({"completed", "failed", "expired", "cancelled"})
EXPIRED_MESSAGE = "This request could not be executed before the completion window expired."
CANCELLED_MESSAGE = "This request was not executed because the batch was cancelled."
#: stands for an image's base64 in a line until it is spliced in
_B64_MARK = "b64-image-goes-here"


class FakeClock:
    """The fake's time, in Unix seconds: where it started, plus ``rate`` times the wall
    clock's seconds since, plus what :meth:`advance` added. ``rate=0`` (the default):
    time moves only when a test moves it."""

    def __init__(self, rate: float = 0.0, start: float | None = None) -> None:
        self.rate = rate
        self._start = time.time() if start is None else start
        self._wall = time.monotonic()
        self._added = 0.0
        self._lock = threading.Lock()

    def now(self) -> float:
        with self._lock:
            return self._start + self._added + (time.monotonic() - self._wall) * self.rate

    def advance(self, seconds: float) -> None:
        with self._lock:
            self._added += seconds


@dataclass(frozen=True)
class Upload:
    """One ``POST /v1/files`` the fake accepted."""

    file_id: str
    filename: str
    purpose: str
    size: int
    #: the custom_ids of its lines (those it could read), in order
    custom_ids: tuple[str, ...]


@dataclass(frozen=True)
class CreatedBatch:
    """One ``POST /v1/batches`` the fake accepted."""

    batch_id: str
    input_file_id: str
    custom_ids: tuple[str, ...]
    metadata: dict[str, str] | None


@dataclass
class _File:
    id: str
    filename: str
    purpose: str
    created_at: int
    data: bytes = b""
    #: for an output or error file: its lines, made when they are read
    lines: Callable[[], Iterator[bytes]] | None = None
    size: int | None = None

    def pieces(self) -> Iterator[bytes]:
        if self.lines is None:
            yield self.data
        else:
            yield from self.lines()

    def length(self) -> int:
        if self.size is None:
            self.size = sum(len(piece) for piece in self.pieces())
        return self.size


@dataclass
class _Line:
    custom_id: str
    prompt: str
    body: dict[str, Any]
    #: None: it succeeds; else the answer that refuses it
    fault: Fault | None = None


@dataclass
class _Batch:
    id: str
    number: int
    input_file_id: str
    endpoint: str
    metadata: dict[str, str] | None
    created_at: float
    expires_at: float
    raw_lines: list[bytes]
    status: str = "validating"
    lines: list[_Line] = field(default_factory=list)
    #: indexes into ``lines`` in the order they run
    order: list[int] = field(default_factory=list)
    errors: list[dict[str, Any]] = field(default_factory=list)
    stamps: dict[str, float] = field(default_factory=dict)
    #: how many requests (of ``order``) had run when the batch stopped running
    processed: int | None = None
    output_file_id: str | None = None
    error_file_id: str | None = None
    #: durations, copied from the fake at the create
    validating: float = 0.0
    in_progress: float = 0.0
    finalizing: float = 0.0
    cancelling: float = 0.0
    stall_at: int | None = None


class OpenAIBatchFake(OpenAIFake):
    """The Images API fake, plus Files and Batches (see the module's docstring)."""

    def __init__(
        self,
        *,
        api_key: str = "test-key",
        time_scale: float = 1.0,
        clock: FakeClock | None = None,
        seed: int = 22,
    ) -> None:
        super().__init__(api_key=api_key, time_scale=time_scale)
        self.clock = clock if clock is not None else FakeClock()
        self.seed = seed
        #: fake seconds a batch spends in each phase, and its completion window
        self.validating_seconds = 1.0
        self.in_progress_seconds = 10.0
        self.finalizing_seconds = 1.0
        self.cancelling_seconds = 1.0
        self.window_seconds = 24 * 3600.0
        #: a batch runs at most this many requests, then waits for its window to end
        self.stall_at: int | None = None
        #: every image of an output file is one cached PNG of about this many bytes
        self.image_bytes: int | None = None
        #: "missing" (left out of both files) or "error_file" (batch_cancelled lines)
        self.cancelled_unfinished = "missing"
        #: the limits the fake enforces (smaller ones make the limit tests cheap)
        self.max_requests = MAX_REQUESTS
        self.max_file_bytes = MAX_FILE_BYTES
        #: (bytes, event): a content download pauses after that many bytes until the
        #: event is set (or the fake stops)
        self.content_hold: tuple[int, threading.Event] | None = None
        self.uploads: list[Upload] = []
        self.created: list[CreatedBatch] = []
        self.deleted: list[str] = []
        self._stored: dict[str, _File] = {}
        self._batches: dict[str, _Batch] = {}
        self._line_faults: dict[str, Fault] = {}
        self._numbers = itertools.count(1)

    # ---------------------------------------------------------------- test-facing API

    def fail_prompt(self, prompt: str, fault: Fault | None = None) -> None:
        """Make every batch request for ``prompt`` fail with ``fault``'s status and error
        (default: a content policy refusal); its line goes to the error file."""
        with self.lock:
            self._line_faults[prompt] = fault if fault is not None else Fault.content_policy()

    def heal_prompt(self, prompt: str) -> None:
        """Requests for ``prompt`` succeed again (in the batches created from now on)."""
        with self.lock:
            self._line_faults.pop(prompt, None)

    def batches_of(self) -> dict[str, list[str]]:
        """The batches each custom_id was sent in, in the order they were created."""
        found: dict[str, list[str]] = {}
        with self.lock:
            for created in self.created:
                for custom_id in created.custom_ids:
                    found.setdefault(custom_id, []).append(created.batch_id)
        return found

    def creates_by_input_file(self) -> Counter[str]:
        with self.lock:
            return Counter(created.input_file_id for created in self.created)

    def batch(self, batch_id: str) -> dict[str, Any]:
        """The batch object as ``GET /v1/batches/{id}`` would answer it now."""
        with self.lock:
            return self._object(self._batches[batch_id])

    def file_ids(self) -> set[str]:
        """The ids of the files the fake holds (uploaded, output and error files)."""
        with self.lock:
            return set(self._stored)

    # ---------------------------------------------------------------------- routing

    def route(self, request: Request) -> tuple[str, Callable[[Request], Answer]] | None:
        path = urlsplit(request.path).path
        parts = path.strip("/").split("/")
        method = request.method
        if parts[:2] == ["v1", "files"]:
            if len(parts) == 2:
                handlers = {"POST": ("upload", self._upload), "GET": ("file_list", self._files)}
            elif len(parts) == 3:
                handlers = {
                    "GET": ("file_get", self._file_get),
                    "DELETE": ("file_delete", self._delete),
                }
            elif len(parts) == 4 and parts[3] == "content":
                handlers = {"GET": ("content", self._content)}
            else:
                return None
            return handlers.get(method)
        if parts[:2] == ["v1", "batches"]:
            if len(parts) == 2:
                handlers = {
                    "POST": ("batch_create", self._create_batch),
                    "GET": ("batch_list", self._list),
                }
            elif len(parts) == 3:
                handlers = {"GET": ("batch_get", self._get)}
            elif len(parts) == 4 and parts[3] == "cancel":
                handlers = {"POST": ("batch_cancel", self._cancel)}
            else:
                return None
            return handlers.get(method)
        return super().route(request)

    def _invalid(self, message: str, param: str | None = None, status: int = 400) -> Answer:
        answer = self.error(status, message, None, "invalid_request_error")
        body = json.loads(answer.body)
        body["error"]["param"] = param
        return Answer.json(status, body, **answer.headers)

    # ------------------------------------------------------------------------ files

    def _file_object(self, stored: _File) -> dict[str, Any]:
        return {
            "id": stored.id,
            "object": "file",
            "bytes": stored.length(),
            "created_at": stored.created_at,
            "filename": stored.filename,
            "purpose": stored.purpose,
            "status": "processed",
            "expires_at": None,
            "status_details": None,
        }

    def _upload(self, request: Request) -> Answer:
        content_type = request.headers.get("content-type", "")
        if not content_type.startswith("multipart/form-data"):
            return self._invalid("the upload must be multipart/form-data", "file")
        message = BytesParser(policy=HTTP).parsebytes(
            b"Content-Type: " + content_type.encode() + b"\r\n\r\n" + request.raw
        )
        fields: dict[str, tuple[str | None, bytes]] = {}
        for part in message.iter_parts():
            name = part.get_param("name", header="content-disposition")
            payload = part.get_payload(decode=True)
            if isinstance(name, str) and isinstance(payload, bytes):
                fields[name] = (part.get_filename(), payload)
        purpose = fields.get("purpose", (None, b""))[1].decode(errors="replace")
        if purpose not in ("batch", "assistants", "fine-tune", "vision", "user_data", "evals"):
            return self._invalid(f"'{purpose}' is not a valid purpose", "purpose")
        if "file" not in fields:
            return self._invalid("a file is required", "file")
        filename, data = fields["file"]
        if purpose == "batch" and len(data) > self.max_file_bytes:
            return self._invalid(
                f"a batch input file may hold at most {self.max_file_bytes} bytes", "file"
            )
        custom_ids = []
        for raw in data.splitlines():
            try:
                line = json.loads(raw)
            except ValueError:
                continue
            if isinstance(line, dict) and isinstance(line.get("custom_id"), str):
                custom_ids.append(line["custom_id"])
        with self.lock:
            stored = _File(
                f"file-{next(self._numbers)}",
                filename or "upload",
                purpose,
                int(self.clock.now()),
                data=data,
            )
            self._stored[stored.id] = stored
            self.uploads.append(
                Upload(stored.id, stored.filename, purpose, len(data), tuple(custom_ids))
            )
            return Answer.json(200, self._file_object(stored))

    def _files(self, request: Request) -> Answer:
        query = parse_qs(urlsplit(request.path).query)
        purpose = query.get("purpose", [None])[0]
        with self.lock:
            found = [f for f in self._stored.values() if purpose in (None, f.purpose)]
            found.reverse()  # newest first (order=desc, the default)
            return self._page(query, [self._file_object(f) for f in found], 10_000)

    def _page(self, query: dict[str, list[str]], items: list[dict[str, Any]], most: int) -> Answer:
        """One page of a listing: ``limit`` (1 to ``most``; default 20 for batches, all
        for files, as published) items after the one named ``after``."""
        try:
            limit = int(query.get("limit", [str(min(most, 20) if most <= 100 else most)])[0])
        except ValueError:
            return self._invalid("limit must be a number", "limit")
        if not 1 <= limit <= most:
            return self._invalid(f"limit must be between 1 and {most}", "limit")
        after = query.get("after", [None])[0]
        if after is not None:
            ids = [item["id"] for item in items]
            if after not in ids:
                return self._invalid(f"no object '{after}' to list after", "after")
            items = items[ids.index(after) + 1 :]
        page = items[:limit]
        return Answer.json(
            200,
            {
                "object": "list",
                "data": page,
                "first_id": page[0]["id"] if page else None,
                "last_id": page[-1]["id"] if page else None,
                "has_more": len(items) > limit,
            },
        )

    def _stored_file(self, request: Request) -> _File | None:
        file_id = urlsplit(request.path).path.split("/")[3]
        with self.lock:
            for batch in self._batches.values():
                self._advance(batch)
            return self._stored.get(file_id)

    def _missing_file(self, request: Request) -> Answer:
        file_id = urlsplit(request.path).path.split("/")[3]
        return self.error(404, f"No such File object: {file_id}", None, "invalid_request_error")

    def _file_get(self, request: Request) -> Answer:
        stored = self._stored_file(request)
        if stored is None:
            return self._missing_file(request)
        return Answer.json(200, self._file_object(stored))

    def _delete(self, request: Request) -> Answer:
        stored = self._stored_file(request)
        if stored is None:
            return self._missing_file(request)
        with self.lock:
            self._stored.pop(stored.id, None)
            self.deleted.append(stored.id)
        return Answer.json(200, {"id": stored.id, "object": "file", "deleted": True})

    def _content(self, request: Request) -> Answer:
        stored = self._stored_file(request)
        if stored is None:
            return self._missing_file(request)
        return Answer(200, b"", "application/octet-stream", pieces=self._held(stored.pieces()))

    def _held(self, pieces: Iterator[bytes]) -> Iterator[bytes]:
        """``pieces``, paused after :attr:`content_hold`'s bytes until its event is set."""
        hold = self.content_hold
        sent = 0
        for piece in pieces:
            if hold is not None and sent < hold[0] <= sent + len(piece):
                cut = hold[0] - sent
                yield piece[:cut]
                while not hold[1].wait(0.05) and not self._stopping.is_set():
                    pass
                piece = piece[cut:]
            sent += len(piece)
            yield piece

    # ---------------------------------------------------------------------- batches

    def _create_batch(self, request: Request) -> Answer:
        body = request.body if isinstance(request.body, dict) else {}
        file_id = body.get("input_file_id")
        endpoint = body.get("endpoint")
        metadata = body.get("metadata")
        if not isinstance(file_id, str):
            return self._invalid("input_file_id is required", "input_file_id")
        if endpoint not in ENDPOINTS:
            return self._invalid(f"'{endpoint}' is not a supported endpoint", "endpoint")
        if endpoint != IMAGES:
            return self._invalid(f"this fake runs only {IMAGES} batches", "endpoint")
        if body.get("completion_window") != "24h":
            return self._invalid("completion_window must be '24h'", "completion_window")
        if metadata is not None and not _valid_metadata(metadata):
            return self._invalid("metadata: at most 16 string pairs (64, 512)", "metadata")
        with self.lock:
            stored = self._stored.get(file_id)
            if stored is None or stored.lines is not None:
                return self._invalid(f"no uploaded file '{file_id}'", "input_file_id")
            if stored.purpose != "batch":
                return self._invalid("the input file's purpose must be 'batch'", "input_file_id")
            now = self.clock.now()
            number = next(self._numbers)
            batch = _Batch(
                id=f"batch_{number}",
                number=number,
                input_file_id=file_id,
                endpoint=endpoint,
                metadata=metadata,
                created_at=now,
                expires_at=now + self.window_seconds,
                raw_lines=[raw for raw in stored.data.splitlines() if raw.strip()],
                validating=self.validating_seconds,
                in_progress=self.in_progress_seconds,
                finalizing=self.finalizing_seconds,
                cancelling=self.cancelling_seconds,
                stall_at=self.stall_at,
            )
            self._batches[batch.id] = batch
            upload = next(u for u in self.uploads if u.file_id == file_id)
            self.created.append(CreatedBatch(batch.id, file_id, upload.custom_ids, metadata))
            return Answer.json(200, self._object(batch))

    def _batch_of(self, request: Request) -> _Batch | None:
        return self._batches.get(urlsplit(request.path).path.split("/")[3])

    def _get(self, request: Request) -> Answer:
        with self.lock:
            batch = self._batch_of(request)
            if batch is None:
                return self._no_batch(request)
            return Answer.json(200, self._object(batch))

    def _no_batch(self, request: Request) -> Answer:
        batch_id = urlsplit(request.path).path.split("/")[3]
        return self.error(404, f"No such batch: {batch_id}", None, "invalid_request_error")

    def _list(self, request: Request) -> Answer:
        query = parse_qs(urlsplit(request.path).query)
        with self.lock:
            batches = [self._object(b) for b in reversed(self._batches.values())]
            return self._page(query, batches, 100)

    def _cancel(self, request: Request) -> Answer:
        with self.lock:
            batch = self._batch_of(request)
            if batch is None:
                return self._no_batch(request)
            self._advance(batch)
            if batch.status not in ("validating", "in_progress"):
                return self._invalid(f"Cannot cancel a batch with status '{batch.status}'.")
            now = self.clock.now()
            batch.processed = self._done(batch, now) if batch.status == "in_progress" else 0
            batch.status = "cancelling"
            batch.stamps["cancelling_at"] = now
            return Answer.json(200, self._object(batch))

    # ------------------------------------------------------------ the batch lifecycle

    def _done(self, batch: _Batch, at: float) -> int:
        """How many of the batch's requests had run at fake time ``at``."""
        total = len(batch.order)
        started = batch.stamps["in_progress_at"]
        if batch.in_progress <= 0:
            done = total
        else:
            done = min(total, math.floor(total * max(0.0, at - started) / batch.in_progress))
        return done if batch.stall_at is None else min(done, batch.stall_at)

    def _advance(self, batch: _Batch) -> None:
        """Bring ``batch`` to its status at the clock's now (under the lock)."""
        now = self.clock.now()
        if batch.status == "validating":
            at = batch.created_at + batch.validating
            if now < at:
                return
            self._validate(batch)
            if batch.errors:
                batch.status = "failed"
                batch.stamps["failed_at"] = at
                return
            batch.status = "in_progress"
            batch.stamps["in_progress_at"] = at
            order = list(range(len(batch.lines)))
            random.Random(self.seed * 1_000_003 + batch.number).shuffle(order)
            batch.order = order
        if batch.status == "in_progress":
            ends = batch.stamps["in_progress_at"] + max(0.0, batch.in_progress)
            stalls = batch.stall_at is not None and batch.stall_at < len(batch.order)
            if not stalls and ends <= batch.expires_at:
                if now >= ends:
                    batch.processed = len(batch.order)
                    batch.status = "finalizing"
                    batch.stamps["finalizing_at"] = ends
            elif now >= batch.expires_at:
                batch.processed = self._done(batch, batch.expires_at)
                batch.status = "expired"
                batch.stamps["expired_at"] = batch.expires_at
                self._write_results(batch, "batch_expired")
                return
        if batch.status == "finalizing":
            at = batch.stamps["finalizing_at"] + batch.finalizing
            if now >= at:
                batch.status = "completed"
                batch.stamps["completed_at"] = at
                self._write_results(batch, None)
        if batch.status == "cancelling":
            at = batch.stamps["cancelling_at"] + batch.cancelling
            if now >= at:
                batch.status = "cancelled"
                batch.stamps["cancelled_at"] = at
                unfinished = (
                    "batch_cancelled" if self.cancelled_unfinished == "error_file" else None
                )
                self._write_results(batch, unfinished)

    def _validate(self, batch: _Batch) -> None:
        seen: set[str] = set()
        errors = batch.errors
        if len(batch.raw_lines) > self.max_requests:
            errors.append(
                _error("too_many_requests", f"at most {self.max_requests} requests a batch")
            )
        for number, raw in enumerate(batch.raw_lines, 1):
            if len(errors) >= 20:
                break
            try:
                line = json.loads(raw)
            except ValueError:
                errors.append(_error("invalid_json", "this line is not JSON", line=number))
                continue
            if not isinstance(line, dict):
                errors.append(_error("invalid_json", "this line is not an object", line=number))
                continue
            custom_id = line.get("custom_id")
            body = line.get("body")
            if not isinstance(custom_id, str) or not custom_id:
                errors.append(
                    _error("missing_custom_id", "custom_id is required", "custom_id", number)
                )
            elif custom_id in seen:
                errors.append(
                    _error(
                        "duplicate_custom_id",
                        f"the custom_id '{custom_id}' is used more than once",
                        "custom_id",
                        number,
                    )
                )
            elif line.get("method") != "POST":
                errors.append(_error("invalid_method", "method must be POST", "method", number))
            elif line.get("url") != batch.endpoint:
                errors.append(
                    _error(
                        "mismatched_url",
                        f"the url must be the batch's endpoint {batch.endpoint}",
                        "url",
                        number,
                    )
                )
            elif not isinstance(body, dict) or not isinstance(body.get("prompt"), str):
                errors.append(_error("invalid_body", "body.prompt is required", "body", number))
            else:
                seen.add(custom_id)
                prompt = body["prompt"]
                fault = self._line_faults.get(prompt)
                batch.lines.append(_Line(custom_id, prompt, body, fault))
        if errors:
            batch.lines.clear()

    def _write_results(self, batch: _Batch, unfinished: str | None) -> None:
        """Make the output and error files of a batch that has stopped (under the lock):
        the requests that ran, and (``unfinished``: the error code) those that did not."""
        processed = batch.processed or 0
        ran = [batch.lines[i] for i in batch.order[:processed]]
        not_run = [batch.lines[i] for i in batch.order[processed:]]
        ok = [line for line in ran if line.fault is None]
        failed = [line for line in ran if line.fault is not None]
        errors = [*failed, *not_run] if unfinished else failed
        created = int(self.clock.now())
        tag = batch.number
        image_bytes = self.image_bytes
        if ok:
            output = _File(
                f"file-{next(self._numbers)}", f"{batch.id}_output.jsonl", "batch_output", created
            )
            output.lines = lambda: _output_lines(ok, tag, created, image_bytes)
            self._stored[output.id] = output
            batch.output_file_id = output.id
        if errors:
            error = _File(
                f"file-{next(self._numbers)}", f"{batch.id}_error.jsonl", "batch_output", created
            )
            error.lines = lambda: _error_lines(
                failed, not_run if unfinished else [], unfinished, tag
            )
            self._stored[error.id] = error
            batch.error_file_id = error.id

    def _counts(self, batch: _Batch) -> dict[str, int]:
        if batch.status in ("validating", "failed"):
            return {"total": 0, "completed": 0, "failed": 0}
        if batch.processed is not None:
            done = batch.processed
        else:
            done = self._done(batch, self.clock.now())
        ran = [batch.lines[i] for i in batch.order[:done]]
        failed = sum(1 for line in ran if line.fault is not None)
        return {"total": len(batch.lines), "completed": len(ran) - failed, "failed": failed}

    def _object(self, batch: _Batch) -> dict[str, Any]:
        self._advance(batch)
        stamps = {
            name: (int(batch.stamps[name]) if name in batch.stamps else None)
            for name in (
                "in_progress_at",
                "finalizing_at",
                "completed_at",
                "failed_at",
                "expired_at",
                "cancelling_at",
                "cancelled_at",
            )
        }
        return {
            "id": batch.id,
            "object": "batch",
            "endpoint": batch.endpoint,
            "errors": {"object": "list", "data": batch.errors} if batch.errors else None,
            "input_file_id": batch.input_file_id,
            "completion_window": "24h",
            "status": batch.status,
            "output_file_id": batch.output_file_id,
            "error_file_id": batch.error_file_id,
            "created_at": int(batch.created_at),
            "expires_at": int(batch.expires_at),
            **stamps,
            "request_counts": self._counts(batch),
            "metadata": batch.metadata,
        }


def _valid_metadata(metadata: Any) -> bool:
    return (
        isinstance(metadata, dict)
        and len(metadata) <= 16
        and all(
            isinstance(k, str) and isinstance(v, str) and len(k) <= 64 and len(v) <= 512
            for k, v in metadata.items()
        )
    )


def _error(
    code: str, message: str, param: str | None = None, line: int | None = None
) -> dict[str, Any]:
    return {"code": code, "message": message, "param": param, "line": line}


def _output_lines(
    lines: list[_Line], tag: int, created: int, image_bytes: int | None
) -> Iterator[bytes]:
    """The output file's lines, each made as it is sent; a big image's base64 is spliced
    in (the same cached text each time) rather than encoded as JSON again."""
    for n, line in enumerate(lines, 1):
        words = len(line.prompt.split())
        body = {
            "created": created,
            "data": [{"b64_json": _B64_MARK, "revised_prompt": f"{line.prompt}, revised"}],
            "usage": {"input_tokens": words, "output_tokens": 272, "total_tokens": words + 272},
        }
        record = {
            "id": f"batch_req_{tag}_{n}",
            "custom_id": line.custom_id,
            "response": {"status_code": 200, "request_id": f"req_{tag}_{n}", "body": body},
            "error": None,
        }
        head, tail = json.dumps(record).encode().split(_B64_MARK.encode())
        b64 = _big_b64(image_bytes) if image_bytes else base64.b64encode(make_png(line.prompt))
        yield head + b64 + tail + b"\n"


def _error_lines(
    failed: list[_Line], not_run: list[_Line], code: str | None, tag: int
) -> Iterator[bytes]:
    for n, line in enumerate(failed, 1):
        fault = line.fault
        assert fault is not None
        body = {
            "error": {
                "message": fault.message,
                "type": fault.type,
                "param": None,
                "code": fault.code,
            }
        }
        record = {
            "id": f"batch_req_{tag}_e{n}",
            "custom_id": line.custom_id,
            "response": {
                "status_code": fault.status,
                "request_id": f"req_{tag}_e{n}",
                "body": body,
            },
            "error": None,
        }
        yield json.dumps(record).encode() + b"\n"
    message = EXPIRED_MESSAGE if code == "batch_expired" else CANCELLED_MESSAGE
    for n, line in enumerate(not_run, 1):
        record = {
            "id": f"batch_req_{tag}_u{n}",
            "custom_id": line.custom_id,
            "response": None,
            "error": {"code": code, "message": message},
        }
        yield json.dumps(record).encode() + b"\n"


def _main() -> None:
    import argparse
    import sys

    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--rate", type=float, default=600.0)
    known, rest = parser.parse_known_args()
    sys.argv[1:] = rest

    def make(**kwargs: Any) -> OpenAIBatchFake:
        return OpenAIBatchFake(clock=FakeClock(rate=known.rate), **kwargs)

    serve_main(make, "A loopback fake of OpenAI's Images, Files and Batches APIs.")


if __name__ == "__main__":
    _main()
