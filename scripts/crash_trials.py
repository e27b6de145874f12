#!/usr/bin/env python3
"""Randomized crash testing of imagepipe against an oracle.

Each trial starts a run of the real CLI as a subprocess with random styles, variations,
failure rate, crash mode and time scale; SIGKILLs it at a random moment (sometimes at
once, before anything is committed; sometimes after a random number of events; sometimes
while a branch backs off; sometimes several times in a row); then resumes until the run
is settled, and checks:

- every attempt ended as the injected faults say it must (the simulated provider is
  deterministic per seed, branch and attempt), a branch is rejected exactly when its
  budget is used up or its style is refused, and the run fails exactly when a branch is
  rejected (exit 1) and resolves otherwise (exit 0);
- every image reported done before a kill is in the store after it;
- no branch settled before a kill runs again or changes value (lost / re-executed);
- attempt counts never go down;
- the final JSON lists exactly the resolved branches, marking the earlier ones replayed;
- the database passes ``PRAGMA integrity_check``.

Prints one line such as ``100/100 trials ok, 0 lost, 0 re-executed, 213 kills`` and exits
non-zero if any trial broke a rule. The test suite runs a short form of it.

Then it runs the job trials (kills between the durable sub-steps of a job-style provider)
and the takeover trials of ``scripts/job_trials.py``, and the resume-beside-workers,
takeover-with-files and cap trials of ``scripts/executor_trials.py``, and the batch trials of
``scripts/batch_trials.py`` (kills of runs sent through the Batch API fake), one summary
line each.

The kill trials and the executor trials run on SQLite (a file in the work directory), or
on PostgreSQL: ``--db postgresql://...`` (runs are added to that database), or
``--postgres`` (a throw-away server started in the work directory, as the tests do). The
job and takeover trials of ``job_trials.py`` always use SQLite.

    python scripts/crash_trials.py [--trials 100] [--jobs 10] [--takeovers 5] [--beside 5]
                                   [--file-takeovers 3] [--caps 5] [--batch 5] [--seed 1]
                                   [--workers 2]
                                   [--db URL | --postgres] [--keep DIR]
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
import threading
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from executor_trials import (
    StoreReader,
    beside_trials,
    cap_trials,
    embedded_postgres,
    file_takeover_trials,
)

from imagepipe.providers import SimulatedProvider
from imagepipe.providers.simulated import SimulatedOptions, simulated_request
from imagepipe.runs.model import BranchArgs
from imagepipe.styles import BUILTIN_TEMPLATES

KNOWN_STYLES = list(BUILTIN_TEMPLATES)

PROMPT = "A futuristic city skyline"
#: the error each simulated fault raises (None: the attempt succeeds)
EXPECTED_ERROR = {
    None: None,
    "crash": "ProviderTimeout",
    "refuse": "InvalidRequest",
    "transient": "TransientProviderError",
}


@dataclass
class Plan:
    """One trial's random choices."""

    run_id: str
    styles: list[str]
    variations: int
    crash: bool
    fail_rate: float
    fail_style: str | None
    fault_seed: int
    max_attempts: int
    time_scale: float
    #: (how, after how many events or "Done" lines); how is one of: immediately (before
    #: anything is committed), after-events, after-done, during-backoff
    kills: list[tuple[str, int]]

    @classmethod
    def draw(cls, rng: random.Random, index: int) -> Plan:
        styles = rng.sample(KNOWN_STYLES, rng.randint(1, 4))
        variations = rng.randint(1, 3)
        count = len(styles) * variations
        kills: list[tuple[str, int]] = []
        for _ in range(rng.choice([1, 1, 1, 2, 2, 3])):
            how = rng.choice(
                ["immediately", "after-events", "after-done", "after-done", "during-backoff"]
            )
            kills.append((how, rng.randint(1, 2 * count if how == "after-events" else count)))
        return cls(
            run_id=f"trial-{index}",
            styles=styles,
            variations=variations,
            crash=rng.random() < 0.3,
            fail_rate=rng.choice([0.0, 0.2, 0.4, 0.6]),
            fail_style=rng.choice(styles) if rng.random() < 0.15 else None,
            fault_seed=rng.randint(0, 10_000),
            max_attempts=rng.randint(2, 5),
            time_scale=rng.choice([0.002, 0.005, 0.01, 0.02]),
            kills=kills,
        )

    def fault_flags(self) -> list[str]:
        flags = ["-o", "fail_rate", str(self.fail_rate), "-o", "fault_seed", str(self.fault_seed)]
        flags += ["--max-attempts", str(self.max_attempts)]
        if self.fail_style:
            flags += ["-o", "fail_style", self.fail_style]
        return flags

    def provider(self) -> SimulatedProvider:
        return SimulatedProvider(
            SimulatedOptions(
                fail_rate=self.fail_rate, fault_seed=self.fault_seed, fail_style=self.fail_style
            )
        )


@dataclass
class Result:
    ok: bool = True
    problems: list[str] = field(default_factory=list)
    lost: int = 0
    re_executed: int = 0
    kills: int = 0

    def fail(self, problem: str) -> None:
        self.ok = False
        self.problems.append(problem)


def branches(db: StoreReader, run_id: str) -> dict[str, dict[str, Any]]:
    rows = db.query(
        "SELECT id, args, state, value, attempts FROM promises WHERE parent_id = ?", run_id
    )
    return {
        r[0]: {"args": json.loads(r[1]), "state": r[2], "value": r[3], "attempts": r[4]}
        for r in rows
    }


def attempts(db: StoreReader, run_id: str) -> dict[str, list[tuple[int, str | None]]]:
    rows = db.query(
        "SELECT a.promise_id, a.attempt, a.error FROM attempts a JOIN promises p"
        " ON p.id = a.promise_id WHERE p.parent_id = ? ORDER BY a.promise_id, a.attempt",
        run_id,
    )
    found: dict[str, list[tuple[int, str | None]]] = {}
    for promise_id, attempt, error in rows:
        kind = None if error is None else json.loads(error)["type"]
        found.setdefault(promise_id, []).append((attempt, kind))
    return found


class Trial:
    def __init__(self, plan: Plan, db: str) -> None:
        self.plan = plan
        self.db = StoreReader(db)
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("IMAGEPIPE_")}
        self.env.update(
            IMAGEPIPE_DB=db,
            IMAGEPIPE_TIME_SCALE=str(plan.time_scale),
            PYTHONUNBUFFERED="1",
            NO_COLOR="1",
            TERM="dumb",
        )
        self.result = Result()
        self.settled_before: dict[str, dict[str, Any]] = {}
        self.last_seen: dict[str, dict[str, Any]] = {}

    def argv(self, first: bool) -> list[str]:
        cli = [sys.executable, "-m", "imagepipe"]
        if not first:
            return [*cli, "resume", self.plan.run_id, *self.plan.fault_flags()]
        spec = ["run", PROMPT, "--id", self.plan.run_id, "-n", str(self.plan.variations)]
        for style in self.plan.styles:
            spec += ["-s", style]
        if self.plan.crash:
            spec.append("--crash")
        return [*cli, *spec, *self.plan.fault_flags()]

    def kill_once(self, first: bool, how: str, after: int) -> None:
        proc = subprocess.Popen(
            self.argv(first),
            env=self.env,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
        )
        assert proc.stdout is not None
        reported: list[str] = []  # URLs the process said were done before it died
        if how != "immediately":
            events = done = 0
            for line in proc.stdout:
                events += line.startswith("[")
                if "Done: " in line:
                    done += 1
                    reported.append(line.rsplit("Done: ", 1)[1].strip())
                if how == "during-backoff" and "retrying in" in line:
                    break
                if how == "after-events" and events >= after:
                    break
                if how == "after-done" and done >= after:
                    break
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        proc.stdout.close()
        self.result.kills += 1
        self.check_snapshot()
        stored = {json.loads(b["value"])["url"] for b in self.last_seen.values() if b["value"]}
        for url in reported:
            if url not in stored:
                self.result.lost += 1
                self.result.fail(f"{url} was reported done but is not in the store")

    def check_snapshot(self) -> None:
        """After a kill: nothing settled earlier changed or ran again; no count went down."""
        now = branches(self.db, self.plan.run_id)
        for promise_id, before in self.settled_before.items():
            after = now.get(promise_id)
            if (
                after is None
                or after["state"] != before["state"]
                or after["value"] != before["value"]
            ):
                self.result.lost += 1
                self.result.fail(f"{promise_id} lost its {before['state']} outcome")
            elif after["attempts"] != before["attempts"]:
                self.result.re_executed += 1
                self.result.fail(f"{promise_id} was executed again after it settled")
        for promise_id, before in self.last_seen.items():
            if now.get(promise_id, {}).get("attempts", 0) < before["attempts"]:
                self.result.fail(f"{promise_id} attempt count went down")
        self.last_seen = now
        self.settled_before = {k: v for k, v in now.items() if v["state"] != "pending"}

    def finish(self) -> None:
        for _ in range(5):
            proc = subprocess.run(
                [*self.argv(first=False), "--json"],
                env=self.env,
                capture_output=True,
                text=True,
                timeout=300,
            )
            if proc.returncode in (0, 1):
                self.check_snapshot()
                self.check_final(proc.returncode, json.loads(proc.stdout))
                return
            if proc.returncode == 2 and "no run with id" in proc.stderr:
                # Killed before the run was recorded: nothing was promised; start it again.
                self.kill_free_start()
                continue
            self.result.fail(f"resume exited {proc.returncode}: {proc.stderr.strip()}")
            return
        self.result.fail("the run never settled")

    def kill_free_start(self) -> None:
        subprocess.run(self.argv(first=True), env=self.env, capture_output=True, timeout=300)

    def check_final(self, code: int, output: dict[str, Any]) -> None:
        plan, provider = self.plan, self.plan.provider()
        stored = branches(self.db, plan.run_id)
        history = attempts(self.db, plan.run_id)
        expected_count = len(plan.styles) * plan.variations
        if len(stored) != expected_count:
            self.result.fail(f"{len(stored)} branches stored, {expected_count} expected")
        any_rejected = False
        for promise_id, branch in stored.items():
            args = BranchArgs.read(branch["args"])
            prompt, style, variation, crash = args.prompt, args.style, args.variation, args.crash
            tried = history.get(promise_id, [])
            # Only failed attempts have a row; the others succeeded or were cut off.
            failed_at = dict(tried)
            if any(n > branch["attempts"] for n in failed_at):
                self.result.fail(f"{promise_id}: failed attempt beyond the count {tried}")
            tried = [(n, failed_at.get(n)) for n in range(1, branch["attempts"] + 1)]
            for number, error in tried:
                request = simulated_request(prompt, style, variation, promise_id, number, crash)
                expected = EXPECTED_ERROR[provider.fault_for(request)]
                if error is not None and error != expected:
                    self.result.fail(f"{promise_id} #{number} failed with {error}, not {expected}")
                # An attempt without an error is either the one that resolved the branch
                # (the last) or one cut off by a kill, which may have met any fault.
                resolved_it = number == branch["attempts"] and branch["state"] == "resolved"
                if error is None and resolved_it and expected is not None:
                    self.result.fail(f"{promise_id} #{number} resolved despite {expected}")
            if branch["state"] == "rejected" and tried and tried[-1][1] is None:
                self.result.fail(f"{promise_id} rejected without a failed last attempt")
            failures = [e for _, e in tried if e is not None]
            if branch["state"] == "rejected":
                any_rejected = True
                budget_used = len(failures) >= plan.max_attempts
                if not (budget_used or failures[-1:] == ["InvalidRequest"]):
                    self.result.fail(f"{promise_id} rejected with budget left: {tried}")
            elif branch["state"] == "resolved":
                if "InvalidRequest" in failures or len(failures) >= plan.max_attempts:
                    self.result.fail(f"{promise_id} resolved though it should be rejected")
            else:
                self.result.fail(f"{promise_id} still {branch['state']} after the run ended")
        if (code == 1) != any_rejected or output["state"] != (
            "failed" if any_rejected else "resolved"
        ):
            self.result.fail(f"exit {code} / state {output['state']} but rejected={any_rejected}")
        in_order = sorted(stored.items(), key=lambda kv: int(kv[0].rsplit(".", 1)[1]))
        urls = [json.loads(b["value"])["url"] for _, b in in_order if b["state"] == "resolved"]
        if [i["url"] for i in output["images"]] != urls:
            self.result.fail("the JSON images differ from the stored resolved branches")
        check = self.db.integrity()
        if check != "ok":
            self.result.fail(f"integrity_check: {check}")

    def run(self) -> Result:
        for n, (how, after) in enumerate(self.plan.kills):
            self.kill_once(first=n == 0, how=how, after=after)
        self.finish()
        return self.result


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trials", type=int, default=100, help="how many runs (default 100)")
    parser.add_argument("--seed", type=int, default=1, help="seed of the random plans")
    parser.add_argument("--workers", type=int, default=2, help="trials run at once")
    parser.add_argument("--keep", type=Path, help="keep the database in this directory")
    parser.add_argument(
        "--jobs", type=int, default=10, help="job trials with nested steps (default 10)"
    )
    parser.add_argument(
        "--takeovers", type=int, default=5, help="SIGSTOP takeover trials (default 5)"
    )
    parser.add_argument(
        "--beside",
        type=int,
        default=5,
        help="resume-beside-workers trials: kills of workers and of a resume (default 5)",
    )
    parser.add_argument(
        "--file-takeovers",
        type=int,
        default=3,
        help="SIGSTOP takeover trials against the OpenAI fake, then verify (default 3)",
    )
    parser.add_argument(
        "--caps",
        type=int,
        default=5,
        help="kill trials of runs under --max-cost against the billing OpenAI fake (default 5)",
    )
    parser.add_argument(
        "--batch",
        type=int,
        default=5,
        help="kill trials of runs sent through the Batch API fake (default 5)",
    )
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--db", metavar="URL", help="the store of the kill trials (PostgreSQL)")
    where.add_argument(
        "--postgres", action="store_true", help="run the kill trials on a throw-away PostgreSQL"
    )
    args = parser.parse_args(argv)
    if args.trials < 0 or args.workers < 1:
        parser.error("--trials must be at least 0 and --workers at least 1")

    workdir = args.keep or Path(tempfile.mkdtemp(prefix="imagepipe-trials-"))
    workdir.mkdir(parents=True, exist_ok=True)
    stop_server = None
    if args.postgres:
        db, stop_server = embedded_postgres(workdir)
    else:
        # one store for all trials: runs share it, as users' do
        db = args.db or str(workdir / "trials.db")
    try:
        return _all_trials(args, db, workdir)
    finally:
        if stop_server is not None:
            stop_server()


def _all_trials(args: argparse.Namespace, db: str, workdir: Path) -> int:
    rng = random.Random(args.seed)
    plans = [Plan.draw(rng, i) for i in range(args.trials)]
    lock = threading.Lock()
    results: list[tuple[Plan, Result]] = []

    def one(plan: Plan) -> None:
        result = Trial(plan, db).run()
        with lock:
            results.append((plan, result))
            if not result.ok:
                print(f"trial {plan.run_id} FAILED: {'; '.join(result.problems)}", file=sys.stderr)
                print(f"  plan: {plan}", file=sys.stderr)

    with ThreadPoolExecutor(max_workers=args.workers) as pool:
        list(pool.map(one, plans))

    ok = sum(r.ok for _, r in results)
    lost = sum(r.lost for _, r in results)
    re_executed = sum(r.re_executed for _, r in results)
    kills = sum(r.kills for _, r in results)
    print(f"{ok}/{len(results)} trials ok, {lost} lost, {re_executed} re-executed, {kills} kills")
    from job_trials import job_trials, takeover_trials

    jobs = job_trials(args.jobs, args.seed, workdir)
    takeovers = takeover_trials(args.takeovers, args.seed, workdir)
    beside = beside_trials(args.beside, args.seed, db, workdir)
    files = file_takeover_trials(args.file_takeovers, args.seed, db, workdir)
    caps = cap_trials(args.caps, args.seed, db, workdir)
    from batch_trials import batch_trials

    batches = batch_trials(args.batch, args.seed, workdir, db if "://" in db else None)
    problems = jobs.problems + takeovers.problems + beside.problems + files.problems
    for problem in problems + caps.problems + batches.problems:
        print(f"FAILED: {problem}", file=sys.stderr)
    print(jobs.line())
    print(takeovers.line())
    print(beside.line())
    print(files.line())
    print(caps.line())
    print(batches.line())
    summaries = (jobs, takeovers, beside, files, caps, batches)
    all_ok = ok == len(results) and all(s.ok == s.trials for s in summaries)
    return 0 if all_ok else 1


if __name__ == "__main__":
    sys.exit(main())
