"""Issue 19's hostile provider answers, through the real CLI against the loopback fakes.

3. Huge answers (with a Content-Length, chunked, a gzip bomb, a huge error body) are read
   only up to a limit counted in decompressed bytes; over it, the branch is rejected with
   one line and not retried.
4. Hangs: a dripping answer ends at the request's deadline; an absurd or over-long
   Retry-After is never waited for; a stuck Replicate prediction is canceled at the poll
   deadline and made again.
7. ``retry`` makes a new prediction for a branch whose prediction failed.
13. An image URL is fetched only over http(s) from a public address (or the API's own
    origin).
14. An answer of the wrong shape is a provider protocol error naming what is wrong.
15. A provider's text that echoes the key is stored and printed with the key redacted.
"""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from imagepipe.styles import render, templates_for
from tests.fakes.common import Fault
from tests.fakes.openai_server import OpenAIFake
from tests.fakes.replicate_server import ReplicateFake

from conftest import cli_argv, cli_env

pytest_plugins = ["tests.fakes.plugin"]

MB = 1_000_000
PROMPT = "a lighthouse"
#: what the provider gets for PROMPT in the style ``photo`` (the style's template applied)
SENT = render(templates_for(["photo"])["photo"], PROMPT, "photo")


def run_cli(db: Path, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """One ``imagepipe`` process (a hang before the fixes ends the test at ``timeout``)."""
    return subprocess.run(
        cli_argv(*args),
        env=cli_env(db, IMAGEPIPE_TIME_SCALE="0.01"),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def one_run(provider: str, run_id: str, out: Path, *options: str) -> list[str]:
    """A run of one image (style ``photo``) with ``-o`` pairs from ``options``."""
    pairs = [arg for i in range(0, len(options), 2) for arg in ("-o", *options[i : i + 2])]
    args = ["run", PROMPT, "--provider", provider, "--style", "photo", "--id", run_id]
    return [*args, "--out", str(out), *pairs]


def one_line(stderr: str) -> str:
    assert stderr.count("\n") == 1, stderr
    assert "Traceback" not in stderr, stderr
    return stderr.strip()


def attempts(db: Path, branch: str) -> list[str]:
    """The stored error of each failed attempt of ``branch``."""
    conn = sqlite3.connect(db)
    rows = conn.execute(
        "SELECT error FROM attempts WHERE promise_id = ? AND error IS NOT NULL ORDER BY attempt",
        (branch,),
    ).fetchall()
    conn.close()
    return [json.loads(r[0])["message"] for r in rows]


def branch_value(db: Path, branch: str) -> dict[str, Any]:
    conn = sqlite3.connect(db)
    [(value,)] = conn.execute("SELECT value FROM promises WHERE id = ?", (branch,)).fetchall()
    conn.close()
    result: dict[str, Any] = json.loads(value)
    return result


def store_text(db: Path) -> str:
    """Everything the store holds, as SQL text."""
    conn = sqlite3.connect(db)
    text = "\n".join(conn.iterdump())
    conn.close()
    return text


@pytest.fixture
def url_fake(openai_fake: OpenAIFake) -> OpenAIFake:
    """The OpenAI fake answering with an image URL (served by itself by default)."""
    openai_fake.respond_with_url = True
    return openai_fake


# -- 3. unbounded answers ------------------------------------------------------------


@pytest.mark.parametrize(
    "fault",
    [
        Fault.huge(200 * MB),
        Fault.huge(200 * MB, chunked=True),
        Fault.gzip_bomb(1 << 30),
        Fault.gzip_bomb(1 << 30, bomb_format="deflate"),
        Fault.gzip_bomb(1 << 30, bomb_format="raw-deflate"),
    ],
    ids=["content-length", "chunked", "gzip-bomb", "deflate-bomb", "raw-deflate-bomb"],
)
def test_a_huge_image_is_refused_at_the_cap_and_not_retried(
    url_fake: OpenAIFake, db_path: Path, tmp_path: Path, fault: Fault
) -> None:
    url_fake.add_fault(fault, endpoint="file", times=-1)
    done = run_cli(db_path, *one_run("openai", "h1", tmp_path / "img", "max_image_mb", "1"))
    assert done.returncode == 1, done.stderr
    line = one_line(done.stderr)
    assert "the provider's image is larger than 1 MB; refused" in line
    assert attempts(db_path, "h1.0") == [
        "the provider's image is larger than 1 MB; refused (-o max_image_mb sets the limit)"
    ]
    # read up to the cap, then the connection was closed: most of it was never sent
    assert url_fake.streamed["file"] < 50 * MB
    assert url_fake.requests["file"] == 1


def test_a_huge_api_answer_is_refused_and_a_huge_error_body_is_cut_short(
    openai_fake: OpenAIFake, db_path: Path, tmp_path: Path
) -> None:
    openai_fake.add_fault(Fault.huge(300 * MB, status=503, chunked=True))
    openai_fake.add_fault(Fault.huge(300 * MB, chunked=True))
    done = run_cli(db_path, *one_run("openai", "h2", tmp_path / "img", "max_image_mb", "1"))
    assert done.returncode == 1, done.stderr
    line = one_line(done.stderr)
    assert "the provider's answer is larger than 2.33333 MB; refused" in line
    first, second = attempts(db_path, "h2.0")
    # the 503's body was read up to 64 KB: its message is there, cut to one line
    assert first.startswith("HTTP 503: xxxx")
    assert len(first) <= 500
    assert second.startswith("the provider's answer is larger than")
    assert openai_fake.requests["create"] == 2  # the 503 retried, the huge answer not
    assert openai_fake.streamed["create"] < 100 * MB  # of 600 MB


def test_a_gzip_bomb_does_not_inflate_past_the_default_cap(
    openai_fake: OpenAIFake, db_path: Path, tmp_path: Path
) -> None:
    """A create answer of ~1 MB on the wire that inflates to 1 GiB, against the default
    limit (50 MB images, so 67.7 MB of JSON): the process's peak memory stays far below
    what inflating it would take."""
    openai_fake.add_fault(Fault.gzip_bomb(1 << 30))
    argv = cli_argv(*one_run("openai", "gz", tmp_path / "img"))
    env = cli_env(db_path, IMAGEPIPE_TIME_SCALE="0.01")
    proc = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    assert proc.stderr is not None
    stderr = proc.stderr.read().decode()
    proc.stderr.close()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    assert proc.returncode == 1, stderr
    assert "the provider's answer is larger than 67.6667 MB; refused" in one_line(stderr)
    assert openai_fake.requests["create"] == 1
    peak_mb = usage.ru_maxrss / 1024  # KiB on Linux
    assert peak_mb < 400, peak_mb


# -- 4. hangs --------------------------------------------------------------------------


def test_a_dripping_answer_ends_at_the_deadline_and_is_retried(
    openai_fake: OpenAIFake, db_path: Path, tmp_path: Path
) -> None:
    openai_fake.add_fault(Fault.dripping(0.05))  # a byte every 50 ms, forever
    done = run_cli(db_path, *one_run("openai", "d1", tmp_path / "img", "timeout", "2"))
    assert done.returncode == 0, done.stderr
    errors = attempts(db_path, "d1.0")
    assert errors[0] == "the provider did not complete its answer in 2 s (-o timeout)"
    assert openai_fake.requests["create"] == len(errors) + 1


@pytest.mark.parametrize(
    ("fault", "outcome"),
    [
        (
            Fault(503, "overloaded", retry_after="100000"),
            "overloaded; resume later (the provider asked to wait 100000 s)",
        ),
        (Fault(503, "overloaded", retry_after_ms="inf"), None),
        (Fault(502, "bad gateway", retry_after="1e300"), None),
    ],
    ids=["503-100000s", "ms-inf", "absurd"],
)
def test_an_absurd_or_long_retry_after_is_never_waited_for(
    openai_fake: OpenAIFake, db_path: Path, tmp_path: Path, fault: Fault, outcome: str | None
) -> None:
    """Over 120 s (any status): rejected at once, "resume later"; not finite or absurd: as
    if absent, so retried after the usual back-off (a negative one too: see
    test_providers_http.py)."""
    openai_fake.add_fault(fault)
    done = run_cli(db_path, *one_run("openai", "r1", tmp_path / "img"), timeout=30)
    if outcome is None:
        assert done.returncode == 0, done.stderr
        assert openai_fake.requests["create"] == 2
    else:
        assert done.returncode == 1, done.stderr
        assert outcome in one_line(done.stderr)
        assert attempts(db_path, "r1.0") == [outcome]
        assert openai_fake.requests["create"] == 1


def test_a_stuck_prediction_is_canceled_at_the_poll_deadline_and_made_again(
    replicate_fake: ReplicateFake, db_path: Path, tmp_path: Path
) -> None:
    replicate_fake.stall_prompt(SENT)  # the first prediction never ends by itself
    # time scale 0.01: a poll every 10 ms, the deadline after 0.3 s
    args = one_run("replicate", "s1", tmp_path / "img", "poll_timeout", "30")
    done = run_cli(db_path, *args)
    assert done.returncode == 0, done.stderr
    assert replicate_fake.cancels == ["p00001"]
    assert replicate_fake.predictions["p00001"]["status"] == "canceled"
    assert replicate_fake.paid_creates == 2
    assert branch_value(db_path, "s1.0")["request_id"] == "p00002"
    assert attempts(db_path, "s1.0") == [
        "prediction p00001 did not end in 30 s (-o poll_timeout); canceled it"
    ]


# -- 7. retry after a failed prediction --------------------------------------------------


@pytest.mark.parametrize("ending", ["failed", "canceled"])
def test_retry_makes_a_new_prediction_for_one_that_failed(
    replicate_fake: ReplicateFake, db_path: Path, tmp_path: Path, ending: str
) -> None:
    if ending == "failed":
        replicate_fake.fail_prompt(SENT, "the model crashed", times=1)
    else:
        replicate_fake.cancel_prompt(SENT, times=1)
    replicate_fake.processing_polls = 1
    done = run_cli(db_path, *one_run("replicate", "f1", tmp_path / "img"))
    assert done.returncode == 1, done.stderr
    assert replicate_fake.paid_creates == 1
    retried = run_cli(db_path, "retry", "f1")
    assert retried.returncode == 0, retried.stderr
    assert replicate_fake.paid_creates == 2
    assert branch_value(db_path, "f1.0")["request_id"] == "p00002"
    # a second retry of a resolved run pays for nothing more
    assert run_cli(db_path, "retry", "f1").returncode == 0
    assert replicate_fake.paid_creates == 2


# -- 13. where an image URL may point ----------------------------------------------------


@pytest.fixture
def other_server() -> Iterator[OpenAIFake]:
    """Another loopback server, that no image URL may make imagepipe call."""
    fake = OpenAIFake()
    fake.start()
    yield fake
    fake.stop()


@pytest.mark.parametrize(
    ("where", "why"),
    [
        ("other-port", "points to 127.0.0.1, a private, loopback or link-local address"),
        ("file:///etc/passwd", "is not http(s)"),
        ("ftp://example.com/x.png", "is not http(s)"),
        ("http://169.254.169.254/latest/meta-data", "points to 169.254.169.254"),
        ("http://[::ffff:10.0.0.1]/x.png", "points to"),
        ("gopher://\x1b[2J\u202e/x", "'gopher://\\x1b[2J\\u202e/x' is not a valid URL"),
    ],
)
def test_an_image_url_may_not_point_to_a_private_address_or_another_scheme(
    url_fake: OpenAIFake,
    other_server: OpenAIFake,
    db_path: Path,
    tmp_path: Path,
    where: str,
    why: str,
) -> None:
    url = f"{other_server.origin}/files/img-1.png" if where == "other-port" else where
    url_fake.image_url = url
    done = run_cli(db_path, *one_run("openai", "u1", tmp_path / "img", "timeout", "5"))
    assert done.returncode == 1, done.stderr
    line = one_line(done.stderr)
    assert line.isprintable()
    assert line.startswith("error: ")
    assert "the provider's image URL" in line
    assert why in line
    assert "refused" in line
    [error] = attempts(db_path, "u1.0")  # not retried
    assert why in error
    assert other_server.log == []
    assert url_fake.requests["file"] == 0


def test_a_replicate_output_on_another_port_is_refused(
    replicate_fake: ReplicateFake, other_server: OpenAIFake, db_path: Path, tmp_path: Path
) -> None:
    replicate_fake.image_url = f"{other_server.origin}/files/img-1.png"
    done = run_cli(db_path, *one_run("replicate", "u2", tmp_path / "img"))
    assert done.returncode == 1, done.stderr
    assert "points to 127.0.0.1, a private, loopback" in one_line(done.stderr)
    assert len(attempts(db_path, "u2.0")) == 1  # not retried
    assert other_server.log == []
    assert replicate_fake.requests["file"] == 0


# -- 14. answers of the wrong shape -------------------------------------------------------


@pytest.mark.parametrize(
    ("provider", "raw", "message"),
    [
        ("openai", b'"an image"', "the provider's answer is a string, not an object"),
        ("openai", b"[1, 2]", "the provider's answer is a list, not an object"),
        ("openai", b'{"data": "x"}', "the provider's answer has data as a string, not a list"),
        (
            "openai",
            b'{"data": ["x"]}',
            "the provider's answer has data[0] as a string, not an object",
        ),
        (
            "openai",
            b'{"data": [{"b64_json": ["x"]}]}',
            "the provider's answer has data[0].b64_json as a list, not a string",
        ),
        ("openai", b"<html>oops</html>", "the provider's answer is not JSON"),
        (
            "openai",
            b"[" * 100_000 + b"]" * 100_000,
            "the provider's answer is JSON nested too deeply",
        ),
        (
            "replicate",
            b'{"id": "p9", "status": {"x": 1}}',
            "the provider's prediction has status as an object, not a string",
        ),
        ("replicate", b'["p9"]', "the provider's answer is a list, not a prediction object"),
    ],
)
def test_an_answer_of_the_wrong_shape_is_a_protocol_error(
    openai_fake: OpenAIFake,
    replicate_fake: ReplicateFake,
    db_path: Path,
    tmp_path: Path,
    provider: str,
    raw: bytes,
    message: str,
) -> None:
    fake = openai_fake if provider == "openai" else replicate_fake
    fake.add_fault(Fault.answer(raw, 201 if provider == "replicate" else 200), times=-1)
    done = run_cli(db_path, *one_run(provider, "w1", tmp_path / "img"))
    assert done.returncode == 1, done.stderr
    assert message in one_line(done.stderr)
    conn = sqlite3.connect(db_path)
    [(error,)] = conn.execute("SELECT error FROM attempts WHERE promise_id = 'w1.0'").fetchall()
    conn.close()
    assert json.loads(error) == {
        "type": "ProviderProtocolError",
        "message": message,
        "retryable": False,
    }


# -- 15. a provider that echoes the key -------------------------------------------------


def test_a_key_echoed_by_the_provider_is_redacted_from_output_and_store(
    openai_fake: OpenAIFake, replicate_fake: ReplicateFake, db_path: Path, tmp_path: Path
) -> None:
    openai_fake.add_fault(Fault(400, "bad request from key sk-test, try again", "invalid"))
    replicate_fake.fail_prompt(SENT, "token r8-test has no access to this model")
    by_openai = run_cli(db_path, *one_run("openai", "k1", tmp_path / "a"))
    by_replicate = run_cli(db_path, *one_run("replicate", "k2", tmp_path / "b"))
    assert by_openai.returncode == by_replicate.returncode == 1
    assert "bad request from key [redacted], try again" in one_line(by_openai.stderr)
    assert "token [redacted] has no access to this model" in one_line(by_replicate.stderr)
    shown = run_cli(db_path, "show", "k2").stdout + run_cli(db_path, "show", "k1").stdout
    assert "[redacted]" in shown
    for text in (by_openai.stderr, by_replicate.stderr, shown, store_text(db_path)):
        assert "sk-test" not in text
        assert "r8-test" not in text
