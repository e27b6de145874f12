"""Issue 21, "account-wide errors stop the run", through the real CLI against the loopback
fakes: a refused key, an exhausted quota, an unknown model and a base URL that cannot be
used stop the run after the requests in flight (exit 78, one line naming what to fix and
``imagepipe resume ID``), the rest left pending; once fixed, ``resume`` finishes it with
every image made exactly once. Errors of one image stay per branch (tests elsewhere)."""

from __future__ import annotations

import json
import socket
import sqlite3
import subprocess
import threading
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from imagepipe.providers import base
from imagepipe.providers.http import classify
from tests.fakes.common import FakeServer, Fault
from tests.fakes.openai_server import OpenAIFake
from tests.fakes.replicate_server import ReplicateFake

from conftest import cli_argv, cli_env
from storeview import checkpointed_bytes

pytest_plugins = ["tests.fakes.plugin"]

PROMPT = "a lighthouse"
#: what an unknown model's line says to fix
MODEL_FIX = (
    "check -o model; a run keeps its model, so get access to it or start a new run with another"
)
#: 3 styles x 4 variations: 12 branches, 2 requests at a time
BRANCHES, CONCURRENCY = 12, 2


def cli(db: Path, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        cli_argv(*args), env=cli_env(db, **env), capture_output=True, text=True, timeout=120
    )


def openai_run(run_id: str, out: Path, *extra: str) -> list[str]:
    return ["run", PROMPT, "-p", "openai", "-n", "4", "-c", str(CONCURRENCY), "--id", run_id,
            "--out", str(out), *extra]  # fmt: skip


def rows(db: Path, sql: str, *params: object) -> list[tuple[Any, ...]]:
    with sqlite3.connect(db) as conn:
        return conn.execute(sql, params).fetchall()


def states(db: Path, run_id: str) -> Counter[str]:
    return Counter(r[0] for r in rows(db, "SELECT state FROM promises WHERE parent_id = ?", run_id))


def failed_attempts(db: Path) -> int:
    return int(rows(db, "SELECT count(*) FROM attempts")[0][0])


def images_made(fake: FakeServer, run_id: str) -> Counter[str]:
    """How many images each branch got from the fake (answers 200 to its create)."""
    with fake.lock:
        return Counter(
            a.key
            for a in fake.log
            if a.endpoint == "create" and a.status == 200 and str(a.key).startswith(f"{run_id}.")
        )


def the_line(done: subprocess.CompletedProcess[str]) -> str:
    assert done.stderr.count("\n") == 1, done.stderr
    return done.stderr


# -- a refused key, an exhausted quota, an unknown model ------------------------------

CASES = {
    "bad key": ("Incorrect API key provided", "check OPENAI_API_KEY"),
    "exhausted quota": (
        "You exceeded your current quota",
        "add credit to the account of OPENAI_API_KEY or raise its spending limit",
    ),
    "billing hard limit": (
        "Billing hard limit has been reached",
        "add credit to the account of OPENAI_API_KEY or raise its spending limit",
    ),
    "unknown model": ("The model `gpt-image-9` does not exist", MODEL_FIX),
}


def _break(case: str, fake: OpenAIFake) -> dict[str, str]:
    """Make the fake answer ``case`` to every create; the environment to run with."""
    if case == "bad key":
        return {"OPENAI_API_KEY": "sk-wrong"}
    fault = {
        "exhausted quota": Fault.insufficient_quota(),
        "billing hard limit": Fault.billing_hard_limit(),
        "unknown model": Fault.model_not_found("gpt-image-9"),
    }[case]
    fake.add_fault(fault, times=-1)
    return {}


@pytest.mark.parametrize("case", list(CASES))
def test_an_account_error_stops_the_run_and_a_fixed_one_lets_resume_finish(
    openai_fake: OpenAIFake, db_path: Path, tmp_path: Path, case: str
) -> None:
    said, fix = CASES[case]
    out = tmp_path / "images"
    broken = _break(case, openai_fake)
    done = cli(db_path, *openai_run("a1", out), **broken)
    assert done.returncode == 78, done.stderr
    line = the_line(done)
    assert line.startswith("error: run 'a1' stopped, its unfinished branches pending: ")
    assert said in line
    assert line.endswith(f"({fix}); fix it, then `imagepipe resume a1`\n")
    assert "retry" not in line
    # no more requests than were in flight: the first error stopped every later one
    assert 1 <= openai_fake.requests["create"] <= CONCURRENCY
    assert openai_fake.paid_creates == 0
    assert states(db_path, "a1") == {"pending": BRANCHES}
    assert rows(db_path, "SELECT state FROM promises WHERE id = 'a1'") == [("pending",)]
    assert failed_attempts(db_path) == 0  # meeting it is no failed attempt

    openai_fake.clear_faults()  # fixed: the key set right, credit added, access granted
    resumed = cli(db_path, "resume", "a1", "--json")
    assert resumed.returncode == 0, resumed.stderr
    assert json.loads(resumed.stdout)["state"] == "resolved"
    assert states(db_path, "a1") == {"resolved": BRANCHES}
    made = images_made(openai_fake, "a1")
    assert made == {f"a1.{i}": 1 for i in range(BRANCHES)}  # every image exactly once
    assert len([p for p in out.iterdir() if p.suffix == ".png"]) == BRANCHES


@pytest.mark.parametrize("how", ["run", "worker"])
def test_the_requests_in_flight_end_and_are_recorded_the_rest_left_pending(
    openai_fake: OpenAIFake, db_path: Path, tmp_path: Path, how: str
) -> None:
    """Three branches, three at a time: two are held in flight at the fake, the third is
    told the quota is exhausted. The two are answered once the test says so: their images
    are kept and recorded, the third stays pending, and nothing else is sent."""
    answer = threading.Event()
    openai_fake.add_fault(Fault.held(answer), times=2)
    openai_fake.add_fault(Fault.insufficient_quota(), times=-1)
    out = tmp_path / "images"
    args = ["run", PROMPT, "-p", "openai", "-c", "3", "--id", "f1", "--out", str(out)]
    if how == "worker":
        assert cli(db_path, *args, "--detach").returncode == 0
        args = ["worker", "--once", "-c", "3"]
    proc = subprocess.Popen(
        cli_argv(*args), env=cli_env(db_path), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True,
    )  # fmt: skip
    try:
        openai_fake.wait_for(lambda: openai_fake.requests["create"] == 3, timeout=60)
        answer.set()
        printed, err = proc.communicate(timeout=120)
    finally:
        answer.set()
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 78, err
    if how == "run":  # the user is told why nothing new starts while the others finish
        assert "Stopping, no new request: " in printed
    assert "fix it, then `imagepipe resume f1`" in err
    assert err.count("\n") == 1
    assert openai_fake.requests["create"] == 3
    assert openai_fake.paid_creates == 2
    assert states(db_path, "f1") == {"resolved": 2, "pending": 1}
    assert len([p for p in out.iterdir() if p.suffix == ".png"]) == 2
    assert failed_attempts(db_path) == 0

    openai_fake.clear_faults()
    resumed = cli(db_path, "resume", "f1")
    assert resumed.returncode == 0, resumed.stderr
    assert images_made(openai_fake, "f1") == {"f1.0": 1, "f1.1": 1, "f1.2": 1}
    assert len([p for p in out.iterdir() if p.suffix == ".png"]) == 3


# -- the base URL ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("env", "option", "shown"),
    [
        (
            {"OPENAI_BASE_URL": "localhost:8080/v1"},
            [],
            "'localhost:8080/v1' (from OPENAI_BASE_URL)",
        ),
        ({"OPENAI_BASE_URL": "http://loc\x1b[2Jal/v1"}, [], "'http://loc\\x1b[2Jal/v1'"),
        ({}, ["-o", "base_url", "http:///v1"], "'http:///v1' (-o base_url)"),
    ],
    ids=["no scheme", "a control character", "no host"],
)
def test_a_base_url_without_scheme_or_host_is_refused_before_anything_is_written(
    openai_fake: OpenAIFake,
    db_path: Path,
    tmp_path: Path,
    env: dict[str, str],
    option: list[str],
    shown: str,
) -> None:
    done = cli(db_path, *openai_run("u1", tmp_path / "images", *option), **env)
    assert done.returncode == 2, done.stderr
    line = the_line(done)
    assert f"the base URL {shown}" in line
    assert not db_path.exists()
    assert not (tmp_path / "images").exists()
    assert openai_fake.log == []


def test_a_resume_with_a_base_url_without_scheme_leaves_the_store_unchanged(
    openai_fake: OpenAIFake, db_path: Path, tmp_path: Path
) -> None:
    stopped = cli(db_path, *openai_run("u2", tmp_path / "images"), OPENAI_API_KEY="sk-wrong")
    assert stopped.returncode == 78, stopped.stderr
    sent = openai_fake.requests["create"]
    before = checkpointed_bytes(db_path)
    done = cli(db_path, "resume", "u2", OPENAI_BASE_URL="127.0.0.1:1/v1")
    assert done.returncode == 2, done.stderr
    assert "the base URL '127.0.0.1:1/v1' (from OPENAI_BASE_URL)" in the_line(done)
    assert checkpointed_bytes(db_path) == before
    assert openai_fake.requests["create"] == sent


@pytest.fixture
def refusing_port() -> Iterator[int]:
    """A port bound but not listening: every connection to it is refused (held for the
    test, so that nobody else can listen there meanwhile)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        yield sock.getsockname()[1]


def test_a_base_url_that_refuses_every_connection_stops_the_run_naming_it(
    openai_fake: OpenAIFake, db_path: Path, tmp_path: Path, refusing_port: int
) -> None:
    url = f"http://127.0.0.1:{refusing_port}/v1"
    done = cli(db_path, *openai_run("c1", tmp_path / "images", "-o", "base_url", url))
    assert done.returncode == 78, done.stderr
    line = the_line(done)
    assert f"the base URL '{url}' cannot be reached (3 requests in a row: cannot connect" in line
    assert line.endswith(
        "(check OPENAI_BASE_URL or -o base_url); fix it, then `imagepipe resume c1`\n"
    )
    assert states(db_path, "c1") == {"pending": BRANCHES}
    # the first two were retryable (a refused connection may be a restart): recorded as such
    assert failed_attempts(db_path) == 2

    resumed = cli(db_path, "resume", "c1")  # the fake's URL again, from OPENAI_BASE_URL
    assert resumed.returncode == 0, resumed.stderr
    assert images_made(openai_fake, "c1") == {f"c1.{i}": 1 for i in range(BRANCHES)}


# -- workers ---------------------------------------------------------------------------


def test_a_worker_with_a_refused_key_stops_and_leaves_the_branches_to_others(
    openai_fake: OpenAIFake, db_path: Path, tmp_path: Path
) -> None:
    detach = ["run", PROMPT, "-p", "openai", "-n", "4", "--id", "d1", "--out",
              str(tmp_path / "images"), "--detach"]  # fmt: skip
    assert cli(db_path, *detach).returncode == 0
    worker = ["worker", "--once", "-c", str(CONCURRENCY)]
    stopped = cli(db_path, *worker, OPENAI_API_KEY="sk-wrong")
    assert stopped.returncode == 78, stopped.stderr
    assert the_line(stopped) == (
        "error: worker stopped, the run's unfinished branches pending: Incorrect API key "
        "provided (check OPENAI_API_KEY); fix it, then `imagepipe resume d1` or start the "
        "workers again\n"
    )
    assert 1 <= openai_fake.requests["create"] <= CONCURRENCY
    assert states(db_path, "d1") == {"pending": BRANCHES}
    assert failed_attempts(db_path) == 0
    held = "SELECT count(*) FROM leases WHERE key LIKE 'd1.%' AND owner IS NOT NULL"
    assert rows(db_path, held) == [(0,)]  # its claims released: any worker may take them

    # a resume of the detached run meets it too, as a worker of that run
    resumed = cli(db_path, "resume", "d1", "-c", str(CONCURRENCY), OPENAI_API_KEY="sk-wrong")
    assert resumed.returncode == 78, resumed.stderr
    assert the_line(resumed).endswith(
        "(check OPENAI_API_KEY); fix it, then `imagepipe resume d1`\n"
    )
    assert openai_fake.requests["create"] <= 2 * CONCURRENCY

    fixed = cli(db_path, *worker)
    assert fixed.returncode == 0, fixed.stderr
    assert states(db_path, "d1") == {"resolved": BRANCHES}
    assert images_made(openai_fake, "d1") == {f"d1.{i}": 1 for i in range(BRANCHES)}


# -- Replicate ---------------------------------------------------------------------------


def test_replicate_unknown_model_stops_the_run_naming_the_option(
    replicate_fake: ReplicateFake, db_path: Path, tmp_path: Path
) -> None:
    replicate_fake.add_fault(Fault(404, "The requested resource could not be found."), times=-1)
    args = ["run", PROMPT, "-p", "replicate", "-n", "4", "-c", str(CONCURRENCY), "--id", "r1",
            "--out", str(tmp_path / "images"), "-o", "model", "nobody/nothing"]  # fmt: skip
    done = cli(db_path, *args)
    assert done.returncode == 78, done.stderr
    line = the_line(done)
    assert (
        "no model 'nobody/nothing' here (404: The requested resource could not be found.)" in line
    )
    assert f"({MODEL_FIX}; or REPLICATE_BASE_URL or -o base_url)" in line
    assert 1 <= replicate_fake.requests["create"] <= CONCURRENCY
    assert states(db_path, "r1") == {"pending": BRANCHES}


# -- classification of the published error bodies ---------------------------------------


def _openai(message: str, code: str | None, type_: str | None, param: str | None = None) -> bytes:
    return json.dumps(
        {"error": {"message": message, "type": type_, "param": param, "code": code}}
    ).encode()


@pytest.mark.parametrize(
    ("status", "body", "expected", "fix"),
    [
        (401, _openai("Incorrect API key provided: sk-xx***", "invalid_api_key",
                      "invalid_request_error"), "AuthenticationFailed", "check OPENAI_API_KEY"),
        (403, _openai("Country, region, or territory not supported",
                      "unsupported_country_region_territory", "request_forbidden"),
         "AuthenticationFailed", "check OPENAI_API_KEY"),
        (429, _openai("You exceeded your current quota", "insufficient_quota",
                      "insufficient_quota"), "QuotaExceeded", None),
        (429, _openai("You exceeded your current quota", "project_spend_limit_exceeded",
                      "insufficient_quota"), "QuotaExceeded", None),
        (400, _openai("Billing hard limit has been reached", "billing_hard_limit_reached",
                      "invalid_request_error"), "QuotaExceeded", None),
        (402, b'{"title": "Payment Required", "detail": "You have insufficient credit",'
              b' "status": 402}', "QuotaExceeded", None),
        (404, _openai("The model `gpt-5` does not exist or you do not have access to it.",
                      "model_not_found", "invalid_request_error"),
         "UnknownModel", MODEL_FIX),
        (400, _openai("Invalid value: 'dall-e-9'.", "invalid_value", "invalid_request_error",
                      "model"), "UnknownModel", MODEL_FIX),
        (429, _openai("Rate limit reached", "rate_limit_exceeded", "requests"),
         "RateLimited", None),
    ],
    ids=["401", "403", "quota", "spend limit", "hard limit", "402", "model 404", "model 400",
         "rate limit"],
)  # fmt: skip
def test_account_errors_are_classified_from_the_published_bodies(
    status: int, body: bytes, expected: str, fix: str | None
) -> None:
    error = classify(status, {}, body)
    assert type(error).__name__ == expected
    if expected == "RateLimited":  # the one here that is not the account's
        assert not isinstance(error, base.AccountError)
        return
    assert isinstance(error, base.AccountError)
    assert not error.retryable
    if fix is not None:
        from imagepipe.providers.openai import OpenAIProvider

        assert OpenAIProvider().what_to_fix(error) == fix


# -- only connections refused in a row blame the base URL --------------------------------


def _not_listening(port: int = 0) -> socket.socket:
    """A socket bound to ``port`` on 127.0.0.1 and not listening: connections are refused."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", port))
    return sock


async def test_an_answer_in_between_clears_the_count_of_refused_connections() -> None:
    from imagepipe.providers.base import BaseURLUnusable, CannotConnect, ProviderRequest
    from imagepipe.providers.openai import OpenAIOptions, OpenAIProvider

    refusing = _not_listening()
    port = refusing.getsockname()[1]
    options = OpenAIOptions(base_url=f"http://127.0.0.1:{port}/v1")
    provider = OpenAIProvider(options, api_key="sk-test")
    request = ProviderRequest("a lighthouse", "run-1.0", 1, options)
    steps: Any = None  # the OpenAI provider has no sub-steps
    try:
        for _ in range(2):
            with pytest.raises(CannotConnect):
                await provider.generate(request, steps)
        refusing.close()
        fake = OpenAIFake(api_key="sk-test")
        fake.start(port)
        try:
            await provider.generate(request, steps)  # answered: the count starts again
        finally:
            fake.stop()
            await provider.aclose()  # no pooled connection to the stopped fake
        refusing = _not_listening(port)
        for _ in range(2):
            with pytest.raises(CannotConnect):
                await provider.generate(request, steps)
        with pytest.raises(BaseURLUnusable) as info:
            await provider.generate(request, steps)
        assert info.value.message.startswith(
            f"the base URL 'http://127.0.0.1:{port}/v1' cannot be reached (3 requests in a row"
        )
        assert info.value.fix == "check OPENAI_BASE_URL or -o base_url"
    finally:
        refusing.close()
        await provider.aclose()
