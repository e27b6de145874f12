"""Every test gets its own real SQLite file and a fast clock.

``IMAGEPIPE_TIME_SCALE=0.01`` (the documented setting) shrinks the simulated durations
and retry back-off a hundredfold, so the crash path (300 ms + 2 s + 1 s) takes ~35 ms.
"""

from __future__ import annotations

import gc
import logging
import os
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from imagepipe.durable import Store, open_store

#: the session's PostgreSQL server (``postgres_server``, ``postgres_url``), started on first use
pytest_plugins = ["postgres_server"]

FAST = "0.01"
ROOT = Path(__file__).resolve().parent.parent
#: the tests' own provider plugins, each a module with its dist-info (entry points): on a
#: subprocess's PYTHONPATH, ``-p calllog`` is the simulated provider with each call
#: logged (``IMAGEPIPE_TEST_CALL_LOG``) and held (``IMAGEPIPE_TEST_CALL_GATE``)
PLUGINS = ROOT / "tests" / "plugins"


def pytest_sessionstart(session: pytest.Session) -> None:
    """Byte-compile the code the suite's subprocesses import, once.

    The suite starts hundreds of ``python -m imagepipe`` processes (and the trial scripts).
    Under ``PYTHONDONTWRITEBYTECODE`` none of them writes a cache, so each compiled every
    imagepipe module again: ~70 ms of CPU a process. Up-to-date files are skipped; the
    caches are written atomically (pytest-xdist's workers may do this at once)."""
    import compileall

    for folder in (ROOT / "imagepipe", ROOT / "tests" / "fakes", PLUGINS, ROOT / "scripts"):
        compileall.compile_dir(folder, quiet=2)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Run the modules that hold slow tests first (each module's tests stay together and
    in order). Under pytest-xdist the two workers then meet among quick tests at the end,
    rather than one of them finishing a 30 s test alone while the other waits."""
    slow = {item.path for item in items if item.get_closest_marker("slow")}
    items.sort(key=lambda item: item.path not in slow)


@pytest.fixture(autouse=True)
def isolated(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    db = tmp_path / "imagepipe.db"
    monkeypatch.setenv("IMAGEPIPE_DB", str(db))
    monkeypatch.setenv("IMAGEPIPE_TIME_SCALE", FAST)
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "xdg"))
    monkeypatch.delenv("NO_COLOR", raising=False)
    # A terminal's size comes from the pseudo-terminal a test makes, never from the shell
    # (or pytest-xdist, which exports COLUMNS=80 to its workers).
    monkeypatch.delenv("COLUMNS", raising=False)
    monkeypatch.delenv("LINES", raising=False)
    return db


@pytest.fixture(autouse=True)
def no_lost_task_errors(caplog: pytest.LogCaptureFixture) -> Iterator[None]:
    """Fail a test that leaves an asyncio task's exception unretrieved (a swallowed error).

    The collection finds the test's unreachable tasks (their exceptions are logged as they
    are freed). What survives it is then frozen out of later collections: otherwise each
    test's collection walks every object of the session (modules, hypothesis, pyarrow...),
    0.1-0.3 s a test on two busy cores; frozen, it walks only what the test made."""
    caplog.set_level(logging.ERROR, logger="asyncio")
    yield
    gc.collect()
    gc.freeze()
    lost = [r for r in caplog.records if r.name == "asyncio" and r.levelno >= logging.ERROR]
    assert not lost, [r.getMessage() for r in lost]


@pytest.fixture
def db_path(isolated: Path) -> Path:
    return isolated


@pytest.fixture
async def store(db_path: Path) -> AsyncIterator[Store]:
    s = await open_store(str(db_path))
    yield s
    await s.close()


def cli_env(db: Path, **extra: str) -> dict[str, str]:
    """Environment for a real ``imagepipe`` subprocess."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("IMAGEPIPE_")}
    env.update(IMAGEPIPE_DB=str(db), PYTHONUNBUFFERED="1", NO_COLOR="1", TERM="dumb")
    env.update(extra)
    return env


def with_plugins(env: dict[str, str]) -> dict[str, str]:
    """``env`` with the tests' provider plugins (:data:`PLUGINS`) on its PYTHONPATH."""
    paths = [str(PLUGINS), *filter(None, [env.get("PYTHONPATH")])]
    return env | {"PYTHONPATH": os.pathsep.join(paths)}


def cli_argv(*args: str) -> list[str]:
    return [sys.executable, "-m", "imagepipe", *args]


@pytest.fixture
def procs() -> Iterator[list[subprocess.Popen[str]]]:
    """Processes a test starts; any still running at the end is killed and reaped."""
    started: list[subprocess.Popen[str]] = []
    yield started
    for proc in started:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
