"""Detached runs executed by `imagepipe worker` processes, through the real CLI on SQLite:
the queue is shared, a killed worker's branches are taken over, a stopped one is fenced."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import time
from collections import Counter
from pathlib import Path

import pytest

from conftest import cli_argv, cli_env, with_plugins

LEASE = "1"


def cli(db: Path, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        cli_argv(*args),
        env=with_plugins(cli_env(db, **env)),
        capture_output=True,
        text=True,
        timeout=60,
    )


def spawn(
    db: Path, procs: list[subprocess.Popen[str]], *args: str, **env: str
) -> subprocess.Popen[str]:
    proc = subprocess.Popen(
        cli_argv(*args),
        env=with_plugins(cli_env(db, **env)),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    procs.append(proc)
    return proc


def rows(db: Path, sql: str, *params: object) -> list[tuple[object, ...]]:
    with sqlite3.connect(db) as conn:
        return conn.execute(sql, params).fetchall()


def wait_until(condition: object, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():  # type: ignore[operator]
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)  # polling another process's store: no event to wait on


def test_detach_records_every_branch_pending_with_a_plain_runs_ids_and_arguments(
    db_path: Path,
) -> None:
    detached = cli(db_path, "run", "a fox", "-n", "2", "--id", "d", "--detach")
    assert (detached.returncode, detached.stdout) == (0, "d\n")
    plain = cli(db_path, "run", "a fox", "-n", "2", "--id", "p", "--json")
    assert plain.returncode == 0, plain.stderr
    stored = rows(
        db_path,
        "SELECT substr(id, 3), func, args, state, attempts FROM promises"
        " WHERE parent_id = ? ORDER BY seq",
        "d",
    )
    ran = rows(db_path, "SELECT substr(id, 3), func, args FROM promises WHERE parent_id = 'p'")
    assert [r[:3] for r in stored] == sorted(ran, key=lambda r: int(str(r[0])))
    assert {(r[3], r[4]) for r in stored} == {("pending", 0)}
    assert len(stored) == 6
    assert rows(db_path, "SELECT state FROM promises WHERE id = 'd'") == [("pending",)]
    again = cli(db_path, "run", "a fox", "-n", "2", "--id", "d", "--detach")
    assert again.returncode == 0
    other = cli(db_path, "run", "a whale", "--id", "d", "--detach")
    assert other.returncode == 2
    assert "already exists" in other.stderr


@pytest.mark.slow
def test_three_workers_share_2000_branches_and_one_killed_loses_nothing(
    db_path: Path, tmp_path: Path, procs: list[subprocess.Popen[str]]
) -> None:
    calls = tmp_path / "calls.log"
    spec = ("run", "x", "-s", "photorealistic", "-s", "cartoon", "-n", "1000", "--id", "big")
    spec += ("-p", "calllog")  # the simulated provider, its calls logged
    assert cli(db_path, *spec, "--detach").returncode == 0
    env = {"IMAGEPIPE_LEASE_TIMEOUT": LEASE, "IMAGEPIPE_TEST_CALL_LOG": str(calls)}
    args = ("worker", "--once", "-c", "16", "--sim-latency", "0")
    workers = [spawn(db_path, procs, *args, **env) for _ in range(3)]

    def resolved() -> int:
        return int(
            str(rows(db_path, "SELECT count(*) FROM promises WHERE state = 'resolved'")[0][0])
        )

    wait_until(lambda: resolved() >= 300)
    workers[0].send_signal(signal.SIGKILL)
    for worker in workers[1:]:
        _out, err = worker.communicate(timeout=60)
        assert worker.returncode == 0, err
    branches = rows(db_path, "SELECT id, state, attempts FROM promises WHERE parent_id = 'big'")
    assert len(branches) == 2000
    assert {state for _, state, _ in branches} == {"resolved"}
    assert rows(db_path, "SELECT state FROM promises WHERE id = 'big'") == [("resolved",)]
    # every provider call is a durable attempt, made once; no resolved branch ran again
    made = Counter(
        (line.split()[0], int(line.split()[1])) for line in calls.read_text().split("\n") if line
    )
    assert max(made.values()) == 1
    attempts = {str(i): int(str(a)) for i, _, a in branches}
    assert {branch for branch, _ in made} == set(attempts)
    for branch, attempt in made:
        assert attempt <= attempts[branch]
    assert rows(db_path, "SELECT count(*) FROM attempts") == [(0,)]


def test_a_stopped_worker_past_its_lease_is_fenced_off_when_continued(
    db_path: Path, procs: list[subprocess.Popen[str]]
) -> None:
    assert cli(db_path, "run", "x", "-n", "2", "--id", "s", "--detach").returncode == 0
    env = {"IMAGEPIPE_LEASE_TIMEOUT": LEASE}
    # 300 s of simulated latency at the tests' time scale: 3 s, far past the lease
    stopped = spawn(db_path, procs, "worker", "--once", "--sim-latency", "300000", **env)
    wait_until(
        lambda: rows(db_path, "SELECT min(attempts) FROM promises WHERE parent_id = 's'") == [(1,)]
    )
    stopped.send_signal(signal.SIGSTOP)
    time.sleep(float(LEASE) * 1.5)  # the lease must lapse by the store's clock
    taker = cli(db_path, "worker", "--once", "--sim-latency", "0", **env)
    assert taker.returncode == 0, taker.stderr
    assert "6 branches claimed, 6 resolved" in taker.stdout
    before = rows(
        db_path, "SELECT id, state, value, attempts, settled_at FROM promises ORDER BY id"
    )
    stopped.send_signal(signal.SIGCONT)
    out, err = stopped.communicate(timeout=30)
    assert stopped.returncode == 0, err
    assert "6 lost" in out
    assert err.count("lost branch s.") == 6
    assert (
        rows(db_path, "SELECT id, state, value, attempts, settled_at FROM promises ORDER BY id")
        == before
    )
    assert {a for *_, a, _ in before[1:]} == {2}  # the stopped one's attempt 1, then the taker's


def test_two_runs_at_once_across_workers_and_watch_reports_each(
    db_path: Path, procs: list[subprocess.Popen[str]]
) -> None:
    assert (
        cli(
            db_path, "run", "a fox", "-s", "abstract", "-n", "3", "--id", "one", "--detach"
        ).returncode
        == 0
    )
    assert (
        cli(
            db_path, "run", "a cat", "-o", "fail_style", "cartoon", "--id", "two", "--detach"
        ).returncode
        == 0
    )
    watchers = [spawn(db_path, procs, "watch", run) for run in ("one", "two")]
    workers = [
        spawn(db_path, procs, "worker", "--once", "-c", "2", "-o", "fail_style", "cartoon")
        for _ in range(2)
    ]
    for worker in workers:
        assert worker.wait(timeout=60) == 0
    one, two = (w.communicate(timeout=30) for w in watchers)
    assert watchers[0].returncode == 0
    assert "Results of one" in one[0]
    assert watchers[1].returncode == 1
    assert "run two failed: 1 of 3 branches rejected" in two[1]
    listing = json.loads(cli(db_path, "list", "--json").stdout)
    assert {r["id"]: r["state"] for r in listing} == {"one": "resolved", "two": "failed"}


def test_workers_lists_a_live_worker_with_its_claims(
    db_path: Path, procs: list[subprocess.Popen[str]]
) -> None:
    assert cli(db_path, "run", "x", "--id", "w", "--detach").returncode == 0
    worker = spawn(db_path, procs, "worker", "--sim-latency", "300000")
    wait_until(lambda: json.loads(cli(db_path, "workers", "--json").stdout or "[]") != [])
    wait_until(lambda: json.loads(cli(db_path, "workers", "--json").stdout)[0]["claimed"] == 3)
    [live] = json.loads(cli(db_path, "workers", "--json").stdout)
    assert live["pid"] == worker.pid
    assert live["host"] == os.uname().nodename
    worker.send_signal(signal.SIGINT)
    worker.communicate(timeout=30)
    assert json.loads(cli(db_path, "workers", "--json").stdout) == []


def calls_made(log: Path) -> list[tuple[str, int, int]]:
    """The provider calls logged (``-p calllog``: IMAGEPIPE_TEST_CALL_LOG): branch, attempt,
    pid."""
    if not log.exists():
        return []
    return [
        (branch, int(attempt), int(pid))
        for branch, attempt, pid in (line.split() for line in log.read_text().splitlines())
    ]


SPEC_B = (
    "run",
    "x",
    "-s",
    "photorealistic",
    "-s",
    "cartoon",
    "-n",
    "4",
    "--id",
    "b",
    "-p",
    "calllog",
)


@pytest.mark.parametrize("command", [("resume", "b"), SPEC_B], ids=["resume", "run --id"])
def test_resume_beside_a_worker_runs_each_branch_once_through_the_claims(
    db_path: Path, tmp_path: Path, procs: list[subprocess.Popen[str]], command: tuple[str, ...]
) -> None:
    """Issue 19, item 2: `resume` (or `run --id`) of a detached run that a worker is
    executing takes part through the per-branch claims; before, it ran every pending
    branch under the run's lease, and the 4 the worker held were paid twice."""
    calls, gate = tmp_path / "calls.log", tmp_path / "gate"
    assert cli(db_path, *SPEC_B, "--detach").returncode == 0
    # the worker's 4 calls stay in flight (its claims live) until the gate file exists
    worker = spawn(
        db_path,
        procs,
        "worker",
        "--once",
        "-c",
        "4",
        IMAGEPIPE_TEST_CALL_LOG=str(calls),
        IMAGEPIPE_TEST_CALL_GATE=str(gate),
    )
    wait_until(lambda: len(calls_made(calls)) == 4)
    resume = spawn(db_path, procs, *command, IMAGEPIPE_TEST_CALL_LOG=str(calls))
    resolved = "SELECT count(*) FROM promises WHERE parent_id = 'b' AND state = 'resolved'"
    wait_until(lambda: rows(db_path, resolved)[0][0] >= 4)  # the 4 nobody held
    assert resume.poll() is None  # it waits for the worker's 4: their calls are held
    gate.touch()
    out, err = resume.communicate(timeout=60)
    assert resume.returncode == 0, err
    worker_out, worker_err = worker.communicate(timeout=60)
    assert worker.returncode == 0, worker_err
    assert "lost branch" not in worker_err
    # one attempt each: the worker's 4 were not run again by the resume (attempt 2)
    attempts = "SELECT id, attempts FROM promises WHERE parent_id = 'b' ORDER BY seq"
    assert rows(db_path, attempts) == [(f"b.{i}", 1) for i in range(8)]
    made = calls_made(calls)
    assert Counter(branch for branch, _, _ in made) == {f"b.{i}": 1 for i in range(8)}
    assert Counter(pid for _, _, pid in made) == {worker.pid: 4, resume.pid: 4}
    assert rows(db_path, "SELECT state FROM promises WHERE id = 'b'") == [("resolved",)]
    assert rows(db_path, resolved) == [(8,)]
    assert "Results of b" in out
    assert "4 branches claimed, 4 resolved" in worker_out


def test_retry_of_a_failed_detached_run_shares_its_reopened_branches_with_a_worker(
    db_path: Path, tmp_path: Path, procs: list[subprocess.Popen[str]]
) -> None:
    """`retry` of a detached run reopens its rejected branches, then runs them through the
    claims: a worker started meanwhile takes its share, nothing runs twice."""
    calls, gate = tmp_path / "calls.log", tmp_path / "gate"
    spec = ("run", "x", "-s", "photorealistic", "-s", "cartoon", "-n", "4", "--id", "f")
    spec += ("-p", "calllog")
    assert cli(db_path, *spec, "--detach").returncode == 0
    failed = cli(db_path, "worker", "--once", "-o", "fail_style", "cartoon")
    assert failed.returncode == 0, failed.stderr
    assert rows(db_path, "SELECT state FROM promises WHERE id = 'f'") == [("rejected",)]
    # the retry's calls stay in flight until the gate file exists
    retry = spawn(
        db_path,
        procs,
        "retry",
        "f",
        "-c",
        "2",
        IMAGEPIPE_TEST_CALL_LOG=str(calls),
        IMAGEPIPE_TEST_CALL_GATE=str(gate),
    )
    # the retry reopened the 4 rejected branches and holds 2 (its -c 2) in flight
    wait_until(lambda: len(calls_made(calls)) == 2)
    worker = spawn(
        db_path, procs, "worker", "--once", "-c", "2", IMAGEPIPE_TEST_CALL_LOG=str(calls)
    )
    wait_until(lambda: len(calls_made(calls)) >= 4)  # 2 held by the retry, 2 by the worker
    gate.touch()
    out, err = retry.communicate(timeout=60)
    assert retry.returncode == 0, err
    _worker_out, worker_err = worker.communicate(timeout=60)
    assert worker.returncode == 0, worker_err
    made = calls_made(calls)
    cartoons = {f"f.{i}" for i in range(4, 8)}  # the rejected ones: paid once each
    assert Counter(branch for branch, _, _ in made) == dict.fromkeys(cartoons, 1)
    assert Counter(pid for _, _, pid in made) == {retry.pid: 2, worker.pid: 2}
    assert rows(db_path, "SELECT state FROM promises WHERE id = 'f'") == [("resolved",)]
    assert "Results of f" in out


def test_a_run_whose_branches_all_settled_without_its_root_is_settled_not_waited_for(
    db_path: Path,
) -> None:
    """A worker that settled a run's last branch and died before settling the run left it
    pending with nothing to claim: `worker --once` waited for it forever."""
    assert (
        cli(db_path, "run", "x", "-s", "cartoon", "-n", "2", "--id", "r", "--detach").returncode
        == 0
    )
    assert cli(db_path, "worker", "--once").returncode == 0
    # the root's settlement lost, as if its writer died between the two commits
    with sqlite3.connect(db_path) as conn:
        conn.execute(
            "UPDATE promises SET state = 'pending', value = NULL, settled_at = NULL,"
            " child_counts = NULL WHERE id = 'r'"
        )
    done = cli(db_path, "worker", "--once")  # before: a timeout
    assert done.returncode == 0, done.stderr
    assert "1 runs settled" in done.stdout
    assert rows(db_path, "SELECT state, value FROM promises WHERE id = 'r'") == [
        ("resolved", '{"images":2,"total_ms":1600}')
    ]
