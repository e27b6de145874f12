"""The machinery both fakes share: a threaded loopback server, scripted faults, counters.

A :class:`Fault` is applied to matching requests (by endpoint, prompt, position) before the
fake's normal answer; :meth:`FakeServer.limit_rpm` makes it allow only R requests per
(scaled) minute, or R/60 in any one second, answering 429 with Retry-After beyond that.
Every wait the fake makes is multiplied by ``time_scale``, and every wait it asks for is
given unscaled, as a real server would: the client's own ``time_scale`` brings it back.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import hashlib
import io
import itertools
import json
import math
import random
import select
import signal
import sys
import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

__all__ = [
    "Answer",
    "Arrival",
    "FakeServer",
    "Fault",
    "Request",
    "make_big_png",
    "make_png",
    "serve_main",
]


@functools.lru_cache(maxsize=256)
def make_png(prompt: str, width: int = 32, height: int = 32) -> bytes:
    """A small real PNG, the same for the same prompt: a gradient in the prompt's colours."""
    from PIL import Image

    digest = hashlib.sha256(prompt.encode()).digest()
    a, b = digest[:3], digest[3:6]
    image = Image.new("RGB", (width, height))
    pixels = [
        tuple(a[c] + (b[c] - a[c]) * x // max(1, width - 1) for c in range(3))
        for _y in range(height)
        for x in range(width)
    ]
    image.putdata(pixels)
    out = io.BytesIO()
    image.save(out, format="PNG")
    return out.getvalue()


@functools.lru_cache(maxsize=4)
def make_big_png(nbytes: int) -> bytes:
    """A real PNG of about ``nbytes`` (at least), made once: random-looking pixels, stored
    with the fastest compression (random data does not compress), for memory tests."""
    from PIL import Image

    side = max(1, math.ceil(math.sqrt(nbytes / 3)))
    pixels = random.Random(nbytes).randbytes(side * side * 3)
    out = io.BytesIO()
    Image.frombytes("RGB", (side, side), pixels).save(out, format="PNG", compress_level=0)
    return out.getvalue()


@dataclass(frozen=True)
class Fault:
    """What to do instead of (or before) the normal answer.

    ``status`` 0 means "answer normally" (after ``delay``). ``retry_after`` /
    ``retry_after_ms`` become headers; ``message``, ``code`` and ``type`` make the error body
    in the fake's own style.
    """

    status: int = 0
    message: str = ""
    code: str | None = None
    type: str | None = None
    retry_after: str | None = None
    retry_after_ms: str | None = None
    headers: tuple[tuple[str, str], ...] = ()
    delay: float = 0.0  # seconds, times time_scale
    hang: bool = False  # never answer (until the server stops)
    #: make (and, for a create, bill) the normal answer, then never send it: the client
    #: dies or times out after the provider did the work
    hang_after: bool = False
    drop: bool = False  # close the connection without an answer
    #: answer only once this event is set (or the server stops): a test holds a client
    #: mid-request for exactly as long as it needs, whatever the machine's speed
    held_until: threading.Event | None = None
    #: a body of this many filler bytes instead of the normal answer (with ``status``, 200
    #: when 0): sent with its Content-Length, or ``chunked`` without one, or as ``gzip``
    #: (``size`` is then what it inflates to; the wire carries ~1 KB a MiB, and its
    #: Content-Length declares that). Made while it is sent, never held in memory.
    size: int = 0
    chunked: bool = False
    gzip: bool = False
    #: the bomb's format: "gzip", "deflate" (zlib-wrapped) or "raw-deflate" (no header,
    #: as some servers send for Content-Encoding: deflate)
    bomb_format: str = "gzip"
    #: headers, then one byte every ``drip`` seconds (times time_scale) of a body that
    #: claims a megabyte, until the client leaves or the server stops
    drip: float = 0.0
    #: exactly these bytes as the body instead of the normal answer (a malformed one)
    raw: bytes | None = None

    @classmethod
    def rate_limited(cls, retry_after: float | None = 1.0, *, ms: bool = False) -> Fault:
        if retry_after is None:
            return cls(429, "Rate limit reached", "rate_limit_exceeded", "requests")
        if ms:
            return cls(
                429,
                "Rate limit reached",
                "rate_limit_exceeded",
                "requests",
                retry_after_ms=f"{retry_after * 1000:g}",
            )
        return cls(
            429,
            "Rate limit reached",
            "rate_limit_exceeded",
            "requests",
            retry_after=f"{retry_after:g}",
        )

    @classmethod
    def insufficient_quota(cls) -> Fault:
        return cls(
            429,
            "You exceeded your current quota, please check your plan and billing",
            "insufficient_quota",
            "insufficient_quota",
        )

    @classmethod
    def billing_hard_limit(cls) -> Fault:
        """DALL·E's answer once the account's hard spending limit is reached (a 400)."""
        return cls(
            400,
            "Billing hard limit has been reached",
            "billing_hard_limit_reached",
            "invalid_request_error",
        )

    @classmethod
    def model_not_found(cls, model: str) -> Fault:
        return cls(
            404,
            f"The model `{model}` does not exist or you do not have access to it.",
            "model_not_found",
            "invalid_request_error",
        )

    @classmethod
    def moderation_blocked(cls) -> Fault:
        return cls(
            400,
            "Your request was rejected by the safety system",
            "moderation_blocked",
            "image_generation_user_error",
        )

    @classmethod
    def content_policy(cls) -> Fault:
        return cls(
            400,
            "Your request was rejected as a result of our safety system",
            "content_policy_violation",
            "invalid_request_error",
        )

    @classmethod
    def server_error(cls, status: int = 500) -> Fault:
        return cls(
            status,
            "The server had an error while processing your request",
            "server_error",
            "server_error",
        )

    @classmethod
    def slow(cls, seconds: float) -> Fault:
        return cls(delay=seconds)

    @classmethod
    def hanging(cls) -> Fault:
        return cls(hang=True)

    @classmethod
    def paid_then_hang(cls) -> Fault:
        return cls(hang_after=True)

    @classmethod
    def dropped(cls) -> Fault:
        return cls(drop=True)

    @classmethod
    def huge(cls, size: int, *, status: int = 0, chunked: bool = False) -> Fault:
        return cls(status, size=size, chunked=chunked)

    @classmethod
    def gzip_bomb(cls, inflated: int, *, status: int = 0, bomb_format: str = "gzip") -> Fault:
        return cls(status, size=inflated, gzip=True, bomb_format=bomb_format)

    @classmethod
    def dripping(cls, every: float) -> Fault:
        return cls(drip=every)

    @classmethod
    def answer(cls, raw: bytes, status: int = 200) -> Fault:
        return cls(status, raw=raw)

    @classmethod
    def held(cls, until: threading.Event) -> Fault:
        """Answer normally, but only once ``until`` is set (see :attr:`held_until`)."""
        return cls(held_until=until)

    @property
    def streams(self) -> bool:
        """Whether the fake sends this fault's own body (see :meth:`FakeServer._stream`)."""
        return bool(self.size or self.drip or self.raw is not None)


@functools.lru_cache(maxsize=3)
def _gzip_blocks(bomb_format: str = "gzip") -> tuple[bytes, bytes]:
    """A compressed stream's start (header and one MiB of zeros) and a block that inflates
    to one more MiB; repeated, it makes a bomb of any size with no trailer (a client must
    stop before its end anyway). ``bomb_format``: see :attr:`Fault.bomb_format`."""
    import zlib

    wbits = {"gzip": zlib.MAX_WBITS | 16, "deflate": zlib.MAX_WBITS, "raw-deflate": -15}
    mib = bytes(1 << 20)
    squeeze = zlib.compressobj(9, zlib.DEFLATED, wbits[bomb_format])
    head = squeeze.compress(mib) + squeeze.flush(zlib.Z_FULL_FLUSH)
    block = squeeze.compress(mib) + squeeze.flush(zlib.Z_FULL_FLUSH)
    return head, block


@dataclass
class _Rule:
    fault: Fault
    endpoint: str
    prompt: str | None
    skip: int
    remaining: int


@dataclass
class Request:
    method: str
    path: str
    headers: dict[str, str]  # lower-case names
    body: Any  # parsed JSON or None
    raw: bytes = b""  # the body as sent (a multipart upload is not JSON)


@dataclass(frozen=True)
class Arrival:
    """One request as the fake saw it: when it was read (time.monotonic), and its answer."""

    time: float
    endpoint: str
    status: int  # 0: dropped or hung
    key: str | None  # its Idempotency-Key


@dataclass
class Answer:
    status: int
    body: bytes
    content_type: str = "application/json"
    headers: dict[str, str] = field(default_factory=dict)
    #: when set, the body is these pieces instead of ``body``, made while they are sent
    #: (never held in memory as a whole) and sent chunked
    pieces: Iterable[bytes] | None = None

    @classmethod
    def json(cls, status: int, data: Any, **headers: str) -> Answer:
        return cls(status, json.dumps(data).encode(), "application/json", dict(headers))


class FakeServer:
    """A loopback HTTP server with scripted faults, an optional rpm limit and counters.

    Counters (read them after the requests): ``requests`` by endpoint name, ``prompts`` and
    ``keys`` (Idempotency-Key) by value, ``paid_creates`` and ``paid_by_prompt``; ``log`` has
    one :class:`Arrival` per request (status 0: dropped or hung).
    """

    base_path = ""

    def __init__(self, *, api_key: str = "test-key", time_scale: float = 1.0) -> None:
        self.api_key = api_key
        self.time_scale = time_scale
        self.lock = threading.Lock()
        self.requests: Counter[str] = Counter()
        self.prompts: Counter[str] = Counter()
        self.keys: Counter[str] = Counter()
        self.paid_creates = 0
        self.paid_by_prompt: Counter[str] = Counter()
        self.log: list[Arrival] = []
        #: answers written in full, by endpoint name
        self.sent: Counter[str] = Counter()
        #: body bytes written for faults that send their own body, by endpoint name
        self.streamed: Counter[str] = Counter()
        #: notified whenever ``log`` or ``sent`` grows (see :meth:`wait_for`)
        self._news = threading.Condition()
        self._rules: list[_Rule] = []
        self._rpm: tuple[int, deque[float]] | None = None
        #: limit_rpm(per_second=True): the slices, and the stated limit's (level, time)
        self._per_second = False
        self._stated = True
        self._bucket = (0.0, 0.0)
        self._stopping = threading.Event()
        self._httpd: _Server | None = None
        self._thread: threading.Thread | None = None
        #: connections accepted and not yet closed (guarded by ``_news``)
        self._open = 0
        self.files: dict[str, bytes] = {}

    # ---------------------------------------------------------------- test-facing API

    @property
    def origin(self) -> str:
        assert self._httpd is not None, "the fake is not started"
        return f"http://127.0.0.1:{self._httpd.server_address[1]}"

    @property
    def url(self) -> str:
        """The base URL a client is given (OpenAI: with /v1; Replicate: the host root)."""
        return self.origin + self.base_path

    def add_fault(
        self,
        fault: Fault,
        *,
        endpoint: str = "create",
        prompt: str | None = None,
        times: int = 1,
        after: int = 0,
    ) -> None:
        """Apply ``fault`` to ``times`` matching requests, after letting ``after`` of them by.

        ``endpoint`` is "create" (the paid POST), "poll" (Replicate GET) or "file" (download).
        ``times=-1``: every matching request from then on.
        """
        with self.lock:
            self._rules.append(_Rule(fault, endpoint, prompt, after, times))

    def clear_faults(self) -> None:
        """Forget every fault added: requests get the normal answer again."""
        with self.lock:
            self._rules.clear()

    def limit_rpm(self, rpm: int, *, per_second: bool = False, stated: bool = True) -> None:
        """Allow only ``rpm`` creates per 60 s × time_scale (sliding); 429 beyond that.

        ``per_second``: enforce it in one-second slices, as OpenAI's rate-limit guide says
        a per-minute limit may be: at most ``rpm/60`` creates in any one second (sliding;
        below 60 a minute, one in any ``60/rpm`` s), and answer with the headers OpenAI
        publishes, its stated per-minute limit replenished continuously:
        ``x-ratelimit-limit-requests`` (``rpm``), ``-remaining-requests`` and
        ``-reset-requests`` (the time until it is whole again), on a 429 too, with
        ``retry-after-ms`` and ``retry-after``; ``stated=False``: without those headers
        (a provider that states no limit, only its 429s' waits)."""
        with self.lock:
            self._rpm = (rpm, deque())
            self._per_second = per_second
            self._stated = stated
            self._bucket = (float(rpm), time.monotonic())

    def wait_for(self, predicate: Callable[[], bool], timeout: float = 10.0) -> None:
        """Block until ``predicate()`` is true, re-checked whenever a request arrives or an
        answer is sent (no polling); AssertionError after ``timeout`` seconds."""
        with self._news:
            if not self._news.wait_for(predicate, timeout):
                raise AssertionError(f"the fake never saw what was expected in {timeout} s")

    def notify(self) -> None:
        with self._news:
            self._news.notify_all()

    def wait_idle(self, timeout: float = 10.0) -> None:
        """Block until no connection is open or waiting to be accepted: once the clients
        have exited, every request they sent has been handled (and counted) by then.
        AssertionError after ``timeout`` seconds (a hanging fault keeps its connection)."""
        assert self._httpd is not None, "the fake is not started"
        listening = self._httpd.socket
        deadline = time.monotonic() + timeout
        with self._news:
            # Closing a connection notifies; one still in the accept queue does not, hence
            # the short re-check.
            while self._open or select.select([listening], [], [], 0)[0]:
                if time.monotonic() > deadline:
                    raise AssertionError(f"the fake still had a connection after {timeout} s")
                self._news.wait(0.01)

    def _connection(self, change: int) -> None:
        with self._news:
            self._open += change
            self._news.notify_all()

    def arrivals(self, endpoint: str) -> list[float]:
        with self.lock:
            return [a.time for a in self.log if a.endpoint == endpoint]

    # ------------------------------------------------------------------------ running

    def start(self, port: int = 0) -> str:
        """Listen on 127.0.0.1 (``port`` 0: a free one) in a thread; returns :attr:`url`."""
        fake = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: Any) -> None:
                pass

            def do_GET(self) -> None:
                fake._serve(self)

            def do_POST(self) -> None:
                fake._serve(self)

            def do_DELETE(self) -> None:
                fake._serve(self)

        self._httpd = _Server(("127.0.0.1", port), Handler)
        self._httpd.on_connection = self._connection
        self._httpd.daemon_threads = True
        self._thread = threading.Thread(target=self._httpd.serve_forever, args=(0.02,), daemon=True)
        self._thread.start()
        return self.url

    def stop(self) -> None:
        self._stopping.set()  # releases hanging handlers
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
        if self._thread is not None:
            self._thread.join(5)

    # ---------------------------------------------------------------------- internals

    def route(self, request: Request) -> tuple[str, Callable[[Request], Answer]] | None:
        """(endpoint name, handler) for a request; subclasses define their API."""
        raise NotImplementedError

    def error(self, status: int, message: str, code: str | None, type_: str | None) -> Answer:
        raise NotImplementedError

    def authorized(self, request: Request) -> bool:
        return request.headers.get("authorization") == f"Bearer {self.api_key}"

    def _match(self, endpoint: str, prompt: str | None) -> Fault | None:
        with self.lock:
            for rule in self._rules:
                if rule.endpoint != endpoint or rule.prompt not in (None, prompt):
                    continue
                if rule.remaining == 0:
                    continue
                if rule.skip > 0:
                    rule.skip -= 1
                    continue
                if rule.remaining > 0:
                    rule.remaining -= 1
                return rule.fault
        return None

    def _over_rpm(self) -> tuple[float | None, dict[str, str]]:
        """Unscaled seconds until a create is allowed again (None: allowed now, and then
        counted), and OpenAI's x-ratelimit-*-requests headers for an allowed one: the
        limit, what is left of the window, and when its oldest request leaves it."""
        with self.lock:
            if self._rpm is None:
                return None, {}
            if self._per_second:
                return self._over_slice()
            limit, accepted = self._rpm
            window = 60.0 * self.time_scale
            now = time.monotonic()
            while accepted and accepted[0] <= now - window:
                accepted.popleft()
            if len(accepted) >= limit:
                return (accepted[0] + window - now) / self.time_scale, {}
            accepted.append(now)
            reset = (accepted[0] + window - now) / self.time_scale
            return None, {
                "x-ratelimit-limit-requests": str(limit),
                "x-ratelimit-remaining-requests": str(limit - len(accepted)),
                "x-ratelimit-reset-requests": f"{reset * 1000:.0f}ms",
            }

    def _over_slice(self) -> tuple[float | None, dict[str, str]]:
        """:meth:`_over_rpm` in one-second slices (see :meth:`limit_rpm`), with the lock
        held; the headers go with a 429 too."""
        assert self._rpm is not None
        limit, accepted = self._rpm
        allowed = max(1, limit // 60)
        window = allowed * 60.0 / limit * self.time_scale
        now = time.monotonic()
        while accepted and accepted[0] <= now - window:
            accepted.popleft()
        # the stated per-minute limit, replenished continuously (what the headers tell)
        level, then = self._bucket
        level = min(float(limit), level + (now - then) / self.time_scale * limit / 60.0)
        wait = None
        if len(accepted) >= allowed:
            wait = (accepted[0] + window - now) / self.time_scale
        else:
            accepted.append(now)
            level = max(0.0, level - 1)
        self._bucket = (level, now)
        reset = (limit - level) * 60.0 / limit
        headers = {
            "x-ratelimit-limit-requests": str(limit),
            "x-ratelimit-remaining-requests": str(int(level)),
            "x-ratelimit-reset-requests": f"{reset * 1000:.0f}ms",
        }
        return wait, headers if self._stated else {}

    def prompt_of(self, request: Request) -> str | None:
        return None

    def _answer(
        self, request: Request, endpoint: str, handler: Callable[[Request], Answer]
    ) -> Answer | Fault:
        prompt = self.prompt_of(request) if endpoint == "create" else None
        with self.lock:
            self.requests[endpoint] += 1
            if prompt is not None:
                self.prompts[prompt] += 1
            key = request.headers.get("idempotency-key")
            if key is not None and endpoint == "create":
                self.keys[key] += 1
        self.notify()  # a request held by a fault is seen before it is answered
        if not self.authorized(request):
            return self.error(401, "Incorrect API key provided", "invalid_api_key", None)
        rate_headers: dict[str, str] = {}
        if endpoint == "create":
            wait, rate_headers = self._over_rpm()
            if wait is not None:
                answer = self.error(429, "Rate limit reached", "rate_limit_exceeded", "requests")
                answer.headers.update(rate_headers)
                answer.headers["retry-after-ms"] = f"{wait * 1000:.0f}"
                answer.headers["retry-after"] = str(max(1, math.ceil(wait)))
                return answer
        fault = self._match(endpoint, prompt)
        if fault is not None:
            if fault.hang or fault.drop or fault.streams:
                return fault
            if fault.hang_after:
                handler(request)
                return fault
            if fault.held_until is not None:
                while not fault.held_until.wait(0.05) and not self._stopping.is_set():
                    pass
            if fault.delay:
                self._stopping.wait(fault.delay * self.time_scale)
            if fault.status:
                answer = self.error(fault.status, fault.message, fault.code, fault.type)
                if fault.retry_after is not None:
                    answer.headers["retry-after"] = fault.retry_after
                if fault.retry_after_ms is not None:
                    answer.headers["retry-after-ms"] = fault.retry_after_ms
                answer.headers.update(dict(fault.headers))
                return answer
        answer = handler(request)
        answer.headers.update(rate_headers)
        return answer

    def _serve(self, handler: BaseHTTPRequestHandler) -> None:
        length = int(handler.headers.get("content-length") or 0)
        raw = handler.rfile.read(length) if length else b""
        try:
            body = json.loads(raw) if raw else None
        except ValueError:
            body = None
        request = Request(
            handler.command,
            handler.path,
            {k.lower(): v for k, v in handler.headers.items()},
            body,
            raw,
        )
        arrived = time.monotonic()
        key = request.headers.get("idempotency-key")
        routed = self.route(request)
        answer: Answer | Fault
        if routed is None:
            endpoint = "unknown"
            answer = self.error(404, f"no route for {request.method} {request.path}", None, None)
        else:
            endpoint = routed[0]
            answer = self._answer(request, *routed)
        if isinstance(answer, Fault) and answer.streams:
            with self.lock:
                self.log.append(Arrival(arrived, endpoint, answer.status or 200, key))
            self.notify()
            self._stream(handler, endpoint, answer)
            return
        if isinstance(answer, Fault):
            with self.lock:
                self.log.append(Arrival(arrived, endpoint, 0, key))
            self.notify()
            if answer.hang or answer.hang_after:
                self._stopping.wait()
            handler.close_connection = True
            return
        with self.lock:
            self.log.append(Arrival(arrived, endpoint, answer.status, key))
        self.notify()
        if answer.pieces is not None:
            self._send_pieces(handler, endpoint, answer)
            return
        handler.send_response(answer.status)
        handler.send_header("Content-Type", answer.content_type)
        handler.send_header("Content-Length", str(len(answer.body)))
        for name, value in answer.headers.items():
            handler.send_header(name, value)
        handler.end_headers()
        try:
            handler.wfile.write(answer.body)
            handler.wfile.flush()
        except OSError:  # the client died meanwhile (a test killed it)
            handler.close_connection = True
            return
        with self.lock:
            self.sent[endpoint] += 1
        self.notify()

    def _stream(self, handler: BaseHTTPRequestHandler, endpoint: str, fault: Fault) -> None:
        """Send ``fault``'s own body (huge, chunked, a gzip bomb, dripping or raw), counting
        the bytes written in :attr:`streamed`; stop when the client leaves."""
        handler.close_connection = True
        handler.send_response(fault.status or 200)
        handler.send_header("Content-Type", "application/json")
        for name, value in fault.headers:
            handler.send_header(name, value)
        if fault.raw is not None:
            handler.send_header("Content-Length", str(len(fault.raw)))
            pieces: Any = [fault.raw]
        elif fault.drip:
            handler.send_header("Content-Length", str(1_000_000))
            pieces = self._drip(fault.drip)
        elif fault.gzip:
            head, block = _gzip_blocks(fault.bomb_format)
            blocks = max(1, math.ceil(fault.size / (1 << 20)))
            encoding = "gzip" if fault.bomb_format == "gzip" else "deflate"
            handler.send_header("Content-Encoding", encoding)
            handler.send_header("Content-Length", str(len(head) + len(block) * (blocks - 1)))
            pieces = itertools.chain([head], itertools.repeat(block, blocks - 1))
        else:
            if fault.chunked:
                handler.send_header("Transfer-Encoding", "chunked")
            else:
                handler.send_header("Content-Length", str(fault.size))
            pieces = _filler(fault.size)
        handler.end_headers()
        try:
            for piece in pieces:
                if fault.chunked and not fault.gzip and fault.raw is None:
                    handler.wfile.write(b"%x\r\n%s\r\n" % (len(piece), piece))
                else:
                    handler.wfile.write(piece)
                handler.wfile.flush()
                with self.lock:
                    self.streamed[endpoint] += len(piece)
            if fault.chunked and not fault.gzip and fault.raw is None:
                handler.wfile.write(b"0\r\n\r\n")
                handler.wfile.flush()
        except OSError:  # the client stopped reading and closed the connection
            return
        finally:
            self.notify()
        with self.lock:
            self.sent[endpoint] += 1

    def _send_pieces(self, handler: BaseHTTPRequestHandler, endpoint: str, answer: Answer) -> None:
        """Send an answer made of :attr:`Answer.pieces`, chunked, counting the bytes written
        in :attr:`streamed`; stop when the client leaves."""
        assert answer.pieces is not None
        handler.close_connection = True
        handler.send_response(answer.status)
        handler.send_header("Content-Type", answer.content_type)
        handler.send_header("Transfer-Encoding", "chunked")
        for name, value in answer.headers.items():
            handler.send_header(name, value)
        handler.end_headers()
        try:
            for piece in answer.pieces:
                if not piece:
                    continue
                handler.wfile.write(b"%x\r\n%s\r\n" % (len(piece), piece))
                with self.lock:
                    self.streamed[endpoint] += len(piece)
                self.notify()  # a test may wait for a download to get so far
            handler.wfile.write(b"0\r\n\r\n")
            handler.wfile.flush()
        except OSError:  # the client stopped reading and closed the connection
            return
        finally:
            self.notify()
        with self.lock:
            self.sent[endpoint] += 1
        self.notify()

    def _drip(self, every: float) -> Any:
        while not self._stopping.wait(every * self.time_scale):
            yield b" "


def _filler(size: int, piece: int = 1 << 16) -> Any:
    block = b"x" * piece
    for start in range(0, size, piece):
        yield block[: min(piece, size - start)]


class _Server(ThreadingHTTPServer):
    #: the listen backlog: socketserver's 5 overflowed when 16 clients connected at once
    #: (connections reset: a client's ReadError)
    request_queue_size = 128
    #: told +1 as a connection is accepted (before its thread starts), -1 once it is closed
    on_connection: Callable[[int], None] = staticmethod(lambda change: None)

    def process_request(self, request: Any, client_address: Any) -> None:
        self.on_connection(1)
        try:
            super().process_request(request, client_address)
        except BaseException:
            self.on_connection(-1)
            raise

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self.on_connection(-1)

    def handle_error(self, request: Any, client_address: Any) -> None:
        # A client that a test killed mid-request resets its connection: expected here.

        if not isinstance(sys.exc_info()[1], ConnectionError):
            super().handle_error(request, client_address)


def serve_main(make: Callable[..., FakeServer], description: str) -> None:
    """``python -m tests.fakes.<server> --port 0``: serve until SIGTERM, print the URL."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--port", type=int, default=0, help="0 picks a free port")
    parser.add_argument("--key", default="test-key", help="the API key the fake accepts")
    parser.add_argument("--time-scale", type=float, default=1.0)
    parser.add_argument("--rpm", type=int, default=None, help="allow only N creates a minute")
    parser.add_argument(
        "--per-second", action="store_true", help="enforce --rpm in one-second slices"
    )
    args = parser.parse_args()
    fake = make(api_key=args.key, time_scale=args.time_scale)
    fake.start(args.port)
    if args.rpm:
        fake.limit_rpm(args.rpm, per_second=args.per_second)
    print(fake.url, flush=True)
    done = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: done.set())
    with contextlib.suppress(KeyboardInterrupt):
        while not done.wait(0.2):  # a bare wait() would not let the signal handler run
            pass
    fake.stop()
