"""Batch crash trials, run by ``scripts/crash_trials.py --batch N`` (or alone): a run sent
through the loopback fake of OpenAI's Files and Batches APIs is SIGKILLed at random moments,
in ``run --batch`` and in the ``resume`` processes that send and collect its batches, until
a last ``resume`` finishes it.

The fake runs in this process (its clock faster than the wall clock), so its records are
read directly. Checked after each trial:

- the run resolved, every branch once, each image on disk as its value records it
  (``imagepipe verify``);
- no branch was sent in two batches, no input file made two batches, and every uploaded
  file either made a batch or was deleted (none left behind);
- every batch of the run was collected and its input file deleted.

Usage: ``python scripts/batch_trials.py [--trials N] [--seed S] [--db postgresql://...]``.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # the fakes live with the tests

from tests.fakes.openai_batch_server import FakeClock, OpenAIBatchFake  # noqa: E402

__all__ = ["BatchSummary", "batch_trials"]

PROMPTS = 30  # x 3 styles: 90 branches, in batches of 40 (three batches)
BATCH_SIZE = 40


@dataclass
class BatchSummary:
    trials: int = 0
    ok: int = 0
    kills: int = 0
    images: int = 0
    batches: int = 0
    uploads: int = 0
    problems: list[str] = field(default_factory=list)

    def line(self) -> str:
        return (
            f"{self.ok}/{self.trials} batch trials ok, {self.kills} kills; {self.images} "
            f"images from {self.batches} batches ({self.uploads} uploads), no branch in two "
            f"batches, no input file left" + ("" if not self.problems else "; PROBLEMS")
        )


def _env(db: str, url: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("IMAGEPIPE_", "OPENAI_"))}
    env.update(
        IMAGEPIPE_DB=db,
        IMAGEPIPE_TIME_SCALE="0.01",
        IMAGEPIPE_BATCH_SIZE=str(BATCH_SIZE),
        IMAGEPIPE_LEASE_TIMEOUT="2",
        OPENAI_API_KEY="sk-batch-trials",
        OPENAI_BASE_URL=url,
        PYTHONPATH=str(ROOT),
    )
    return env


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "imagepipe", *args]


def batch_trials(count: int, seed: int, workdir: Path, db_url: str | None = None) -> BatchSummary:
    summary = BatchSummary()
    rng = random.Random(seed)
    for n in range(count):
        summary.trials += 1
        problems = _one_trial(rng, workdir / f"batch{n}", db_url, n, summary)
        if problems:
            summary.problems += [f"trial {n}: {p}" for p in problems]
        else:
            summary.ok += 1
    return summary


def _one_trial(
    rng: random.Random, folder: Path, db_url: str | None, n: int, summary: BatchSummary
) -> list[str]:
    folder.mkdir(parents=True)
    prompts = folder / "prompts.txt"
    prompts.write_text("".join(f"trial {n} prompt {i}\n" for i in range(PROMPTS)))
    fake = OpenAIBatchFake(api_key="sk-batch-trials", clock=FakeClock(rate=4), seed=n)
    fake.start(0)
    run_id = f"bt{n}"
    db = db_url or str(folder / "store.db")
    env = _env(db, fake.url)
    out = folder / "images"
    first = _cli("run", "--prompts", str(prompts), "-p", "openai", "-o", "model", "gpt-image-1")
    first += ["--batch", "--id", run_id, "--out", str(out), "-q"]
    try:
        for _ in range(rng.randint(3, 8)):  # killed at random moments, then again
            # `run` with the id of an unfinished run resumes it (or starts it, if the kill
            # came before the run was recorded)
            proc = subprocess.Popen(
                first, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
            )
            time.sleep(rng.uniform(0.2, 1.6))
            if proc.poll() is None:
                proc.send_signal(signal.SIGKILL)
                summary.kills += 1
            proc.wait()
        done = subprocess.run([*first[:-1], "--json"], env=env, capture_output=True, timeout=600)
        if done.returncode != 0:
            return [f"the last run exited {done.returncode}: {done.stderr.decode()[-300:]}"]
        verified = subprocess.run(_cli("verify", run_id), env=env, capture_output=True)
        if verified.returncode != 0:
            return [f"verify exited {verified.returncode}: {verified.stdout.decode()[-300:]}"]
        return _check(json.loads(done.stdout), fake, out, summary)
    finally:
        fake.stop()


def _check(
    result: dict[str, object], fake: OpenAIBatchFake, out: Path, summary: BatchSummary
) -> list[str]:
    problems = []
    images = result.get("images")
    assert isinstance(images, list)
    if result.get("state") != "resolved" or len(images) != PROMPTS * 3:
        problems.append(f"the run is {result.get('state')} with {len(images)} images")
    for image in images:  # (verify checked each file against the sha256 the store holds)
        path = Path(str(image.get("path")))
        if not path.is_file():
            problems.append(f"{path.name} is missing")
    on_disk = sorted(p.name for p in out.iterdir() if p.suffix == ".png")
    if len(on_disk) != PROMPTS * 3:
        problems.append(f"{len(on_disk)} images on disk for {PROMPTS * 3} branches")
    twice = {c: b for c, b in fake.batches_of().items() if len(b) > 1}
    if twice:
        problems.append(f"{len(twice)} branches in two batches, e.g. {next(iter(twice.items()))}")
    made_twice = [f for f, times in fake.creates_by_input_file().items() if times > 1]
    if made_twice:
        problems.append(f"input files that made two batches: {made_twice}")
    left = [u.file_id for u in fake.uploads if u.file_id not in fake.deleted]
    if left:
        problems.append(f"input files left at the provider: {left}")
    summary.images += len(images)
    summary.batches += len(fake.created)
    summary.uploads += len(fake.uploads)
    return problems


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trials", type=int, default=10)
    parser.add_argument("--seed", type=int, default=22)
    parser.add_argument("--db", default=None, help="a PostgreSQL URL (default: SQLite files)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        summary = batch_trials(args.trials, args.seed, Path(tmp), args.db)
    print(summary.line())
    for problem in summary.problems:
        print(" ", problem)
    sys.exit(1 if summary.problems else 0)


if __name__ == "__main__":
    main()
