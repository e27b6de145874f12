"""The replicate provider against the loopback fake: one paid create per image, resumes."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from imagepipe.providers.base import (
    AuthenticationFailed,
    MissingCredentials,
    PredictionFailed,
    ProviderConnectionError,
    ProviderRequest,
    RateLimited,
    ServerError,
)
from imagepipe.providers.http import Pacer
from imagepipe.providers.replicate import ReplicateOptions, ReplicateProvider, check_credentials
from tests.fakes.common import Fault, make_png
from tests.fakes.replicate_server import ReplicateFake
from tests.fakes.steps import MemorySteps, generate_with_retries

pytest_plugins = ["tests.fakes.plugin"]

VERSION = "5599ed30703defd1d160a25a63321b4dec97101d98b4674bcc56e41f62f35637"


def request(prompt: str = "a lighthouse", **opts: object) -> ProviderRequest:
    return ProviderRequest(prompt, "run-1.0", 1, ReplicateOptions(**opts))  # type: ignore[arg-type]


def make_provider() -> ReplicateProvider:
    return ReplicateProvider(ReplicateOptions(poll_interval=1.0), time_scale=0.001)


@pytest.fixture
async def provider(replicate_fake: ReplicateFake) -> AsyncIterator[ReplicateProvider]:
    p = make_provider()
    yield p
    await p.aclose()


async def test_prefer_wait_answer_that_is_final_needs_no_poll(
    replicate_fake: ReplicateFake, provider: ReplicateProvider
) -> None:
    steps = MemorySteps()
    image = await provider.generate(request(seed=3), steps)
    assert image.data == make_png("a lighthouse")
    assert image.mime == "image/png"
    assert image.request_id == "p00001"
    assert image.seed == 3
    assert image.model == "black-forest-labs/flux-schnell"
    assert image.source_url == f"{replicate_fake.origin}/files/p00001.png"
    assert replicate_fake.requests == {"create": 1, "file": 1}
    assert steps.results[0]["id"] == "p00001"
    created = replicate_fake.predictions["p00001"]
    assert created["input"] == {
        "prompt": "a lighthouse",
        "aspect_ratio": "1:1",
        "output_format": "webp",
        "seed": 3,
    }


async def test_a_version_id_creates_through_v1_predictions(
    replicate_fake: ReplicateFake, provider: ReplicateProvider
) -> None:
    await provider.generate(request(model=VERSION), MemorySteps())
    await provider.generate(request(model=f"owner/name:{VERSION}"), MemorySteps())
    assert [p["version"] for p in replicate_fake.predictions.values()] == [VERSION, VERSION]


async def test_polls_until_the_prediction_ends(
    replicate_fake: ReplicateFake, provider: ReplicateProvider
) -> None:
    replicate_fake.processing_polls = 3
    image = await provider.generate(request(), MemorySteps())
    assert replicate_fake.polls[image.request_id or ""] == 4  # 3 × processing, then succeeded
    assert replicate_fake.paid_creates == 1


async def test_a_resume_polls_the_same_prediction_and_never_creates_again(
    replicate_fake: ReplicateFake,
) -> None:
    replicate_fake.processing_polls = 2
    replicate_fake.add_fault(Fault.dropped(), endpoint="poll")  # the "kill": mid-wait
    first = make_provider()
    steps = MemorySteps()
    with pytest.raises(ProviderConnectionError):
        await first.generate(request(), steps)
    await first.aclose()
    assert steps.results == [
        {
            "id": "p00001",
            "status": "starting",
            "output": None,
            "error": None,
            "model": "black-forest-labs/flux-schnell",
        }
    ]
    # a new process resumes the branch with the stored result of its create step
    resumed = make_provider()
    replayed = MemorySteps(stored=steps.results)
    image = await resumed.generate(request(), replayed)
    await resumed.aclose()
    # the create step was replayed, not run; only the wait ran, and stored the end
    assert replayed.executed == 1
    assert replayed.results[0] == steps.results[0]
    assert replayed.results[1]["status"] == "succeeded"
    assert image.request_id == "p00001"
    assert replicate_fake.requests["create"] == 1
    assert replicate_fake.paid_creates == 1
    assert replicate_fake.requests["poll"] == 4  # the dropped one, 2 × processing, succeeded
    assert replicate_fake.polls["p00001"] == 3


async def test_paid_creates_per_image_is_one_under_poll_failures(
    replicate_fake: ReplicateFake, provider: ReplicateProvider
) -> None:
    replicate_fake.processing_polls = 2
    replicate_fake.add_fault(Fault.server_error(503), endpoint="poll", times=6)
    replicate_fake.add_fault(Fault.dropped(), endpoint="file", times=2)
    images = await asyncio.gather(
        *(
            generate_with_retries(provider, request(f"p{i}"), MemorySteps(), attempts=10)
            for i in range(8)
        )
    )
    assert [i.data for i in images] == [make_png(f"p{i}") for i in range(8)]
    assert replicate_fake.paid_creates == 8
    assert set(replicate_fake.paid_by_prompt.values()) == {1}


async def test_a_failed_create_is_retried_by_a_new_create(
    replicate_fake: ReplicateFake, provider: ReplicateProvider
) -> None:
    replicate_fake.add_fault(Fault.server_error(), endpoint="create")
    steps = MemorySteps()
    with pytest.raises(ServerError):
        await provider.generate(request(), steps)
    assert steps.results == []  # nothing was created, nothing stored
    await generate_with_retries(provider, request(), steps)
    assert replicate_fake.paid_creates == 1


async def test_failed_and_canceled_predictions_are_not_retried(
    replicate_fake: ReplicateFake, provider: ReplicateProvider
) -> None:
    replicate_fake.processing_polls = 1
    replicate_fake.fail_prompt("nsfw", "NSFW content detected.\nTry another prompt")
    replicate_fake.cancel_prompt("stop")
    with pytest.raises(PredictionFailed) as failed:
        await generate_with_retries(provider, request("nsfw"), MemorySteps())
    assert failed.value.message == "NSFW content detected. Try another prompt"
    assert not failed.value.retryable
    with pytest.raises(PredictionFailed, match=r"prediction p00002 was canceled"):
        await generate_with_retries(provider, request("stop"), MemorySteps())
    assert replicate_fake.paid_creates == 2


async def test_token_errors(replicate_fake: ReplicateFake, monkeypatch: pytest.MonkeyPatch) -> None:
    bad = ReplicateProvider(api_key="r8-wrong", time_scale=0.001)
    with pytest.raises(AuthenticationFailed) as info:
        await generate_with_retries(bad, request(), MemorySteps())
    await bad.aclose()
    assert info.value.message == "Incorrect API key provided"
    assert replicate_fake.requests["create"] == 1
    monkeypatch.delenv("REPLICATE_API_TOKEN")
    with pytest.raises(MissingCredentials, match=r"^no API key: set REPLICATE_API_TOKEN "):
        check_credentials()
    steps = MemorySteps()
    with pytest.raises(MissingCredentials):
        await ReplicateProvider().generate(request(), steps)
    assert steps.results == []


async def test_a_429_on_create_pauses_the_polls_too(
    replicate_fake: ReplicateFake,
) -> None:
    pacer = Pacer(time_scale=0.01)
    p = ReplicateProvider(pacer=pacer, time_scale=0.001)
    replicate_fake.add_fault(Fault.rate_limited(3.0))
    with pytest.raises(RateLimited, match=r"^Rate limit reached$"):
        await p.generate(request(), MemorySteps())
    assert pacer.last_pause is not None
    image = await p.generate(request(), MemorySteps())
    await p.aclose()
    [start, end] = pacer.last_pause
    assert end - start == pytest.approx(0.03)
    assert image.request_id == "p00001"
