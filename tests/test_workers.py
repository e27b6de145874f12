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

from conftest import cli_argv, cli_env

LEASE = "1"


def cli(db: Path, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        cli_argv(*args), env=cli_env(db, **env), capture_output=True, text=True, timeout=60
    )


def spawn(
    db: Path, procs: list[subprocess.Popen[str]], *args: str, **env: str
) -> subprocess.Popen[str]:
    proc = subprocess.Popen(
        cli_argv(*args),
        env=cli_env(db, **env),
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
            db_path, "run", "a cat", "--fail-style", "cartoon", "--id", "two", "--detach"
        ).returncode
        == 0
    )
    watchers = [spawn(db_path, procs, "watch", run) for run in ("one", "two")]
    workers = [
        spawn(db_path, procs, "worker", "--once", "-c", "2", "--fail-style", "cartoon")
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
