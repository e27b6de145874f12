"""The randomized crash trials (scripts/crash_trials.py), in a short form."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).parent.parent / "scripts" / "crash_trials.py"


def trials(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(SCRIPT), *args, "--keep", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=600,
    )


def summary(proc: subprocess.CompletedProcess[str], kind: str) -> str:
    """The summary line of one kind of trial ("trials ok", "job trials ok", ...)."""
    [line] = [line for line in proc.stdout.splitlines() if re.match(rf"\d+/\d+ {kind} ok", line)]
    return line


@pytest.mark.slow
def test_short_crash_trials_find_no_lost_or_repeated_work(tmp_path: Path) -> None:
    proc = trials(
        tmp_path,
        *("--trials", "10", "--jobs", "3", "--takeovers", "1", "--seed", "11"),
        *("--beside", "1", "--file-takeovers", "0", "--caps", "1", "--batch", "1"),
    )
    assert proc.returncode == 0, proc.stderr
    match = re.fullmatch(
        r"10/10 trials ok, 0 lost, 0 re-executed, (\d+) kills", summary(proc, "trials")
    )
    assert match, proc.stdout
    assert int(match.group(1)) >= 10
    # kills between a job's durable sub-steps: one paid create per image, bar the window
    jobs = summary(proc, "job trials")
    match = re.fullmatch(
        r"3/3 job trials ok, (\d+) images, (\d+) paid creates \([\d.]+ per image\), "
        r"(\d+) window hits, (\d+) kills, \d+ branches resumed mid-job",
        jobs,
    )
    assert match, jobs
    images, paid, window, kills = map(int, match.groups())
    assert paid == images + window
    assert kills >= 3
    takeovers = summary(proc, "takeover trials")
    assert takeovers == "1/1 takeover trials ok (old owner exit 75, no writes after)"
    assert_beside_ok(summary(proc, "resume-beside-workers trials"))
    assert summary(proc, "cap trials").startswith("1/1 cap trials ok")
    batches = summary(proc, "batch trials")
    assert batches.startswith("1/1 batch trials ok"), batches
    assert "no branch in two batches, no input file left" in batches


def assert_beside_ok(line: str) -> None:
    """A resume beside workers, with kills of both: every image paid once, plus the calls
    the kills cut off, and nothing executed twice (issue 19, item 2)."""
    match = re.fullmatch(
        r"1/1 resume-beside-workers trials ok, (\d+) images, (\d+) paid calls "
        r"\([\d.]+ per image\), (\d+) cut by kills, 0 executed twice, (\d+) kills",
        line,
    )
    assert match, line
    images, paid, cut, _kills = map(int, match.groups())
    assert images >= 16
    assert paid == images + cut


@pytest.mark.slow
def test_kill_trials_on_postgresql_find_no_lost_or_repeated_work(
    tmp_path: Path, postgres_url: str
) -> None:
    """The same kill trials, and a resume beside workers, on PostgreSQL."""
    proc = trials(
        tmp_path,
        *("--trials", "4", "--jobs", "0", "--takeovers", "0", "--seed", "12"),
        *("--beside", "1", "--file-takeovers", "0", "--caps", "0", "--batch", "0"),
        *("--db", postgres_url),
    )
    assert proc.returncode == 0, proc.stderr
    line = summary(proc, "trials")
    assert re.fullmatch(r"4/4 trials ok, 0 lost, 0 re-executed, \d+ kills", line), line
    assert_beside_ok(summary(proc, "resume-beside-workers trials"))


@pytest.mark.slow
def test_a_stale_owner_continued_after_a_takeover_leaves_the_files_as_stored(
    tmp_path: Path,
) -> None:
    """A run SIGSTOPped mid-request, taken over and finished by `resume`, then continued:
    the old owner exits 75 and `imagepipe verify` finds every file as the store has it."""
    proc = trials(
        tmp_path,
        *("--trials", "0", "--jobs", "0", "--takeovers", "0", "--seed", "13"),
        *("--beside", "0", "--file-takeovers", "1", "--caps", "0", "--batch", "0"),
    )
    line = summary(proc, "takeover-with-files trials")
    assert line.startswith("1/1 takeover-with-files trials ok"), proc.stderr
    assert proc.returncode == 0, proc.stderr
