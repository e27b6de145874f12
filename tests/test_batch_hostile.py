"""``run --batch`` attacked as a hostile user would, through the real CLI against the
loopback Files and Batches fake (whose clock moves only when a test moves it).

1. ``resume --batch`` (and ``retry --batch``) of a run not started with ``--batch`` is
   refused in one line, exit 2, the store unchanged, nothing sent: before, a detached or
   dall-e run was silently run one by one at the full price, or sent in a batch that a
   later plain ``resume`` ignored, paying for every branch a second time.
2. A run sent in batches under a ``--max-cost`` that held some branches back collects its
   open batch on ``resume``: before, every ``resume`` stopped at the cap (counted with the
   open batch's reservation) and never read the batch that was paid for.
"""

from __future__ import annotations

import hashlib
import os
import sqlite3
import subprocess
from pathlib import Path

from tests.fakes.common import Fault
from tests.fakes.openai_batch_server import OpenAIBatchFake

from conftest import cli_argv, cli_env

pytest_plugins = ["tests.fakes.plugin"]


def imagepipe(db: Path, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    """One ``imagepipe`` process against the fake (its URL and key from the fixture)."""
    extra = {k: os.environ[k] for k in ("OPENAI_BASE_URL", "OPENAI_API_KEY")}
    return subprocess.run(
        cli_argv(*args),
        env=cli_env(db, IMAGEPIPE_TIME_SCALE="0.01", **(extra | env)),
        capture_output=True,
        text=True,
        timeout=60,
    )


def one_line(stderr: str) -> str:
    assert stderr.count("\n") == 1, stderr
    assert "Traceback" not in stderr, stderr
    return stderr.strip()


def store_digest(db: Path) -> str:
    """Every row of every table the runs use (not the leases' heartbeats)."""
    conn = sqlite3.connect(db)
    try:
        tables = ("promises", "attempts", "notes", "spending", "reservations")
        rows = {t: sorted(map(repr, conn.execute(f"SELECT * FROM {t}"))) for t in tables}
    finally:
        conn.close()
    return hashlib.sha256(repr(rows).encode()).hexdigest()


def states(db: Path, run_id: str) -> dict[str, str]:
    conn = sqlite3.connect(db)
    try:
        found = conn.execute(
            "SELECT id, state FROM promises WHERE parent_id = ? ORDER BY id", (run_id,)
        ).fetchall()
    finally:
        conn.close()
    return dict(found)


def openai_run(run_id: str, out: Path, *more: str) -> list[str]:
    return ["run", "a lighthouse", "-p", "openai", "--id", run_id, "--out", str(out), *more]


def instant(fake: OpenAIBatchFake) -> None:
    """Each batch ends as soon as it is created (nothing waits on the clock)."""
    fake.validating_seconds = fake.in_progress_seconds = fake.finalizing_seconds = 0.0


# -- 1. --batch on resume of a run started without it -----------------------------------


def test_resume_batch_of_a_detached_run_is_refused_and_sends_nothing(
    db_path: Path, tmp_path: Path, openai_batch_fake: OpenAIBatchFake
) -> None:
    detached = imagepipe(db_path, *openai_run("d", tmp_path / "img", "--detach", "-q"))
    assert detached.returncode == 0, detached.stderr
    before = store_digest(db_path)

    done = imagepipe(db_path, "resume", "d", "--batch")

    assert done.returncode == 2, done.stdout + done.stderr
    assert "--batch" in one_line(done.stderr)
    assert "not started with --batch" in done.stderr
    assert store_digest(db_path) == before
    assert sum(openai_batch_fake.requests.values()) == 0  # no image paid at the full price


def test_resume_batch_of_a_dall_e_run_is_refused_and_sends_nothing(
    db_path: Path, tmp_path: Path, openai_batch_fake: OpenAIBatchFake
) -> None:
    """A model without a batch mode is refused by ``run --batch``; a pending run of it
    must not get round that with ``resume --batch``."""
    instant(openai_batch_fake)  # before the fix, the batch it sent ended at once
    args = openai_run("d3", tmp_path / "img", "-o", "model", "dall-e-3", "-q")
    refused_key = imagepipe(db_path, *args, OPENAI_API_KEY="sk-wrong")
    assert refused_key.returncode == 78, refused_key.stderr  # the run is pending
    before = store_digest(db_path)
    asked = sum(openai_batch_fake.requests.values())

    done = imagepipe(db_path, "resume", "d3", "--batch")

    assert done.returncode == 2, done.stdout + done.stderr
    one_line(done.stderr)
    assert store_digest(db_path) == before
    assert sum(openai_batch_fake.requests.values()) == asked
    assert openai_batch_fake.uploads == []


def test_resume_batch_of_a_plain_run_never_pays_twice(
    db_path: Path, tmp_path: Path, openai_batch_fake: OpenAIBatchFake
) -> None:
    """Before: ``resume --batch`` sent the batch but the run was not marked as a batch
    run, so the next plain ``resume`` ran every branch again at the full price beside the
    open batch (and never collected it)."""
    instant(openai_batch_fake)
    refused_key = imagepipe(db_path, *openai_run("p", tmp_path / "img", "-q"), OPENAI_API_KEY="x")
    assert refused_key.returncode == 78, refused_key.stderr
    before = store_digest(db_path)

    for again in (["resume", "p"], openai_run("p", tmp_path / "img")):
        switched = imagepipe(db_path, *again, "--batch", "-q")
        assert switched.returncode == 2, switched.stdout + switched.stderr
        assert "not started with --batch" in one_line(switched.stderr)
        assert store_digest(db_path) == before

    plain = imagepipe(db_path, "resume", "p", "-q")
    assert plain.returncode == 0, plain.stderr
    paid_one_by_one = openai_batch_fake.paid_creates
    assert paid_one_by_one == 3
    assert openai_batch_fake.created == []  # no batch paid beside them


# -- 2. --max-cost -------------------------------------------------------------------


def test_a_capped_batch_run_collects_its_open_batch_on_resume(
    db_path: Path, tmp_path: Path, openai_batch_fake: OpenAIBatchFake
) -> None:
    """$0.10 holds one image's worst case at the batch rate ($0.0839), so the first batch
    has one request; each image then costs $0.0055, so the cap holds all three."""
    instant(openai_batch_fake)
    sent = imagepipe(db_path, *openai_run("cap", tmp_path / "img", "--batch", "--max-cost", "0.1"))
    assert sent.returncode == 0, sent.stderr
    assert [len(c.custom_ids) for c in openai_batch_fake.created] == [1]

    done = imagepipe(db_path, "resume", "cap", "-q")

    assert done.returncode == 0, done.stderr
    assert set(states(db_path, "cap").values()) == {"resolved"}
    # every branch in exactly one batch, and none paid one by one
    assert sorted(openai_batch_fake.batches_of()) == ["cap.0", "cap.1", "cap.2"]
    assert all(len(b) == 1 for b in openai_batch_fake.batches_of().values())
    assert openai_batch_fake.paid_creates == 0


def test_a_resume_stopped_at_the_cap_writes_no_empty_batch_plan(
    db_path: Path, tmp_path: Path, openai_batch_fake: OpenAIBatchFake
) -> None:
    """$0.085 holds one image's worst case ($0.0839) and, once it cost $0.0055, not a
    second one: each resume stops at the cap. Before: each noted an empty planning
    (``batch.plan.<p>`` with no group), so the store grew by a note a resume."""
    instant(openai_batch_fake)
    args = openai_run("cap", tmp_path / "img", "--batch", "--max-cost", "0.085")
    assert imagepipe(db_path, *args).returncode == 0
    first = imagepipe(db_path, "resume", "cap", "-q")
    assert first.returncode == 3, first.stderr
    assert states(db_path, "cap") == {"cap.0": "resolved", "cap.1": "pending", "cap.2": "pending"}
    before = store_digest(db_path)

    again = imagepipe(db_path, "resume", "cap", "-q")

    assert again.returncode == 3, again.stderr
    assert "budget reached" in one_line(again.stderr)
    assert store_digest(db_path) == before
    conn = sqlite3.connect(db_path)
    try:
        plans = conn.execute("SELECT value FROM notes WHERE key LIKE 'batch.plan.%'").fetchall()
    finally:
        conn.close()
    assert len(plans) == 1, plans


# -- 3. who follows a run -------------------------------------------------------------


def lease_holder_pid(db: Path, run_id: str) -> int | None:
    conn = sqlite3.connect(db)
    try:
        found = conn.execute("SELECT pid FROM leases WHERE key = ?", (run_id,)).fetchone()
    finally:
        conn.close()
    return None if found is None else int(found[0])


def test_a_follower_holds_the_run_before_its_first_poll_so_a_resume_is_busy(
    db_path: Path,
    tmp_path: Path,
    openai_batch_fake: OpenAIBatchFake,
    procs: list[subprocess.Popen[str]],
) -> None:
    """Before: a process following a batch took the run's lease only at its first write
    (a status that changed, a line collected), so a ``watch``, a ``resume`` and a worker
    all polled the same batch at once and each downloaded its output (twice the gigabytes
    for one collection); the losers learnt they were busy only then."""
    fake = openai_batch_fake
    sent = imagepipe(db_path, *openai_run("f", tmp_path / "img", "--batch", "-q"))
    assert sent.returncode == 0, sent.stderr
    env = cli_env(db_path, IMAGEPIPE_TIME_SCALE="0.01")
    env |= {k: os.environ[k] for k in ("OPENAI_BASE_URL", "OPENAI_API_KEY")}
    watch = subprocess.Popen(cli_argv("watch", "f"), env=env, text=True, stdout=subprocess.PIPE)
    procs.append(watch)
    fake.wait_for(lambda: fake.requests["batch_get"] >= 2, timeout=60)  # it follows the batch

    assert lease_holder_pid(db_path, "f") == watch.pid
    busy = imagepipe(db_path, "resume", "f", "-q")
    assert busy.returncode == 75, busy.stderr
    assert f"process {watch.pid}" in one_line(busy.stderr)

    fake.clock.advance(100)  # the batch ends: the watch alone collects it
    watch.communicate(timeout=60)
    assert watch.returncode == 0
    assert set(states(db_path, "f").values()) == {"resolved"}
    assert fake.requests["content"] == 1


# -- 4. what show says was paid ---------------------------------------------------------


def test_show_counts_no_cost_for_the_requests_an_expired_batch_did_not_run(
    db_path: Path, tmp_path: Path, openai_batch_fake: OpenAIBatchFake
) -> None:
    """Before: the attempts a batch did not run (``BatchUnfinished``: given back whole,
    paid nothing) were shown as 'up to $0.3355 more for 2 failed attempts that may have
    been paid', each at its synchronous worst case."""
    fake = openai_batch_fake
    fake.stall_at, fake.window_seconds = 1, 100.0  # one request runs, then it expires
    sent = imagepipe(db_path, *openai_run("x", tmp_path / "img", "--batch", "-q"))
    assert sent.returncode == 0, sent.stderr
    fake.clock.advance(200)
    collected = imagepipe(db_path, "resume", "x", "-q")
    assert collected.returncode == 4, collected.stderr
    assert sorted(states(db_path, "x").values()) == ["pending", "pending", "resolved"]

    shown = imagepipe(db_path, "show", "x")

    assert shown.returncode == 0, shown.stderr
    [cost] = [line for line in shown.stdout.splitlines() if line.startswith("Cost: ")]
    assert cost.startswith("Cost: $0.0055 for 1 image"), cost
    assert "may have been paid" not in cost, cost


# -- 5. a worker and a batch it cannot collect -------------------------------------------


def test_a_worker_does_not_download_again_and_again_a_batch_it_cannot_read(
    db_path: Path, tmp_path: Path, openai_batch_fake: OpenAIBatchFake
) -> None:
    """Before: a worker whose collection of a run stopped (a line of the output that is
    not JSON, a batch the provider no longer knows, no key) picked the run up again at its
    next look for work, about once a second: the whole output file downloaded again each
    time, the same line printed each time, and ``worker --once`` never exited."""
    fake = openai_batch_fake
    sent = imagepipe(db_path, *openai_run("w", tmp_path / "img", "--batch", "-q"))
    assert sent.returncode == 0, sent.stderr
    fake.clock.advance(100)  # the batch has ended
    fake.add_fault(Fault.answer(b"not json\n"), endpoint="content", times=1_000_000)

    once = imagepipe(db_path, "worker", "--once")

    assert once.returncode == 0, once.stderr
    assert "line 1 of the provider's batch file is not JSON" in one_line(once.stderr)
    assert fake.requests["content"] == 1
    assert set(states(db_path, "w").values()) == {"pending"}


# -- 6. resume --no-batch after a kill in the middle of sending ---------------------------


def killed_in(
    db: Path, out: Path, fake: OpenAIBatchFake, endpoint: str, fault: Fault, *more: str
) -> None:
    """``run --batch`` SIGKILLed while ``endpoint`` holds its request with ``fault``."""
    fake.add_fault(fault, endpoint=endpoint)
    env = cli_env(db, IMAGEPIPE_TIME_SCALE="0.01")
    env |= {k: os.environ[k] for k in ("OPENAI_BASE_URL", "OPENAI_API_KEY")}
    argv = cli_argv(*openai_run("k", out, "--batch", *more))
    proc = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        fake.wait_for(lambda: fake.requests[endpoint] >= 1, timeout=60)
    finally:
        proc.kill()
        proc.wait()
    fake.clear_faults()


def test_no_batch_after_a_kill_once_the_provider_made_the_batch_never_pays_twice(
    db_path: Path, tmp_path: Path, openai_batch_fake: OpenAIBatchFake
) -> None:
    """Killed after the provider created the batch, before it was noted: a plain
    ``resume`` finds it (``find_batch``), but ``resume --no-batch`` dropped the group
    without looking, deleted the batch's input file and paid for every branch a second
    time one by one while the batch ran."""
    fake = openai_batch_fake
    killed_in(db_path, tmp_path / "img", fake, "batch_create", Fault.paid_then_hang())
    assert len(fake.created) == 1

    refused = imagepipe(db_path, "resume", "k", "--no-batch", "-q")

    assert refused.returncode == 2, refused.stdout + refused.stderr
    assert f"open batches ({fake.created[0].batch_id})" in one_line(refused.stderr)
    assert fake.paid_creates == 0
    assert fake.deleted == []
    fake.clock.advance(100)  # the batch ends: resume collects it
    done = imagepipe(db_path, "resume", "k", "-q")
    assert done.returncode == 0, done.stderr
    assert set(states(db_path, "k").values()) == {"resolved"}
    assert fake.paid_creates == 0
    assert sorted(fake.batches_of()) == ["k.0", "k.1", "k.2"]
    assert len(fake.created) == 1


def test_no_batch_gives_back_what_a_dropped_group_reserved(
    db_path: Path, tmp_path: Path, openai_batch_fake: OpenAIBatchFake
) -> None:
    """Killed during the upload, after the group's attempts reserved their batch worst
    case ($0.2515): ``resume --no-batch`` dropped the group but kept its reservations, so
    the run stopped at a $0.60 cap that three images one by one ($0.5031 at worst) fit."""
    fake = openai_batch_fake
    killed_in(db_path, tmp_path / "img", fake, "upload", Fault.hanging(), "--max-cost", "0.6")
    assert fake.uploads == []

    done = imagepipe(db_path, "resume", "k", "--no-batch", "-q")

    assert done.returncode == 0, done.stderr
    assert set(states(db_path, "k").values()) == {"resolved"}
    assert fake.paid_creates == 3
    assert fake.created == []


# -- 7. a transient error while collecting ----------------------------------------------


def test_a_5xx_on_the_download_is_tried_again_as_a_5xx_on_the_upload_is(
    db_path: Path, tmp_path: Path, openai_batch_fake: OpenAIBatchFake
) -> None:
    """Before: one 503 on the output file's download stopped ``resume`` (and ``watch``, and
    the worker's collection) with exit 75, where the upload, the create and the polls
    try a transient error again."""
    fake = openai_batch_fake
    sent = imagepipe(db_path, *openai_run("t", tmp_path / "img", "--batch", "-q"))
    assert sent.returncode == 0, sent.stderr
    fake.clock.advance(100)
    fake.add_fault(Fault.server_error(503), endpoint="content", times=1)

    done = imagepipe(db_path, "resume", "t", "-q")

    assert done.returncode == 0, done.stderr
    assert set(states(db_path, "t").values()) == {"resolved"}
    assert fake.requests["content"] == 2


def test_no_batch_leaves_no_input_file_of_a_dropped_group_among_the_images(
    db_path: Path, tmp_path: Path, openai_batch_fake: OpenAIBatchFake
) -> None:
    """Before: the input file written for a group that ``resume --no-batch`` dropped
    (up to 200 MB of the run's requests) stayed in ``<images>/.batches/`` once the run
    was done."""
    fake = openai_batch_fake
    images = tmp_path / "img"
    killed_in(db_path, images, fake, "upload", Fault.hanging())
    assert (images / ".batches" / "k.g0.jsonl").exists()

    done = imagepipe(db_path, "resume", "k", "--no-batch", "-q")

    assert done.returncode == 0, done.stderr
    assert not (images / ".batches").exists()
    assert sorted(p.name for p in images.glob("*.png")) == [
        "abstract.png",
        "cartoon.png",
        "photorealistic.png",
    ]
