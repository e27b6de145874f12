"""The randomized worker kills (scripts/worker_trials.py), in a short form."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).parent.parent / "scripts" / "worker_trials.py"


@pytest.mark.slow
def test_killed_workers_lose_nothing_and_run_nothing_twice() -> None:
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--trials", "1", "--seed", "3"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    summary = proc.stdout.strip().splitlines()[-1]
    match = re.fullmatch(
        r"1/1 trials ok, 0 lost, 0 re-executed, 0 unfinished, (\d+) kills", summary
    )
    assert match, summary
