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
        [
            sys.executable,
            str(SCRIPT),
            "--trials",
            "10",
            "--jobs",
            "3",
            "--takeovers",
            "1",
            "--seed",
            "11",
            "--keep",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr
    summary, jobs, takeovers = proc.stdout.strip().splitlines()[-3:]
    match = re.fullmatch(r"10/10 trials ok, 0 lost, 0 re-executed, (\d+) kills", summary)
    assert match, summary
    assert int(match.group(1)) >= 10
    # kills between a job's durable sub-steps: one paid create per image, bar the window
    match = re.fullmatch(
        r"3/3 job trials ok, (\d+) images, (\d+) paid creates \([\d.]+ per image\), "
        r"(\d+) window hits, (\d+) kills, \d+ branches resumed mid-job",
        jobs,
    )
    assert match, jobs
    images, paid, window, kills = map(int, match.groups())
    assert paid == images + window
    assert kills >= 3
    assert takeovers == "1/1 takeover trials ok (old owner exit 75, no writes after)"
