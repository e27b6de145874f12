"""A lost PostgreSQL connection is ridden out (issue 19, item 9), through real processes.

A plain run and a worker, each held at the OpenAI fake while its two requests are in
flight: their sessions are terminated (``pg_terminate_backend``) while a write waits on a
row lock the test holds, or the server is stopped and started again. Either way the
process reconnects, writes again what the lost connection had rolled back, and exits 0:
every branch resolved with one attempt and one paid request. A server that stays away
longer than ``IMAGEPIPE_DB_RECONNECT`` ends the process with exit 75 and one line, and a
``resume`` after it is back finishes the run. Presence rows of workers long gone are
deleted when a worker starts or ``imagepipe workers`` lists.
"""

from __future__ import annotations

import contextlib
import json
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from postgres_server import PostgresServer

from tests.fakes.common import Fault
from tests.fakes.openai_server import OpenAIFake

from conftest import cli_argv, cli_env

pytest_plugins = ["tests.fakes.plugin"]

RUN = "rc"
BRANCHES = 2
#: the sessions of imagepipe processes (every connection of the store names itself so)
OURS = "datname = current_database() AND application_name = 'imagepipe'"


def pg_env(url: str, **extra: str) -> dict[str, str]:
    env = cli_env(Path("/nonexistent"), **extra)
    env["IMAGEPIPE_DB"] = url
    return env


def cli(url: str, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        cli_argv(*args), env=pg_env(url, **env), capture_output=True, text=True, timeout=120
    )


def wait_until(condition: Any, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)  # polling another process's database: no event to wait on


@pytest.fixture
def gate(openai_fake: OpenAIFake) -> Iterator[threading.Event]:
    """Every create the fake gets is held until the test sets this event."""
    held = threading.Event()
    openai_fake.add_fault(Fault.held(held), times=-1)
    yield held
    held.set()


def start(
    kind: str, url: str, out: Path, procs: list[subprocess.Popen[str]], **env: str
) -> subprocess.Popen[str]:
    """A plain run of two branches, or a worker on the same run detached."""
    spec = ["run", "a lighthouse", "-p", "openai", "-s", "oil", "-s", "ink", "--id", RUN]
    spec += ["--out", str(out)]
    if kind == "run":
        argv = [*spec, "--json"]
    else:
        detached = cli(url, *spec, "--detach")
        assert detached.returncode == 0, detached.stderr
        argv = ["worker", "--once", "-c", "4"]
    proc = subprocess.Popen(
        cli_argv(*argv),
        env=pg_env(url, **{"IMAGEPIPE_BUSY_TIMEOUT": "120", **env}),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    procs.append(proc)
    return proc


def branches(server: PostgresServer, url: str) -> list[tuple[Any, ...]]:
    return server.execute(
        url,
        "SELECT state, attempts, failures FROM imagepipe.promises"
        f" WHERE parent_id = '{RUN}' ORDER BY id",
    )


def assert_resolved_once(
    proc: subprocess.Popen[str], fake: OpenAIFake, server: PostgresServer, url: str
) -> None:
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    assert branches(server, url) == [("resolved", 1, 0)] * BRANCHES
    root = server.execute(url, f"SELECT state FROM imagepipe.promises WHERE id = '{RUN}'")
    assert root == [("resolved",)]
    assert fake.requests["create"] == BRANCHES  # each image paid for once
    if out.startswith("{"):
        assert json.loads(out)["state"] == "resolved"


@contextlib.contextmanager
def writes_waiting(server: PostgresServer, url: str, gate: threading.Event) -> Iterator[None]:
    """Lock the branches' rows, let the provider answer, and return (to the block) once
    the process's settlement waits on that lock: its session is mid-transaction."""
    with psycopg.connect(url) as holder:
        holder.execute(
            "SELECT id FROM imagepipe.promises WHERE parent_id = %s FOR UPDATE", (RUN,)
        ).fetchall()
        gate.set()
        waiting = f"SELECT count(*) FROM pg_stat_activity WHERE {OURS} AND wait_event_type = 'Lock'"
        wait_until(lambda: server.execute(url, waiting)[0][0] >= 1)
        yield


@pytest.mark.parametrize("kind", ["run", "worker"])
def test_sessions_terminated_mid_write_are_ridden_out(
    kind: str,
    openai_fake: OpenAIFake,
    gate: threading.Event,
    postgres_server: PostgresServer,
    postgres_url: str,
    tmp_path: Path,
    procs: list[subprocess.Popen[str]],
) -> None:
    proc = start(kind, postgres_url, tmp_path / "img", procs)
    openai_fake.wait_for(lambda: openai_fake.requests["create"] >= BRANCHES, timeout=60)
    with writes_waiting(postgres_server, postgres_url, gate):
        ended = postgres_server.execute(
            postgres_url, f"SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE {OURS}"
        )
        assert any(ok for (ok,) in ended)  # one may have ended by itself meanwhile
    assert_resolved_once(proc, openai_fake, postgres_server, postgres_url)


@pytest.mark.parametrize("kind", ["run", "worker"])
def test_a_server_restart_mid_write_is_ridden_out(
    kind: str,
    openai_fake: OpenAIFake,
    gate: threading.Event,
    postgres_server: PostgresServer,
    postgres_url: str,
    tmp_path: Path,
    procs: list[subprocess.Popen[str]],
) -> None:
    proc = start(kind, postgres_url, tmp_path / "img", procs)
    openai_fake.wait_for(lambda: openai_fake.requests["create"] >= BRANCHES, timeout=60)
    with (
        contextlib.suppress(psycopg.OperationalError),  # the holder's session ends too
        writes_waiting(postgres_server, postgres_url, gate),
    ):
        postgres_server.shut_down()
        postgres_server.start_up()
    assert_resolved_once(proc, openai_fake, postgres_server, postgres_url)


@pytest.mark.parametrize("kind", ["run", "worker"])
def test_a_server_away_longer_than_the_setting_is_exit_75_then_the_run_finishes(
    kind: str,
    openai_fake: OpenAIFake,
    gate: threading.Event,
    postgres_server: PostgresServer,
    postgres_url: str,
    tmp_path: Path,
    procs: list[subprocess.Popen[str]],
) -> None:
    proc = start(kind, postgres_url, tmp_path / "img", procs, IMAGEPIPE_DB_RECONNECT="0.5")
    openai_fake.wait_for(lambda: openai_fake.requests["create"] >= BRANCHES, timeout=60)
    postgres_server.shut_down()
    try:
        gate.set()
        _out, err = proc.communicate(timeout=60)  # exits while the server is still away
    finally:
        postgres_server.start_up()
    assert proc.returncode == 75, err
    [line] = err.strip().splitlines()
    assert line.startswith("error: the store postgres@"), line
    assert "cannot be reached" in line
    assert "gave up after 0.5 s; try again once it is back" in line
    if kind == "run":
        assert line.endswith(f": imagepipe resume {RUN}")
        again = cli(postgres_url, "resume", RUN, "--json")
    else:
        assert "imagepipe resume" not in line
        # the stopped worker's claims lapse after the lease timeout: a short one here
        again = cli(postgres_url, "worker", "--once", IMAGEPIPE_LEASE_TIMEOUT="1")
    assert again.returncode == 0, again.stderr
    assert [state for state, *_ in branches(postgres_server, postgres_url)] == ["resolved"] * 2


def test_presence_rows_of_workers_long_gone_are_deleted(
    postgres_server: PostgresServer, postgres_url: str
) -> None:
    def sql(statement: str) -> list[tuple[Any, ...]]:
        return postgres_server.execute(postgres_url, statement)

    first = cli(postgres_url, "worker", "--once")  # creates the schema; nothing to do
    assert first.returncode == 0, first.stderr
    # a worker killed an hour ago, one that stopped cleanly, and one alive now
    sql(
        "INSERT INTO imagepipe.leases (key, owner, pid, host, heartbeat_at, epoch) VALUES"
        " ('worker:dead', 'dead', 1, 'h', extract(epoch FROM now()) - 3600, 1),"
        " ('worker:done', NULL, NULL, NULL, extract(epoch FROM now()), 1),"
        " ('worker:live', 'live', 1, 'h', extract(epoch FROM now()), 1),"
        " ('rc.0', 'old', 1, 'h', extract(epoch FROM now()) - 3600, 7)"
    )
    listed = cli(postgres_url, "workers")
    assert listed.returncode == 0, listed.stderr
    keys = "SELECT key FROM imagepipe.leases ORDER BY key"
    # a branch's lease keeps its row (and epoch) however old
    assert sql(keys) == [("rc.0",), ("worker:live",)]
    sql(
        "UPDATE imagepipe.leases SET heartbeat_at = extract(epoch FROM now()) - 3600"
        " WHERE key = 'worker:live'"
    )
    worker = cli(postgres_url, "worker", "--once")
    assert worker.returncode == 0, worker.stderr
    # gone when the worker started; its own row stays, released, until the next listing
    assert [key for (key,) in sql(keys)][:1] == ["rc.0"]
    assert sql("SELECT count(*) FROM imagepipe.leases WHERE owner IS NOT NULL") == [(1,)]
    assert cli(postgres_url, "workers").returncode == 0
    assert sql(keys) == [("rc.0",)]
