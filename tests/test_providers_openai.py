"""The openai provider against the loopback fake: images, errors, back-off, rate limits."""

from __future__ import annotations

import asyncio
import base64
from collections import Counter
from collections.abc import AsyncIterator

import pytest

from imagepipe.providers.base import (
    AuthenticationFailed,
    ContentRejected,
    MissingCredentials,
    ProviderConnectionError,
    ProviderError,
    ProviderRequest,
    ProviderTimeout,
    QuotaExceeded,
    RateLimited,
    ServerError,
)
from imagepipe.providers.http import Pacer
from imagepipe.providers.openai import OpenAIOptions, OpenAIProvider, check_credentials
from tests.fakes.common import Fault, make_png
from tests.fakes.openai_server import OpenAIFake
from tests.fakes.steps import MemorySteps, generate_with_retries

pytest_plugins = ["tests.fakes.plugin"]


def request(prompt: str = "a lighthouse", key: str = "run-1.0", **opts: str) -> ProviderRequest:
    return ProviderRequest(prompt, key, 1, OpenAIOptions(**opts))  # type: ignore[arg-type]


@pytest.fixture
async def provider(openai_fake: OpenAIFake) -> AsyncIterator[OpenAIProvider]:
    p = OpenAIProvider(OpenAIOptions(timeout=2.0), pacer=Pacer(time_scale=0.01))
    yield p
    await p.aclose()


async def test_b64_image_with_request_id_usage_and_idempotency_key(
    openai_fake: OpenAIFake, provider: OpenAIProvider
) -> None:
    image = await provider.generate(request(quality="low"), MemorySteps())
    assert image.data == make_png("a lighthouse")
    assert image.mime == "image/png"
    assert image.model == "gpt-image-1"
    assert image.request_id == "req_1"
    assert image.revised_prompt == "a lighthouse, revised"
    assert image.usage is not None
    assert image.usage["output_tokens"] == 272
    assert image.source_url is None
    assert openai_fake.keys == {"run-1.0": 1}
    assert openai_fake.paid_creates == 1


async def test_a_repeated_idempotency_key_is_not_paid_twice(
    openai_fake: OpenAIFake, provider: OpenAIProvider
) -> None:
    first = await provider.generate(request(key="run-1.2"), MemorySteps())
    again = await provider.generate(request(key="run-1.2"), MemorySteps())
    assert again == first
    assert openai_fake.keys["run-1.2"] == 2
    assert openai_fake.paid_creates == 1


async def test_a_url_answer_is_downloaded_before_returning(
    openai_fake: OpenAIFake, provider: OpenAIProvider
) -> None:
    openai_fake.respond_with_url = True
    image = await provider.generate(request("a dall-e lighthouse"), MemorySteps())
    assert image.data == make_png("a dall-e lighthouse")
    assert image.source_url is not None
    assert image.source_url.startswith(openai_fake.origin + "/files/")
    assert openai_fake.requests == {"create": 1, "file": 1}


async def test_a_bad_key_is_not_retryable(openai_fake: OpenAIFake) -> None:
    p = OpenAIProvider(api_key="sk-wrong")
    with pytest.raises(AuthenticationFailed) as info:
        await generate_with_retries(p, request(), MemorySteps())
    await p.aclose()
    assert info.value.message == "Incorrect API key provided"
    assert not info.value.retryable
    assert openai_fake.requests["create"] == 1  # nothing was retried


async def test_a_missing_key_says_which_variable_to_set(
    openai_fake: OpenAIFake, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("OPENAI_API_KEY")
    with pytest.raises(MissingCredentials) as info:
        check_credentials()
    assert (info.value.message, info.value.exit_code) == (
        "no API key: set OPENAI_API_KEY (this provider reads its key from it)",
        2,
    )
    with pytest.raises(MissingCredentials):
        await OpenAIProvider().generate(request(), MemorySteps())
    assert openai_fake.requests["create"] == 0
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test")
    OpenAIProvider.check_credentials()


@pytest.mark.parametrize(
    ("fault", "cls", "retryable", "message"),
    [
        (
            Fault.moderation_blocked(),
            ContentRejected,
            False,
            "Your request was rejected by the safety system",
        ),
        (
            Fault.content_policy(),
            ContentRejected,
            False,
            "Your request was rejected as a result of our safety system",
        ),
        (
            Fault.insufficient_quota(),
            QuotaExceeded,
            False,
            "You exceeded your current quota, please check your plan and billing",
        ),
        (
            Fault.server_error(),
            ServerError,
            True,
            "The server had an error while processing your request",
        ),
        (Fault.rate_limited(2.0, ms=True), RateLimited, True, "Rate limit reached"),
        (
            Fault.rate_limited(600),
            RateLimited,
            False,
            "rate limited; resume later (the provider asked to wait 600 s)",
        ),
        (Fault(500, "no", headers=(("x-should-retry", "false"),)), ServerError, False, "no"),
    ],
)
async def test_errors_are_classified(
    openai_fake: OpenAIFake,
    provider: OpenAIProvider,
    fault: Fault,
    cls: type[ProviderError],
    retryable: bool,
    message: str,
) -> None:
    openai_fake.add_fault(fault)
    with pytest.raises(cls) as info:
        await provider.generate(request(), MemorySteps())
    assert (info.value.retryable, info.value.message) == (retryable, message)


async def test_a_dropped_connection_and_a_hang_are_retryable(
    openai_fake: OpenAIFake, provider: OpenAIProvider
) -> None:
    openai_fake.add_fault(Fault.dropped())
    with pytest.raises(ProviderConnectionError) as dropped:
        await provider.generate(request(), MemorySteps())
    assert dropped.value.retryable
    openai_fake.add_fault(Fault.hanging())
    quick = OpenAIProvider(OpenAIOptions(timeout=0.2))
    with pytest.raises(ProviderTimeout) as hung:
        await quick.generate(request(), MemorySteps())
    await quick.aclose()
    assert hung.value.retryable
    # and the next attempt goes through
    image = await provider.generate(request(), MemorySteps())
    assert image.mime == "image/png"


async def test_one_content_rejection_does_not_stop_the_other_branches(
    openai_fake: OpenAIFake, provider: OpenAIProvider
) -> None:
    openai_fake.add_fault(Fault.moderation_blocked(), prompt="p3", times=-1)
    results = await asyncio.gather(
        *(
            generate_with_retries(provider, request(f"p{i}", f"r.{i}"), MemorySteps())
            for i in range(6)
        ),
        return_exceptions=True,
    )
    assert [isinstance(r, ContentRejected) for r in results] == [i == 3 for i in range(6)]
    assert openai_fake.prompts["p3"] == 1  # not retried


@pytest.mark.parametrize("coordinated", [True, False])
async def test_a_429_pauses_every_branch(openai_fake: OpenAIFake, coordinated: bool) -> None:
    """16 concurrent branches meet one 429 with retry-after 1 s (scaled to 500 ms).

    Checked by order, not by tight timing (a loaded machine delays the fake's threads):
    within the pause, no branch sends a request after the one it had in flight.
    """
    openai_fake.add_fault(Fault.rate_limited(1.0), after=24)
    openai_fake.add_fault(Fault.slow(0.02), times=-1)
    pacer = Pacer(coordinated=coordinated, time_scale=0.5)
    p = OpenAIProvider(pacer=pacer)

    async def branch(i: int) -> None:
        for j in range(6):
            await generate_with_retries(p, request(f"b{i}-{j}", f"r.{i}.{j}"), MemorySteps())

    await asyncio.gather(*(branch(i) for i in range(16)))
    await p.aclose()
    assert openai_fake.paid_creates == 96
    [limited] = [a for a in openai_fake.log if a.status == 429]
    assert limited.key is not None
    retry = next(a for a in openai_fake.log if a.key == limited.key and a.status == 200)

    def branches_in(start: float, end: float) -> Counter[str]:
        """Requests per branch that reached the fake between start and end."""
        keys = [a.key for a in openai_fake.log if start < a.time < end and a.key]
        return Counter(key.split(".")[1] for key in keys)

    if coordinated:
        assert pacer.last_pause is not None
        start, end = pacer.last_pause
        assert start >= limited.time
        assert end - start == pytest.approx(0.5)
        assert retry.time >= end  # the branch that met the 429 waited for it
        # each other branch had at most its one request in flight when the pause began:
        # none sent another until the pause ended
        assert max(branches_in(start, end - 0.01).values(), default=0) <= 1
        assert branches_in(end, end + 10)  # and they all went on afterwards
    else:
        assert pacer.last_pause is None
        assert retry.time < limited.time + 0.45
        assert max(branches_in(limited.time, limited.time + 0.45).values()) >= 2


async def test_rpm_holds_within_ten_percent_over_a_scaled_minute(
    openai_fake: OpenAIFake,
) -> None:
    # a minute is 4.8 s: 12.5 requests a second to keep up, which two busy cores shared
    # with another test process still manage (at 0.02, 50 a second: 26 of 60 under load)
    scale = 0.08
    p = OpenAIProvider(pacer=Pacer(rpm=60, time_scale=scale))
    loop = asyncio.get_running_loop()
    end = loop.time() + 60 * scale

    async def branch(i: int) -> None:
        j = 0
        while loop.time() < end:
            await p.generate(request(f"b{i}", f"r.{i}.{j}"), MemorySteps())
            j += 1

    await asyncio.gather(*(branch(i) for i in range(8)))
    await p.aclose()
    arrivals = openai_fake.arrivals("create")
    in_minute = [t for t in arrivals if t < arrivals[0] + 60 * scale]
    assert 54 <= len(in_minute) <= 66


async def test_the_fake_limits_rpm_and_the_pacer_keeps_under_it(openai_fake: OpenAIFake) -> None:
    """Goodput under the fake's limit: R=60 a minute, scaled to 0.6 s; rpm 57 client-side."""
    openai_fake.time_scale = 0.01
    openai_fake.limit_rpm(60)
    p = OpenAIProvider(pacer=Pacer(rpm=57, time_scale=0.01))
    images = await asyncio.gather(
        *(
            generate_with_retries(p, request(f"p{i}", f"r.{i}"), MemorySteps(), attempts=20)
            for i in range(30)
        )
    )
    await p.aclose()
    assert len(images) == 30
    statuses = [a.status for a in openai_fake.log if a.endpoint == "create"]
    assert statuses.count(429) <= 1  # under 5 % of the requests


async def test_the_fakes_own_limit_answers_429_with_retry_after(openai_fake: OpenAIFake) -> None:
    # a minute is 3 s: the three requests may take up to 0.5 s on a busy machine
    openai_fake.time_scale = 0.05
    openai_fake.limit_rpm(2)
    # coordinated back-off off: the quota headers are ignored, so the third meets the limit
    p = OpenAIProvider(pacer=Pacer(coordinated=False, time_scale=0.05))
    await p.generate(request("a", "r.a"), MemorySteps())
    await p.generate(request("b", "r.b"), MemorySteps())
    with pytest.raises(RateLimited) as info:
        await p.generate(request("c", "r.c"), MemorySteps())
    await p.aclose()
    assert info.value.retry_after is not None
    assert 50 < info.value.retry_after <= 60  # asked in unscaled seconds, as a real server


async def test_an_exhausted_quota_is_waited_out_before_it_costs_a_429(
    openai_fake: OpenAIFake,
) -> None:
    openai_fake.time_scale = 0.01
    openai_fake.limit_rpm(2)
    pacer = Pacer(time_scale=0.01)
    p = OpenAIProvider(pacer=pacer)
    for prompt in "abc":  # the second answer says 0 left: the third waits for the reset
        await p.generate(request(prompt, f"r.{prompt}"), MemorySteps())
    await p.aclose()
    assert [a.status for a in openai_fake.log if a.endpoint == "create"] == [200, 200, 200]
    assert pacer.pauses == 1
    assert pacer.last_pause is not None
    start, end = pacer.last_pause
    assert 0.5 < end - start <= 0.6  # until the window's oldest request leaves it, scaled


def test_openai_durations_parse() -> None:
    from imagepipe.providers.http import parse_duration

    assert parse_duration("6m0s") == 360
    assert parse_duration("1.5s") == 1.5
    assert parse_duration("120ms") == pytest.approx(0.12)
    assert parse_duration("1h2m3s") == 3723
    assert parse_duration("soon") is None
    assert parse_duration("") is None


def test_b64_of_the_fake_is_a_real_png() -> None:
    import io

    from PIL import Image

    png = make_png("x", 8, 4)
    assert Image.open(io.BytesIO(png)).size == (8, 4)
    assert base64.b64decode(base64.b64encode(png)) == png
