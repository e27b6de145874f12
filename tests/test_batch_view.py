"""What users see of a run sent through OpenAI's Batch API, through the real CLI against
the loopback Files and Batches fake (its clock moves only when a test moves it):
``run --batch``'s output, ``show``, ``list``, the live table, ``--dry-run --batch`` and
``cancel``."""

from __future__ import annotations

import json
import re
import sqlite3
import subprocess
from pathlib import Path
from typing import Any

import pexpect

from imagepipe.cost import format_usd
from tests.fakes.openai_batch_server import FakeClock, OpenAIBatchFake

from conftest import cli_argv, cli_env

pytest_plugins = ["tests.fakes.plugin"]

ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")
#: a run of 6 branches (3 styles, 2 variations) of gpt-image-1, through its batches
BATCH_RUN = ("a lighthouse", "-p", "openai", "-o", "model", "gpt-image-1", "-n", "2", "--batch")
#: the fake's phases: validating 1 s, in progress 10 s, finalizing 1 s
TO_COMPLETED = 1 + 10 + 1 + 1


def imagepipe(db: Path, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        cli_argv(*args),
        env=cli_env(db, IMAGEPIPE_TIME_SCALE="0.01", **env),
        capture_output=True,
        text=True,
        timeout=120,
    )


def ok(db: Path, *args: str, **env: str) -> str:
    done = imagepipe(db, *args, **env)
    assert done.returncode == 0, done.stderr
    assert done.stderr == ""
    return done.stdout


def as_json(db: Path, *args: str) -> Any:
    return json.loads(ok(db, *args, "--json"))


def one_by_one_estimate(db: Path, *run: str) -> tuple[int, int]:
    """The run's estimate at synchronous prices, as ``--dry-run`` without --batch has it."""
    plan = as_json(db, "run", *[a for a in run if a != "--batch"], "--dry-run")
    return plan["cost"]["low_micro_usd"], plan["cost"]["high_micro_usd"]


def half(micro_usd: int, *, up: bool) -> int:
    """OpenAI's batch price: half, the worst case rounded up."""
    return -(-micro_usd // 2) if up else micro_usd // 2


def about_half(batch: int, one_by_one: int) -> bool:
    """Half, give or take the rounding up of each of the run's 6 attempts (each style's
    worst case is halved and rounded up, then added)."""
    return abs(batch - one_by_one / 2) <= 6


# -- run --batch --------------------------------------------------------------------


def test_run_batch_says_what_it_sent_what_it_may_cost_and_how_to_follow(
    openai_batch_fake: OpenAIBatchFake, db_path: Path
) -> None:
    low, high = one_by_one_estimate(db_path, *BATCH_RUN)
    out = ok(db_path, "run", *BATCH_RUN, "--id", "b1")
    batch = openai_batch_fake.created[0].batch_id
    assert "already pending" not in out
    assert "nothing was executed" not in out
    assert "Run b1: 6 requests sent in 1 batch" in out
    assert f"  Batch {batch} (6 requests): validating" in out
    batch_low, batch_high = half(low, up=False), half(high, up=True)
    assert (
        f"Estimated cost: {format_usd(batch_low)} to {format_usd(batch_high)} at batch prices "
        f"({format_usd(low)} to {format_usd(high)} one by one)"
    ) in out
    assert "imagepipe watch b1" in out
    assert "imagepipe resume b1" in out


def test_run_batch_json_is_one_document_with_the_batches_and_the_estimate(
    openai_batch_fake: OpenAIBatchFake, db_path: Path
) -> None:
    low, high = one_by_one_estimate(db_path, *BATCH_RUN)
    data = as_json(db_path, "run", *BATCH_RUN, "--id", "b2")
    assert data["id"] == "b2"
    assert data["state"] == "pending"
    [batch] = data["batches"]
    assert batch["batch_id"] == openai_batch_fake.created[0].batch_id
    assert batch["status"] == "validating"
    assert batch["requests"] == 6
    assert batch["age_seconds"] is not None
    assert data["estimate"]["batch"]["low_micro_usd"] == half(low, up=False)
    assert about_half(data["estimate"]["batch"]["high_micro_usd"], high)
    assert data["estimate"]["one_by_one"]["high_micro_usd"] == high
    assert data["follow"] == ["imagepipe watch b2", "imagepipe resume b2"]


# -- show and list ------------------------------------------------------------------


def test_show_has_a_line_per_batch_with_its_age_and_the_estimate_at_batch_prices(
    openai_batch_fake: OpenAIBatchFake, db_path: Path
) -> None:
    openai_batch_fake.clock.advance(-(3 * 3600 + 5 * 60 + 30))  # created 3 h 05 min ago
    low, high = one_by_one_estimate(db_path, *BATCH_RUN)
    ok(db_path, "run", *BATCH_RUN, "--id", "s1")
    batch = openai_batch_fake.created[0].batch_id
    shown = ok(db_path, "show", "s1")
    assert f"Batch {batch} (6 requests): validating, 0 done, 0 failed, 3 h " in shown
    age = re.search(r"validating, 0 done, 0 failed, 3 h (\d\d) min of its 24 h", shown)
    assert age is not None, shown
    assert int(age.group(1)) >= 5  # 05, or later on a slow machine
    estimate = f"{format_usd(half(low, up=False))} to {format_usd(half(high, up=True))}"
    assert f"(estimated {estimate} at batch prices)" in shown
    data = as_json(db_path, "show", "s1")
    [group] = data["batches"]
    assert (group["batch_id"], group["status"], group["requests"]) == (batch, "validating", 6)
    assert 3 * 3600 + 5 * 60 + 30 <= group["age_seconds"] < 4 * 3600
    assert about_half(data["cost"]["estimated"]["high_micro_usd"], high)
    # each branch's attempt is in the open batch: not a failed attempt, but a request that
    # will be paid once it runs, at the batch price
    spent = data["cost"]["spent"]
    assert spent["failed_attempts"] == 0
    assert spent["open_batch_requests"] == 6
    assert spent["open_batch_micro_usd"] == data["cost"]["estimated"]["high_micro_usd"]
    worst = format_usd(half(high, up=True))
    assert f"up to {worst} more for 6 requests in open batches" in shown, shown

    openai_batch_fake.clock.advance(3 * 3600 + 5 * 60 + 30 + TO_COMPLETED)
    resumed = ok(db_path, "resume", "s1")  # collects the six images
    assert f"(estimated {estimate} at batch prices)" in resumed
    shown = ok(db_path, "show", "s1")
    assert (
        f"Batch {batch} (6 requests): completed, 6 done, 0 failed; collected: 6 images, "
        "0 rejected, 0 not run"
    ) in shown


def test_list_sums_up_each_batch_run_in_a_few_words(
    openai_batch_fake: OpenAIBatchFake, db_path: Path
) -> None:
    ok(db_path, "run", "a kite", "--id", "plain")  # simulated: no batches
    ok(db_path, "run", *BATCH_RUN, "--id", "l1")
    before = _dump(db_path)
    listed = ok(db_path, "list")
    assert re.search(r"l1\s+pending\s+0/6\s+1 batch: validating 0/6", listed)
    assert re.search(r"plain\s+resolved\s+3/3\s+\$0\.00", listed)
    runs = {run["id"]: run for run in as_json(db_path, "list")}
    assert "batches" not in runs["plain"]
    [group] = runs["l1"]["batches"]
    assert (group["status"], group["requests"]) == ("validating", 6)
    assert _dump(db_path) == before  # reading a run's batches writes nothing

    openai_batch_fake.clock.advance(TO_COMPLETED)
    resumed = as_json(db_path, "resume", "l1")
    assert resumed["state"] == "resolved"
    assert [group["status"] for group in resumed["batches"]] == ["completed"]
    assert re.search(r"l1\s+resolved\s+6/6\s+1 batch: completed 6/6", ok(db_path, "list"))


def test_the_live_table_draws_the_runs_batches_with_it(
    openai_batch_fake: OpenAIBatchFake, db_path: Path
) -> None:
    ok(db_path, "run", *BATCH_RUN, "--id", "t1")
    batch = openai_batch_fake.created[0].batch_id
    # from now on the fake's batches run 1,000 fake seconds a second: each poll of watch
    # finds its batch further on, whatever the machine's speed
    openai_batch_fake.clock = FakeClock(rate=1000)
    environment = cli_env(db_path, IMAGEPIPE_TIME_SCALE="0.01", TERM="xterm-256color")
    environment.pop("NO_COLOR", None)
    argv = cli_argv("watch", "t1")
    child = pexpect.spawn(
        argv[0], argv[1:], env=environment, dimensions=(40, 160), encoding="utf-8", timeout=60
    )
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0, child.before
    screen = ANSI.sub("", str(child.before))
    # the last frame the live view drew (from its header on) has the batch's line in it
    frame = screen[screen.rindex("t1  'a lighthouse'") :]
    assert f"Batch {batch} (6 requests): completed, 6 done" in frame.split("style")[0]
    assert frame.startswith("t1  'a lighthouse'  watch · "), frame[:80]  # not "resume"


def _dump(db: Path) -> list[str]:
    with sqlite3.connect(db) as connection:
        return list(connection.iterdump())


# -- --dry-run --batch --------------------------------------------------------------


def test_a_dry_run_with_batch_shows_both_estimates_and_how_many_batches(
    openai_batch_fake: OpenAIBatchFake, db_path: Path
) -> None:
    low, high = one_by_one_estimate(db_path, *BATCH_RUN)
    planned = ok(db_path, "run", *BATCH_RUN, "--dry-run", IMAGEPIPE_BATCH_SIZE="4")
    assert f"  cost:     {format_usd(low)} to {format_usd(high)} one by one" in planned
    batch = f"{format_usd(half(low, up=False))} to {format_usd(half(high, up=True))}"
    assert f"  batch:    {batch} in 2 batches of at most 4 requests" in planned
    plan = as_json(db_path, "run", *BATCH_RUN, "--dry-run")
    assert plan["cost"]["high_micro_usd"] == high
    assert plan["batch"]["batches"] == 1
    assert plan["batch"]["batch_size"] == 50_000
    assert plan["batch"]["cost"]["low_micro_usd"] == half(low, up=False)
    assert about_half(plan["batch"]["cost"]["high_micro_usd"], high)
    assert openai_batch_fake.uploads == []
    assert openai_batch_fake.created == []
    assert not db_path.exists()


def test_a_dry_run_with_batch_and_a_cap_says_what_run_batch_sends(
    openai_batch_fake: OpenAIBatchFake, db_path: Path
) -> None:
    """A batch's requests are reserved at their batch worst case: twice as many fit in a
    cap as one by one, and run --batch sends what the dry run said."""
    capped = (*BATCH_RUN, "--max-cost", "0.30")
    one_by_one = ok(db_path, "run", *[a for a in capped if a != "--batch"], "--dry-run")
    assert "about 1 of 6 branches fit at their worst case" in one_by_one
    planned = ok(db_path, "run", *capped, "--dry-run")
    assert "about 3 of 6 branches fit at their worst case" in planned
    out = ok(db_path, "run", *capped, "--id", "m1")
    assert "Run m1: 3 requests sent in 1 batch" in out
    assert "3 branches not sent: their worst case does not fit in the run's caps" in out
    assert len(openai_batch_fake.created[0].custom_ids) == 3
    assert as_json(db_path, "run", *capped, "--id", "m2")["not_sent"] == 3


def test_a_dry_run_with_batch_refuses_what_run_batch_refuses(
    openai_batch_fake: OpenAIBatchFake, db_path: Path
) -> None:
    refusals = [
        (("a kite", "--batch"), {}),  # the simulated provider has no batch mode
        (("a kite", "-p", "openai", "-o", "model", "dall-e-3", "--batch"), {}),
        (BATCH_RUN, {"IMAGEPIPE_BATCH_SIZE": "2", "IMAGEPIPE_MAX_BATCHES": "2"}),  # 3 needed
    ]
    for args, env in refusals:
        real = imagepipe(db_path, "run", *args, **env)
        for extra in ([], ["--json"]):
            dry = imagepipe(db_path, "run", *args, "--dry-run", *extra, **env)
            assert (dry.returncode, dry.stdout, dry.stderr) == (2, "", real.stderr)
        assert real.returncode == 2
        assert real.stderr.count("\n") == 1
    assert openai_batch_fake.uploads == []
    assert openai_batch_fake.created == []
    assert not db_path.exists()


# -- cancel ---------------------------------------------------------------------------


def test_cancel_stops_the_open_batches_and_leaves_the_branches_pending(
    openai_batch_fake: OpenAIBatchFake, db_path: Path
) -> None:
    fake = openai_batch_fake
    ok(db_path, "run", *BATCH_RUN, "--id", "c1")
    batch = fake.created[0].batch_id
    fake.clock.advance(1 + 5)  # validated, halfway through its requests
    before = _dump(db_path)
    said = ok(db_path, "cancel", "c1")
    assert f"Batch {batch} (6 requests): cancelling" in said
    assert "imagepipe resume c1" in said
    assert fake.batch(batch)["status"] == "cancelling"
    assert _dump(db_path) == before  # the store is not written: no lease, no note
    assert as_json(db_path, "show", "c1")["state"] == "pending"

    fake.clock.advance(1)  # cancelled, with what it finished
    resumed = imagepipe(db_path, "resume", "c1")
    assert resumed.returncode == 4, resumed.stderr
    assert "not run" in resumed.stderr
    assert resumed.stderr.count("\n") == 1
    data = as_json(db_path, "show", "c1")
    states = [branch["state"] for branch in data["branches"]]
    done = fake.batch(batch)["request_counts"]["completed"]
    assert 0 < done < 6
    assert (states.count("resolved"), states.count("pending")) == (done, 6 - done)
    # nothing open any more: cancel says so and exits 0
    assert ok(db_path, "cancel", "c1") == "Run c1 has no open batch: nothing to cancel.\n"
    assert as_json(db_path, "cancel", "c1") == {"id": "c1", "cancelled": []}


def test_cancel_does_not_wait_for_a_resume_that_follows_the_run(
    openai_batch_fake: OpenAIBatchFake, db_path: Path, procs: list[subprocess.Popen[str]]
) -> None:
    """A resume polling the run holds its lease; cancel needs none, and the resume sees
    the batch cancelled on its next poll (exit 4)."""
    fake = openai_batch_fake
    ok(db_path, "run", *BATCH_RUN, "--id", "c2")
    follower = subprocess.Popen(
        cli_argv("resume", "c2"),
        env=cli_env(db_path, IMAGEPIPE_TIME_SCALE="0.01"),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    procs.append(follower)
    assert follower.stdout is not None
    assert follower.stdout.readline().startswith("Resuming run c2")  # it holds the run
    data = as_json(db_path, "cancel", "c2")
    [group] = data["cancelled"]
    assert (group["batch_id"], group["status"]) == (fake.created[0].batch_id, "cancelling")
    fake.clock.advance(1)  # cancelled before it ran anything
    _, stderr = follower.communicate(timeout=60)
    assert follower.returncode == 4, stderr
    assert "6 branches not run" in stderr


def test_cancel_of_an_unknown_run_or_without_the_key_is_one_line_exit_2(
    openai_batch_fake: OpenAIBatchFake, db_path: Path
) -> None:
    ok(db_path, "run", *BATCH_RUN, "--id", "c3")
    unknown = imagepipe(db_path, "cancel", "nope")
    assert (unknown.returncode, unknown.stdout) == (2, "")
    assert unknown.stderr == f"error: no run with id 'nope' in {db_path}\n"
    no_key = imagepipe(db_path, "cancel", "c3", OPENAI_API_KEY="")
    assert (no_key.returncode, no_key.stdout) == (2, "")
    assert no_key.stderr.startswith("error: no API key: set OPENAI_API_KEY")
    assert no_key.stderr.count("\n") == 1
    assert openai_batch_fake.batch(openai_batch_fake.created[0].batch_id)["status"] == (
        "validating"
    )
