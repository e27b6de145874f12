"""The randomized crash trials (scripts/crash_trials.py), in a short form."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).parent.parent / "scripts" / "crash_trials.py"


@pytest.mark.slow
def test_short_crash_trials_find_no_lost_or_repeated_work(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--trials", "10", "--seed", "11", "--keep", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr
    summary = proc.stdout.strip().splitlines()[-1]
    match = re.fullmatch(r"10/10 trials ok, 0 lost, 0 re-executed, (\d+) kills", summary)
    assert match, summary
    assert int(match.group(1)) >= 10
