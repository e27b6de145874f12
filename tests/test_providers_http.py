"""Error classification, Retry-After parsing and the Pacer (no HTTP server needed; the
Pacer on a virtual clock)."""

from __future__ import annotations

import asyncio
import email.utils
import itertools
import json
from collections.abc import Callable

import pytest

from imagepipe.providers.base import (
    AccountError,
    AuthenticationFailed,
    ContentRejected,
    InvalidRequest,
    ProviderConnectionError,
    ProviderError,
    ProviderTimeout,
    QuotaExceeded,
    RateLimited,
    RateLimitPatienceExceeded,
    ServerError,
    TransientProviderError,
)
from imagepipe.providers.http import (
    PACE_GUARD,
    Pacer,
    classify,
    parse_retry_after,
    transport_error,
)
from tests.virtual_clock import run


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


# The pacer's tests run on a virtual clock (tests/virtual_clock.py): every wait takes the
# time the pacer asked for, to within microseconds (EPSILON), on any machine.
EPSILON = 1e-3


def acquire_times(
    pacer: Pacer,
    n: int,
    *,
    before: Callable[[], None] | None = None,
    during: Callable[[int], None] | None = None,
) -> list[float]:
    """When each of ``n`` requests queued at once may go (loop time, from 0); ``before()``
    is called first, on the loop, and ``during(i)`` right after the ``i``-th (0-based)
    request is let through."""

    async def main() -> list[float]:
        loop = asyncio.get_running_loop()
        if before is not None:
            before()
        times: list[float] = []

        async def one() -> None:
            await pacer.acquire()
            times.append(loop.time())
            if during is not None:
                during(len(times) - 1)

        await asyncio.gather(*(one() for _ in range(n)))
        return times

    return run(main())


def most_in_one_second(times: list[float]) -> int:
    """The most requests let through in any one second (half-open, sliding)."""
    return max(sum(1 for u in times if t <= u < t + 1.0) for t in times)


def gaps(times: list[float]) -> list[float]:
    return [b - a for a, b in itertools.pairwise(sorted(times))]


def test_rpm_spaces_requests_evenly_from_the_first_one() -> None:
    times = acquire_times(Pacer(rpm=600), 40)  # 10 a second
    assert times[0] < EPSILON  # the first at once
    assert min(gaps(times)) >= 0.1  # then one every 60/600 s, never a second's share at once
    assert max(gaps(times)) < 0.1 * (1 + PACE_GUARD) + EPSILON  # and no slower than that
    assert most_in_one_second(times) <= 10


def test_no_burst_after_a_pause_for_a_429() -> None:
    pacer = Pacer(rpm=600)

    def meet_a_429(i: int) -> None:
        if i == 4:
            pacer.observe(RateLimited("slow down", retry_after=2.0))

    times = acquire_times(pacer, 40, during=meet_a_429)
    assert pacer.last_pause == (times[4], pytest.approx(times[4] + 2.0))
    later = times[5:]
    assert min(later) >= times[4] + 2.0  # nothing goes during the pause
    assert min(gaps(times)) >= 0.1  # and no burst at its end: still one every 60/600 s
    assert most_in_one_second(later) <= 10


def test_rpm_below_sixty_is_one_request_per_interval() -> None:
    times = acquire_times(Pacer(rpm=30), 4)  # one per 2 s
    assert times[0] < EPSILON
    assert min(gaps(times)) >= 2.0


def test_the_time_scale_scales_the_pace() -> None:
    times = acquire_times(Pacer(rpm=600, time_scale=0.01), 5)
    assert min(gaps(times)) >= 0.001  # 60/600 s × 0.01
    assert max(gaps(times)) < 0.001 * (1 + PACE_GUARD) + 1e-5


def test_pacing_follows_the_limit_the_headers_state() -> None:
    pacer = Pacer()  # no --rpm: the first answer's headers say 300 a minute

    def answered(i: int) -> None:
        if i == 0:
            pacer.observe_limit({"x-ratelimit-limit-requests": "300"})
        if i == 10:
            pacer.observe(RateLimited("slow down", retry_after=1.0))

    times = acquire_times(pacer, 30, during=answered)
    assert pacer.pace == 300
    assert min(gaps(times[1:])) >= 0.2  # 5 a second from then on, evenly
    assert min(times[11:]) >= times[10] + 1.0  # the pause holds everyone
    assert most_in_one_second(times[1:]) <= 5  # and ends without a burst


def test_no_burst_after_a_pause_for_an_exhausted_quota() -> None:
    """The headers say 600 a minute, and that 1 is left for the 3 requests in flight: every
    branch waits for the reset (2 s), one request goes first, and once its answer says the
    quota came back the others go at the stated pace, not at once."""
    pacer = Pacer()

    def run_out() -> None:
        pacer.observe_limit({"x-ratelimit-limit-requests": "600"})
        pacer.in_flight = 3
        headers = {"x-ratelimit-remaining-requests": "1", "x-ratelimit-reset-requests": "2s"}
        assert not pacer.observe_quota(headers)
        pacer.in_flight = 0

    def answered(i: int) -> None:
        if i == 0:  # the request that went first is answered: the quota is back
            pacer.answered(quota_left=True)

    times = acquire_times(pacer, 20, before=run_out, during=answered)
    assert min(times) >= 2.0
    assert min(gaps(times)) >= 0.1
    assert most_in_one_second(times) <= 10


def test_without_rpm_or_headers_the_first_429_sets_the_pace() -> None:
    """A provider that states no limit let through 5 requests sent in one second, then
    answered 429: from then on, 5 a second, evenly, and no burst after the pause."""
    pacer = Pacer()

    async def main() -> list[float]:
        loop = asyncio.get_running_loop()
        for _ in range(5):  # sent 0.1 s apart, each let through
            await pacer.acquire()
            sent = loop.time()
            await asyncio.sleep(0.1)
            pacer.let_through(sent)
        pacer.observe(RateLimited("slow down", retry_after=1.0))
        start = loop.time()
        return [t - start for t in await asyncio.gather(*(_acquired_at(pacer) for _ in range(12)))]

    times = run(main())
    assert pacer.learned_rpm == 300
    assert min(times) >= 1.0  # the pause first
    assert min(gaps(times)) >= 0.2  # then 5 a second, not 12 at once
    assert most_in_one_second(times) <= 5


def test_a_stated_limit_above_rpm_keeps_the_rpm_pace() -> None:
    pacer = Pacer(rpm=60)
    pacer.observe_limit({"x-ratelimit-limit-requests": "600"})
    assert pacer.pace == 60
    pacer.observe_limit({"x-ratelimit-limit-requests": "30"})
    assert pacer.pace == 30
    pacer.observe_limit({"x-ratelimit-limit-requests": "600"})
    assert pacer.pace == 60
    off = Pacer(coordinated=False)  # the benchmark's "every branch on its own"
    off.observe_limit({"x-ratelimit-limit-requests": "30"})
    assert off.pace is None


def test_a_pause_holds_every_acquire_until_it_ends() -> None:
    pacer = Pacer(time_scale=0.05)

    async def main() -> tuple[float, list[float]]:
        pacer.observe(RateLimited("slow down", retry_after=1.0))  # 1 s × 0.05
        start = asyncio.get_running_loop().time()
        return start, await asyncio.gather(*(_acquired_at(pacer) for _ in range(8)))

    start, times = run(main())
    assert min(times) - start == pytest.approx(0.05, abs=EPSILON)
    assert pacer.pauses == 1


def test_a_pause_is_not_shortened_and_off_when_not_coordinated() -> None:
    async def main() -> None:
        pacer = Pacer(time_scale=0.05)
        pacer.pause(2.0)
        pacer.pause(1.0)  # an earlier end does not shorten the pause
        assert pacer.paused_for() == pytest.approx(0.1)
        off = Pacer(coordinated=False, time_scale=0.05)
        off.observe(RateLimited("slow down", retry_after=1.0))
        assert off.paused_for() == 0.0
        # a 429 without Retry-After still pauses everyone for a moment; a 400 does not
        pacer2 = Pacer(time_scale=0.05)
        pacer2.observe(InvalidRequest("bad"))
        assert pacer2.paused_for() == 0.0
        pacer2.observe(RateLimited("slow down"))
        assert pacer2.paused_for() > 0.0

    run(main())


def test_patience_gives_up_on_a_rate_limit_that_lets_nothing_through() -> None:
    async def main() -> None:
        pacer = Pacer(patience=10.0)
        pacer.observe(RateLimited("slow down", retry_after=1.0))
        await asyncio.sleep(9.0)
        pacer.observe(RateLimited("slow down", retry_after=1.0))
        assert pacer.gave_up() is None
        pacer.let_through()  # a request got through: the patience starts again
        await asyncio.sleep(5.0)
        pacer.observe(RateLimited("slow down", retry_after=1.0))
        await asyncio.sleep(10.5)
        pacer.observe(RateLimited("slow down", retry_after=1.0))
        error = pacer.gave_up()
        assert isinstance(error, RateLimitPatienceExceeded)
        assert isinstance(error, AccountError)  # it stops the run, the rest pending
        assert not error.retryable
        assert error.message == "rate limited: the provider let no request through for 10 s"
        assert "IMAGEPIPE_RATE_LIMIT_PATIENCE" in error.fix
        with pytest.raises(RateLimitPatienceExceeded):
            await pacer.acquire()  # nothing more is sent

    run(main())


def test_a_rate_limit_is_a_wait_not_a_failed_attempt() -> None:
    assert RateLimited("slow down").counts_as_attempt is False
    assert ServerError("oops").counts_as_attempt is True
    quota = classify(429, {}, openai_body("quota", "insufficient_quota"))
    assert quota.counts_as_attempt is True


def test_pacer_refuses_a_zero_rpm() -> None:
    with pytest.raises(ValueError, match="rpm"):
        Pacer(rpm=0)


async def _acquired_at(pacer: Pacer) -> float:
    await pacer.acquire()
    return asyncio.get_running_loop().time()
