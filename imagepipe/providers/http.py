"""HTTP pieces shared by the real providers: Retry-After, error classification, pacing.

- :func:`parse_retry_after` reads ``retry-after-ms``, then ``retry-after`` (seconds or an
  HTTP date).
- :func:`classify` turns an HTTP error answer into the right :class:`ProviderError`, in one
  place: retry timeouts, connection errors, 408, 409, 429 rate limits and 5xx; never 400
  (content policy included), 401, 403, 404, 422 or a 429 ``insufficient_quota``;
  ``x-should-retry: true|false`` overrides. :func:`transport_error` does the same for
  httpx's exceptions (timeouts, refused or dropped connections).
- :class:`Pacer` is shared by every branch of one provider: coordinated back-off (a 429
  with Retry-After pauses every branch's next request until then) and an optional
  client-side ``rpm`` limit through aiolimiter, spread evenly (never a burst larger than
  one second's share).
- :func:`send` is one paced request with classified errors.

httpx and aiolimiter are imported only by the functions that use them.
"""

from __future__ import annotations

import asyncio
import email.utils
import json
import re
import time
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from imagepipe.providers.base import (
    MAX_RETRY_AFTER,
    AuthenticationFailed,
    ContentRejected,
    InvalidRequest,
    ProviderConnectionError,
    ProviderError,
    ProviderTimeout,
    QuotaExceeded,
    RateLimited,
    ServerError,
    TransientProviderError,
)

if TYPE_CHECKING:
    import httpx
    from aiolimiter import AsyncLimiter

__all__ = [
    "CONTENT_POLICY_CODES",
    "Pacer",
    "classify",
    "error_message",
    "parse_duration",
    "parse_retry_after",
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
#: seconds every branch pauses after a 429 that names no wait
DEFAULT_PAUSE = 1.0


def _header(headers: Mapping[str, str], name: str) -> str | None:
    value = headers.get(name)
    if value is None:  # a plain dict: look up case-insensitively
        for key, v in headers.items():
            if key.lower() == name:
                return v
    return value


def parse_retry_after(headers: Mapping[str, str], now: float | None = None) -> float | None:
    """Seconds the server asks to wait, or ``None``; ``now`` is the epoch time for HTTP dates.

    ``retry-after-ms`` (OpenAI's) wins over ``retry-after``, which is a number of seconds or
    an HTTP date. The value is not capped here: :class:`RateLimited` refuses one over 120 s.
    """
    ms = _header(headers, "retry-after-ms")
    if ms is not None:
        try:
            return max(0.0, float(ms) / 1000.0)
        except ValueError:
            pass
    value = _header(headers, "retry-after")
    if value is None:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:
        return None
    return max(0.0, when.timestamp() - (time.time() if now is None else now))


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
    status: int, headers: Mapping[str, str], body: bytes | str, now: float | None = None
) -> ProviderError:
    """The :class:`ProviderError` for an HTTP error answer (``status`` >= 300)."""
    message, code = error_message(status, body)
    retry_after = parse_retry_after(headers, now)
    data = _json(body)
    err_type = None
    if isinstance(data, dict) and isinstance(data.get("error"), dict):
        err_type = data["error"].get("type")
    codes = {code, err_type}
    error: ProviderError
    if status == 429:
        if "insufficient_quota" in codes:
            error = QuotaExceeded(message, status=status, code=code)
        else:
            error = RateLimited(message, retry_after=retry_after, code=code)
    elif status in (400, 422) and codes & CONTENT_POLICY_CODES:
        error = ContentRejected(message, status=status, code=code)
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


def transport_error(exc: Exception) -> ProviderError:
    """The retryable :class:`ProviderError` for an httpx timeout or connection failure."""
    import httpx

    detail = str(exc) or type(exc).__name__
    if isinstance(exc, httpx.TimeoutException):
        return ProviderTimeout(f"the provider did not answer in time ({detail})")
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
      :meth:`backoff` until then. ``coordinated=False`` turns that off (for benchmarks).
    - ``rpm``: at most that many :meth:`acquire` a minute, spread evenly: a bucket of one
      second's share refilled continuously (for ``rpm`` < 60, one request per ``60/rpm`` s).
    - ``time_scale`` multiplies every wait, so tests can simulate a minute in 0.6 s.
    """

    def __init__(
        self, rpm: float | None = None, *, coordinated: bool = True, time_scale: float = 1.0
    ) -> None:
        if rpm is not None and rpm <= 0:
            raise ValueError("rpm must be positive")
        self.rpm = rpm
        self.coordinated = coordinated
        self.time_scale = time_scale
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
        self._limiter: AsyncLimiter | None = None
        if rpm is not None:
            from aiolimiter import AsyncLimiter

            burst = max(1.0, rpm / 60.0)
            self._limiter = AsyncLimiter(burst, burst * 60.0 / rpm * time_scale)

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
        """Pause everyone if ``error`` asks for a wait (coordinated back-off)."""
        if not self.coordinated or not error.retryable:
            return
        if error.retry_after is not None:
            self.pause(error.retry_after)
        elif isinstance(error, RateLimited):
            self.pause(DEFAULT_PAUSE)

    async def backoff(self) -> None:
        """Wait out the current pause, if any (pauses may be extended meanwhile)."""
        # A deadline that may move later, not a condition: an Event would need a timer task.
        while (left := self.paused_for()) > 0:  # noqa: ASYNC110
            await asyncio.sleep(left)

    async def acquire(self) -> None:
        """Wait until one more request may be sent. After a pause for an exhausted quota,
        one request goes first: its answer says how much of the quota came back."""
        while True:
            await self.backoff()
            if not self._probing:
                break
            if not self._probe_out:
                self._probe_out = True
                break
            answered = self._answered
            await answered.wait()
        if self._limiter is not None:
            await self._limiter.acquire()
            await self.backoff()

    def answered(self, quota_left: bool) -> None:
        """A request came back; ``quota_left``: its answer said the quota has room for the
        requests in flight (then the others may go again)."""
        if self._probing:
            self._probe_out = False
            if quota_left:
                self._probing = False
            self._answered.set()
            self._answered = asyncio.Event()


async def send(
    client: httpx.AsyncClient,
    method: str,
    url: str,
    *,
    pacer: Pacer,
    paced: bool = True,
    **kwargs: Any,
) -> httpx.Response:
    """One request through ``pacer``; a failure raises the classified :class:`ProviderError`.

    ``paced=False`` waits out back-off pauses but does not count against ``rpm`` (polls).
    """
    import httpx

    await (pacer.acquire() if paced else pacer.backoff())
    pacer.in_flight += 1
    quota_left = False
    try:
        response = await client.request(method, url, **kwargs)
        if not 200 <= response.status_code < 300:
            error = classify(response.status_code, response.headers, response.content)
            pacer.observe(error)
            raise error
        quota_left = pacer.observe_quota(response.headers)
        return response
    except httpx.TransportError as exc:
        raise transport_error(exc) from exc
    finally:
        pacer.in_flight -= 1
        if paced:
            pacer.answered(quota_left)
