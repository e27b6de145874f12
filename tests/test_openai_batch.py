"""The OpenAI batch client against the loopback Files and Batches fake.

The fake's clock stands still until a test moves it, so every status a test sees is the
one it asked for, however slow the machine (tests/fakes/openai_batch_server.py).
"""

from __future__ import annotations

import asyncio
import json
import threading
import tracemalloc
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import aclosing
from pathlib import Path

import pytest

from imagepipe.providers.base import (
    AnswerTooLarge,
    AuthenticationFailed,
    ContentRejected,
    InvalidRequest,
    MissingCredentials,
    ProviderProtocolError,
    ProviderRequest,
    ServerError,
)
from imagepipe.providers.http import Pacer
from imagepipe.providers.openai import OpenAIOptions, OpenAIProvider
from imagepipe.providers.openai_batch import (
    BatchInfo,
    BatchResult,
    OpenAIBatchClient,
    RequestLine,
    group_lines,
    split_lines,
    write_input_file,
)
from tests.fakes.common import Fault, make_png
from tests.fakes.openai_batch_server import OpenAIBatchFake
from tests.fakes.openai_server import _big_b64

pytest_plugins = ["tests.fakes.plugin"]

PROMPTS = ["a lighthouse", "a red fox", "a tea cup", "a glacier", "a kite"]


def request(prompt: str, branch: str, **opts: str) -> ProviderRequest:
    return ProviderRequest(prompt, branch, 1, OpenAIOptions(**opts))  # type: ignore[arg-type]


@pytest.fixture
async def client(openai_batch_fake: OpenAIBatchFake) -> AsyncIterator[OpenAIBatchClient]:
    c = OpenAIBatchClient(OpenAIOptions(timeout=5.0), pacer=Pacer(time_scale=0.01))
    yield c
    await c.aclose()


async def submit(
    client: OpenAIBatchClient, folder: Path, prompts: list[str], name: str = "run-1"
) -> BatchInfo:
    """Write, upload and create one batch of ``prompts`` (branch ids ``name.0``...)."""
    lines = [client.request_line(request(p, f"{name}.{i}")) for i, p in enumerate(prompts)]
    path = folder / f"{name}.jsonl"
    written = write_input_file(path, lines)
    assert written.requests == len(prompts)
    uploaded = await client.upload_file(path, filename=path.name)
    assert uploaded.bytes == written.bytes
    return await client.create_batch(uploaded.id, metadata={"imagepipe_run": name})


async def collect(client: OpenAIBatchClient, batch: BatchInfo) -> list[BatchResult]:
    async with aclosing(client.results(batch)) as results:
        return [result async for result in results]


async def test_round_trip_every_branch_once_with_its_own_image(
    openai_batch_fake: OpenAIBatchFake, client: OpenAIBatchClient, tmp_path: Path
) -> None:
    fake = openai_batch_fake
    batch = await submit(client, tmp_path, PROMPTS)
    assert batch.status == "validating"
    assert batch.metadata == {"imagepipe_run": "run-1"}
    assert batch.stamps["expires_at"] - (batch.created_at or 0) == 24 * 3600
    fake.clock.advance(1 + 4)  # validated, then 4 of the 10 s of running
    running = await client.get_batch(batch.id)
    assert running.status == "in_progress"
    assert running.counts.total == 5
    assert running.counts.completed == 2
    fake.clock.advance(6)
    assert (await client.get_batch(batch.id)).status == "finalizing"
    fake.clock.advance(1)
    done = await client.get_batch(batch.id)
    assert done.status == "completed"
    assert done.counts.completed == 5
    assert done.error_file_id is None
    assert BatchInfo.from_json(json.loads(json.dumps(done.as_json()))) == done

    results = await collect(client, done)
    images = {r.custom_id: r.image for r in results}
    assert sorted(images) == [f"run-1.{i}" for i in range(5)]
    for i, prompt in enumerate(PROMPTS):
        image = images[f"run-1.{i}"]
        assert image is not None
        assert image.data == make_png(prompt)
        assert image.mime == "image/png"
        assert image.model == "gpt-image-1"
        assert image.revised_prompt == f"{prompt}, revised"
        assert image.request_id is not None
    # what the fake was asked: one upload, one create, every branch in one batch
    assert [u.custom_ids for u in fake.uploads] == [tuple(f"run-1.{i}" for i in range(5))]
    assert fake.creates_by_input_file() == {batch.input_file_id: 1}
    assert all(len(batches) == 1 for batches in fake.batches_of().values())


async def test_a_line_carries_the_synchronous_request_body(
    openai_batch_fake: OpenAIBatchFake, client: OpenAIBatchClient
) -> None:
    branch = request("a lighthouse", "run-9.3", quality="low", size="1024x1536")
    line = client.request_line(branch)
    assert line.custom_id == "run-9.3"
    assert line.data.endswith(b"\n")
    assert line.data.count(b"\n") == 1
    assert json.loads(line.data) == {
        "custom_id": "run-9.3",
        "method": "POST",
        "url": "/v1/images/generations",
        "body": OpenAIProvider(OpenAIOptions())._body(branch),
    }


def test_only_gpt_image_models_answering_in_base64_can_be_batched() -> None:
    assert OpenAIBatchClient.refusal(OpenAIOptions()) is None
    assert OpenAIBatchClient.refusal(OpenAIOptions(model="gpt-image-1-mini")) is None
    refused = OpenAIBatchClient.refusal(OpenAIOptions(model="dall-e-3\x1b[2J"))
    assert refused == "the model 'dall-e-3\\x1b[2J' has no batch mode (GPT Image models do)"
    url = OpenAIBatchClient.refusal(OpenAIOptions(response_format="url"))
    assert url is not None
    assert "b64_json only" in url


async def test_results_come_in_random_order_and_are_matched_by_custom_id(
    openai_batch_fake: OpenAIBatchFake, client: OpenAIBatchClient, tmp_path: Path
) -> None:
    prompts = [f"a scene number {i}" for i in range(20)]
    batch = await submit(client, tmp_path, prompts)
    openai_batch_fake.clock.advance(12)
    results = await collect(client, await client.get_batch(batch.id))
    order = [r.custom_id for r in results]
    assert order != [f"run-1.{i}" for i in range(20)]
    assert sorted(order) == sorted(f"run-1.{i}" for i in range(20))
    for result in results:
        index = int(result.custom_id.split(".")[1])
        assert result.image is not None
        assert result.image.data == make_png(prompts[index])


async def test_failed_lines_come_from_the_error_file_classified(
    openai_batch_fake: OpenAIBatchFake, client: OpenAIBatchClient, tmp_path: Path
) -> None:
    fake = openai_batch_fake
    fake.fail_prompt("a red fox")
    fake.fail_prompt("a glacier", Fault.server_error(502))
    batch = await submit(client, tmp_path, PROMPTS)
    fake.clock.advance(12)
    done = await client.get_batch(batch.id)
    assert done.status == "completed"
    assert (done.counts.completed, done.counts.failed) == (3, 2)
    assert done.error_file_id is not None
    results = {r.custom_id: r for r in await collect(client, done)}
    refused = results["run-1.1"].error
    assert isinstance(refused, ContentRejected)
    assert not refused.retryable
    assert results["run-1.1"].image is None
    broken = results["run-1.3"].error
    assert isinstance(broken, ServerError)
    assert broken.retryable
    assert broken.status == 502
    assert {k for k, r in results.items() if r.image is not None} == {
        "run-1.0",
        "run-1.2",
        "run-1.4",
    }


async def test_an_expired_batch_gives_its_partial_results(
    openai_batch_fake: OpenAIBatchFake, client: OpenAIBatchClient, tmp_path: Path
) -> None:
    fake = openai_batch_fake
    fake.stall_at = 2  # runs two requests, then nothing until the window ends
    batch = await submit(client, tmp_path, PROMPTS)
    fake.clock.advance(3600)
    stalled = await client.get_batch(batch.id)
    assert stalled.status == "in_progress"
    assert stalled.counts.completed == 2
    fake.clock.advance(24 * 3600)
    expired = await client.get_batch(batch.id)
    assert expired.status == "expired"
    assert expired.terminal
    assert expired.stamps["expired_at"] == stalled.stamps["expires_at"]
    assert len(expired.result_files) == 2
    results = await collect(client, expired)
    done = [r for r in results if r.image is not None]
    unfinished = [r for r in results if r.unfinished is not None]
    assert len(done) == 2
    assert len(unfinished) == 3
    assert {r.unfinished for r in unfinished} == {"batch_expired"}
    assert all(r.error is None for r in unfinished)
    assert {r.custom_id for r in results} == {f"run-1.{i}" for i in range(5)}


@pytest.mark.parametrize("unfinished", ["missing", "error_file"])
async def test_a_cancelled_batch_gives_its_partial_results(
    openai_batch_fake: OpenAIBatchFake, client: OpenAIBatchClient, tmp_path: Path, unfinished: str
) -> None:
    fake = openai_batch_fake
    fake.cancelled_unfinished = unfinished
    batch = await submit(client, tmp_path, PROMPTS)
    fake.clock.advance(1 + 6)  # 3 of 5 have run
    cancelling = await client.cancel_batch(batch.id)
    assert cancelling.status == "cancelling"
    assert cancelling.counts.completed == 3
    fake.clock.advance(5)
    cancelled = await client.get_batch(batch.id)
    assert cancelled.status == "cancelled"
    assert cancelled.counts.completed == 3  # nothing ran after the cancel
    # cancelling again (a resumed `cancel` after a kill) answers the batch as it is
    assert (await client.cancel_batch(batch.id)).status == "cancelled"
    results = await collect(client, cancelled)
    assert sum(1 for r in results if r.image is not None) == 3
    left = [r for r in results if r.image is None]
    if unfinished == "missing":
        assert left == []
    else:
        assert [r.unfinished for r in left] == ["batch_cancelled"] * 2


def _line(custom_id: str, prompt: str, url: str = "/v1/images/generations") -> RequestLine:
    body = {"model": "gpt-image-1", "prompt": prompt, "n": 1}
    data = {"custom_id": custom_id, "method": "POST", "url": url, "body": body}
    return RequestLine(custom_id, json.dumps(data).encode() + b"\n")


@pytest.mark.parametrize(
    ("lines", "problem"),
    [
        (
            [_line("run-1.0", "a kite"), _line("run-1.0", "a fox")],
            ("duplicate_custom_id", 2, "custom_id"),
        ),
        (
            [_line("run-1.0", "a kite"), _line("run-1.1", "a fox", url="/v1/images/edits")],
            ("mismatched_url", 2, "url"),
        ),
        (
            [_line(f"run-1.{i}", "a kite") for i in range(3)],
            ("too_many_requests", None, None),
        ),
    ],
    ids=["duplicate custom_id", "another endpoint", "too many requests"],
)
async def test_an_input_file_that_fails_validation_fails_the_batch(
    openai_batch_fake: OpenAIBatchFake,
    client: OpenAIBatchClient,
    tmp_path: Path,
    lines: list[RequestLine],
    problem: tuple[str, int | None, str | None],
) -> None:
    openai_batch_fake.max_requests = 2
    path = tmp_path / "bad.jsonl"
    write_input_file(path, lines)
    uploaded = await client.upload_file(path, filename="bad.jsonl")
    batch = await client.create_batch(uploaded.id)
    assert batch.status == "validating"
    openai_batch_fake.clock.advance(1)
    failed = await client.get_batch(batch.id)
    assert failed.status == "failed"
    assert failed.terminal
    assert "failed_at" in failed.stamps
    assert failed.result_files == ()
    assert [(p.code, p.line, p.param) for p in failed.errors] == [problem]
    assert await collect(client, failed) == []


async def test_an_input_file_over_the_size_limit_is_refused_at_the_upload(
    openai_batch_fake: OpenAIBatchFake, client: OpenAIBatchClient, tmp_path: Path
) -> None:
    openai_batch_fake.max_file_bytes = 100
    path = tmp_path / "big.jsonl"
    write_input_file(path, [_line("run-1.0", "a kite " * 20)])
    with pytest.raises(InvalidRequest, match="at most 100 bytes") as refused:
        await client.upload_file(path, filename="big.jsonl")
    assert refused.value.status == 400
    assert openai_batch_fake.uploads == []


async def test_a_bad_endpoint_is_refused_at_the_create(
    openai_batch_fake: OpenAIBatchFake, client: OpenAIBatchClient, tmp_path: Path
) -> None:
    path = tmp_path / "one.jsonl"
    write_input_file(path, [client.request_line(request("a kite", "run-1.0"))])
    uploaded = await client.upload_file(path, filename="one.jsonl")
    with pytest.raises(InvalidRequest, match="'/v1/images/variations' is not a supported"):
        await client.create_batch(uploaded.id, endpoint="/v1/images/variations")
    assert openai_batch_fake.created == []


def test_lines_are_grouped_within_the_count_and_byte_limits() -> None:
    lines = [RequestLine(f"r.{i}", b"x" * 99 + b"\n") for i in range(10)]
    by_count = list(group_lines(lines, max_requests=4, max_bytes=10_000))
    assert [len(g) for g in by_count] == [4, 4, 2]
    by_bytes = list(group_lines(lines, max_requests=100, max_bytes=350))
    assert [len(g) for g in by_bytes] == [3, 3, 3, 1]
    assert [line for group in by_bytes for line in group] == lines
    with pytest.raises(ValueError, match="more than one line"):
        list(group_lines([lines[0], lines[0]], max_requests=100, max_bytes=10_000))
    with pytest.raises(InvalidRequest, match="more than a batch file may hold"):
        list(group_lines(lines, max_requests=100, max_bytes=50))


async def test_an_upload_and_a_batch_the_fake_got_are_found_after_a_kill(
    openai_batch_fake: OpenAIBatchFake, client: OpenAIBatchClient, tmp_path: Path
) -> None:
    """A process killed after the fake made the file (or the batch) but before it read
    the answer: the next one finds it, and creates nothing twice."""
    fake = openai_batch_fake

    async def killed_once_the_fake_has(call: Awaitable[object], made: Callable[[], bool]) -> None:
        task = asyncio.ensure_future(call)
        await asyncio.to_thread(fake.wait_for, made)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    path = tmp_path / "run-1.g0.jsonl"
    write_input_file(path, [client.request_line(request("a kite", "run-1.0"))])
    fake.add_fault(Fault.paid_then_hang(), endpoint="upload")
    await killed_once_the_fake_has(
        client.upload_file(path, filename=path.name), lambda: len(fake.uploads) == 1
    )
    found = await client.find_upload(path.name)
    assert found is not None
    assert found.id == fake.uploads[0].file_id
    assert await client.find_upload("run-1.g1.jsonl") is None
    fake.add_fault(Fault.paid_then_hang(), endpoint="batch_create")
    await killed_once_the_fake_has(client.create_batch(found.id), lambda: len(fake.created) == 1)
    batch = await client.find_batch(found.id)
    assert batch is not None
    assert batch.id == fake.created[0].batch_id
    assert await client.find_batch("file-none") is None
    assert fake.creates_by_input_file() == {found.id: 1}
    assert len(fake.uploads) == 1


async def test_find_batch_pages_through_the_listing_and_stops_at_older_batches(
    openai_batch_fake: OpenAIBatchFake, client: OpenAIBatchClient, tmp_path: Path
) -> None:
    fake = openai_batch_fake
    made = []
    for k in range(5):
        made.append(await submit(client, tmp_path, PROMPTS[:1], name=f"run-{k}"))
        fake.clock.advance(10)
    client.batch_page = 2
    client.file_page = 2
    oldest = made[0]
    assert oldest.input_file_id is not None
    found = await client.find_batch(oldest.input_file_id)
    assert found is not None
    assert found.id == oldest.id
    assert fake.requests["batch_list"] == 3  # newest first, two a page: the oldest is last
    assert (await client.find_upload("run-0.jsonl")) is not None
    # a batch created before the file it is asked for cannot be its batch: the listing
    # stops at the first one (on the first page here)
    newest = made[-1]
    assert await client.find_batch("file-none", not_before=newest.created_at or 0) is None
    assert fake.requests["batch_list"] == 4


def test_a_run_makes_the_client_with_a_pacer_of_its_own() -> None:
    from imagepipe.providers.contract import ProviderSettings

    client = OpenAIBatchClient.create(OpenAIOptions(), ProviderSettings(time_scale=0.5, rpm=6))
    assert client.pacer.rpm is None  # --rpm is the images API's, not the Batch API's
    assert client.pacer.time_scale == 0.5


async def test_deleting_a_file_twice_is_not_an_error(
    openai_batch_fake: OpenAIBatchFake, client: OpenAIBatchClient, tmp_path: Path
) -> None:
    path = tmp_path / "one.jsonl"
    write_input_file(path, [client.request_line(request("a kite", "run-1.0"))])
    uploaded = await client.upload_file(path, filename="one.jsonl")
    assert await client.delete_file(uploaded.id) is True
    assert await client.delete_file(uploaded.id) is False
    assert openai_batch_fake.deleted == [uploaded.id]
    assert uploaded.id not in openai_batch_fake.file_ids()


async def test_errors_are_classified_and_the_key_is_required(
    openai_batch_fake: OpenAIBatchFake,
    client: OpenAIBatchClient,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    with pytest.raises(InvalidRequest) as missing:
        await client.get_batch("batch_404")
    assert missing.value.status == 404
    openai_batch_fake.add_fault(Fault.server_error(503), endpoint="batch_get")
    with pytest.raises(ServerError):
        await client.get_batch("batch_1")
    monkeypatch.setenv("OPENAI_API_KEY", "sk-wrong")
    with pytest.raises(AuthenticationFailed):
        await client.get_batch("batch_1")
    monkeypatch.delenv("OPENAI_API_KEY")
    with pytest.raises(MissingCredentials):
        await client.get_batch("batch_1")


async def test_a_line_longer_than_the_limit_rejects_its_branch_and_the_rest_is_read(
    openai_batch_fake: OpenAIBatchFake, tmp_path: Path
) -> None:
    fake = openai_batch_fake
    fake.image_bytes = 2_000_000  # ~2.7 MB of base64 a line
    client = OpenAIBatchClient(OpenAIOptions(timeout=5.0, max_image_mb=1.0))
    try:
        batch = await submit(client, tmp_path, PROMPTS[:3])
        fake.clock.advance(12)
        done = await client.get_batch(batch.id)
        results = await collect(client, done)
        assert sorted(r.custom_id for r in results) == ["run-1.0", "run-1.1", "run-1.2"]
        for number, result in enumerate(results, 1):
            assert isinstance(result.error, AnswerTooLarge)
            assert not result.error.retryable
            assert str(result.error).startswith(
                f"line {number} of the provider's batch file is longer than 2.33333 MB"
            )
        # a line too long whose custom_id cannot be read refuses the file
        noise = b'{"response": "' + b"x" * 2_400_000 + b'", "custom_id": "run-1.0"}\n'
        fake.add_fault(Fault.answer(noise), endpoint="content")
        with pytest.raises(AnswerTooLarge, match=r"^line 1 of the provider's batch file"):
            await collect(client, done)
    finally:
        await client.aclose()


async def test_split_lines_bounds_a_line_and_keeps_lines_split_across_chunks() -> None:
    async def chunks(*parts: bytes) -> AsyncIterator[bytes]:
        for part in parts:
            yield part

    got = [x async for x in split_lines(chunks(b'{"a"', b":1}\n\n{", b'"b":2}\n{"c":3}'), 10)]
    assert got == [(1, b'{"a":1}', True), (3, b'{"b":2}', True), (4, b'{"c":3}', True)]
    long = [b"short\n", b"abcdef", b"ghijkl", b"mnop\nnext\n", b"0123456789ABC"]
    got = [x async for x in split_lines(chunks(*long), 10)]
    assert got == [
        (1, b"short", True),
        (2, b"abcdefghij", False),  # only its first bytes (here: the limit's worth)
        (3, b"next", True),
        (4, b"0123456789", False),
    ]


async def test_a_line_without_custom_id_is_a_protocol_error(
    openai_batch_fake: OpenAIBatchFake, client: OpenAIBatchClient, tmp_path: Path
) -> None:
    batch = await submit(client, tmp_path, PROMPTS[:1])
    openai_batch_fake.clock.advance(12)
    done = await client.get_batch(batch.id)
    openai_batch_fake.add_fault(Fault.answer(b'{"response": null}\n'), endpoint="content")
    with pytest.raises(ProviderProtocolError, match=r"line 1 .* has no custom_id"):
        await collect(client, done)


async def test_a_download_held_by_the_fake_resumes_when_released(
    openai_batch_fake: OpenAIBatchFake, client: OpenAIBatchClient, tmp_path: Path
) -> None:
    fake = openai_batch_fake
    batch = await submit(client, tmp_path, PROMPTS)
    fake.clock.advance(12)
    done = await client.get_batch(batch.id)
    release = threading.Event()
    fake.content_hold = (100, release)
    reading = asyncio.create_task(collect(client, done))
    await asyncio.to_thread(fake.wait_for, lambda: fake.streamed["content"] >= 100)
    assert not reading.done()
    release.set()
    assert len(await reading) == 5


async def test_streaming_200_mb_of_results_keeps_memory_flat(
    openai_batch_fake: OpenAIBatchFake, tmp_path: Path
) -> None:
    """150 lines of a 1 MB image each (200 MB of base64): the client holds about one
    line at a time, so its peak stays a few lines' worth, not the file's size."""
    fake = openai_batch_fake
    fake.image_bytes = 1_000_000
    fake.in_progress_seconds = 0
    client = OpenAIBatchClient(OpenAIOptions(timeout=30.0))
    try:
        batch = await submit(client, tmp_path, [f"a scene {i}" for i in range(150)])
        fake.clock.advance(2)
        done = await client.get_batch(batch.id)
        assert done.status == "completed"
        images = 0
        size = 0
        _big_b64(fake.image_bytes)  # the fake's one image, made before the measure
        tracemalloc.start()
        try:
            async with aclosing(client.results(done)) as results:
                async for result in results:
                    assert result.image is not None
                    images += 1
                    size += len(result.image.data)
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        assert images == 150
        assert fake.streamed["content"] > 200_000_000
        assert size > 150_000_000
        # one line is 1.33 MB of base64 and 1 MB decoded; the whole file 200 MB
        print(f"peak {peak / 1e6:.1f} MB over {fake.streamed['content'] / 1e6:.0f} MB")
        assert peak < 16_000_000, peak
    finally:
        await client.aclose()
