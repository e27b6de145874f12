"""Failure semantics: injected faults, partial results, retry, one executor, store faults."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from imagepipe.cli import app
from imagepipe.durable.records import encode_args
from imagepipe.durable.sqlite_schema import SCHEMA_VERSION
from imagepipe.providers import Faults
from imagepipe.providers.simulated import simulated_request

from conftest import cli_argv, cli_env

runner = CliRunner()


def invoke(*args: str) -> Any:
    return runner.invoke(app, list(args), catch_exceptions=False)


def rows(db: Path, sql: str, *params: object) -> list[tuple[Any, ...]]:
    conn = sqlite3.connect(db)
    try:
        return conn.execute(sql, params).fetchall()
    finally:
        conn.close()


def branches(db: Path, run_id: str) -> dict[str, tuple[Any, ...]]:
    found = rows(
        db,
        "SELECT id, state, value, attempts FROM promises WHERE parent_id = ? ORDER BY seq",
        run_id,
    )
    return {r[0]: r[1:] for r in found}


def integrity(db: Path) -> str:
    return str(rows(db, "PRAGMA integrity_check")[0][0])


def test_seeded_failure_rate_fails_exactly_the_drawn_attempts(db_path: Path) -> None:
    args = ["run", "a cat", "--id", "fr", "-n", "6", "--fail-rate", "0.5", "--seed", "7"]
    result = invoke(*args, "--max-attempts", "3", "--json")
    faults = Faults(fail_rate=0.5, seed=7)
    history = rows(
        db_path,
        "SELECT a.promise_id, a.attempt, a.error IS NOT NULL, p.state FROM attempts a"
        " JOIN promises p ON p.id = a.promise_id ORDER BY a.promise_id, a.attempt",
    )
    assert history, "attempts are recorded"
    outcome: dict[str, list[bool]] = {}
    for promise_id, attempt, failed, _ in history:
        request = simulated_request("a cat", "x", 0, promise_id, attempt)
        assert bool(failed) == faults.fails(request), (promise_id, attempt)
        outcome.setdefault(promise_id, []).append(bool(failed))
    states = {pid: state for pid, _, _, state in history}
    for promise_id, failures in outcome.items():
        expected = "rejected" if failures == [True, True, True] else "resolved"
        assert states[promise_id] == expected
    any_rejected = "rejected" in states.values()
    assert result.exit_code == (1 if any_rejected else 0)
    assert any_rejected, "seed 7 at 50 % rejects at least one of 18 branches"
    assert "resolved" in states.values()


def test_non_retryable_error_rejects_at_once_and_the_rest_finish(db_path: Path) -> None:
    result = invoke("run", "a cat", "--id", "nr", "--fail-style", "cartoon", "--json")
    assert result.exit_code == 1
    data = json.loads(result.stdout)
    assert data["state"] == "failed"
    assert [i["style"] for i in data["images"]] == ["photorealistic", "abstract"]
    assert data["sequential_ms"] == 2200
    assert result.stderr.count("\n") == 1
    assert "run nr failed: 1 of 3 branches rejected, first cartoon (nr.1)" in result.stderr
    assert "imagepipe retry nr" in result.stderr
    state, value, attempts = branches(db_path, "nr")["nr.1"]
    assert (state, value, attempts) == ("rejected", None, 1)
    shown = json.loads(invoke("show", "nr", "--json").stdout)
    assert shown["state"] == "failed"
    assert shown["branches"][1]["error"].startswith("InvalidRequest: the provider refuses")


def test_exhausted_branch_is_rejected_with_its_last_error(db_path: Path) -> None:
    result = invoke(
        "run",
        "a cat",
        "-s",
        "abstract",
        "--id",
        "ex",
        "--fail-rate",
        "1",
        "--max-attempts",
        "3",
        "--json",
    )
    assert result.exit_code == 1
    shown = json.loads(invoke("show", "ex", "--json").stdout)
    branch = shown["branches"][0]
    assert (branch["state"], branch["attempts"]) == ("rejected", 3)
    assert branch["error"] == (
        "TransientProviderError: simulated transient failure for style 'abstract' (attempt 3)"
    )


def test_a_hang_is_a_retryable_timeout(db_path: Path) -> None:
    result = invoke(
        "run",
        "a cat",
        "-s",
        "cartoon",
        "--id",
        "hg",
        "--hang-rate",
        "1",
        "--attempt-timeout",
        "0.05",
        "--max-attempts",
        "2",
        "--json",
    )
    assert result.exit_code == 1
    branch = json.loads(invoke("show", "hg", "--json").stdout)["branches"][0]
    assert (branch["state"], branch["attempts"]) == ("rejected", 2)
    assert branch["error"] == "AttemptTimeout: attempt timed out after 0.05 s"


def test_retry_reruns_only_rejected_branches_and_keeps_history(db_path: Path) -> None:
    invoke("run", "a cat", "--id", "rt", "--fail-style", "abstract", "--json")
    before = branches(db_path, "rt")
    result = invoke("retry", "rt", "--json")
    assert result.exit_code == 0, result.stderr
    data = json.loads(result.stdout)
    assert data["state"] == "resolved"
    after = branches(db_path, "rt")
    assert after["rt.0"] == before["rt.0"]
    assert after["rt.1"] == before["rt.1"]
    assert after["rt.2"][0] == "resolved"
    assert after["rt.2"][2] == 2  # a new attempt number
    assert [i["replayed"] for i in data["images"]] == [True, True, False]
    shown = invoke("show", "rt").stdout
    assert "rt.2 attempt 1" in shown
    assert "InvalidRequest: the provider refuses style 'abstract'" in shown
    # nothing left to retry: the stored result is shown, nothing runs
    again = invoke("retry", "rt", "--json")
    assert again.exit_code == 0
    assert all(i["replayed"] for i in json.loads(again.stdout)["images"])
    assert branches(db_path, "rt") == after


def test_resume_retry_failed_is_the_same_as_retry(db_path: Path) -> None:
    invoke("run", "a cat", "--id", "rf", "--fail-style", "cartoon", "--json")
    plain = invoke("resume", "rf", "--json")
    assert plain.exit_code == 1, "resume alone leaves a failed run failed"
    result = invoke("resume", "rf", "--retry-failed", "--json")
    assert result.exit_code == 0
    assert json.loads(result.stdout)["state"] == "resolved"


def test_non_determinism_is_refused_naming_the_first_mismatch(db_path: Path) -> None:
    invoke("run", "a cat", "--id", "nd", "--fail-style", "abstract", "--json")
    conn = sqlite3.connect(db_path)
    conn.execute(
        "UPDATE promises SET args = ? WHERE id = 'nd.1'",
        (encode_args({"crash": False, "prompt": "a cat", "style": "watercolor", "variation": 0}),),
    )
    conn.commit()
    conn.close()
    before = branches(db_path, "nd")
    result = invoke("retry", "nd")
    assert result.exit_code == 65
    assert result.stderr.count("\n") == 1
    assert "replay mismatch at nd.1" in result.stderr
    assert '"watercolor"' in result.stderr
    assert '"cartoon"' in result.stderr
    assert branches(db_path, "nd") == before
    assert rows(db_path, "SELECT count(*) FROM leases WHERE owner IS NOT NULL") == [(0,)]


# -- one executor at a time ---------------------------------------------------------


def test_second_executor_is_refused_and_a_dead_one_is_taken_over_at_once(
    db_path: Path, procs: list[subprocess.Popen[str]]
) -> None:
    # The owner never finishes by itself, however slow the machine: every attempt hangs
    # (there is no attempt timeout) until this test kills it. Its lease goes stale only
    # after an hour of silence, so the takeover below can only come from the owner's
    # death being noticed, at once.
    env = cli_env(db_path, IMAGEPIPE_TIME_SCALE="0.01", IMAGEPIPE_LEASE_TIMEOUT="3600")
    owner = subprocess.Popen(
        cli_argv("run", "a cat", "--crash", "--id", "busy", "--hang-rate", "1"),
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    procs.append(owner)
    assert owner.stdout is not None
    for line in owner.stdout:
        if "Generating image" in line:
            break
    second = subprocess.run(
        cli_argv("resume", "busy", "--json"), env=env, capture_output=True, text=True
    )
    assert second.returncode == 75
    assert second.stdout == ""
    assert f"run 'busy' is being executed by process {owner.pid}" in second.stderr
    rerun = subprocess.run(
        cli_argv("run", "a cat", "--crash", "--id", "busy"),
        env=env,
        capture_output=True,
        text=True,
    )
    assert rerun.returncode == 75

    assert owner.poll() is None  # it was the owner all along

    owner.send_signal(signal.SIGKILL)
    owner.wait()
    taken = subprocess.run(
        cli_argv("resume", "busy", "--json"), env=env, capture_output=True, text=True, timeout=300
    )
    assert taken.returncode == 0, taken.stderr
    assert json.loads(taken.stdout)["state"] == "resolved"


def test_two_resumes_at_once_exactly_one_executes(
    db_path: Path, procs: list[subprocess.Popen[str]]
) -> None:
    # Leave a pending run behind: its attempts hang until it is killed.
    first = subprocess.Popen(
        cli_argv("run", "a cat", "--id", "twin", "--hang-rate", "1"),
        env=cli_env(db_path, IMAGEPIPE_TIME_SCALE="0.01"),
        stdout=subprocess.PIPE,
        text=True,
    )
    procs.append(first)
    assert first.stdout is not None
    for line in first.stdout:
        if "Generating image" in line:
            break
    first.kill()
    first.wait()
    # At full time scale the two resumes take over a second: they usually overlap.
    env = cli_env(db_path, IMAGEPIPE_TIME_SCALE="1")
    pair = [
        subprocess.Popen(
            cli_argv("resume", "twin", "--json"),
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(2)
    ]
    procs.extend(pair)
    results = [(p.wait(timeout=60), p.stdout.read(), p.stderr.read()) for p in pair]  # type: ignore[union-attr]
    codes = sorted(code for code, _, _ in results)
    assert codes in ([0, 75], [0, 0]), results
    executed = [json.loads(out) for code, out, _ in results if code == 0]
    computed = [i for run in executed for i in run["images"] if not i["replayed"]]
    assert len(computed) == 3, "each branch was computed by exactly one process"
    if codes == [0, 75]:
        assert "is being executed by process" in next(e for c, _, e in results if c == 75)


# -- store faults -------------------------------------------------------------------


def test_locked_store_is_a_clear_error(db_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    invoke("run", "a cat", "--id", "ok", "--json")
    monkeypatch.setenv("IMAGEPIPE_BUSY_TIMEOUT", "0.1")
    blocker = sqlite3.connect(db_path, isolation_level=None)
    blocker.execute("BEGIN IMMEDIATE")
    try:
        result = invoke("run", "a dog", "--id", "blocked")
    finally:
        blocker.execute("ROLLBACK")
        blocker.close()
    assert result.exit_code == 75
    assert result.stderr == f"error: the store {db_path} is locked by another process; try again\n"
    assert rows(db_path, "SELECT id FROM promises WHERE parent_id IS NULL") == [("ok",)]


def test_read_only_store_is_a_clear_error(db_path: Path) -> None:
    invoke("run", "a cat", "--id", "ok", "--json")
    before = db_path.read_bytes()
    immutable = os.geteuid() == 0
    if immutable:  # root ignores permissions; the immutable flag stops root too
        if subprocess.run(["chattr", "+i", str(db_path)], capture_output=True).returncode:
            pytest.skip("chattr +i is not supported on this file system")
    else:
        db_path.chmod(0o444)
    try:
        result = invoke("run", "a dog", "--id", "ro")
    finally:
        if immutable:
            subprocess.run(["chattr", "-i", str(db_path)], check=True)
        db_path.chmod(0o644)
    assert result.exit_code == 74
    assert result.stderr == f"error: the store {db_path} is read-only; check its permissions\n"
    assert db_path.read_bytes() == before


def test_corrupt_store_is_a_clear_error_and_not_written(db_path: Path) -> None:
    invoke("run", "a cat", "--id", "ok", "-n", "30", "--json")
    invoke("list")  # checkpoint nothing special: just another reader
    conn = sqlite3.connect(db_path)
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    conn.close()
    data = bytearray(db_path.read_bytes())
    for offset in range(4096, len(data), 4096):  # smash every b-tree page header but the first
        data[offset : offset + 8] = b"\xff" * 8
    db_path.write_bytes(bytes(data))
    for args in (["show", "ok"], ["resume", "ok"], ["run", "x", "--id", "new"]):
        result = invoke(*args)
        assert result.exit_code == 74, (args, result.stderr)
        assert result.stderr.startswith(f"error: the store {db_path} is corrupt")
        assert result.stderr.count("\n") == 1
    assert db_path.read_bytes() == bytes(data)


def test_full_disk_stops_the_run_keeps_results_and_resume_finishes(
    db_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    invoke("run", "a cat", "--id", "seed", "--json")
    pages = rows(db_path, "PRAGMA page_count")[0][0]
    monkeypatch.setenv("IMAGEPIPE_SIMULATE_MAX_PAGES", str(pages + 3))
    # 60 branches of a 700-character prompt need ~11 pages: three run out (600 branches
    # did too, and made the resume below take 8 s)
    result = invoke("run", "a long prompt " * 50, "--id", "full", "-n", "20", "--json")
    assert result.exit_code == 74
    assert result.stderr == f"error: the disk holding {db_path} is full; free space and resume\n"
    assert integrity(db_path) == "ok"
    assert [b[0] for b in branches(db_path, "seed").values()] == ["resolved"] * 3
    kept = {k: v for k, v in branches(db_path, "full").items() if v[0] == "resolved"}

    monkeypatch.delenv("IMAGEPIPE_SIMULATE_MAX_PAGES")
    resumed = invoke("resume", "full", "--json")
    assert resumed.exit_code == 0, resumed.stderr
    after = branches(db_path, "full")
    assert len(after) == 60
    assert all(v[0] == "resolved" for v in after.values())
    assert all(after[k] == v for k, v in kept.items())


def test_newer_schema_is_a_clear_error(db_path: Path) -> None:
    invoke("run", "a cat", "--id", "ok", "--json")
    conn = sqlite3.connect(db_path)
    conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    conn.close()
    result = invoke("show", "ok")
    assert result.exit_code == 74
    assert "newer than this imagepipe knows" in result.stderr
    assert "upgrade imagepipe" in result.stderr


@pytest.mark.slow
def test_a_file_size_limit_says_what_to_do_and_the_run_resumes(db_path: Path) -> None:
    import resource

    def small_files() -> None:  # ulimit -f 128: files of at most 128 KiB (the new store fits)
        resource.setrlimit(resource.RLIMIT_FSIZE, (128 * 1024, 128 * 1024))

    args = ["run", "a prompt to fill the store", "-n", "300", "--sim-latency", "0", "--id", "q"]
    done = subprocess.run(
        cli_argv(*args, "--json"),
        env=cli_env(db_path),
        capture_output=True,
        text=True,
        timeout=60,
        preexec_fn=small_files,
    )
    assert done.returncode == 74
    assert done.stderr.count("\n") == 1
    assert "ulimit -f" in done.stderr
    assert done.stderr.rstrip().endswith("then imagepipe resume q")
    again = subprocess.run(
        cli_argv("resume", "q", "--sim-latency", "0", "--json"),
        env=cli_env(db_path),
        capture_output=True,
        text=True,
    )
    assert again.returncode == 0, again.stderr
    assert len(json.loads(again.stdout)["images"]) == 900
