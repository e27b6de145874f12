"""Error classification, Retry-After parsing and the Pacer (no HTTP server needed)."""

from __future__ import annotations

import asyncio
import email.utils
import importlib
import json

import pytest

from imagepipe.providers.base import (
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
from imagepipe.providers.http import Pacer, classify, parse_retry_after, transport_error


def openai_body(message: str, code: str | None = None, type_: str | None = None) -> bytes:
    return json.dumps({"error": {"message": message, "code": code, "type": type_}}).encode()


CASES = [
    # status, headers, body, expected class, retryable, retry_after
    (400, {}, openai_body("bad size", "invalid_value"), InvalidRequest, False, None),
    (400, {}, openai_body("unsafe", "content_policy_violation"), ContentRejected, False, None),
    (400, {}, openai_body("blocked", "moderation_blocked"), ContentRejected, False, None),
    (
        401,
        {},
        openai_body("Incorrect API key", "invalid_api_key"),
        AuthenticationFailed,
        False,
        None,
    ),
    (403, {}, b'{"detail": "forbidden"}', AuthenticationFailed, False, None),
    (404, {}, b"", InvalidRequest, False, None),
    (
        422,
        {},
        b'{"title": "Input validation failed", "detail": "bad"}',
        InvalidRequest,
        False,
        None,
    ),
    (408, {}, b"", ProviderTimeout, True, None),
    (409, {}, openai_body("key in use"), TransientProviderError, True, None),
    (
        429,
        {"retry-after": "3"},
        openai_body("slow down", "rate_limit_exceeded"),
        RateLimited,
        True,
        3.0,
    ),
    (
        429,
        {},
        openai_body("quota", "insufficient_quota", "insufficient_quota"),
        QuotaExceeded,
        False,
        None,
    ),
    (429, {"retry-after": "600"}, openai_body("slow down"), RateLimited, False, 600.0),
    (500, {}, b"<html>oops</html>", ServerError, True, None),
    (503, {"retry-after-ms": "250"}, b"", ServerError, True, 0.25),
    # x-should-retry overrides the status's default
    (500, {"x-should-retry": "false"}, b"", ServerError, False, None),
    (400, {"X-Should-Retry": "true"}, openai_body("try again"), InvalidRequest, True, None),
    # ...but never a wait longer than 120 s
    (429, {"retry-after": "121", "x-should-retry": "true"}, b"", RateLimited, False, 121.0),
]


@pytest.mark.parametrize(("status", "headers", "body", "cls", "retryable", "after"), CASES)
def test_classification_table(
    status: int,
    headers: dict[str, str],
    body: bytes,
    cls: type[ProviderError],
    retryable: bool,
    after: float | None,
) -> None:
    error = classify(status, headers, body, now=0.0)
    assert type(error) is cls
    assert error.retryable is retryable
    assert error.retry_after == after
    assert error.status == status
    assert "\n" not in error.message


def test_messages_are_the_providers_own_on_one_line() -> None:
    assert classify(400, {}, openai_body("Your request\nwas rejected")).message == (
        "Your request was rejected"
    )
    assert classify(422, {}, b'{"detail": "input.prompt is required"}').message == (
        "input.prompt is required"
    )
    assert classify(502, {}, b"").message == "HTTP 502"
    assert classify(429, {"retry-after": "300"}, b"").message == (
        "rate limited; resume later (the provider asked to wait 300 s)"
    )
    assert classify(400, {}, openai_body("bad \x1b[31m")).message == "bad \\x1b[31m"


def test_transport_errors_are_retryable() -> None:
    import httpx

    timeout = transport_error(httpx.ReadTimeout("read timed out"))
    assert isinstance(timeout, ProviderTimeout)
    assert timeout.retryable
    dropped = transport_error(httpx.RemoteProtocolError("Server disconnected"))
    assert isinstance(dropped, ProviderConnectionError)
    assert dropped.retryable
    refused = transport_error(httpx.ConnectError("connection refused"))
    assert isinstance(refused, ProviderConnectionError)


@pytest.mark.parametrize(
    ("headers", "expected"),
    [
        ({}, None),
        ({"retry-after": "2"}, 2.0),
        ({"Retry-After": "0.5"}, 0.5),
        ({"retry-after-ms": "1500", "retry-after": "9"}, 1.5),
        ({"retry-after-ms": "junk", "retry-after": "9"}, 9.0),
        ({"retry-after": "-3"}, None),  # a negative, non-finite or absurd wait: absent
        ({"retry-after-ms": "inf", "retry-after": "4"}, 4.0),
        ({"retry-after-ms": "inf"}, None),
        ({"retry-after-ms": "nan"}, None),
        ({"retry-after-ms": "-5"}, None),
        ({"retry-after": "1e300"}, None),
        ({"retry-after": "Infinity"}, None),
        ({"retry-after": "soon"}, None),
        ({"retry-after": email.utils.formatdate(1_000_030, usegmt=True)}, 30.0),
        ({"retry-after": email.utils.formatdate(999_000, usegmt=True)}, 0.0),
    ],
)
def test_parse_retry_after(headers: dict[str, str], expected: float | None) -> None:
    assert parse_retry_after(headers, now=1_000_000.0) == expected


async def test_a_pause_holds_every_acquire_until_it_ends() -> None:
    pacer = Pacer(time_scale=0.05)
    loop = asyncio.get_running_loop()
    pacer.observe(RateLimited("slow down", retry_after=1.0))  # 1 s × 0.05
    start = loop.time()
    times = await asyncio.gather(*(_acquired_at(pacer) for _ in range(8)))
    assert min(times) - start >= 0.045
    assert pacer.pauses == 1


async def test_a_pause_is_not_shortened_and_off_when_not_coordinated() -> None:
    pacer = Pacer(time_scale=0.05)
    pacer.pause(2.0)
    pacer.pause(1.0)  # an earlier end does not shorten the pause
    assert pacer.paused_for() > 0.06
    off = Pacer(coordinated=False, time_scale=0.05)
    off.observe(RateLimited("slow down", retry_after=1.0))
    assert off.paused_for() == 0.0
    # a 429 without Retry-After still pauses everyone for a moment; a 400 does not
    pacer2 = Pacer(time_scale=0.05)
    pacer2.observe(InvalidRequest("bad"))
    assert pacer2.paused_for() == 0.0
    pacer2.observe(RateLimited("slow down"))
    assert pacer2.paused_for() > 0.0


@pytest.fixture(autouse=True, scope="module")
def limiter_imported() -> None:
    """The pacer imports aiolimiter at its first request: import it before a test's clock
    starts (a cold import in a busy test process took longer than a 4 ms burst)."""
    importlib.import_module("aiolimiter")


async def test_rpm_is_spread_with_no_burst_above_one_seconds_share() -> None:
    # 600 rpm = 10 a second; time_scale 0.05 makes a second 50 ms.
    pacer = Pacer(rpm=600, time_scale=0.05)
    times = sorted(await asyncio.gather(*(_acquired_at(pacer) for _ in range(40))))
    # from the first request: a busy machine may delay the start, not the spacing
    offsets = [t - times[0] for t in times]
    burst = [t for t in offsets if t < 0.004]  # less than one request's share of time (5 ms)
    assert len(burst) == 10  # one second's share at once, not 40
    # then one every 5 ms: the other 30 need three more seconds' worth of share, 150 ms
    assert offsets[-1] >= 0.135


async def test_rpm_below_sixty_is_one_request_per_interval() -> None:
    pacer = Pacer(rpm=30, time_scale=0.01)  # one per 2 s × 0.01 = 20 ms
    start = asyncio.get_running_loop().time()
    times = sorted(await asyncio.gather(*(_acquired_at(pacer) for _ in range(4))))
    assert times[0] - start < 0.015  # at once: a paced one would wait 20 ms
    assert times[1] - start >= 0.015
    assert times[-1] - start >= 0.055


def test_pacer_refuses_a_zero_rpm() -> None:
    with pytest.raises(ValueError, match="rpm"):
        Pacer(rpm=0)


async def _acquired_at(pacer: Pacer) -> float:
    await pacer.acquire()
    return asyncio.get_running_loop().time()
