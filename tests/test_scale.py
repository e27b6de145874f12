"""Correctness at scale (timings live in scripts/bench.py, not here)."""

from __future__ import annotations

import json
import signal
import sqlite3
import subprocess
from pathlib import Path
from typing import Any

import pytest

from conftest import cli_argv, cli_env

pytestmark = pytest.mark.slow
N = 2_000


def stored(db: Path) -> dict[str, tuple[Any, ...]]:
    conn = sqlite3.connect(db)
    try:
        rows = conn.execute(
            "SELECT id, state, value, attempts FROM promises WHERE parent_id = 'big'"
        ).fetchall()
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    finally:
        conn.close()
    return {r[0]: r[1:] for r in rows}


def test_two_thousand_branches_with_failures_survive_a_kill(db_path: Path) -> None:
    # small images: this is about 2,000 durable branches, not about drawing 2,000 PNGs
    flags = ["-o", "fail_rate", "0.3", "-o", "fault_seed", "4", "--max-attempts", "10", "-c", "64"]
    flags += ["--sim-latency", "20", "-o", "size", "8x8"]
    env = cli_env(db_path, IMAGEPIPE_TIME_SCALE="0.001")
    proc = subprocess.Popen(
        cli_argv(
            "run",
            "many cats",
            "--id",
            "big",
            "-s",
            "cartoon",
            "-s",
            "abstract",
            "-n",
            str(N // 2),
            *flags,
        ),
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    assert proc.stdout is not None
    done = 0
    for line in proc.stdout:
        done += "Done: " in line
        if done == N // 4:
            break
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    proc.stdout.close()
    before = stored(db_path)
    assert len(before) == N, "every branch was created before any ran"
    resolved_before = {k: v for k, v in before.items() if v[0] == "resolved"}
    assert len(resolved_before) >= N // 4  # everything reported done is in the store
    assert any(v[0] == "pending" for v in before.values())

    result = subprocess.run(
        cli_argv("resume", "big", "--json", *flags),
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    assert data["state"] == "resolved"
    assert len(data["images"]) == N
    assert len({i["url"] for i in data["images"]}) == N, "every variation has its own URL"
    after = stored(db_path)
    assert all(v[0] == "resolved" for v in after.values())
    assert all(after[k] == v for k, v in resolved_before.items()), "no resolved branch re-ran"
    replayed = sum(i["replayed"] for i in data["images"])
    assert replayed == len(resolved_before)
    retried = sum(i["attempts"] > 1 for i in data["images"])
    assert retried > N // 10, "the injected failures were retried"
