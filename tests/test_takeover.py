"""Split brain (issue 11, bug 1), through real processes: an owner stopped with SIGSTOP past
the lease timeout is taken over by ``resume``; continued with SIGCONT, it must write
nothing more, report nothing more, say that it lost the run and exit 75.

Before fencing, the continued owner called the provider again for attempt numbers the new
owner had used, printed ``Done`` a second time, wrote attempt counts that went down and
overwrote attempt-history rows.
"""

from __future__ import annotations

import json
import re
import signal
import sqlite3
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import IO

import pytest

from conftest import cli_argv, cli_env
from storeview import lease_age, rows

pytestmark = pytest.mark.slow

LEASE_TIMEOUT = 1.0
#: --sim-latency 3000 at this scale: an attempt takes 0.6 s, a failing one 0.3 s
SCALE = "0.2"
RUN_ID = "split"
#: seed 1 fails attempt 1 of two of the nine branches (photorealistic#2, abstract#1)
SLOW_FLAKY = ("--sim-latency", "3000", "-n", "3", "-o", "fail_rate", "0.5", "-o", "fault_seed", "1")
_LINE = re.compile(r"^\[(?P<label>[^\]]+)\]\s+(?P<what>.*)$")


def read_until(stream: IO[str], done: Callable[[list[str]], bool]) -> list[str]:
    """Read lines as the process prints them until ``done`` says so (no sleeping)."""
    lines: list[str] = []
    for line in iter(stream.readline, ""):
        lines.append(line.rstrip("\n"))
        if done(lines):
            return lines
    raise AssertionError("process ended before the expected output:\n" + "\n".join(lines))


def poll(condition: Callable[[], bool], *, timeout: float, what: str) -> None:
    """Wait for a condition on the store (polled: the store has no way to notify)."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting until {what}")
        time.sleep(0.02)


def labels(db: Path) -> dict[str, str]:
    """Branch id by its on-screen label (``style`` or ``style#n``)."""
    conn = sqlite3.connect(db)
    try:
        found = conn.execute("SELECT id, args FROM promises WHERE parent_id = ?", (RUN_ID,))
        by_label = {}
        for promise_id, args in found:
            kwargs = json.loads(args)["kwargs"]
            n = kwargs["variation"]
            by_label[kwargs["style"] if n == 0 else f"{kwargs['style']}#{n}"] = promise_id
        return by_label
    finally:
        conn.close()


def branch_rows(db: Path) -> dict[str, tuple[str, int, int, str | None]]:
    """(state, attempts, failures, value) of each branch, by id."""
    conn = sqlite3.connect(db)
    try:
        found = conn.execute(
            "SELECT id, state, attempts, failures, value FROM promises WHERE parent_id = ?",
            (RUN_ID,),
        )
        return {r[0]: (r[1], r[2], r[3], r[4]) for r in found}
    finally:
        conn.close()


def test_a_stopped_owner_that_was_taken_over_writes_and_reports_nothing_more(
    db_path: Path, procs: list[subprocess.Popen[str]]
) -> None:
    env = cli_env(db_path, IMAGEPIPE_TIME_SCALE=SCALE, IMAGEPIPE_LEASE_TIMEOUT=f"{LEASE_TIMEOUT}")
    old = subprocess.Popen(
        cli_argv("run", "a red fox", "--id", RUN_ID, *SLOW_FLAKY),
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    procs.append(old)
    assert old.stdout is not None
    # Stop it in the middle: attempts in flight, a failure recorded, a retry waiting.
    seen = read_until(old.stdout, lambda lines: any("retrying in" in x for x in lines))
    old.send_signal(signal.SIGSTOP)
    at_stop = branch_rows(db_path)
    assert any(state == "pending" for state, *_ in at_stop.values())
    assert any(failures for _, _, failures, _ in at_stop.values())

    # Past the lease timeout by the store's clock, another process takes the run over.
    poll(
        lambda: (lease_age(db_path) or 0) > LEASE_TIMEOUT * 1.2,
        timeout=10,
        what="the stopped owner's heartbeat is stale",
    )
    new = subprocess.run(
        cli_argv("resume", RUN_ID, "--json", "--sim-latency", "3000"),
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert new.returncode == 0, new.stderr
    assert json.loads(new.stdout)["state"] == "resolved"
    after_takeover = rows(db_path)
    taken_over = branch_rows(db_path)

    old.send_signal(signal.SIGCONT)
    rest, err = old.communicate(timeout=30)

    # It says it lost the run, on one line, and exits 75 ...
    assert old.returncode == 75, err
    assert err.count("\n") == 1, err
    assert err.startswith(f"error: lost run {RUN_ID!r}"), err
    # ... and wrote nothing: not a row, not an attempt, not the lease.
    assert rows(db_path) == after_takeover

    # The run is whole: every branch resolved once, no attempt count went down, and no
    # failure is counted twice (each failure is one row of the attempt history).
    history = after_takeover["attempts"]
    for promise_id, (state, attempts, failures, value) in taken_over.items():
        assert state == "resolved"
        assert value is not None
        assert attempts >= at_stop[promise_id][1]
        assert failures == sum(1 for a in history if a[0] == promise_id and a[4] is not None)
    root_state = [r for r in after_takeover["promises"] if r[0] == RUN_ID]
    assert "resolved" in root_state[0]

    # It reported nothing more: every "Done" it printed is a branch it had made durable
    # before it was stopped, and it started no attempt the store did not hold by then.
    by_label = labels(db_path)
    for line in [*seen, *rest.splitlines()]:
        match = _LINE.match(line)
        if match is None:
            continue
        promise_id, what = by_label[match["label"]], match["what"]
        state, attempts, *_ = at_stop[promise_id]
        if what.startswith("Done:"):
            assert state == "resolved", f"{line!r}: reported after it lost the run"
        started = re.match(r"Generating image \(attempt (\d+)\)", what)
        if started:
            assert int(started[1]) <= attempts, f"{line!r}: a provider call after the takeover"
    assert "Results of" not in rest
