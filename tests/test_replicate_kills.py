"""Never pay twice with Replicate: kill -9 the real CLI at random points, resume, count.

The create is a durable sub-step, so a resume after its commit polls the SAME prediction.
The one window left is between the fake billing a create and imagepipe committing its id:
a kill there leaves an orphan prediction, and the resume pays for a second one. This test
kills 10 times, about half at a random moment and half right after a create's answer was
sent (aimed at the window), and checks that every paid create beyond one per image is such an
orphan. Run with ``-s`` to see how often the window was hit.
"""

from __future__ import annotations

import functools
import json
import random
import sqlite3
import subprocess
import threading
from collections import Counter
from pathlib import Path

import pytest

from tests.fakes.replicate_server import ReplicateFake

from conftest import cli_argv, cli_env

pytest_plugins = ["tests.fakes.plugin"]
pytestmark = pytest.mark.slow

STYLES = ("oil", "ink", "chalk", "neon")
VARIATIONS = 2
BRANCHES = len(STYLES) * VARIATIONS
KILLS = 6  # scripts/crash_trials.py's job trials kill many more, outside the suite


def stored_predictions(db: Path) -> dict[str, str]:
    """Branch id -> the prediction id its committed create sub-step holds."""
    if not db.exists():
        return {}
    conn = sqlite3.connect(db)
    rows = conn.execute(
        "SELECT parent_id, value FROM promises WHERE func = 'create_prediction' "
        "AND state = 'resolved'"
    ).fetchall()
    conn.close()
    return {parent: json.loads(value)["id"] for parent, value in rows}


def branch_values(db: Path) -> dict[str, dict[str, object]]:
    conn = sqlite3.connect(db)
    rows = conn.execute(
        "SELECT id, value FROM promises WHERE func = 'generate_image' AND state = 'resolved'"
    ).fetchall()
    conn.close()
    return {pid: json.loads(value) for pid, value in rows}


def answered_since(fake: ReplicateFake, answered: int, exited: threading.Event) -> bool:
    """Whether a create was answered since there were ``answered``, or the CLI exited."""
    return fake.sent["create"] > answered or exited.is_set()


def start(db: Path, out: Path, run_id: str) -> subprocess.Popen[str]:
    """The run, or its resume: the same `run --id` resumes a run that exists (one killed
    before it had written its root is simply started again)."""
    styles = [arg for style in STYLES for arg in ("-s", style)]
    args = ["run", "a lighthouse", "--provider", "replicate", *styles]
    args += ["-n", str(VARIATIONS), "--id", run_id, "--out", str(out / run_id)]
    args += ["-o", "poll_interval", "1"]
    return subprocess.Popen(
        cli_argv(*args, "--json"),
        env=cli_env(db),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )


def test_random_kills_never_pay_for_a_second_prediction_after_the_commit(
    replicate_fake: ReplicateFake,
    db_path: Path,
    tmp_path: Path,
    procs: list[subprocess.Popen[str]],
) -> None:
    fake = replicate_fake
    fake.processing_polls = 3  # each prediction: create, 3 polls "processing", 1 final
    rng = random.Random(20240612)
    runs: list[str] = []
    finished: set[str] = set()
    orphans: set[str] = set()
    hits: Counter[str] = Counter()  # kills that landed in the window, by kind
    lost: Counter[str] = Counter()  # predictions they orphaned
    kills: Counter[str] = Counter()
    while sum(kills.values()) < KILLS or (runs and runs[-1] not in finished):
        if not runs or runs[-1] in finished:
            runs.append(f"rk{len(runs) + 1}")
        proc = start(db_path, tmp_path, runs[-1])
        procs.append(proc)
        exited = threading.Event()

        def watch(p: subprocess.Popen[str] = proc, ended: threading.Event = exited) -> None:
            p.wait()
            ended.set()
            fake.notify()

        threading.Thread(target=watch, daemon=True).start()
        if sum(kills.values()) >= KILLS:
            kind = "none"  # enough kills: let this one finish
            exited.wait(60)
        elif rng.random() < 0.5:
            kind = "right after a create's answer"
            answered = fake.sent["create"]
            fake.wait_for(functools.partial(answered_since, fake, answered, exited), timeout=60)
        else:
            # A kill at a random moment of the process's life (it lives ~1-2 s): a timed
            # wait is the point here, not a stand-in for an event.
            kind = "at a random moment"
            exited.wait(rng.uniform(0.1, 2.0))
        if proc.poll() is None:
            proc.kill()
            proc.wait()
            kills[kind] += 1
            # A create the dead process had sent may still be on its way through the fake:
            # count what it made only once every request it sent has been handled.
            fake.wait_idle()
            with fake.lock:
                created = set(fake.predictions)
            new = created - set(stored_predictions(db_path).values()) - orphans
            orphans |= new
            hits[kind] += bool(new)
            lost[kind] += len(new)
        else:
            proc.wait()
            error = proc.stderr.read() if proc.stderr else ""
            assert proc.returncode == 0, (runs[-1], proc.returncode, error)
            finished.add(runs[-1])

    fake.wait_idle()
    images = BRANCHES * len(runs)
    stored = stored_predictions(db_path)
    values = branch_values(db_path)
    assert len(values) == images
    for branch, value in values.items():
        # the branch's image came from the prediction its committed create recorded
        assert value["request_id"] == stored[branch]
        assert Path(str(value["path"])).is_file()
    with fake.lock:
        created = set(fake.predictions)
        polled = set(fake.polls)
    assert created == set(stored.values()) | orphans
    assert not orphans & polled  # an orphan was never polled: nobody waited for it
    assert fake.paid_creates == images + len(orphans)
    print(
        f"\nreplicate under {sum(kills.values())} kill -9s ({dict(kills)}): "
        f"{fake.paid_creates} paid creates for {images} images = "
        f"{fake.paid_creates / images:.2f} per image; window between a create's answer and "
        f"its commit hit by {sum(hits.values())} kills ({dict(hits)}), orphaning "
        f"{len(orphans)} predictions ({dict(lost)}); excluding them: "
        f"{(fake.paid_creates - len(orphans)) / images:.2f}"
    )
