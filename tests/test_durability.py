"""Durability with real processes: start the CLI, kill it, resume, check store and output."""

from __future__ import annotations

import itertools
import json
import signal
import sqlite3
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

import pytest

from imagepipe.providers import Faults
from imagepipe.providers.simulated import simulated_request

from conftest import cli_argv, cli_env

pytestmark = pytest.mark.slow


def start(db: Path, *args: str, scale: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        cli_argv(*args),
        env=cli_env(db, IMAGEPIPE_TIME_SCALE=scale),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def read_until(stream: IO[str], done: Callable[[list[str]], bool]) -> list[str]:
    """Read lines as the process prints them until ``done`` says so (no sleeping)."""
    lines: list[str] = []
    for line in iter(stream.readline, ""):
        lines.append(line.rstrip("\n"))
        if done(lines):
            return lines
    raise AssertionError("process ended before the expected output:\n" + "\n".join(lines))


def seed_for(run_id: str, fault: str, branch: int) -> int:
    """A ``--seed`` under which, at a rate of 0.5, the first attempt of this one of the
    run's three branches meets ``fault`` ("fail" or "hang") and the others' do not."""
    for seed in itertools.count():
        faults = Faults(seed=seed, **{f"{fault}_rate": 0.5})
        meets = faults.fails if fault == "fail" else faults.hangs
        first = [simulated_request("", "", 0, f"{run_id}.{n}", 1) for n in range(3)]
        if [meets(request) for request in first] == [n == branch for n in range(3)]:
            return seed
    raise AssertionError("unreachable")


def branches(db: Path, run_id: str) -> dict[str, dict[str, Any]]:
    conn = sqlite3.connect(db)
    rows = conn.execute(
        "SELECT id, state, value, attempts, failures FROM promises WHERE parent_id = ?",
        (run_id,),
    ).fetchall()
    conn.close()
    return {r[0]: {"state": r[1], "value": r[2], "attempts": r[3], "failures": r[4]} for r in rows}


def resume_json(db: Path, run_id: str, scale: str = "0.01") -> dict[str, Any]:
    proc = subprocess.run(
        cli_argv("resume", run_id, "--json"),
        env=cli_env(db, IMAGEPIPE_TIME_SCALE=scale),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    data: dict[str, Any] = json.loads(proc.stdout)
    return data


def test_sigkill_during_backoff_then_resume(
    db_path: Path, procs: list[subprocess.Popen[str]]
) -> None:
    # Abstract's first attempt fails at once and backs off 2 s x 100: killed in its back-off
    # whenever the test gets to it; the others take 1 ms x 100.
    seed = str(seed_for("k1", "fail", 2))
    args = ("-o", "fail_rate", "0.5", "-o", "fault_seed", seed, "--sim-latency", "1")
    proc = start(db_path, "run", "A futuristic city skyline", "--id", "k1", *args, scale="100")
    procs.append(proc)
    assert proc.stdout is not None
    read_until(
        proc.stdout,
        lambda lines: (
            sum("Done:" in line for line in lines) == 2
            and any("retrying in" in line for line in lines)
        ),
    )
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    before = branches(db_path, "k1")
    assert before["k1.0"]["state"] == before["k1.1"]["state"] == "resolved"
    assert before["k1.2"] == {"state": "pending", "value": None, "attempts": 1, "failures": 1}

    result = resume_json(db_path, "k1")
    after = branches(db_path, "k1")
    assert result["state"] == "resolved"
    by_style = {i["style"]: i for i in result["images"]}
    for promise_id, style in (("k1.0", "photorealistic"), ("k1.1", "cartoon")):
        assert by_style[style]["replayed"] is True
        assert after[promise_id] == before[promise_id]  # value and attempts unchanged
        assert json.loads(before[promise_id]["value"])["url"] == by_style[style]["url"]
    assert by_style["abstract"]["replayed"] is False
    assert by_style["abstract"]["attempts"] == 2  # the attempt count survived the kill
    assert after["k1.2"]["state"] == "resolved"


def test_sigkill_during_an_attempt_continues_with_the_next_attempt_number(
    db_path: Path, procs: list[subprocess.Popen[str]]
) -> None:
    # Photorealistic's first attempt hangs until the kill; cartoon's is done in 8 ms.
    seed = str(seed_for("k2", "hang", 0))
    args = ("-o", "hang_rate", "0.5", "-o", "fault_seed", seed)
    proc = start(db_path, "run", "a lighthouse", "--id", "k2", *args, scale="0.01")
    procs.append(proc)
    assert proc.stdout is not None
    read_until(proc.stdout, lambda lines: any("[cartoon]" in x and "Done:" in x for x in lines))
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    before = branches(db_path, "k2")
    assert before["k2.1"]["state"] == "resolved"
    assert before["k2.0"]["state"] == "pending"
    assert before["k2.0"]["attempts"] == 1

    # Another run in the same store is not disturbed by the dead one.
    result = resume_json(db_path, "k2")
    by_style = {i["style"]: i for i in result["images"]}
    assert by_style["cartoon"]["replayed"] is True
    assert by_style["cartoon"]["attempts"] == 1
    assert by_style["photorealistic"]["replayed"] is False
    assert by_style["photorealistic"]["attempts"] == 2  # attempt 1 was cut off by the kill
    assert branches(db_path, "k2")["k2.1"] == before["k2.1"]
    conn = sqlite3.connect(db_path)
    assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    conn.close()


@pytest.mark.parametrize(("sig", "code"), [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_a_polite_signal_leaves_a_resumable_run_and_says_how(
    db_path: Path, procs: list[subprocess.Popen[str]], sig: signal.Signals, code: int
) -> None:
    # Photorealistic's first attempt hangs until the signal; cartoon's is done in 8 ms.
    seed = str(seed_for("sig", "hang", 0))
    args = ("-o", "hang_rate", "0.5", "-o", "fault_seed", seed)
    proc = start(db_path, "run", "a lighthouse", "--id", "sig", *args, scale="0.01")
    procs.append(proc)
    assert proc.stdout is not None
    assert proc.stderr is not None
    read_until(proc.stdout, lambda lines: any("[cartoon]" in x and "Done:" in x for x in lines))
    proc.send_signal(sig)
    assert proc.wait(timeout=300) == code
    err = proc.stderr.read()
    assert f"interrupted by {sig.name}" in err
    assert "Resume with: imagepipe resume sig" in err
    assert "Traceback" not in err
    state = branches(db_path, "sig")
    assert state["sig.1"]["state"] == "resolved"
    assert state["sig.0"]["state"] == "pending"
    assert resume_json(db_path, "sig")["state"] == "resolved"
