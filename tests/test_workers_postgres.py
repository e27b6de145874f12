"""Workers sharing runs through a real PostgreSQL server (the session's embedded one):
three workers with one killed, and a stopped worker fenced off, through the real CLI."""

from __future__ import annotations

import signal
import subprocess
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from postgres_server import PostgresServer

from conftest import cli_argv, cli_env, with_plugins

LEASE = "3"  # a loaded machine must not make a live worker look gone


def pg_env(url: str, **extra: str) -> dict[str, str]:
    env = with_plugins(cli_env(Path("/nonexistent"), **extra))
    env["IMAGEPIPE_DB"] = url
    return env


def cli(url: str, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        cli_argv(*args), env=pg_env(url, **env), capture_output=True, text=True, timeout=120
    )


def spawn(procs: list[subprocess.Popen[str]], url: str, *args: str, **env: str) -> Any:
    proc = subprocess.Popen(
        cli_argv(*args),
        env=pg_env(url, **env),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    procs.append(proc)
    return proc


def wait_until(condition: Any, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)  # polling another process's database: no event to wait on


@pytest.mark.slow
def test_three_workers_share_2000_branches_on_postgresql_and_a_killed_one_loses_nothing(
    postgres_server: PostgresServer,
    postgres_url: str,
    tmp_path: Path,
    procs: list[subprocess.Popen[str]],
) -> None:
    def sql(statement: str) -> list[tuple[Any, ...]]:
        return postgres_server.execute(postgres_url, statement)

    calls = tmp_path / "calls.log"
    spec = ("run", "x", "-s", "photorealistic", "-s", "cartoon", "-n", "1000", "--id", "big")
    spec += ("-p", "calllog")  # the simulated provider, its calls logged
    detached = cli(postgres_url, *spec, "--detach")
    assert detached.returncode == 0, detached.stderr
    env = {"IMAGEPIPE_LEASE_TIMEOUT": LEASE, "IMAGEPIPE_TEST_CALL_LOG": str(calls)}
    args = ("worker", "--once", "-c", "16", "--sim-latency", "0")
    workers = [spawn(procs, postgres_url, *args, **env) for _ in range(3)]
    count = "SELECT count(*) FROM imagepipe.promises WHERE state = 'resolved'"
    wait_until(lambda: sql(count)[0][0] >= 300)
    workers[0].send_signal(signal.SIGKILL)
    for worker in workers[1:]:
        _out, err = worker.communicate(timeout=120)
        assert worker.returncode == 0, err
    branches = sql("SELECT id, state, attempts FROM imagepipe.promises WHERE parent_id = 'big'")
    assert len(branches) == 2000
    assert {state for _, state, _ in branches} == {"resolved"}
    assert sql("SELECT state FROM imagepipe.promises WHERE id = 'big'") == [("resolved",)]
    made = Counter(
        (line.split()[0], int(line.split()[1])) for line in calls.read_text().split("\n") if line
    )
    assert max(made.values()) == 1, "a provider call was made twice for one attempt"
    attempts = {str(i): int(a) for i, _, a in branches}
    assert {branch for branch, _ in made} == set(attempts)
    assert all(attempt <= attempts[branch] for branch, attempt in made)


def test_a_stopped_worker_is_fenced_off_on_postgresql(
    postgres_server: PostgresServer, postgres_url: str, procs: list[subprocess.Popen[str]]
) -> None:
    def sql(statement: str) -> list[tuple[Any, ...]]:
        return postgres_server.execute(postgres_url, statement)

    assert cli(postgres_url, "run", "x", "-n", "2", "--id", "s", "--detach").returncode == 0
    env = {"IMAGEPIPE_LEASE_TIMEOUT": LEASE}
    stopped = spawn(procs, postgres_url, "worker", "--once", "--sim-latency", "300000", **env)
    wait_until(
        lambda: sql("SELECT min(attempts) FROM imagepipe.promises WHERE parent_id = 's'") == [(1,)]
    )
    stopped.send_signal(signal.SIGSTOP)
    time.sleep(float(LEASE) * 1.5)  # the lease must lapse by the database's clock
    taker = cli(postgres_url, "worker", "--once", "--sim-latency", "0", **env)
    assert taker.returncode == 0, taker.stderr
    state = "SELECT id, state, value, attempts, settled_at FROM imagepipe.promises ORDER BY id"
    before = sql(state)
    stopped.send_signal(signal.SIGCONT)
    out, err = stopped.communicate(timeout=60)
    assert stopped.returncode == 0, err
    assert "6 lost" in out
    assert sql(state) == before


def test_two_runs_at_once_across_workers_on_postgresql_with_watch_woken_by_notify(
    postgres_url: str, procs: list[subprocess.Popen[str]]
) -> None:
    one = cli(postgres_url, "run", "a fox", "-s", "abstract", "-n", "3", "--id", "one", "--detach")
    assert one.returncode == 0, one.stderr
    two = cli(
        postgres_url, "run", "a cat", "-o", "fail_style", "cartoon", "--id", "two", "--detach"
    )
    assert two.returncode == 0, two.stderr
    watchers = [spawn(procs, postgres_url, "watch", run) for run in ("one", "two")]
    workers = [
        spawn(procs, postgres_url, "worker", "--once", "-c", "2", "-o", "fail_style", "cartoon")
        for _ in range(2)
    ]
    for worker in workers:
        assert worker.wait(timeout=120) == 0
    (out_one, _), (_, err_two) = (w.communicate(timeout=60) for w in watchers)
    assert watchers[0].returncode == 0
    assert "Results of one" in out_one
    assert watchers[1].returncode == 1
    assert "run two failed: 1 of 3 branches rejected" in err_two


def test_a_database_restart_mid_run_ends_in_a_finished_run(
    postgres_server: PostgresServer,
    postgres_url: str,
    tmp_path: Path,
    procs: list[subprocess.Popen[str]],
) -> None:
    """Both workers ride out the restart (they reconnect) and finish the run; a worker
    started afterwards finds nothing left to do."""

    def sql(statement: str) -> list[tuple[Any, ...]]:
        return postgres_server.execute(postgres_url, statement)

    calls = tmp_path / "calls.log"
    spec = ("run", "x", "-s", "cartoon", "-n", "300", "--id", "rs", "-p", "calllog")
    assert cli(postgres_url, *spec, "--detach").returncode == 0
    env = {"IMAGEPIPE_LEASE_TIMEOUT": LEASE, "IMAGEPIPE_TEST_CALL_LOG": str(calls)}
    args = ("worker", "--once", "-c", "8", "--sim-latency", "30")
    workers = [spawn(procs, postgres_url, *args, **env) for _ in range(2)]
    count = "SELECT count(*) FROM imagepipe.promises WHERE state = 'resolved'"
    wait_until(lambda: sql(count)[0][0] >= 60)
    postgres_server.restart()
    outcomes = []
    for worker in workers:
        _out, err = worker.communicate(timeout=120)
        outcomes.append(worker.returncode)
        assert worker.returncode == 0, err
    finish = cli(postgres_url, "worker", "--once", "-c", "8", "--sim-latency", "0", **env)
    assert finish.returncode == 0, finish.stderr
    states = sql("SELECT state, count(*) FROM imagepipe.promises GROUP BY state")
    assert dict(states) == {"resolved": 301}
    made = Counter(
        (line.split()[0], int(line.split()[1])) for line in calls.read_text().split("\n") if line
    )
    assert max(made.values()) == 1, "a provider call was made twice for one attempt"
    print(f"worker exits after the restart: {outcomes}")


def test_resume_beside_a_worker_on_postgresql_runs_each_branch_once(
    postgres_server: PostgresServer,
    postgres_url: str,
    tmp_path: Path,
    procs: list[subprocess.Popen[str]],
) -> None:
    """Issue 19, item 2, on PostgreSQL: `resume` of a detached run that a worker holds
    branches of claims only the others, waits for the worker's, and pays each once."""

    def sql(statement: str) -> list[tuple[Any, ...]]:
        return postgres_server.execute(postgres_url, statement)

    def made() -> list[list[str]]:
        return [line.split() for line in calls.read_text().splitlines()] if calls.exists() else []

    calls, gate = tmp_path / "calls.log", tmp_path / "gate"
    spec = ("run", "x", "-s", "photorealistic", "-s", "cartoon", "-n", "4", "--id", "b")
    spec += ("-p", "calllog")
    assert cli(postgres_url, *spec, "--detach").returncode == 0
    # the worker's 4 calls stay in flight (its claims live) until the gate file exists
    held = {"IMAGEPIPE_TEST_CALL_LOG": str(calls), "IMAGEPIPE_TEST_CALL_GATE": str(gate)}
    worker = spawn(procs, postgres_url, "worker", "--once", "-c", "4", **held)
    wait_until(lambda: len(made()) == 4)
    resume = spawn(procs, postgres_url, "resume", "b", IMAGEPIPE_TEST_CALL_LOG=str(calls))
    resolved = (
        "SELECT count(*) FROM imagepipe.promises WHERE parent_id = 'b' AND state = 'resolved'"
    )
    wait_until(lambda: sql(resolved)[0][0] >= 4)  # the 4 nobody held
    assert resume.poll() is None  # it waits for the worker's 4: their calls are held
    gate.touch()
    out, err = resume.communicate(timeout=120)
    assert resume.returncode == 0, err
    _worker_out, worker_err = worker.communicate(timeout=120)
    assert worker.returncode == 0, worker_err
    assert "lost branch" not in worker_err
    attempts = "SELECT id, attempts FROM imagepipe.promises WHERE parent_id = 'b' ORDER BY seq"
    assert sql(attempts) == [(f"b.{i}", 1) for i in range(8)]  # none run again
    assert Counter(branch for branch, _, _ in made()) == {f"b.{i}": 1 for i in range(8)}
    assert Counter(int(pid) for _, _, pid in made()) == {worker.pid: 4, resume.pid: 4}
    assert sql("SELECT state FROM imagepipe.promises WHERE id = 'b'") == [("resolved",)]
    assert "Results of b" in out
