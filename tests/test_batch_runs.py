"""Batch runs are durable: the real CLI against the loopback Files and Batches fake.

Each test runs ``imagepipe run --batch`` and ``imagepipe resume`` as subprocesses against
:class:`~tests.fakes.openai_batch_server.OpenAIBatchFake` (a real HTTP server on
127.0.0.1). The fake's clock stands still until a test moves it, and every kill happens
while the fake holds the process at a known point (a request held until the test releases
it, or answered by the fake and never sent back), so nothing here depends on the
machine's speed. After every kill a ``resume`` finishes the run, and
:func:`assert_every_image_once` checks the store, the image folder and what the fake was
sent: each image once, no branch in two batches that ran it, no batch created twice, no
uploaded file left behind.
"""

from __future__ import annotations

import json
import signal
import sqlite3
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from postgres_server import PostgresServer

from tests.fakes.common import Fault
from tests.fakes.openai_batch_server import OpenAIBatchFake

from conftest import cli_argv, cli_env

pytest_plugins = ["tests.fakes.plugin"]

PROMPT = "a lighthouse"
STYLES = ("photorealistic", "cartoon")
#: enough fake seconds for every batch created so far to end (validating 1 s, running
#: 10 s, finalizing 1 s by default)
LONG_ENOUGH = 60.0


@dataclass
class BatchRun:
    """One batch run of the real CLI against the fake: how it is started and resumed."""

    fake: OpenAIBatchFake
    #: the store: a SQLite file, or a PostgreSQL URL
    db: str
    #: one SQL statement on the store, its rows (table names in ``{s}``: the schema)
    query: Query
    out: Path
    run_id: str
    variations: int = 2
    batch_size: int = 50_000
    extra_env: dict[str, str] = field(default_factory=dict)
    procs: list[subprocess.Popen[str]] = field(default_factory=list)

    @property
    def branches(self) -> int:
        return len(STYLES) * self.variations

    def env(self) -> dict[str, str]:
        env = cli_env(
            Path(self.db),
            IMAGEPIPE_TIME_SCALE="0.01",
            IMAGEPIPE_BATCH_SIZE=str(self.batch_size),
            **self.extra_env,
        )
        env["IMAGEPIPE_DB"] = self.db  # a PostgreSQL URL is no path
        return env

    def run_args(self) -> list[str]:
        styles = [arg for style in STYLES for arg in ("-s", style)]
        return [
            "run",
            PROMPT,
            "-p",
            "openai",
            "-o",
            "model",
            "gpt-image-1",
            *styles,
            "-n",
            str(self.variations),
            "--batch",
            "--id",
            self.run_id,
            "--out",
            str(self.out),
        ]

    def start(self, *args: str) -> subprocess.Popen[str]:
        proc = subprocess.Popen(
            cli_argv(*args),
            env=self.env(),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.procs.append(proc)
        return proc

    def cli(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            cli_argv(*args), env=self.env(), capture_output=True, text=True, timeout=120
        )

    def submit(self) -> subprocess.CompletedProcess[str]:
        done = self.cli(*self.run_args())
        assert done.returncode == 0, done.stderr
        return done

    def resume(self, *extra: str) -> subprocess.CompletedProcess[str]:
        return self.cli("resume", self.run_id, *extra)

    def kill_when(self, proc: subprocess.Popen[str], reached: Callable[[], bool]) -> None:
        """SIGKILL ``proc`` once the fake has seen ``reached()`` (it must not exit first)."""
        self.fake.wait_for(lambda: reached() or proc.poll() is not None, timeout=60)
        assert proc.poll() is None, (proc.returncode, proc.stderr.read() if proc.stderr else "")
        proc.send_signal(signal.SIGKILL)
        proc.wait()

    def kill_while_held(self, endpoint: str, *args: str) -> None:
        """Run ``imagepipe *args`` with the fake holding its first request to ``endpoint``,
        SIGKILL it there, then let the fake finish what it holds."""
        release = threading.Event()
        self.fake.add_fault(Fault.held(release), endpoint=endpoint)
        proc = self.start(*args)
        try:
            self.kill_when(proc, lambda: self.fake.requests[endpoint] >= 1)
        finally:
            release.set()
        self.fake.wait_idle()

    def finish(self) -> subprocess.CompletedProcess[str]:
        """Resume until done, every batch ending at once: those made so far (the clock
        moved past them) and those the resume makes (no time spent in any phase)."""
        self.fake.clear_faults()
        instant(self.fake)
        self.fake.clock.advance(LONG_ENOUGH)
        done = self.resume()
        assert done.returncode == 0, done.stderr
        return done


def instant(fake: OpenAIBatchFake) -> None:
    """Batches created from now on are completed as soon as they are created."""
    fake.validating_seconds = fake.in_progress_seconds = fake.finalizing_seconds = 0.0
    fake.stall_at = None


Query = Callable[[str], list[tuple[Any, ...]]]


def sqlite_query(db: Path) -> Query:
    def query(statement: str) -> list[tuple[Any, ...]]:
        if not db.exists():
            return []
        conn = sqlite3.connect(db)
        try:
            return conn.execute(statement.format(s="")).fetchall()
        finally:
            conn.close()

    return query


@pytest.fixture
def batch_run(
    openai_batch_fake: OpenAIBatchFake, db_path: Path, tmp_path: Path
) -> Iterator[BatchRun]:
    run = BatchRun(openai_batch_fake, str(db_path), sqlite_query(db_path), tmp_path / "out", "br1")
    yield run
    for proc in run.procs:
        if proc.poll() is None:
            proc.kill()
        proc.wait()


# -------------------------------------------------------------------- what is checked


def branch_rows(run: BatchRun) -> list[tuple[str, str, Any, int]]:
    """(id, state, value, attempts) of each branch of the run."""
    rows = run.query(
        "SELECT id, state, value, attempts FROM {s}promises WHERE parent_id = "
        f"'{run.run_id}' AND func = 'generate_image' ORDER BY id"
    )
    return [(pid, state, _json(value), n) for pid, state, value, n in rows]


def _json(value: Any) -> Any:
    return json.loads(value) if isinstance(value, str) else value


def resolved_count(run: BatchRun) -> int:
    return sum(1 for _, state, _, _ in branch_rows(run) if state == "resolved")


def spending(run: BatchRun) -> tuple[int, list[tuple[str, int, int | None]]]:
    """The run's micro-USD spent, and each reservation's (branch, reserved, actual cost)."""
    ((spent,),) = run.query(
        f"SELECT spent FROM {{s}}spending WHERE run_id = '{run.run_id}' AND meter = 'micro_usd'"
    )
    reservations = run.query(
        "SELECT promise_id, reserved, cost FROM {s}reservations WHERE meter = 'micro_usd' "
        "ORDER BY promise_id, attempt"
    )
    return spent, [(pid, reserved, cost) for pid, reserved, cost in reservations]


def images_on_disk(out: Path) -> set[Path]:
    """The files of the image folder, the hidden bookkeeping folders left out."""
    return {
        path
        for path in out.rglob("*")
        if path.is_file() and not any(part.startswith(".") for part in path.relative_to(out).parts)
    }


def assert_every_image_once(run: BatchRun) -> dict[str, dict[str, Any]]:
    """Every branch resolved once from the one batch that ran it, its image on disk once,
    its cost the batch's; at the fake: no branch in two batches, one batch an input file,
    every uploaded file made a batch or was deleted. Returns the branches' values."""
    fake = run.fake
    rows = branch_rows(run)
    assert len(rows) == run.branches
    assert [(pid, state) for pid, state, _, _ in rows] == [
        (pid, "resolved") for pid, _, _, _ in rows
    ]
    values = {pid: value for pid, _, value, _ in rows}
    # the images: one file a branch, nothing else (no staged or duplicate file)
    paths = {Path(value["path"]) for value in values.values()}
    assert len(paths) == run.branches
    assert images_on_disk(run.out) == paths
    staging = run.out / ".imagepipe" / "staging"  # imagepipe.files.STATE_DIR, STAGING_DIR
    assert not list(staging.glob("*")), list(staging.glob("*"))
    # the input files are the provider's once their batch is made
    assert not list((run.out / ".batches").glob("*")), list((run.out / ".batches").glob("*"))
    # at the fake: each branch in exactly one batch, the one its value came from
    batches_of = fake.batches_of()
    assert set(batches_of) == set(values)
    for pid, value in values.items():
        assert batches_of[pid] == [value["batch"]], (pid, batches_of[pid])
    creates = fake.creates_by_input_file()
    assert set(creates.values()) == {1}, creates
    for upload in fake.uploads:
        assert upload.file_id in creates or upload.file_id in fake.deleted, upload
    # paid once, at the batch's price: each reservation gave way to the actual cost
    spent, reservations = spending(run)
    costs = {pid: value["cost"]["micro_usd"] for pid, value in values.items()}
    assert all("batch" in value["cost"]["basis"] for value in values.values())
    assert [(pid, cost) for pid, _, cost in reservations] == sorted(costs.items())
    assert spent == sum(costs.values())
    return values


# ---------------------------------------------------------------------- kill -9 tests


def test_a_batch_run_submits_then_resume_collects_every_image_once(batch_run: BatchRun) -> None:
    fake = batch_run.fake
    submitted = batch_run.submit()
    assert "batch_1" in submitted.stdout or fake.created, submitted.stdout
    assert len(fake.created) == 1
    assert resolved_count(batch_run) == 0
    fake.clock.advance(LONG_ENOUGH)
    done = batch_run.resume()
    assert done.returncode == 0, done.stderr
    assert_every_image_once(batch_run)


def kill_while_the_first_group_looks_for_its_upload(batch_run: BatchRun) -> None:
    """Run two groups of two; hold the first group's first call to the provider (looking
    for an upload a killed process made), kill the run there, then let the fake go."""
    batch_run.batch_size = 2
    batch_run.kill_while_held("file_list", *batch_run.run_args())


def test_kill_before_a_group_file_is_noted_then_resume(batch_run: BatchRun) -> None:
    """Two groups: the first one's first call to the provider (looking for an upload a
    killed process made) is held, so the second group's input file is neither written nor
    noted when the process is killed; the first's is written but not uploaded."""
    fake = batch_run.fake
    kill_while_the_first_group_looks_for_its_upload(batch_run)
    assert fake.uploads == []
    assert [p.name for p in (batch_run.out / ".batches").glob("*")] == ["br1.g0.jsonl"]
    batch_run.finish()
    assert len(fake.created) == 2
    assert_every_image_once(batch_run)


def test_a_file_half_written_by_a_killed_process_is_not_left_behind(batch_run: BatchRun) -> None:
    """A kill inside the file's write (which no request of the fake can hold) leaves what
    it had written under a temporary name beside the file, and the step not noted: the
    resume writes the file again, and removes that half-written one."""
    kill_while_the_first_group_looks_for_its_upload(batch_run)
    # what a kill while group 1's file was being written leaves (write_input_file's
    # temporary name): its first line and a half
    written = (batch_run.out / ".batches" / "br1.g0.jsonl").read_bytes()
    half = batch_run.out / ".batches" / ".br1.g1.jsonl.0123456789ab.tmp"
    half.write_bytes(written[: len(written) * 3 // 4])
    batch_run.finish()
    assert not half.exists()
    assert_every_image_once(batch_run)


def test_kill_while_the_upload_is_held_then_resume(batch_run: BatchRun) -> None:
    """The file written and noted; the upload sent, and held by the fake when the
    process is killed. Released, the fake stores it (as a provider finishes a request
    whose client went away): the resume finds it and uploads nothing again."""
    fake = batch_run.fake
    batch_run.kill_while_held("upload", *batch_run.run_args())
    batch_run.finish()
    assert len(fake.uploads) == 1
    assert_every_image_once(batch_run)


def test_kill_after_the_fake_got_the_upload_before_it_was_noted(batch_run: BatchRun) -> None:
    """The fake stored the file and never answered: the resume finds it and uploads
    nothing again."""
    fake = batch_run.fake
    fake.add_fault(Fault.paid_then_hang(), endpoint="upload")
    proc = batch_run.start(*batch_run.run_args())
    batch_run.kill_when(proc, lambda: len(fake.uploads) == 1)
    batch_run.finish()
    assert len(fake.uploads) == 1
    assert_every_image_once(batch_run)


def test_an_upload_a_killed_process_made_is_deleted_when_the_run_goes_on_one_by_one(
    batch_run: BatchRun,
) -> None:
    """Killed after the fake stored the upload, before the batch: ``resume --no-batch``
    drops the unsent group, deletes its file at the provider, and runs every branch one
    request at a time."""
    fake = batch_run.fake
    fake.add_fault(Fault.paid_then_hang(), endpoint="upload")
    proc = batch_run.start(*batch_run.run_args())
    batch_run.kill_when(proc, lambda: len(fake.uploads) == 1)
    fake.clear_faults()
    done = batch_run.resume("--no-batch")
    assert done.returncode == 0, done.stderr
    (upload,) = fake.uploads
    assert fake.deleted == [upload.file_id]
    assert fake.created == []
    assert fake.requests["create"] == batch_run.branches
    rows = branch_rows(batch_run)
    assert [state for _, state, _, _ in rows] == ["resolved"] * batch_run.branches
    assert images_on_disk(batch_run.out) == {Path(value["path"]) for _, _, value, _ in rows}
    assert not list((batch_run.out / ".batches").glob("*"))


def test_kill_after_the_fake_created_the_batch_before_it_was_noted(batch_run: BatchRun) -> None:
    """The fake created the batch and never answered: the resume finds that batch and
    creates no second one from the same file."""
    fake = batch_run.fake
    fake.add_fault(Fault.paid_then_hang(), endpoint="batch_create")
    proc = batch_run.start(*batch_run.run_args())
    batch_run.kill_when(proc, lambda: len(fake.created) == 1)
    batch_run.finish()
    assert len(fake.created) == 1
    assert len(fake.uploads) == 1
    assert_every_image_once(batch_run)


def test_resume_no_batch_refuses_while_a_batch_a_killed_process_created_may_run(
    batch_run: BatchRun,
) -> None:
    """Killed after the fake created the batch, before it was noted: the batch runs the
    branches at the provider, so ``resume --no-batch`` must not run them one by one too
    (paying twice). It refuses, in one line naming the batch, having recorded only that
    batch (nothing dropped, no branch settled); a plain resume then collects it."""
    fake = batch_run.fake
    fake.add_fault(Fault.paid_then_hang(), endpoint="batch_create")
    proc = batch_run.start(*batch_run.run_args())
    batch_run.kill_when(proc, lambda: len(fake.created) == 1)
    fake.clear_faults()
    (batch_id,) = [created.batch_id for created in fake.created]
    notes = "SELECT key FROM {s}notes ORDER BY key"
    before = {key for (key,) in batch_run.query(notes)}
    refused = batch_run.resume("--no-batch")
    assert refused.returncode == 2, refused.stderr
    lines = refused.stderr.strip().splitlines()
    assert len(lines) == 1, refused.stderr
    assert batch_id in lines[0]
    assert fake.requests["create"] == 0  # not one branch paid a second time
    assert {key for (key,) in batch_run.query(notes)} - before == {"batch.g0.created"}
    assert resolved_count(batch_run) == 0
    batch_run.finish()
    assert len(fake.created) == 1
    assert_every_image_once(batch_run)


def test_kill_while_polling_then_resume(batch_run: BatchRun) -> None:
    fake = batch_run.fake
    batch_run.submit()
    batch_run.kill_while_held("batch_get", "resume", batch_run.run_id)
    assert resolved_count(batch_run) == 0
    batch_run.finish()
    assert len(fake.created) == 1
    assert_every_image_once(batch_run)


def test_kill_halfway_through_the_output_download_then_resume(batch_run: BatchRun) -> None:
    """The output file is held halfway once some of its lines are recorded: the resume
    reads it again from the start, records none of them twice, and what they cost is
    the batch's price, not the reservation's worst case."""
    fake = batch_run.fake
    batch_run.variations = 4  # 8 branches
    fake.image_bytes = 20_000  # ~27 KB of base64 a line: the file is ~215 KB
    batch_run.submit()
    fake.clock.advance(LONG_ENOUGH)
    release = threading.Event()
    fake.content_hold = (110_000, release)  # after about 4 of the 8 lines
    proc = batch_run.start("resume", batch_run.run_id)
    try:
        fake.wait_for(lambda: fake.streamed["content"] >= 110_000 or proc.poll() is not None, 60)
        wait_until(lambda: resolved_count(batch_run) >= 1 or bool(proc.poll()))
        recorded = resolved_count(batch_run)
        assert 1 <= recorded < batch_run.branches
        assert proc.poll() is None
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    finally:
        release.set()
    fake.content_hold = None
    fake.wait_idle()
    done = batch_run.resume()
    assert done.returncode == 0, done.stderr
    assert fake.requests["content"] == 2  # read again from the start
    assert len(fake.created) == 1
    assert_every_image_once(batch_run)


def test_kill_a_watch_collecting_halfway_through_the_download_then_watch_again(
    batch_run: BatchRun,
) -> None:
    """``imagepipe watch`` collects a batch run that nobody else follows: killed halfway
    through the output file, a second ``watch`` reads it again and ends with the run."""
    fake = batch_run.fake
    batch_run.variations = 4
    fake.image_bytes = 20_000
    batch_run.submit()
    fake.clock.advance(LONG_ENOUGH)
    release = threading.Event()
    fake.content_hold = (110_000, release)
    proc = batch_run.start("watch", batch_run.run_id)
    try:
        fake.wait_for(lambda: fake.streamed["content"] >= 110_000 or proc.poll() is not None, 60)
        wait_until(lambda: resolved_count(batch_run) >= 1 or proc.poll() is not None)
        assert proc.poll() is None
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    finally:
        release.set()
    fake.content_hold = None
    fake.wait_idle()
    again = batch_run.cli("watch", batch_run.run_id)
    assert again.returncode == 0, again.stderr
    assert fake.requests["content"] == 2
    assert_every_image_once(batch_run)


def wait_until(condition: Callable[[], bool], timeout: float = 60.0) -> None:
    """Wait for something the fake does not see (a record in the store): re-checked
    every 20 ms, the timeout only a guard against a hang."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "never happened"
        time.sleep(0.02)


# ------------------------------------------------------------ batches that end unfinished


def settled(run: BatchRun) -> tuple[dict[str, dict[str, Any]], list[str]]:
    """The run's resolved branches (their values) and its pending ones."""
    rows = branch_rows(run)
    assert {state for _, state, _, _ in rows} <= {"resolved", "pending"}
    done = {pid: value for pid, state, value, _ in rows if state == "resolved"}
    return done, [pid for pid, state, _, _ in rows if state == "pending"]


def assert_unfinished_exit(
    done: subprocess.CompletedProcess[str], run: BatchRun, left: int, why: str
) -> None:
    """Exit 4, one line naming how many branches the batch did not run and why."""
    assert done.returncode == 4, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert f"{left} branches not run" in lines[0], lines[0]
    assert why in lines[0], lines[0]
    assert f"imagepipe resume {run.run_id} --no-batch" in lines[0]


@pytest.mark.parametrize("then", ["resume", "resume --no-batch"])
def test_an_expired_batch_gives_its_finished_images_and_the_rest_go_on(
    batch_run: BatchRun, then: str
) -> None:
    """The batch ran 2 of its 4 requests before its window ended: the resume records
    those 2 (at the batch's price) and exits 4 naming the 2 others, pending and unpaid.
    Then a second resume sends only those 2 in a new batch, or runs them one by one."""
    fake = batch_run.fake
    fake.stall_at = 2
    fake.window_seconds = 3600
    batch_run.submit()
    (old,) = [created.batch_id for created in fake.created]
    fake.clock.advance(3600 + 1)
    assert fake.batch(old)["status"] == "expired"
    first = batch_run.resume()
    assert_unfinished_exit(first, batch_run, 2, f"batch {old} expired")
    done, left = settled(batch_run)
    assert len(done) == 2
    assert len(left) == 2
    assert images_on_disk(batch_run.out) == {Path(v["path"]) for v in done.values()}
    for value in done.values():
        assert value["batch"] == old
        assert value["cost"]["basis"] == "usage (batch)"
    spent, _ = spending(batch_run)
    assert spent == sum(v["cost"]["micro_usd"] for v in done.values())  # the others: 0

    instant(fake)
    second = batch_run.resume(*then.split()[1:])
    assert second.returncode == 0, second.stderr
    after, pending = settled(batch_run)
    assert pending == []
    assert {pid: after[pid] for pid in done} == done  # recorded once, not again
    assert images_on_disk(batch_run.out) == {Path(v["path"]) for v in after.values()}
    batches_of = fake.batches_of()
    if then == "resume":
        (new,) = [c.batch_id for c in fake.created if c.batch_id != old]
        assert {pid: batches_of[pid] for pid in done} == {pid: [old] for pid in done}
        assert {pid: batches_of[pid] for pid in left} == {pid: [old, new] for pid in left}
        assert all(after[pid]["batch"] == new for pid in left)
        assert set(fake.creates_by_input_file().values()) == {1}
        assert fake.requests["create"] == 0  # nothing through the Images API
    else:
        assert len(fake.created) == 1  # no new batch
        assert fake.requests["create"] == 2  # the 2 left, one request each
        assert all("batch" not in after[pid]["cost"]["basis"] for pid in left)
    spent, _ = spending(batch_run)
    assert spent == sum(v["cost"]["micro_usd"] for v in after.values())


def test_a_cancelled_batch_gives_its_finished_images_and_leaves_the_rest_pending(
    batch_run: BatchRun,
) -> None:
    """``imagepipe cancel`` while the batch has run 2 of its 4 requests: the resume
    collects those 2 and exits 4 for the others, which the next resume sends in a new
    batch (the 2 done stay in the cancelled one only)."""
    fake = batch_run.fake
    batch_run.submit()
    (batch_id,) = [created.batch_id for created in fake.created]
    fake.clock.advance(1 + 5)  # validated, then half of its 10 s of running: 2 of 4 done
    cancelled = batch_run.cli("cancel", batch_run.run_id)
    assert cancelled.returncode == 0, cancelled.stderr
    assert batch_id in cancelled.stdout
    assert fake.requests["batch_cancel"] == 1
    assert resolved_count(batch_run) == 0  # nothing of the run changed in the store
    fake.clock.advance(LONG_ENOUGH)
    assert fake.batch(batch_id)["status"] == "cancelled"
    first = batch_run.resume()
    assert_unfinished_exit(first, batch_run, 2, f"batch {batch_id} cancelled")
    done, left = settled(batch_run)
    assert len(done) == 2
    assert len(left) == 2
    assert images_on_disk(batch_run.out) == {Path(v["path"]) for v in done.values()}
    assert all(value["batch"] == batch_id for value in done.values())
    # the branches the batch did not run stay pending, in no batch that may still run
    # them: a resume sends them again
    instant(fake)
    second = batch_run.resume()
    assert second.returncode == 0, second.stderr
    after, pending = settled(batch_run)
    assert pending == []
    assert {pid: after[pid] for pid in done} == done
    batches_of = fake.batches_of()
    assert all(len(batches_of[pid]) == 1 for pid in done)
    assert all(len(batches_of[pid]) == 2 for pid in left)


# ----------------------------------------------------------- workers on PostgreSQL


def test_two_workers_collect_a_batch_run_on_postgresql_and_one_takes_over_from_a_killed_one(
    openai_batch_fake: OpenAIBatchFake,
    postgres_server: PostgresServer,
    postgres_url: str,
    tmp_path: Path,
    procs: list[subprocess.Popen[str]],
) -> None:
    """``run --batch`` returns; two ``imagepipe worker`` processes poll the run's batch,
    one of them holding the run. It is killed halfway through the output file, once some
    of its lines are recorded: the other takes the run over when its lease lapses, reads
    the file again, and finishes the run with every image once."""
    fake = openai_batch_fake

    def query(statement: str) -> list[tuple[Any, ...]]:
        return postgres_server.execute(postgres_url, statement.format(s="imagepipe."))

    run = BatchRun(
        fake,
        postgres_url,
        query,
        tmp_path / "out",
        "pw1",
        variations=4,
        extra_env={"IMAGEPIPE_LEASE_TIMEOUT": "3"},
        procs=procs,
    )
    fake.image_bytes = 20_000  # ~27 KB of base64 a line: the file is ~215 KB
    run.submit()
    assert len(fake.created) == 1
    release = threading.Event()
    fake.content_hold = (110_000, release)  # after about 4 of the 8 lines
    fake.clock.advance(LONG_ENOUGH)
    workers = {proc.pid: proc for proc in (run.start("worker"), run.start("worker"))}

    def holder() -> int | None:
        held = f"SELECT pid FROM {{s}}leases WHERE key = '{run.run_id}' AND owner IS NOT NULL"
        rows = query(held)
        return rows[0][0] if rows else None

    try:
        fake.wait_for(lambda: fake.streamed["content"] >= 110_000, timeout=60)
        wait_until(lambda: resolved_count(run) >= 1)
        first = holder()
        assert first in workers
        assert 1 <= resolved_count(run) < run.branches
        workers[first].send_signal(signal.SIGKILL)
        workers[first].wait()
    finally:
        release.set()
    fake.content_hold = None
    killed_at = time.monotonic()
    (other,) = set(workers) - {first}
    wait_until(
        lambda: (
            query(f"SELECT state FROM {{s}}promises WHERE id = '{run.run_id}'") == [("resolved",)]
        )
    )
    print(f"\ntaken over in {time.monotonic() - killed_at:.2f} s")
    assert workers[other].poll() is None  # it took the run over, and goes on working
    assert fake.requests["content"] == 2  # the file read again from the start
    assert_every_image_once(run)
    workers[other].send_signal(signal.SIGINT)
    _, err = workers[other].communicate(timeout=60)
    assert "Traceback" not in err


# ------------------------------------------------------------------ a large output file


#: runs ``python -m <module> ...`` and writes the process's own peak resident memory
#: (VmHWM, KiB) to a file as it exits: the ru_maxrss that wait4 gives is at least the
#: parent's at the fork (Linux carries it over exec), so pytest's own size would count
_PEAK_AT_EXIT = """
import atexit, runpy, sys
def report(path=sys.argv[1]):
    with open("/proc/self/status") as f, open(path, "w") as out:
        out.write(next(line for line in f if line.startswith("VmHWM:")).split()[1])
atexit.register(report)
sys.argv = sys.argv[2:]
runpy.run_module(sys.argv[0], run_name="__main__", alter_sys=True)
"""


def run_measured(argv: list[str], env: dict[str, str], work: Path) -> tuple[int, int, str]:
    """Run ``python -m imagepipe ...`` to its end: its exit code, its peak resident memory
    in bytes, and its stderr."""
    assert argv[1:3] == ["-m", "imagepipe"], argv
    peak = work / "peak.kib"
    proc = subprocess.run(
        [argv[0], "-c", _PEAK_AT_EXIT, str(peak), *argv[2:]],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        timeout=300,
    )
    return proc.returncode, int(peak.read_text()) * 1024, proc.stderr


@pytest.mark.slow
def test_a_gigabyte_output_file_is_collected_with_flat_memory(batch_run: BatchRun) -> None:
    """400 lines of a 2 MB image each (1.07 GB of output file): the collecting
    ``imagepipe resume`` holds about a line at a time, so its peak memory stays far below
    the file's size (and near what a small run takes)."""
    fake = batch_run.fake
    batch_run.variations = 200  # 2 styles: 400 branches
    fake.image_bytes = 2_000_000
    batch_run.submit()
    fake.clock.advance(LONG_ENOUGH)
    argv = cli_argv("resume", batch_run.run_id)
    started = time.monotonic()
    code, peak, err = run_measured(argv, batch_run.env(), batch_run.out.parent)
    took = time.monotonic() - started
    assert code == 0, err
    size = fake.streamed["content"]
    assert size >= 1_000_000_000
    print(f"\ncollected {size / 1e9:.2f} GB in {took:.1f} s, peak RSS {peak / 1e6:.0f} MB")
    assert peak < 200_000_000, peak
    values = assert_every_image_once(batch_run)
    for value in values.values():
        Path(value["path"]).unlink()  # 800 MB of images: not kept for pytest's history
