"""The disk agrees with the store (issue 19, items 1, 5 and 6), through real processes.

A process that was stopped mid-request and taken over must never replace the image files of
the process that took over: an attempt writes its image under a staged name of its own, and
only the fenced commit that records it makes it the branch's file. The old owner's record is
refused, so its image stays an orphan (removed at the next resume), and ``verify`` passes.

The fake makes a new image for every paid create (``unique_images``), as a real model does:
with the same bytes for the same prompt, an overwrite could not be seen. It holds the first
owner's requests until the test releases them (``held_until``), so the first owner is
stopped mid-request whatever the machine's speed.
"""

from __future__ import annotations

import hashlib
import json
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
pytestmark = pytest.mark.slow

LEASE_TIMEOUT = "1"


@pytest.fixture(params=["sqlite", "postgresql"])
def store_url(request: pytest.FixtureRequest, db_path: Path) -> str:
    if request.param == "sqlite":
        return str(db_path)
    return str(request.getfixturevalue("postgres_url"))


def env_for(url: str, **extra: str) -> dict[str, str]:
    env = cli_env(Path(url), IMAGEPIPE_LEASE_TIMEOUT=LEASE_TIMEOUT, **extra)
    env["IMAGEPIPE_DB"] = url
    return env


def cli(url: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        cli_argv(*args), env=env_for(url), capture_output=True, text=True, timeout=120
    )


def hashes(directory: Path) -> dict[str, str]:
    """sha256 of every image in the folder (not imagepipe's own state folder)."""
    return {
        p.name: hashlib.sha256(p.read_bytes()).hexdigest()
        for p in directory.iterdir()
        if p.is_file()
    }


def staged(directory: Path) -> list[str]:
    staging = directory / ".imagepipe" / "staging"
    return sorted(p.name for p in staging.iterdir()) if staging.is_dir() else []


def until_taken_over(
    url: str, *args: str, timeout: float = 60.0
) -> subprocess.CompletedProcess[str]:
    """Run the command until it is no longer refused (exit 75) because the stopped owner's
    lease is still fresh by the store's clock."""
    deadline = time.monotonic() + timeout
    while True:
        done = cli(url, *args)
        if done.returncode != 75 or time.monotonic() > deadline:
            return done


def test_a_taken_over_run_never_replaces_the_new_owners_files(
    store_url: str, openai_fake: OpenAIFake, tmp_path: Path, procs: list[subprocess.Popen[str]]
) -> None:
    openai_fake.unique_images = True
    release = threading.Event()
    openai_fake.add_fault(Fault(held_until=release), times=2)  # the first owner's two creates
    out = tmp_path / "img"
    args = ["run", "split", "-p", "openai", "-s", "a", "-s", "b", "--id", "sb", "--out", str(out)]
    old = subprocess.Popen(
        cli_argv(*args),
        env=env_for(store_url),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    procs.append(old)
    openai_fake.wait_for(lambda: openai_fake.requests["create"] >= 2, timeout=60)
    old.send_signal(signal.SIGSTOP)

    taken = until_taken_over(store_url, "resume", "sb")
    assert taken.returncode == 0, taken.stderr
    assert cli(store_url, "verify", "sb").returncode == 0
    finished = hashes(out)
    assert sorted(finished) == ["a.png", "b.png"]

    # The old owner gets its answers (other images) and goes on: its records are refused.
    release.set()
    openai_fake.wait_for(lambda: openai_fake.sent["create"] >= 4, timeout=60)
    old.send_signal(signal.SIGCONT)
    _, err = old.communicate(timeout=60)
    assert old.returncode == 75, err
    assert "lost run" in err

    checked = cli(store_url, "verify", "sb")
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert hashes(out) == finished
    assert openai_fake.paid_creates == 2  # the same idempotency keys: paid once

    # Its orphans (if it got as far as staging them) are gone after the next resume.
    assert cli(store_url, "resume", "sb").returncode == 0
    assert staged(out) == []
    assert hashes(out) == finished


def test_a_taken_over_worker_never_replaces_the_new_workers_files(
    store_url: str, openai_fake: OpenAIFake, tmp_path: Path, procs: list[subprocess.Popen[str]]
) -> None:
    openai_fake.unique_images = True
    release = threading.Event()
    openai_fake.add_fault(Fault(held_until=release), times=3)  # the first worker's creates
    out = tmp_path / "img"
    styles = ["-s", "a", "-s", "b", "-s", "c"]
    detached = cli(
        store_url, "run", "w", "-p", "openai", *styles, "--id", "w", "--out", str(out), "--detach"
    )
    assert detached.returncode == 0, detached.stderr
    stopped = subprocess.Popen(
        cli_argv("worker", "--once"),
        env=env_for(store_url),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    procs.append(stopped)
    openai_fake.wait_for(lambda: openai_fake.requests["create"] >= 3, timeout=60)
    stopped.send_signal(signal.SIGSTOP)

    taker = cli(store_url, "worker", "--once")  # claims each branch once its lease lapses
    assert taker.returncode == 0, taker.stderr
    assert cli(store_url, "verify", "w").returncode == 0
    finished = hashes(out)
    assert sorted(finished) == ["a.png", "b.png", "c.png"]

    release.set()
    openai_fake.wait_for(lambda: openai_fake.sent["create"] >= 6, timeout=60)
    stopped.send_signal(signal.SIGCONT)
    stopped.communicate(timeout=60)
    assert stopped.returncode == 0

    checked = cli(store_url, "verify", "w", "--fix")
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert hashes(out) == finished
    assert staged(out) == []
    assert openai_fake.paid_creates == 3


def test_an_image_folder_that_cannot_be_written_is_refused_before_anything_is_paid(
    openai_fake: OpenAIFake, db_path: Path, tmp_path: Path
) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    done = cli(str(db_path), "run", "x", "-p", "openai", "--id", "x", "--out", str(blocker / "d"))
    assert done.returncode == 2, done.stderr
    assert done.stderr.count("\n") == 1
    assert done.stderr.startswith("error: cannot write images to ")
    assert openai_fake.requests["create"] == 0
    listed = cli(str(db_path), "list", "--json")
    assert listed.returncode == 0
    assert json.loads(listed.stdout or "[]") == []


def test_a_disk_that_fails_after_payment_stops_the_run_instead_of_paying_again(
    openai_fake: OpenAIFake, db_path: Path, tmp_path: Path
) -> None:
    """The file-size limit makes every image write fail (EFBIG) while the store's small
    writes go through: one paid create, then the run stops with its branch pending."""
    import resource

    openai_fake.big_image = 3 << 20
    limit = 2 << 20

    def small_files() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    out = tmp_path / "img"
    args = cli_argv("run", "x", "-p", "openai", "-s", "a", "--id", "full", "--out", str(out))
    done = subprocess.run(
        args,
        env=env_for(str(db_path)),
        capture_output=True,
        text=True,
        timeout=120,
        preexec_fn=small_files,
    )
    assert done.returncode == 74, done.stderr
    assert done.stderr.count("\n") == 1, done.stderr
    assert "cannot write the image of full.0" in done.stderr
    assert "imagepipe resume full" in done.stderr
    assert openai_fake.paid_creates == 1  # not once per attempt
    shown = json.loads(cli(str(db_path), "show", "full", "--json").stdout)
    assert [b["state"] for b in shown["branches"]] == ["pending"]
    assert staged(out) == []

    # With room on the disk, the run finishes.
    assert cli(str(db_path), "resume", "full").returncode == 0
    assert cli(str(db_path), "verify", "full").returncode == 0


def test_two_runs_never_share_an_image_folder(db_path: Path, tmp_path: Path) -> None:
    out = tmp_path / "shared"
    url = str(db_path)
    first = cli(url, "run", "a cat", "--id", "same1", "--out", str(out), "--sim-latency", "0")
    assert first.returncode == 0, first.stderr
    cats = hashes(out)
    second = cli(url, "run", "a dog", "--id", "same2", "--out", str(out), "--sim-latency", "0")
    assert second.returncode == 2
    assert second.stderr.count("\n") == 1
    assert "holds the images of run 'same1'" in second.stderr
    assert hashes(out) == cats
    assert cli(url, "verify", "same1").returncode == 0
    listed = json.loads(cli(url, "list", "--json").stdout)
    assert [r["id"] for r in listed] == ["same1"]
    # The run that owns the folder resumes into it as before.
    assert cli(url, "run", "a cat", "--id", "same1", "--out", str(out)).returncode == 0


def test_verify_fix_puts_recorded_images_in_place_and_removes_orphans(
    db_path: Path, tmp_path: Path
) -> None:
    """What a kill between the record and the rename leaves: the recorded image still
    staged. ``verify`` names it missing; ``verify --fix`` renames it into place and removes
    an orphan (another attempt's bytes) and an old-style temporary file."""
    out = tmp_path / "img"
    url = str(db_path)
    assert cli(url, "run", "a fox", "-s", "a", "--id", "f", "--out", str(out)).returncode == 0
    image = out / "a.png"
    data = image.read_bytes()
    sha = hashlib.sha256(data).hexdigest()
    staging = out / ".imagepipe" / "staging"
    image.rename(staging / f"a.png.{sha[:16]}.0a0b0c0d")
    (staging / "a.png.0123456789abcdef.deadbeef").write_bytes(b"another attempt's image")
    (out / ".0011223344556677.imagepipe-tmp").write_bytes(b"half")

    missing = cli(url, "verify", "f")
    assert missing.returncode == 1
    assert "missing" in missing.stdout

    fixed = cli(url, "verify", "f", "--fix")
    assert fixed.returncode == 0, fixed.stdout + fixed.stderr
    assert "1 recorded images put in place, 2 orphaned or temporary files removed" in fixed.stdout
    assert image.read_bytes() == data
    assert staged(out) == []
    assert sorted(p.name for p in out.iterdir()) == [".imagepipe", "a.png"]


@pytest.mark.parametrize("executor", ["resume", "worker"])
def test_temporary_files_a_kill_left_are_removed_by_the_next_execution(
    executor: str, db_path: Path, tmp_path: Path
) -> None:
    """Older versions wrote ``.<random>.imagepipe-tmp`` beside the images, and a kill left
    them there for ever (nothing called remove_temporaries). The execution that settles the
    run removes them, whoever it is; a user's own files stay."""
    out = tmp_path / "img"
    url = str(db_path)
    args = ["run", "a fox", "-s", "a", "-s", "b", "--id", "t", "--out", str(out)]
    if executor == "worker":
        args.append("--detach")
    else:
        args += ["-o", "hang_rate", "1"]  # the first process never finishes a branch ...
    first = subprocess.Popen(
        cli_argv(*args),
        env=env_for(url),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    if executor == "resume":
        assert first.stdout is not None
        for line in first.stdout:  # ... and is killed once its attempts have started
            if "attempt 1" in line:
                break
        first.kill()
    first.communicate(timeout=60)
    leftover = out / ".0123456789abcdef.imagepipe-tmp"
    leftover.write_bytes(b"half an image")
    mine = out / "notes.txt"
    mine.write_text("the user's own")

    finished = cli(url, "resume", "t") if executor == "resume" else cli(url, "worker", "--once")
    assert finished.returncode == 0, finished.stderr
    assert not leftover.exists()
    assert mine.read_text() == "the user's own"
    assert cli(url, "verify", "t").returncode == 0
