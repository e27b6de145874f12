#!/usr/bin/env python3
"""Randomized kills of ``imagepipe worker`` processes sharing detached runs.

Each trial records a detached run (random size, failure rate and seed), starts three
workers, SIGKILLs a random worker at random moments and starts a new one in its place,
until the run settles. Checked, from the store and from the provider-call log that the
workers write (the tests' ``calllog`` provider, ``tests/plugins``: the simulated provider
writing ``IMAGEPIPE_TEST_CALL_LOG``):

- **lost**: a branch seen resolved before a kill that is not resolved, with the same
  value, afterwards;
- **re-executed**: a provider call for a branch after it had resolved, or two calls for
  the same attempt of a branch;
- **unfinished**: a run whose root has not settled when the last worker has drained the
  queue.

Prints ``20/20 trials ok, 0 lost, 0 re-executed, 0 unfinished, 61 kills`` and exits
non-zero if any trial broke a rule. ``--db postgresql://...`` runs them on PostgreSQL
(each trial in its own runs; the database is not emptied first); the default is a SQLite
file in a temporary directory.

    python scripts/worker_trials.py [--trials 20] [--seed 1] [--db URL]
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
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

LEASE = "2"
#: the tests' provider plugins: ``-p calllog`` is the simulated provider, each call logged
PLUGINS = Path(__file__).resolve().parent.parent / "tests" / "plugins"


@dataclass
class Result:
    kills: int = 0
    lost: int = 0
    re_executed: int = 0
    unfinished: int = 0
    problems: list[str] = field(default_factory=list)


def cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "imagepipe", *args]


def env_for(db: str, calls: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("IMAGEPIPE_")}
    env.update(
        IMAGEPIPE_DB=db,
        IMAGEPIPE_TIME_SCALE="0.1",
        IMAGEPIPE_LEASE_TIMEOUT=LEASE,
        IMAGEPIPE_TEST_CALL_LOG=str(calls),
        PYTHONPATH=os.pathsep.join([str(PLUGINS), *filter(None, [env.get("PYTHONPATH")])]),
        NO_COLOR="1",
        TERM="dumb",
    )
    return env


def branches(env: dict[str, str], run_id: str) -> dict[str, dict[str, Any]]:
    shown = subprocess.run(
        cli("show", run_id, "--json"), env=env, capture_output=True, text=True, check=True
    )
    return {b["id"]: b for b in json.loads(shown.stdout)["branches"]}


def trial(rng: random.Random, db: str, work: Path, run_id: str) -> Result:
    result = Result()
    calls = work / f"{run_id}.calls"
    env = env_for(db, calls)
    spec = [
        "run",
        "a fox",
        "-s",
        "cartoon",
        "-s",
        "sketch",
        "-n",
        str(rng.randint(20, 60)),
        "--id",
        run_id,
        "-o",
        "fail_rate",
        "0.2",
        "-o",
        "fault_seed",
        str(rng.randint(0, 999)),
        "-p",
        "calllog",
        "--detach",
    ]
    subprocess.run(cli(*spec), env=env, check=True, capture_output=True)
    worker = cli("worker", "--once", "-c", "8", "--sim-latency", "3000", "-o", "fail_rate", "0.2")
    running = [
        subprocess.Popen(worker, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        for _ in range(3)
    ]
    resolved: dict[str, Any] = {}
    deadline = time.monotonic() + 120
    for _ in range(rng.randint(1, 4)):
        time.sleep(rng.uniform(0.2, 1.5))
        for branch_id, b in branches(env, run_id).items():
            if b["state"] == "resolved":
                resolved.setdefault(branch_id, b["value"])
        victim = rng.choice(running)
        if victim.poll() is None:
            victim.send_signal(signal.SIGKILL)
            result.kills += 1
        victim.wait()
        running.remove(victim)
        running.append(
            subprocess.Popen(worker, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        )
    for proc in running:
        proc.wait(timeout=max(1.0, deadline - time.monotonic()))
    after = branches(env, run_id)
    for branch_id, value in resolved.items():
        if after[branch_id]["state"] != "resolved" or after[branch_id]["value"] != value:
            result.lost += 1
            result.problems.append(f"{branch_id}: resolved before a kill, not after")
    made = Counter(
        (line.split()[0], int(line.split()[1]))
        for line in (calls.read_text().splitlines() if calls.exists() else [])
        if line
    )
    for (branch_id, attempt), n in made.items():
        if n > 1 or attempt > after[branch_id]["attempts"]:
            result.re_executed += 1
            result.problems.append(f"{branch_id}: attempt {attempt} called {n} times")
    listed = subprocess.run(cli("list", "--json"), env=env, capture_output=True, text=True)
    state = {r["id"]: r["state"] for r in json.loads(listed.stdout)}.get(run_id)
    if state == "pending":
        result.unfinished += 1
        result.problems.append(f"{run_id}: unfinished after its workers drained the queue")
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trials", type=int, default=20)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--db", help="the store (default: a SQLite file in a temporary dir)")
    args = parser.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="imagepipe-workers-"))
    db = args.db or str(work / "workers.db")
    rng = random.Random(args.seed)
    results = []
    for n in range(args.trials):
        run_id = f"wt-{args.seed}-{n}-{rng.randint(0, 1 << 30)}"
        result = trial(rng, db, work, run_id)
        results.append(result)
        for problem in result.problems:
            print(f"trial {run_id} FAILED: {problem}", file=sys.stderr)
    ok = sum(not r.problems for r in results)
    total = Result(
        kills=sum(r.kills for r in results),
        lost=sum(r.lost for r in results),
        re_executed=sum(r.re_executed for r in results),
        unfinished=sum(r.unfinished for r in results),
    )
    print(
        f"{ok}/{len(results)} trials ok, {total.lost} lost, {total.re_executed} re-executed, "
        f"{total.unfinished} unfinished, {total.kills} kills"
    )
    return 0 if ok == len(results) else 1


if __name__ == "__main__":
    sys.exit(main())
