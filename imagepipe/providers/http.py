"""HTTP pieces shared by the real providers: Retry-After, error classification, pacing,
bounded answers.

- :func:`parse_retry_after` reads ``retry-after-ms``, then ``retry-after`` (seconds or an
  HTTP date); a value that is not finite, negative or absurd counts as absent.
- :func:`classify` turns an HTTP error answer into the right :class:`ProviderError`, in one
  place: retry timeouts, connection errors, 408, 409, 429 rate limits and 5xx; never 400
  (content policy included), 401, 403, 404, 422 or a 429 ``insufficient_quota``;
  ``x-should-retry: true|false`` overrides. The account's errors are an
  :class:`AccountError` (they stop the run): 401 and 403, no credit left
  (``insufficient_quota`` and its family, ``billing_hard_limit_reached``, 402) and an
  unknown model (``model_not_found``, or a 400 or 404 about the ``model`` parameter).
  :func:`transport_error` does the same for httpx's exceptions (timeouts, refused or
  dropped connections).
- :class:`Pacer` is shared by every branch of one provider: coordinated back-off (a 429
  with Retry-After pauses every branch's next request until then), an optional
  client-side ``rpm`` limit through aiolimiter, one request every ``60/rpm`` s (never a
  burst, not at the start and not after a pause), the same pacing at the limit an
  answer's ``x-ratelimit-limit-requests`` states, and the run's patience with a rate
  limit that lets nothing through.
- :func:`send` is one paced request with classified errors, an overall deadline, and a
  body read within a :class:`BodyLimit` counted in decompressed bytes (:func:`read_body`):
  a huge answer or a gzip bomb is refused at the limit, never held in memory.
- :func:`check_image_url` refuses an image URL that is not http(s) or points to a
  private, loopback or link-local address (other than the API's own origin).
- :func:`redact` and :func:`redact_json` take the key out of a provider's text.

httpx and aiolimiter are imported only by the functions that use them.
"""

from __future__ import annotations

import asyncio
import email.utils
import ipaddress
import json
import math
import re
import socket
import time
import zlib
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from imagepipe.providers.base import (
    MAX_RETRY_AFTER,
    AnswerTooLarge,
    AuthenticationFailed,
    CannotConnect,
    ContentRejected,
    InvalidRequest,
    ProviderConnectionError,
    ProviderError,
    ProviderProtocolError,
    ProviderTimeout,
    QuotaExceeded,
    RateLimited,
    RateLimitPatienceExceeded,
    RefusedURL,
    ServerError,
    TransientProviderError,
    UnknownModel,
    one_line,
)

if TYPE_CHECKING:
    import httpx
    from aiolimiter import AsyncLimiter

__all__ = [
    "ACCEPT_ENCODING",
    "CONTENT_POLICY_CODES",
    "DEFAULT_PATIENCE",
    "ERROR_BODY_LIMIT",
    "MB",
    "BodyLimit",
    "Pacer",
    "Reply",
    "check_image_url",
    "classify",
    "error_message",
    "json_type",
    "parse_duration",
    "parse_retry_after",
    "read_body",
    "redact",
    "redact_json",
    "same_origin",
    "send",
    "sniff_mime",
    "transport_error",
]

#: error codes (or types) of a 400 that means "the content was refused"
CONTENT_POLICY_CODES = frozenset(
    {
        "content_policy_violation",
        "moderation_blocked",
        "content_filter",
        "image_generation_user_error",
    }
)
#: error codes (or types) that mean "no credit left" (OpenAI's billing errors share the
#: type ``insufficient_quota`` and name the cause in the code; DALL·E's hard limit is a 400)
QUOTA_CODES = frozenset(
    {
        "insufficient_quota",
        "billing_hard_limit_reached",
        "credit_balance_exhausted",
        "organization_spend_limit_exceeded",
        "project_spend_limit_exceeded",
        "organization_usage_limit_exceeded",
    }
)
#: seconds every branch pauses after a 429 that names no wait
DEFAULT_PAUSE = 1.0
#: how much longer than 60/rpm s the pacer spaces requests: a provider counts them as they
#: arrive, and the way there may bring two a little closer than they were sent
PACE_GUARD = 0.02
#: seconds of answers the pacer looks back on to learn a pace from a 429
LEARN_SECONDS = 5.0
#: seconds a run waits for a provider's rate limit to let a request through before it
#: gives up (IMAGEPIPE_RATE_LIMIT_PATIENCE sets it)
DEFAULT_PATIENCE = 600.0
#: a Retry-After longer than this (30 days) is taken for garbage, as if absent
MAX_SANE_WAIT = 30 * 24 * 3600.0


def _header(headers: Mapping[str, str], name: str) -> str | None:
    value = headers.get(name)
    if value is None:  # a plain dict: look up case-insensitively
        for key, v in headers.items():
            if key.lower() == name:
                return v
    return value


def _sane(seconds: float) -> float | None:
    """``seconds`` if it can be a real wait; ``None`` (as if absent) when it is not
    finite, negative or over :data:`MAX_SANE_WAIT`."""
    if not math.isfinite(seconds) or not 0.0 <= seconds <= MAX_SANE_WAIT:
        return None
    return seconds


def _number(text: str) -> float | None:
    try:
        return float(text)
    except ValueError:
        return None


def parse_retry_after(headers: Mapping[str, str], now: float | None = None) -> float | None:
    """Seconds the server asks to wait, or ``None``; ``now`` is the epoch time for HTTP dates.

    ``retry-after-ms`` (OpenAI's) wins over ``retry-after``, which is a number of seconds or
    an HTTP date (one in the past means now). A value that is not finite, negative or over
    a month counts as absent. The value is not capped here: a :class:`ProviderError` asking
    for more than 120 s is not retried in this process.
    """
    ms = _header(headers, "retry-after-ms")
    if ms is not None and (number := _number(ms)) is not None:
        wait = _sane(number / 1000.0)
        if wait is not None:
            return wait
    value = _header(headers, "retry-after")
    if value is None:
        return None
    number = _number(value)
    if number is not None:
        return _sane(number)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:
        return None
    return _sane(max(0.0, when.timestamp() - (time.time() if now is None else now)))


def _json(body: bytes | str) -> Any:
    try:
        return json.loads(body)
    except (ValueError, UnicodeDecodeError):
        return None


def error_message(status: int, body: bytes | str) -> tuple[str, str | None]:
    """The provider's own message and error code from an error body (OpenAI or Replicate)."""
    data = _json(body)
    if isinstance(data, dict):
        err = data.get("error")
        if isinstance(err, dict):  # OpenAI: {"error": {"message", "type", "code"}}
            code = err.get("code") or err.get("type")
            msg = err.get("message") or code
            if msg:
                return str(msg), str(code) if code else None
        if isinstance(err, str) and err:
            return err, None
        detail = data.get("detail") or data.get("title")  # Replicate: problem+json
        if detail:
            return str(detail), None
    text = body.decode("utf-8", "replace") if isinstance(body, bytes) else body
    text = text.strip()
    if text and not text.startswith(("<", "{")):
        return f"HTTP {status}: {text}", None
    return f"HTTP {status}", None


def classify(
    status: int,
    headers: Mapping[str, str],
    body: bytes | str,
    now: float | None = None,
    *,
    secret: str | None = None,
) -> ProviderError:
    """The :class:`ProviderError` for an HTTP error answer (``status`` >= 300); ``secret``
    (the key in use) is redacted from the provider's message."""
    message, code = error_message(status, body)
    message = redact(message, secret)
    retry_after = parse_retry_after(headers, now)
    data = _json(body)
    err_type = param = None
    if isinstance(data, dict) and isinstance(data.get("error"), dict):
        err_type = data["error"].get("type")
        param = data["error"].get("param")
    codes = {code, err_type}
    error: ProviderError
    if codes & QUOTA_CODES or status == 402:
        error = QuotaExceeded(message, status=status, code=code)
    elif status == 429:
        error = RateLimited(message, retry_after=retry_after, code=code)
    elif status in (400, 422) and codes & CONTENT_POLICY_CODES:
        error = ContentRejected(message, status=status, code=code)
    elif "model_not_found" in codes or (status in (400, 404) and param == "model"):
        error = UnknownModel(message, status=status, code=code)
    elif status in (401, 403):
        error = AuthenticationFailed(message, status=status, code=code)
    elif status == 408:
        error = ProviderTimeout(message, retry_after=retry_after, status=status, code=code)
    elif status == 409:
        error = TransientProviderError(message, retry_after=retry_after, status=status, code=code)
    elif status >= 500:
        error = ServerError(message, retry_after=retry_after, status=status, code=code)
    else:  # 400, 404, 422 and any other answer we cannot act on
        error = InvalidRequest(message, status=status, code=code)
    should = (_header(headers, "x-should-retry") or "").strip().lower()
    over_cap = retry_after is not None and retry_after > MAX_RETRY_AFTER
    if should in ("true", "false") and not over_cap:
        error.retryable = should == "true"
    return error


#: what stands in a provider's text for the key it echoed
REDACTED = "[redacted]"
#: a "key" shorter than this is not looked for in text (it would blank common words)
MIN_SECRET = 4


def redact(text: str, secret: str | None) -> str:
    """``text`` without ``secret`` (the API key in use), so that no store, output or log
    gets it from a provider that echoes it."""
    if secret is None or len(secret) < MIN_SECRET:
        return text
    return text.replace(secret, REDACTED)


def redact_json(value: Any, secret: str | None) -> Any:
    """Every string in a JSON value (keys included) with ``secret`` redacted."""
    if secret is None or len(secret) < MIN_SECRET:
        return value
    if isinstance(value, str):
        return value.replace(secret, REDACTED)
    if isinstance(value, list):
        return [redact_json(v, secret) for v in value]
    if isinstance(value, dict):
        return {redact(k, secret): redact_json(v, secret) for k, v in value.items()}
    return value


def transport_error(exc: Exception) -> ProviderError:
    """The retryable :class:`ProviderError` for an httpx timeout or connection failure."""
    import httpx

    detail = str(exc) or type(exc).__name__
    if isinstance(exc, httpx.TimeoutException):
        return ProviderTimeout(f"the provider did not answer in time ({detail})")
    if isinstance(exc, httpx.ConnectError):  # refused, host not found: no connection at all
        return CannotConnect(f"cannot connect: {detail}")
    return ProviderConnectionError(f"connection failed: {detail}")


def same_origin(a: str, b: str) -> bool:
    """Whether two URLs share scheme, host and port (so a key may be sent to both)."""
    pa, pb = urlsplit(a), urlsplit(b)
    return (pa.scheme, pa.hostname, pa.port) == (pb.scheme, pb.hostname, pb.port)


_DURATION = re.compile(r"(\d+(?:\.\d+)?)(ms|h|m|s)")
_UNIT_SECONDS = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 0.001}


def parse_duration(text: str | None) -> float | None:
    """Seconds in OpenAI's duration form (``6m0s``, ``1.5s``, ``120ms``); None if absent or
    not in that form."""
    if not text:
        return None
    parts = _DURATION.findall(text.strip())
    if not parts or "".join(n + u for n, u in parts) != text.strip():
        return None
    return sum(float(n) * _UNIT_SECONDS[u] for n, u in parts)


def sniff_mime(data: bytes) -> str:
    """The image type of ``data`` (:func:`imagepipe.files.sniff_mime`); bytes that are no
    image are a retryable provider error, not a file error."""
    from imagepipe.files import ImageFileError
    from imagepipe.files import sniff_mime as image_type

    try:
        return image_type(data)
    except ImageFileError:
        raise ProviderError(
            f"the provider sent {len(data)} bytes that are not a PNG, JPEG, WebP or GIF image"
        ) from None


class Pacer:
    """Request pacing shared by every branch of one provider in one process.

    - Coordinated back-off: :meth:`observe` of an error with a ``retry_after`` (or a 429
      without one: :data:`DEFAULT_PAUSE`) pauses every later :meth:`acquire` and
      :meth:`backoff` until then. ``coordinated=False`` turns that off, and the pacing
      from headers below with it (for benchmarks).
    - ``rpm``: one :meth:`acquire` every ``60/rpm`` seconds (and :data:`PACE_GUARD`),
      evenly, through an aiolimiter ``AsyncLimiter(1, 60/rpm)``: a bucket that holds one
      request, so no burst ever goes through, not at the start and not after a pause (a
      request that got its turn during a pause waits the pause out, then takes a new turn).
    - Pacing from headers: an answer's ``x-ratelimit-limit-requests`` (the requests a
      minute OpenAI allows) paces every request the same way at that rate, when it is
      lower than ``rpm`` or there is none (:meth:`observe_limit`).
    - Pacing from 429s: with neither, the first 429 sets the pace at the most requests
      the provider let through in one second of the last few (:meth:`_learn_pace`); a
      stated limit that comes later wins over it.
    - Patience: while a provider's rate limit lets no request through, 429s are waits, not
      failed attempts; once it has let none through for ``patience`` seconds, the next
      429, and every :meth:`acquire` after it, raises
      :class:`~imagepipe.providers.base.RateLimitPatienceExceeded`.
    - ``time_scale`` multiplies every wait, so tests can simulate a minute in 0.6 s.
    """

    def __init__(
        self,
        rpm: float | None = None,
        *,
        coordinated: bool = True,
        time_scale: float = 1.0,
        patience: float = DEFAULT_PATIENCE,
    ) -> None:
        if rpm is not None and rpm <= 0:
            raise ValueError("rpm must be positive")
        self.rpm = rpm
        self.coordinated = coordinated
        self.time_scale = time_scale
        self.patience = patience
        self.pauses = 0  # how many times coordinated back-off paused the provider
        self.in_flight = 0  # requests sent and not answered yet
        #: after a pause for an exhausted quota, one request at a time until an answer
        #: says how much came back
        self._probing = False
        self._probe_out = False
        self._answered = asyncio.Event()
        #: (start, end) in the event loop's clock (time.monotonic) of the latest pause
        self.last_pause: tuple[float, float] | None = None
        self._until = 0.0  # loop time
        #: the requests a minute the provider's headers stated, if they did
        self.stated_rpm: int | None = None
        #: requests a minute the limiter paces at (``rpm``, the stated or learned one)
        self.pace: float | None = None
        #: the pace learned from the first 429 when nothing else set one
        self.learned_rpm: int | None = None
        #: when the requests let through in the last few seconds were sent (loop times),
        #: kept while there is no pace
        self._through: deque[float] = deque()
        self._limiter: AsyncLimiter | None = None
        #: loop time of the first 429 since a request was last let through, or None
        self._limited_since: float | None = None
        #: the message of :class:`RateLimitPatienceExceeded` once patience ran out
        self._gave_up: str | None = None
        if rpm is not None:
            self._pace_at(rpm)

    def _pace_at(self, rpm: float) -> None:
        """Pace every later :meth:`acquire` at ``rpm`` requests a minute, one at a time."""
        self.pace = rpm
        if self.time_scale <= 0:
            return  # no waiting at all (IMAGEPIPE_TIME_SCALE=0)
        from aiolimiter import AsyncLimiter

        # A bucket of one: a request goes once the previous one's 60/rpm s have passed.
        self._limiter = AsyncLimiter(1, 60.0 / rpm * (1 + PACE_GUARD) * self.time_scale)

    def paused_for(self) -> float:
        """Seconds (already scaled) until the current pause ends; 0 when not paused."""
        return max(0.0, self._until - asyncio.get_running_loop().time())

    def pause(self, seconds: float) -> None:
        """Hold every branch's next request for ``seconds`` (unscaled) from now."""
        now = asyncio.get_running_loop().time()
        until = now + seconds * self.time_scale
        if until > self._until:
            self._until = until
            self.pauses += 1
            self.last_pause = (now, until)

    def observe_limit(self, headers: Mapping[str, str]) -> None:
        """Pace at the provider's stated limit (``x-ratelimit-limit-requests``, requests a
        minute, as OpenAI sends it on every answer) when it is below ``rpm`` or there is
        none: evenly, as ``rpm`` is. Off when not coordinated."""
        if not self.coordinated:
            return
        stated = (_header(headers, "x-ratelimit-limit-requests") or "").strip()
        if not stated.isdigit() or int(stated) <= 0 or int(stated) == self.stated_rpm:
            return
        self.stated_rpm = int(stated)
        if self.rpm is None or self.stated_rpm < self.rpm:
            self._pace_at(self.stated_rpm)
        elif self.pace != self.rpm:  # the stated limit went back up, above --rpm
            self._pace_at(self.rpm)

    def observe_quota(self, headers: Mapping[str, str]) -> bool:
        """Pause everyone before the provider's request quota runs out: when what is left
        of it (``x-ratelimit-remaining-requests``, as OpenAI sends it) would be used up by
        the requests already in flight, wait until it resets (``x-ratelimit-reset-
        requests``). Without this, every branch in flight meets a 429 at each window's end.
        Returns whether the quota has room for the requests in flight."""
        if not self.coordinated:
            return True
        remaining = headers.get("x-ratelimit-remaining-requests")
        reset = parse_duration(headers.get("x-ratelimit-reset-requests"))
        if remaining is None or reset is None or not remaining.strip().isdigit():
            return True
        if int(remaining) < self.in_flight:
            self.pause(min(reset, MAX_RETRY_AFTER))
            self._probing = True
            return False
        return True

    def observe(self, error: ProviderError) -> None:
        """Pause everyone if ``error`` asks for a wait (coordinated back-off); a rate limit
        that has let no request through for longer than the patience gives up."""
        if isinstance(error, RateLimited) and error.retryable:
            self._rate_limited()
            self._learn_pace()
        if not self.coordinated or not error.retryable:
            return
        if error.retry_after is not None:
            self.pause(error.retry_after)
        elif isinstance(error, RateLimited):
            self.pause(DEFAULT_PAUSE)

    def let_through(self, sent_at: float | None = None) -> None:
        """The provider answered a request with something other than a rate limit;
        ``sent_at``: the loop time it was sent."""
        self._limited_since = None
        if self.pace is None and sent_at is not None:  # to learn a pace at the first 429
            self._through.append(sent_at)
            now = asyncio.get_running_loop().time()
            while self._through and self._through[0] < now - LEARN_SECONDS * self.time_scale:
                self._through.popleft()

    def _learn_pace(self) -> None:
        """At the first 429 with no pace (no ``rpm``, no stated limit), pace at the most
        requests sent in one second of the last few that the provider let through, 60
        times a minute: what a limit enforced in one-second slices allows."""
        if self.pace is not None or not self.coordinated or self.time_scale <= 0:
            return
        second = self.time_scale
        times = sorted(self._through)
        self._through.clear()
        most, first = 0, 0
        for last, sent in enumerate(times):  # the most sent within one second
            while times[first] <= sent - second:
                first += 1
            most = max(most, last - first + 1)
        if most:
            self.learned_rpm = 60 * most
            self._pace_at(self.learned_rpm)

    def _rate_limited(self) -> None:
        now = asyncio.get_running_loop().time()
        if self._limited_since is None:
            self._limited_since = now
        elif self._gave_up is None and now - self._limited_since > self.patience * self.time_scale:
            self._gave_up = (
                f"rate limited: the provider let no request through for {self.patience:g} s"
            )

    def gave_up(self) -> RateLimitPatienceExceeded | None:
        """The error every request raises once the patience ran out, else None."""
        return None if self._gave_up is None else RateLimitPatienceExceeded(self._gave_up)

    async def backoff(self) -> None:
        """Wait out the current pause, if any (pauses may be extended meanwhile)."""
        # A deadline that may move later, not a condition: an Event would need a timer task.
        while (left := self.paused_for()) > 0:  # noqa: ASYNC110
            await asyncio.sleep(left)

    async def acquire(self) -> None:
        """Wait until one more request may be sent: after any pause, at the pace, and,
        after a pause for an exhausted quota, only once the request that went first (its
        answer says how much of the quota came back) is answered."""
        while True:
            if (error := self.gave_up()) is not None:
                raise error
            await self.backoff()
            if self._probing and self._probe_out:
                await self._answered.wait()
                continue
            limiter = self._limiter
            if limiter is not None:
                await limiter.acquire()
                if limiter is not self._limiter or self.paused_for() > 0:
                    # A pause began (or the pace changed) while this request waited for its
                    # turn: going at the pause's end would be a burst. Take a new turn.
                    continue
            if self._probing:
                if self._probe_out:
                    continue  # another request went first meanwhile
                self._probe_out = True
            if (error := self.gave_up()) is not None:
                raise error
            return

    def answered(self, quota_left: bool) -> None:
        """A request came back; ``quota_left``: its answer said the quota has room for the
        requests in flight (then the others may go again)."""
        if self._probing:
            self._probe_out = False
            if quota_left:
                self._probing = False
            self._answered.set()
            self._answered = asyncio.Event()


#: bytes in a megabyte, as ``-o max_image_mb`` counts them
MB = 1_000_000
#: an error answer's body is read up to this many bytes; the rest is not read
ERROR_BODY_LIMIT = 64 * 1024
#: the encodings a request accepts (and :class:`_Inflater` decodes, within the limit)
ACCEPT_ENCODING = "gzip, deflate"


@dataclass(frozen=True)
class BodyLimit:
    """The most bytes, once decompressed, that an answer's body may hold, and how to name
    that body (``"image"``, ``"answer"``) in the one line that rejects a larger one."""

    bytes: int
    what: str = "answer"

    def error(self) -> AnswerTooLarge:
        return AnswerTooLarge(
            f"the provider's {self.what} is larger than {self.bytes / MB:g} MB; refused "
            "(-o max_image_mb sets the limit)"
        )


@dataclass(frozen=True)
class Reply:
    """A successful answer, read in full within its :class:`BodyLimit`."""

    status: int
    headers: Mapping[str, str]
    body: bytes
    #: the key in use: :meth:`json` redacts it from every string (never shown in a repr)
    secret: str | None = field(default=None, repr=False)

    def json(self) -> Any:
        """The body as JSON, the key redacted; :class:`ProviderProtocolError` if it is not
        JSON."""
        try:
            return redact_json(json.loads(self.body), self.secret)
        except (ValueError, UnicodeDecodeError):
            raise ProviderProtocolError("the provider's answer is not JSON") from None
        except RecursionError:
            raise ProviderProtocolError("the provider's answer is JSON nested too deeply") from None


def json_type(value: Any) -> str:
    """How a JSON value's type is named in a protocol error ("a string", "null")."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "a list"
    return "an object"


class _Inflater:
    """Decodes a body's ``Content-Encoding`` (identity, gzip, deflate) chunk by chunk,
    never producing more than the limit: a gzip bomb stops inflating at the cap."""

    def __init__(self, encoding: str) -> None:
        self.encoding = encoding
        self._zlib: Any = None
        self._first = True
        if encoding in ("gzip", "x-gzip"):
            self._zlib = zlib.decompressobj(zlib.MAX_WBITS | 16)
        elif encoding == "deflate":
            self._zlib = zlib.decompressobj()
        elif encoding not in ("", "identity"):
            raise ProviderProtocolError(
                f"the provider's answer is encoded as '{one_line(encoding, 40)}', "
                f"which was not asked for ({ACCEPT_ENCODING})"
            )

    def feed(self, data: bytes, out: bytearray, limit: int) -> bool:
        """Append ``data``, decoded, to ``out`` but never past ``limit + 1`` bytes;
        False once the body is known to be larger than ``limit``."""
        if self._zlib is None:
            out += data[: limit + 1 - len(out)]
            return len(out) <= limit
        while data:
            try:
                out += self._zlib.decompress(data, limit + 1 - len(out))
            except zlib.error as exc:
                if self._first and self.encoding == "deflate":  # raw deflate, no header
                    self._zlib = zlib.decompressobj(-zlib.MAX_WBITS)
                    self._first = False
                    continue
                raise ProviderProtocolError(
                    f"the provider's {self.encoding} answer cannot be decoded ({exc})"
                ) from None
            self._first = False
            if len(out) > limit:
                return False
            data = self._zlib.unconsumed_tail
        return True

    def finish(self, out: bytearray, limit: int) -> bool:
        """Decode what the decoder still holds (a few bytes' worth, all input was fed)."""
        if self._zlib is not None:
            out += self._zlib.flush()
        return len(out) <= limit


async def read_body(response: httpx.Response, limit: int, *, truncate: bool = False) -> bytes:
    """The body of ``response``, decoded, of at most ``limit`` bytes.

    Over the limit, the reading stops at once and raises ``_TooLarge`` (:func:`send` turns
    it into its :class:`BodyLimit`'s error) or, with ``truncate``, returns the first
    ``limit`` bytes. A ``Content-Length`` over the limit of an unencoded body is refused
    before a byte of it is read."""
    encoding = response.headers.get("content-encoding", "").strip().lower()
    inflater = _Inflater(encoding)
    declared = response.headers.get("content-length", "").strip()
    plain = inflater.encoding in ("", "identity")
    if not truncate and plain and declared.isdigit() and int(declared) > limit:
        raise _TooLarge
    out = bytearray()
    async for chunk in response.aiter_raw():
        if not inflater.feed(chunk, out, limit):
            break
    else:
        if inflater.finish(out, limit):
            return bytes(out)
    if truncate:
        return bytes(out[:limit])
    raise _TooLarge


class _TooLarge(Exception):
    """Raised by :func:`read_body`; :func:`send` turns it into its limit's error."""


async def send(
    client: httpx.AsyncClient,
    method: str,
    url: str,
    *,
    pacer: Pacer,
    limit: BodyLimit,
    deadline: float,
    secret: str | None = None,
    paced: bool = True,
    **kwargs: Any,
) -> Reply:
    """One request through ``pacer``; a failure raises the classified :class:`ProviderError`.

    - ``paced=False`` waits out back-off pauses but does not count against ``rpm`` (polls),
      and its answer neither sets the pace nor counts as one the rate limit let through.
    - The answer's body is read within ``limit`` (decompressed bytes; an error answer's
      within :data:`ERROR_BODY_LIMIT`, truncated); the whole request, from sending to the
      last byte of the answer, within ``deadline`` seconds (a retryable timeout), not only
      each read.
    - ``secret`` (the key in use) is redacted from the provider's text.
    """
    import httpx

    await (pacer.acquire() if paced else pacer.backoff())
    sent_at = asyncio.get_running_loop().time()
    pacer.in_flight += 1
    quota_left = False
    try:
        async with asyncio.timeout(deadline):
            async with client.stream(method, url, **kwargs) as response:
                if paced:  # the paced requests' answers tell of their limit (not polls)
                    pacer.observe_limit(response.headers)
                if not 200 <= response.status_code < 300:
                    body = await read_body(response, ERROR_BODY_LIMIT, truncate=True)
                    error = classify(response.status_code, response.headers, body, secret=secret)
                    if paced and not isinstance(error, RateLimited):
                        pacer.let_through(sent_at)
                    pacer.observe(error)
                    raise pacer.gave_up() or error
                if paced:
                    pacer.let_through(sent_at)
                body = await read_body(response, limit.bytes)
        quota_left = pacer.observe_quota(response.headers)
        return Reply(response.status_code, response.headers, body, secret)
    except _TooLarge:
        raise limit.error() from None
    except TimeoutError:
        raise ProviderTimeout(
            f"the provider did not complete its answer in {deadline:g} s (-o timeout)"
        ) from None
    except httpx.TransportError as exc:
        raise transport_error(exc) from exc
    finally:
        pacer.in_flight -= 1
        if paced:
            pacer.answered(quota_left)


def _proxied(scheme: str, host: str) -> bool:
    """Whether a request to ``host`` goes through a proxy set in the environment."""
    import urllib.request

    return scheme in urllib.request.getproxies() and not urllib.request.proxy_bypass(host)


def _refused(address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    """Whether an address is one an image URL may not point to: private, loopback,
    link-local, multicast, reserved or unspecified (an IPv4-mapped one as its IPv4)."""
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return not address.is_global or address.is_multicast


async def check_image_url(url: str, base_url: str) -> None:
    """Refuse (:class:`RefusedURL`, not retried) an image URL from a provider's answer that
    is not http(s), or whose host resolves to an address that is not public, unless it
    is the API's own origin (``base_url``: a local server is then trusted as configured).
    A host that does not resolve is a retryable connection error, unless a proxy (from
    the environment, as httpx uses it) is to resolve it. Redirects are not followed."""
    shown = f"'{one_line(url, 120)}'"
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        raise RefusedURL(f"the provider's image URL {shown} is not a valid URL; refused") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise RefusedURL(f"the provider's image URL {shown} is not http(s); refused")
    if same_origin(url, base_url):
        return
    host = parts.hostname
    try:
        infos = await asyncio.get_running_loop().getaddrinfo(
            host, port or (443 if parts.scheme == "https" else 80), type=socket.SOCK_STREAM
        )
    except (OSError, UnicodeError) as exc:
        if _proxied(parts.scheme, host):
            return  # through a proxy (httpx honours *_PROXY), which resolves it itself
        raise ProviderConnectionError(
            f"cannot resolve the image URL's host '{one_line(host, 80)}': {exc}"
        ) from None
    for info in infos:
        address = ipaddress.ip_address(str(info[4][0]).partition("%")[0])
        if _refused(address):
            raise RefusedURL(
                f"the provider's image URL {shown} points to {address}, a private, "
                "loopback or link-local address; refused"
            )
