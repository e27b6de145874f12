"""Two more kinds of crash trial, run by ``scripts/crash_trials.py`` after its own:

- **job trials**: runs of the real CLI with ``--provider replicate`` against the loopback
  fake of Replicate's API (in this process, on 127.0.0.1), whose predictions stay
  ``processing`` for a few polls. Each run is SIGKILLed at random moments (before, during
  and after the durable sub-step that records "prediction created, id X") and resumed
  until it settles. Checked: every branch resolves once, with a whole file whose sha256
  the store holds; and the fake's paid creates per image, which must be 1 except where
  a kill fell between the create's answer and its commit (counted as "window hits").
- **takeover trials**: a run is SIGSTOPped, left past its lease timeout, taken over and
  finished by ``resume``, then SIGCONTed. The old owner must exit 75 and write nothing
  more: the store is compared before and after it wakes.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import signal
import sqlite3
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # the fakes live with the tests

from tests.fakes.replicate_server import ReplicateFake  # noqa: E402

__all__ = ["JobSummary", "TakeoverSummary", "job_trials", "takeover_trials"]

STYLES = ["watercolor", "sketch", "pixel-art", "ink wash", "neon noir", "cartoon"]


@dataclass
class JobSummary:
    trials: int = 0
    ok: int = 0
    images: int = 0
    paid: int = 0
    window_hits: int = 0
    kills: int = 0
    #: branches whose attempt was cut off after their create was stored: a resume polled it
    resumed_mid_job: int = 0
    problems: list[str] = field(default_factory=list)

    def line(self) -> str:
        ratio = self.paid / self.images if self.images else 0.0
        return (
            f"{self.ok}/{self.trials} job trials ok, {self.images} images, {self.paid} paid "
            f"creates ({ratio:.2f} per image), {self.window_hits} window hits, {self.kills} kills, "
            f"{self.resumed_mid_job} branches resumed mid-job"
        )


@dataclass
class TakeoverSummary:
    trials: int = 0
    ok: int = 0
    problems: list[str] = field(default_factory=list)

    def line(self) -> str:
        return f"{self.ok}/{self.trials} takeover trials ok (old owner exit 75, no writes after)"


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "imagepipe", *args]


def _env(db: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("IMAGEPIPE_")}
    env.update(IMAGEPIPE_DB=str(db), NO_COLOR="1", TERM="dumb", PYTHONUNBUFFERED="1")
    env.update(extra)
    return env


def _branches(db: Path, run_id: str) -> list[tuple[str, str, str | None]]:
    with sqlite3.connect(db) as conn:
        return conn.execute(
            "SELECT id, state, value FROM promises WHERE parent_id = ? ORDER BY seq", (run_id,)
        ).fetchall()


def job_trials(count: int, seed: int, workdir: Path) -> JobSummary:
    summary = JobSummary()
    rng = random.Random(seed)
    fake = ReplicateFake(api_key="r8-trials", time_scale=0.01)
    fake.processing_polls = 3
    url = fake.start()
    db = workdir / "jobs.db"
    try:
        for n in range(count):
            summary.trials += 1
            problems = _one_job_trial(rng, fake, url, db, workdir, f"job-{seed}-{n}", summary)
            if problems:
                summary.problems += problems
            else:
                summary.ok += 1
    finally:
        fake.stop()
    return summary


def _one_job_trial(
    rng: random.Random,
    fake: ReplicateFake,
    url: str,
    db: Path,
    workdir: Path,
    run_id: str,
    summary: JobSummary,
) -> list[str]:
    styles = rng.sample(STYLES, rng.randint(2, 5))
    prompt = f"trial {run_id}"
    env = _env(
        db,
        REPLICATE_API_TOKEN="r8-trials",
        REPLICATE_BASE_URL=url,
        IMAGEPIPE_TIME_SCALE="0.01",
    )
    args = [
        "run",
        prompt,
        "--provider",
        "replicate",
        "--id",
        run_id,
        "--json",
        "--out",
        str(workdir / run_id),
        "-o",
        "poll_interval",
        "5",
    ]
    for style in styles:
        args += ["-s", style]
    command = _cli(*args)
    for _ in range(rng.randint(1, 3)):  # kill it a few times, at random moments
        proc = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        time.sleep(rng.uniform(0.15, 0.6))
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            summary.kills += 1
        proc.wait()  # then `run --id` again: it resumes the run, or starts it if it never began
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=120)
    problems = []
    if done.returncode != 0:
        return [f"{run_id}: the last resume exited {done.returncode}: {done.stderr.strip()}"]
    output = json.loads(done.stdout)
    stored = _branches(db, run_id)
    if [state for _, state, _ in stored] != ["resolved"] * len(styles):
        problems.append(f"{run_id}: branches {[s for _, s, _ in stored]}")
    for branch_id, _, value in stored:
        image = json.loads(value or "{}")
        path = Path(image.get("path") or "/nonexistent")
        if not path.is_file() or hashlib.sha256(path.read_bytes()).hexdigest() != image["sha256"]:
            problems.append(f"{branch_id}: the file is missing or not the stored one")
    if len(output["images"]) != len(styles):
        problems.append(f"{run_id}: {len(output['images'])} images in the JSON")
    with fake.lock:
        paid = sum(n for p, n in fake.paid_by_prompt.items() if p.startswith(prompt + ","))
        paid += fake.paid_by_prompt.get(prompt, 0)
    with sqlite3.connect(db) as conn:
        summary.resumed_mid_job += conn.execute(
            "SELECT count(*) FROM promises b WHERE b.parent_id = ? AND b.attempts > 1"
            " AND EXISTS (SELECT 1 FROM promises s WHERE s.parent_id = b.id)",
            (run_id,),
        ).fetchone()[0]
    summary.images += len(styles)
    summary.paid += paid
    summary.window_hits += max(0, paid - len(styles))
    if paid < len(styles):
        problems.append(f"{run_id}: {paid} paid creates for {len(styles)} images")
    return problems


def _snapshot(db: Path) -> list[object]:
    with sqlite3.connect(db) as conn:
        return [
            conn.execute("SELECT * FROM promises ORDER BY id").fetchall(),
            conn.execute("SELECT * FROM attempts ORDER BY promise_id, attempt").fetchall(),
            conn.execute("SELECT key, owner, epoch FROM leases ORDER BY key").fetchall(),
        ]


def _lease_age(db: Path, run_id: str) -> float:
    """Seconds since the run's owner last renewed its lease; -1 while it has none."""
    if not db.exists():
        return -1.0
    with sqlite3.connect(db) as conn:
        if not conn.execute("SELECT 1 FROM sqlite_master WHERE name = 'leases'").fetchone():
            return -1.0
        row = conn.execute(
            "SELECT (julianday('now') - 2440587.5) * 86400.0 - heartbeat_at FROM leases"
            " WHERE key = ? AND owner IS NOT NULL",
            (run_id,),
        ).fetchone()
    return -1.0 if row is None else float(row[0])


def takeover_trials(count: int, seed: int, workdir: Path) -> TakeoverSummary:
    summary = TakeoverSummary()
    rng = random.Random(seed)
    db = workdir / "takeover.db"
    for n in range(count):
        summary.trials += 1
        run_id = f"takeover-{seed}-{n}"
        problems = _one_takeover(rng, db, run_id, workdir)
        if problems:
            summary.problems += problems
        else:
            summary.ok += 1
    return summary


def _one_takeover(rng: random.Random, db: Path, run_id: str, workdir: Path) -> list[str]:
    env = _env(db, IMAGEPIPE_TIME_SCALE="0.5", IMAGEPIPE_LEASE_TIMEOUT="1")
    args = [
        "run",
        "a fox",
        "--id",
        run_id,
        "-n",
        str(rng.randint(2, 4)),
        "-o",
        "fail_rate",
        "0.3",
        "-o",
        "fault_seed",
        str(rng.randint(0, 999)),
        "--sim-latency",
        "3000",
        "--out",
        str(workdir / run_id),
    ]
    owner = subprocess.Popen(
        _cli(*args), env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        deadline = time.monotonic() + 20
        while _lease_age(db, run_id) < 0 and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(rng.uniform(0.0, 0.8))
        owner.send_signal(signal.SIGSTOP)
        while 0 <= _lease_age(db, run_id) < 1.5 and time.monotonic() < deadline:
            time.sleep(0.05)
        taken = subprocess.run(
            _cli("resume", run_id, "--json"), env=env, capture_output=True, text=True, timeout=60
        )
        if taken.returncode not in (0, 1):
            return [f"{run_id}: resume exited {taken.returncode}: {taken.stderr.strip()}"]
        before = _snapshot(db)
    finally:
        owner.send_signal(signal.SIGCONT)
    _, err = owner.communicate(timeout=60)
    after = _snapshot(db)
    problems = []
    if owner.returncode != 75:
        problems.append(f"{run_id}: the old owner exited {owner.returncode}, not 75: {err.strip()}")
    elif "lost run" not in err:
        problems.append(f"{run_id}: the old owner did not say it lost the run: {err.strip()}")
    if after != before:
        problems.append(f"{run_id}: the old owner wrote after it was taken over")
    return problems
