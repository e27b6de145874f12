"""Issue 11's hostile-user bugs 2-5, each reproduced through real ``imagepipe`` processes.

2. Two ``run --id S`` racing with different prompts: the loser must never run (or print)
   the winner's run.
3. A write lock held by another process during a heartbeat must not kill the run.
4. A run refused with exit 65 (replay mismatch) leaves the store byte-for-byte unchanged.
5. A corrupt store gives one clean line and exit 74, and is never written to.
"""

from __future__ import annotations

import json
import random
import shutil
import sqlite3
import subprocess
import threading
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

import pytest

from tests.fakes.common import Fault
from tests.fakes.openai_server import OpenAIFake

from conftest import FAST, cli_argv, cli_env
from storeview import checkpointed_bytes, lease_age, table_rows

pytestmark = pytest.mark.slow
pytest_plugins = ["tests.fakes.plugin"]


def cli(db: Path, *args: str, **env: str) -> subprocess.CompletedProcess[bytes]:
    env = {"IMAGEPIPE_TIME_SCALE": FAST, **env}
    return subprocess.run(
        cli_argv(*args), env=cli_env(db, **env), capture_output=True, timeout=60, check=False
    )


def start(db: Path, *args: str, **env: str) -> subprocess.Popen[bytes]:
    env = {"IMAGEPIPE_TIME_SCALE": FAST, **env}
    return subprocess.Popen(
        cli_argv(*args), env=cli_env(db, **env), stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )


def sql(db: Path, script: str) -> None:
    conn = sqlite3.connect(db)
    try:
        conn.executescript(script)
    finally:
        conn.close()


@contextmanager
def write_lock(db: Path) -> Iterator[None]:
    """Hold the store's write lock, as another writer would (``BEGIN IMMEDIATE``)."""
    conn = sqlite3.connect(db, isolation_level=None, timeout=5)
    try:
        conn.execute("BEGIN IMMEDIATE")
        yield
        conn.execute("ROLLBACK")
    finally:
        conn.close()


def assert_one_clean_line(err: bytes) -> str:
    """stderr is one line, valid UTF-8, with no control characters and no traceback."""
    text = err.decode("utf-8")  # raises on binary bytes
    assert text.endswith("\n"), text
    assert text.count("\n") == 1, text
    line = text[:-1]
    assert line.startswith("error: "), line
    assert line.isprintable(), line
    assert "\ufffd" not in line, line  # no undecodable bytes of a damaged row
    return line


# -- 2. racing run --id S ------------------------------------------------------------

#: racers wait for the lock rather than give up while the others start
PATIENT = {"IMAGEPIPE_BUSY_TIMEOUT": "30"}
#: Every racer opens the store while the lock is held, so each race is a real one: on
#: 1e24929 all 12 of 12 such races ran the other prompt (the issue saw 1 in 12 when the
#: racers were timed by a fixed sleep); 6 keep this test quick on two cores.
RACES = 6
AT_ONCE = 6


def has_open(proc: subprocess.Popen[bytes], db: Path) -> bool:
    """True once the process has opened the store (Linux: its file descriptors)."""
    try:
        fds = list(Path(f"/proc/{proc.pid}/fd").iterdir())
    except FileNotFoundError:
        return True  # it ended already
    targets = set()
    for fd in fds:
        try:
            targets.add(fd.readlink())
        except OSError:
            continue
    return db in targets


def test_racing_runs_with_one_id_never_run_each_others_prompt(
    tmp_path: Path, procs: list[subprocess.Popen[bytes]]
) -> None:
    template = tmp_path / "template.db"
    assert cli(template, "run", "warm-up", "--id", "w", "--json").returncode == 0
    checkpointed_bytes(template)
    outcomes: list[tuple[int, bytes, bytes, int, bytes, bytes, str]] = []
    for wave in range(RACES // AT_ONCE):
        dbs = [tmp_path / f"race-{wave}-{i}.db" for i in range(AT_ONCE)]
        for db in dbs:
            shutil.copyfile(template, db)
        with ExitStack() as locks:
            for db in dbs:
                locks.enter_context(write_lock(db))
            started = []
            for db in dbs:
                fox = start(db, "run", "a red fox", "--id", "S", "--json", **PATIENT)
                whale = start(
                    db, "run", "a blue whale", "--style", "sketch", "--id", "S", "--json", **PATIENT
                )
                procs += [fox, whale]
                started.append((fox, whale))
            # Both have opened the store and read no run S: they wait for the lock to create it.
            deadline = time.monotonic() + 30
            racers = [(db, p) for db, pair in zip(dbs, started, strict=True) for p in pair]
            while not all(has_open(p, db) for db, p in racers):
                assert time.monotonic() < deadline, "the racers never opened their stores"
                time.sleep(0.02)
            time.sleep(0.2)
        for db, (fox, whale) in zip(dbs, started, strict=True):
            fox_out, fox_err = fox.communicate(timeout=60)
            whale_out, whale_err = whale.communicate(timeout=60)
            conn = sqlite3.connect(db)
            args = conn.execute("SELECT args FROM promises WHERE id = 'S'").fetchone()[0]
            conn.close()
            outcomes.append(
                (fox.returncode, fox_out, fox_err, whale.returncode, whale_out, whale_err, args)
            )

    for fox_code, fox_out, fox_err, whale_code, whale_out, whale_err, stored_args in outcomes:
        if "a red fox" in stored_args:
            assert fox_code == 0, fox_err
            assert json.loads(fox_out)["prompt"] == "a red fox"
            # the whale lost: refused as a conflict (2) or busy (75), never the fox's run
            assert whale_code in (2, 75), (whale_code, whale_err)
            assert whale_out == b""
            assert_one_clean_line(whale_err)
        else:
            assert "a blue whale" in stored_args
            assert fox_code in (2, 75)


# -- 3. a brief lock during a heartbeat ----------------------------------------------


def test_a_brief_lock_during_a_heartbeat_does_not_kill_the_run(
    openai_fake: OpenAIFake, db_path: Path, tmp_path: Path, procs: list[subprocess.Popen[bytes]]
) -> None:
    # The fake holds the three creates, so the attempts last exactly as long as the test
    # needs. It locks the store once they are all in flight and keeps it locked until
    # the heartbeat (every 3 s, with a 0.2 s busy timeout) is 4 s old: a beat met the
    # lock, and the owner, which gives its run up after 30 s of silence, had to bear it.
    held = threading.Event()
    openai_fake.add_fault(Fault(held_until=held), times=3)
    proc = start(
        db_path,
        "run",
        "a lighthouse",
        "--provider",
        "openai",
        "--id",
        "beat",
        "--out",
        str(tmp_path / "images"),
        IMAGEPIPE_BUSY_TIMEOUT="0.2",
        IMAGEPIPE_LEASE_TIMEOUT="30",
    )
    procs.append(proc)
    openai_fake.wait_for(lambda: openai_fake.requests["create"] == 3, timeout=300)
    with write_lock(db_path):
        deadline = time.monotonic() + 300
        while (lease_age(db_path) or 0) < 4:
            assert time.monotonic() < deadline, "the lease was never 4 s old"
            time.sleep(0.05)
    held.set()
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    assert err == b""
    assert out.count(b"Done:") == 3
    conn = sqlite3.connect(db_path)
    states = conn.execute("SELECT state, attempts FROM promises WHERE parent_id = 'beat'")
    assert states.fetchall() == [("resolved", 1)] * 3  # every attempt kept, none redone
    conn.close()
    assert table_rows(db_path, "attempts") == []
    assert openai_fake.paid_creates == 3


# -- 4. exit 65 writes nothing -------------------------------------------------------


@pytest.mark.parametrize(
    ("mismatch", "where"),
    [
        # a stored child the workflow no longer makes (1e24929 reopened the rejected
        # branch, executed and resolved it, set the run back to pending, then exited 65)
        (
            "INSERT INTO promises (id, parent_id, seq, func, args, options, state, value,"
            " created_at, settled_at) SELECT 'f.3', 'f', 3, func, args, options, state, value,"
            " created_at, settled_at FROM promises WHERE id = 'f.1'",
            "f.3",
        ),
        # a stored branch whose arguments the workflow no longer passes
        ("UPDATE promises SET args = replace(args, 'cartoon', 'sketch') WHERE id = 'f.1'", "f.1"),
    ],
    ids=["extra-child", "changed-args"],
)
def test_retry_refused_for_a_replay_mismatch_leaves_the_store_unchanged(
    db_path: Path, mismatch: str, where: str
) -> None:
    failed = cli(db_path, "run", "a fox", "--id", "f", "-o", "fail_style", "abstract")
    assert failed.returncode == 1
    sql(db_path, mismatch)
    before = checkpointed_bytes(db_path)
    proc = cli(db_path, "retry", "f")
    assert proc.returncode == 65, proc.stderr
    assert f"replay mismatch at {where}" in assert_one_clean_line(proc.stderr)
    assert b"Done:" not in proc.stdout  # the reopened branch was not executed either
    assert checkpointed_bytes(db_path) == before


def test_resume_refused_for_an_extra_stored_child_leaves_the_store_unchanged(
    db_path: Path,
) -> None:
    assert cli(db_path, "run", "a fox", "--id", "x").returncode == 0
    # Interrupted, as it were, with one branch pending, and a child the workflow never makes.
    sql(
        db_path,
        "UPDATE promises SET state = 'pending', value = NULL, settled_at = NULL"
        " WHERE id IN ('x', 'x.1');"
        "INSERT INTO promises (id, parent_id, seq, func, args, options, state, created_at)"
        " SELECT 'x.3', 'x', 3, func, args, options, 'pending', created_at"
        " FROM promises WHERE id = 'x.2';",
    )
    before = checkpointed_bytes(db_path)
    proc = cli(db_path, "resume", "x")
    assert proc.returncode == 65, proc.stderr
    assert "replay mismatch at x.3" in assert_one_clean_line(proc.stderr)
    assert b"Done:" not in proc.stdout  # the pending branch was not executed either
    assert checkpointed_bytes(db_path) == before


# -- 5. corrupt stores ---------------------------------------------------------------

RUN = ("run", "a lighthouse", "-n", "20", "--id", "c", "--sim-latency", "0")
COMMANDS = (
    ("show", "c"),
    ("show", "c", "--json"),
    ("list",),
    ("resume", "c"),
    RUN,
)
#: seeds whose damage lands in ids, functions, arguments, states and values
SEEDS = (0, 20, 22, 24)


def _leaf_pages(db: Path, table: str) -> list[int]:
    conn = sqlite3.connect(db)
    try:
        found = conn.execute(
            "SELECT pageno FROM dbstat WHERE name = ? AND pagetype = 'leaf' ORDER BY pageno",
            (table,),
        )
        return [r[0] for r in found]
    finally:
        conn.close()


def _quick_check(db: Path) -> str:
    conn = sqlite3.connect(db)
    try:
        return str(conn.execute("PRAGMA quick_check(1)").fetchone()[0])
    except sqlite3.DatabaseError as exc:
        return str(exc)
    finally:
        conn.close()


@pytest.fixture(scope="module")
def pending_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A store of one interrupted 60-branch run (half its branches pending) and a finished
    one with a failure in its history, all in the main file."""
    db = tmp_path_factory.mktemp("corrupt") / "pristine.db"
    for args in (RUN, ("run", "a fox", "--crash", "--id", "d")):
        assert cli(db, *args).returncode == 0
    sql(
        db,
        "UPDATE promises SET state = 'pending', value = NULL, settled_at = NULL"
        " WHERE id = 'c' OR (parent_id = 'c' AND seq % 2 = 0)",
    )
    checkpointed_bytes(db)
    return db


@pytest.mark.parametrize("seed", SEEDS)
def test_a_corrupt_store_gives_one_clean_line_and_is_never_written(
    pending_store: Path, tmp_path: Path, seed: int
) -> None:
    rng = random.Random(seed)
    pages = _leaf_pages(pending_store, "promises")
    page_size = 4096
    page = rng.choice(pages)
    damaged = bytearray(pending_store.read_bytes())
    start_at = (page - 1) * page_size + rng.randrange(page_size - 64)
    damaged[start_at : start_at + 48] = rng.randbytes(48)

    copies = []
    for n, args in enumerate(COMMANDS):
        copy = tmp_path / f"{n}.db"
        copy.write_bytes(damaged)
        copies.append((copy, args, start(copy, *args)))
    check = _quick_check(tmp_path / "0.db")
    for copy, args, proc in copies:
        _, err = proc.communicate(timeout=60)
        if proc.returncode == 0:
            assert err == b"", (args, err)
            continue
        assert b"Traceback" not in err, (args, err)
        line = assert_one_clean_line(err)
        assert proc.returncode == 74, (args, line)
        assert "is corrupt" in line, (args, line)
        if args[0] in ("run", "resume") and check != "ok":
            assert "is corrupt" in line, (args, line)
            assert copy.read_bytes() == damaged, "a store failing quick_check was written"


def test_run_and_resume_refuse_a_store_that_fails_quick_check(
    pending_store: Path, tmp_path: Path
) -> None:
    # Damage a page that holds only the other run's rows: run c's own rows read fine.
    damaged = bytearray(pending_store.read_bytes())
    page_size = 4096
    for page in _leaf_pages(pending_store, "attempts"):
        damaged[(page - 1) * page_size] = 0xFF  # not a b-tree page type
    for n, args in enumerate((("resume", "c"), RUN)):
        copy = tmp_path / f"{n}.db"
        copy.write_bytes(damaged)
        assert _quick_check(copy) != "ok"
        proc = cli(copy, *args)
        assert proc.returncode == 74, (args, proc.stdout, proc.stderr)
        assert "is corrupt" in assert_one_clean_line(proc.stderr)
        assert copy.read_bytes() == damaged
