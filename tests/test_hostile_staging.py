"""Hostile checks of staged images and the image folder's owner mark (issue 19), through the
real CLI. Each test here shows a bug found by a hostile tester; it fails until it is fixed.
"""

from __future__ import annotations

import json
import resource
import shutil
import signal
import subprocess
import threading
import time
from pathlib import Path

import pytest

from tests.fakes.common import Fault
from tests.fakes.openai_server import OpenAIFake

from conftest import cli_argv, cli_env

pytest_plugins = ["tests.fakes.plugin"]


def cli(
    db: Path, *args: str, fsize: int | None = None, timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    def limit() -> None:
        if fsize is not None:
            resource.setrlimit(resource.RLIMIT_FSIZE, (fsize, fsize))

    return subprocess.run(
        cli_argv(*args),
        env=cli_env(db),
        capture_output=True,
        text=True,
        timeout=timeout,
        preexec_fn=limit,
    )


def test_a_folder_whose_claim_failed_can_still_be_used_by_its_run(
    db_path: Path, tmp_path: Path
) -> None:
    """A disk that refuses the owner mark's write (full, or a file size limit) must not leave
    an empty mark behind that refuses every later run, its own included ("holds the images
    of run ''")."""
    out = tmp_path / "img"
    args = ["run", "cat", "--id", "r", "--out", str(out), "-s", "a", "--sim-latency", "0"]
    refused = cli(db_path, *args, fsize=0)
    assert refused.returncode in (2, 74), refused.stderr  # the mark, or the store

    again = cli(db_path, *args)
    assert again.returncode == 0, again.stderr


def test_a_settled_run_never_tidies_a_folder_that_another_run_now_owns(
    db_path: Path, tmp_path: Path
) -> None:
    """Run A's folder was cleared and reused by run B. Showing A again (`resume A`, which
    reconciles A's folder) must not delete B's staged images: here one that B's store
    recorded but a kill left staged (as a kill between B's commit and its rename does),
    which `verify B --fix` would otherwise put in place."""
    out = tmp_path / "img"
    first = cli(
        db_path, "run", "cat", "--id", "A", "--out", str(out), "-s", "a", "-q", "--sim-latency", "1"
    )
    assert first.returncode == 0, first.stderr
    for path in sorted(out.rglob("*"), reverse=True):  # the user clears the folder
        path.rmdir() if path.is_dir() else path.unlink()
    out.rmdir()
    second = cli(
        db_path, "run", "dog", "--id", "B", "--out", str(out), "-s", "b", "-q", "--sim-latency", "1"
    )
    assert second.returncode == 0, second.stderr

    # B's image as a kill between its commit and its rename leaves it: recorded, staged
    value = json.loads(cli(db_path, "show", "B", "--json").stdout)["branches"][0]["value"]
    staged = out / ".imagepipe" / "staging" / f"b.png.{value['sha256'][:16]}.0123abcd"
    (out / "b.png").rename(staged)

    shown = cli(db_path, "resume", "A", "-q")  # A is settled: this shows it
    assert shown.returncode == 0, shown.stderr
    assert staged.exists(), "resume A deleted run B's staged image"

    fixed = cli(db_path, "verify", "B", "--fix")
    assert fixed.returncode == 0, fixed.stdout + fixed.stderr


def test_a_recorded_image_that_cannot_be_renamed_into_place_is_not_deleted(
    db_path: Path, tmp_path: Path
) -> None:
    """A directory in the folder has an image's name, so the rename after the commit fails.
    The run's own reconciliation then deleted the staged image it had paid for (and the
    run exited 0). Once the user moves the directory away, `verify --fix` must be able to
    put the recorded image in place."""
    out = tmp_path / "img"
    (out / "a.png").mkdir(parents=True)
    ran = cli(
        db_path, "run", "cat", "--id", "D", "--out", str(out), "-s", "a", "-q", "--sim-latency", "1"
    )
    assert ran.returncode in (0, 74), ran.stderr

    (out / "a.png").rmdir()  # the user clears the way
    fixed = cli(db_path, "verify", "D", "--fix")
    assert fixed.returncode == 0, fixed.stdout + fixed.stderr


def test_one_run_whose_folder_is_taken_does_not_stop_the_workers_for_every_run(
    db_path: Path, tmp_path: Path
) -> None:
    """A detached run's folder was cleared and claimed by another run before a worker got
    to it. The worker exited 2 ("holds the images of run 'other'") before executing
    anything, on every start: the queue's other runs were never executed."""
    sim = ["-s", "a", "--sim-latency", "1"]
    taken, free = tmp_path / "taken", tmp_path / "free"
    bad = cli(db_path, "run", "x", "--id", "bad", "--out", str(taken), *sim, "--detach")
    good = cli(db_path, "run", "x", "--id", "good", "--out", str(free), *sim, "--detach")
    assert bad.returncode == 0, bad.stderr
    assert good.returncode == 0, good.stderr
    for path in sorted(taken.rglob("*"), reverse=True):  # the user reuses the folder
        path.rmdir() if path.is_dir() else path.unlink()
    other = cli(db_path, "run", "y", "--id", "other", "--out", str(taken), *sim, "-q")
    assert other.returncode == 0, other.stderr

    cli(db_path, "worker", "--once")
    shown = json.loads(cli(db_path, "show", "good", "--json").stdout)
    assert shown["state"] == "resolved", shown


def test_detach_refuses_a_folder_that_holds_another_runs_images(
    db_path: Path, tmp_path: Path
) -> None:
    """`run --out` is refused (exit 2) for a folder another run holds, before anything is
    recorded; `run --detach` accepted it (exit 0), and every worker then exited 2."""
    out = tmp_path / "img"
    first = cli(
        db_path, "run", "x", "--id", "A", "--out", str(out), "-s", "a", "--sim-latency", "1"
    )
    assert first.returncode == 0, first.stderr

    detached = cli(db_path, "run", "y", "--id", "B", "--out", str(out), "-s", "a", "--detach")
    assert detached.returncode == 2, detached.stdout + detached.stderr


def test_an_entry_of_the_staging_folder_that_cannot_be_removed_is_no_traceback(
    db_path: Path, tmp_path: Path
) -> None:
    """Reconciliation unlinks what it takes for orphans and lets only FileNotFoundError
    pass: a directory in the staging folder (or a read-only file system: EROFS) ended the
    run, `resume` and `verify --fix` with a traceback (exit 1, for a run that resolved)."""
    out = tmp_path / "img"
    (out / ".imagepipe" / "staging" / "junk").mkdir(parents=True)
    ran = cli(db_path, "run", "x", "--id", "S", "--out", str(out), "-s", "a", "--sim-latency", "1")
    assert "Traceback" not in ran.stderr, ran.stderr
    assert ran.returncode == 0, ran.stderr


@pytest.mark.slow
def test_verify_fix_never_deletes_the_staged_image_of_a_live_but_silent_run(
    postgres_url: str, openai_fake: OpenAIFake, tmp_path: Path, procs: list[subprocess.Popen[str]]
) -> None:
    """A run is stopped (SIGSTOP, a suspended laptop) between staging its image and the
    commit that records it, for longer than the lease timeout, and nobody takes it over.
    `verify --fix` took the stale lease for "no process executes the run", deleted the
    staged image as an orphan, and the run, continued, recorded it: the paid image was
    lost, and no resume or verify --fix brings it back. (PostgreSQL, so that a lock can
    hold the commit while the run's event loop goes on and stages its image.)"""
    import psycopg

    lease_timeout = 1.0
    env = cli_env(Path(postgres_url), IMAGEPIPE_LEASE_TIMEOUT=f"{lease_timeout:g}")
    env["IMAGEPIPE_DB"] = postgres_url

    def cli_pg(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(cli_argv(*args), env=env, capture_output=True, text=True, timeout=120)

    openai_fake.unique_images = True
    release = threading.Event()
    openai_fake.add_fault(Fault(held_until=release))
    out = tmp_path / "img"
    args = ["run", "dog", "-p", "openai", "-s", "a", "--id", "fr", "--out", str(out), "-q"]
    run = subprocess.Popen(
        cli_argv(*args), env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    procs.append(run)
    openai_fake.wait_for(lambda: openai_fake.requests["create"] >= 1, timeout=60)

    staging = out / ".imagepipe" / "staging"
    with psycopg.connect(postgres_url) as lock:
        lock.execute("LOCK TABLE imagepipe.promises IN EXCLUSIVE MODE")  # holds the commit
        release.set()
        while not any(staging.iterdir()):  # staged; its commit waits for the lock
            time.sleep(0.05)
        run.send_signal(signal.SIGSTOP)
        lock.rollback()
    time.sleep(lease_timeout + 1)  # the stopped run's lease is now stale

    fixed = cli_pg("verify", "fr", "--fix")
    assert fixed.returncode == 0, fixed.stdout + fixed.stderr
    run.send_signal(signal.SIGCONT)
    run.communicate(timeout=60)

    resumed = cli_pg("resume", "fr", "-q")
    assert resumed.returncode == 0, resumed.stderr
    checked = cli_pg("verify", "fr", "--fix")
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert openai_fake.paid_creates == 1


def test_a_symlinked_staging_folder_never_deletes_files_outside_the_image_folder(
    db_path: Path, tmp_path: Path
) -> None:
    """`.imagepipe/staging` is a symlink to another folder (planted, or synced from a
    folder that had one): the run's reconciliation removed every file there as an orphan,
    user files that are not the run's images and live outside its folder."""
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "thesis.txt").write_text("years of work")
    out = tmp_path / "img"
    (out / ".imagepipe").mkdir(parents=True)
    (out / ".imagepipe" / "staging").symlink_to(docs)

    cli(db_path, "run", "x", "--id", "V", "--out", str(out), "-s", "a", "--sim-latency", "1")
    assert (docs / "thesis.txt").exists()


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("strace") is None, reason="needs strace to kill at a rename")
def test_a_worker_killed_between_its_last_commit_and_the_root_leaves_no_run_pending_for_ever(
    db_path: Path, tmp_path: Path
) -> None:
    """strace kills the worker at its first rename: the promotion of the run's only image,
    right after the commit that recorded it and before the run's root is settled. Only a
    worker that settles a branch checks the root, so no later worker settled it: `worker
    --once` never exited (the run stays pending with every branch settled) and the image
    stayed staged (verify: missing) until someone ran `resume`."""
    out = tmp_path / "img"
    sim = ["-s", "a", "--sim-latency", "1"]
    detached = cli(db_path, "run", "x", "--id", "W", "--out", str(out), *sim, "--detach")
    assert detached.returncode == 0, detached.stderr
    calls = "rename,renameat,renameat2"
    inject = [f"--trace={calls}", f"--inject={calls}:signal=SIGKILL:when=1"]
    killed = subprocess.run(
        ["strace", "-f", "-qq", "-o", "/dev/null", *inject, *cli_argv("worker", "--once")],
        env=cli_env(db_path),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert killed.returncode != 0, killed.stderr  # killed at the rename
    assert json.loads(cli(db_path, "show", "W", "--json").stdout)["state"] == "pending"

    try:
        cli(db_path, "worker", "--once", timeout=30)  # times out while the bug stands
    except subprocess.TimeoutExpired:
        pytest.fail("worker --once never finished a run whose branches had all settled")
    assert json.loads(cli(db_path, "show", "W", "--json").stdout)["state"] == "resolved"
    checked = cli(db_path, "verify", "W")
    assert checked.returncode == 0, checked.stdout + checked.stderr


def test_a_refused_reuse_of_a_run_id_claims_no_folder(db_path: Path, tmp_path: Path) -> None:
    """`run --id C --out NEW` with other arguments than run C's is bad input (exit 2); it
    still created NEW and marked it as C's, so that a later run given NEW was refused."""
    sim = ["-s", "a", "--sim-latency", "1"]
    first = cli(db_path, "run", "cat", "--id", "C", "--out", str(tmp_path / "c"), *sim)
    assert first.returncode == 0, first.stderr
    new = tmp_path / "new"
    refused = cli(db_path, "run", "dog", "--id", "C", "--out", str(new), *sim)
    assert refused.returncode == 2, refused.stderr

    other = cli(db_path, "run", "other", "--id", "D", "--out", str(new), *sim)
    assert other.returncode == 0, other.stderr
