"""Issue 21's rate limits, through the real CLI against the OpenAI fake enforcing its limit
in one-second slices (``limit_rpm(R, per_second=True)``: at most R/60 requests in any one
second, 429 beyond that, with OpenAI's headers), everything counted at the fake.

- ``--rpm`` sends no burst: not at the start, not after a pause for a 429.
- A rate-limit wait is not a failed attempt: it never uses up ``--max-attempts``.
- The run's patience (``IMAGEPIPE_RATE_LIMIT_PATIENCE``) bounds those waits instead; a bad
  value of it is refused before anything is written.

The pacer's exact spacing is tested on a virtual clock in test_providers_http.py.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import pytest

from tests.fakes.common import Fault
from tests.fakes.openai_server import OpenAIFake

from conftest import cli_argv, cli_env

pytest_plugins = ["tests.fakes.plugin"]


def run(
    tmp_path: Path, n: int, *options: str, scale: float, **env: str
) -> tuple[subprocess.CompletedProcess[str], dict[str, Any]]:
    """``imagepipe run cats -p openai -n N --json`` at time scale ``scale``; the process and
    its JSON summary (empty if it printed none: a run that stopped)."""
    argv = cli_argv(
        "run", "cats", "-p", "openai", "-s", "cartoon", "-n", str(n), "--json",
        "--id", "limits", "--out", str(tmp_path / "out"), *options,
    )  # fmt: skip
    proc = subprocess.run(
        argv,
        env=cli_env(tmp_path / "db.sqlite", IMAGEPIPE_TIME_SCALE=str(scale), **env),
        capture_output=True,
        text=True,
        timeout=120,
    )
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    summary: dict[str, Any] = json.loads(lines[-1]) if lines else {}
    return proc, summary


def statuses(fake: OpenAIFake) -> list[int]:
    return [a.status for a in fake.log if a.endpoint == "create"]


def test_rpm_sends_no_burst_at_the_start_or_after_a_pause(
    openai_fake: OpenAIFake, tmp_path: Path
) -> None:
    """The fake allows 4 requests in any one second; ``--rpm 180`` is 3 a second, one every
    0.34 s. A burst of one second's share (3 at once, as aiolimiter's bucket of a second's
    share let through) on top of that rate puts 5 in one second: a 429 at the fake. Evenly,
    5 requests span 1.36 s: a margin of a third of a second for the way to the fake.

    A scripted 429 (Retry-After 1 s) after the 4th request pauses every branch; at its end,
    the requests that waited go one every 0.34 s again, not all at once."""
    openai_fake.limit_rpm(240, per_second=True)
    openai_fake.add_fault(Fault.rate_limited(1.0), after=4)
    proc, summary = run(tmp_path, 9, "-c", "8", "--rpm", "180", scale=1.0)
    assert proc.returncode == 0, proc.stderr
    assert len(summary["images"]) == 9
    assert openai_fake.paid_creates == 9
    # the one scripted 429, and none from the fake's own limit
    assert statuses(openai_fake).count(429) == 1


def test_rate_limit_waits_do_not_use_up_attempts(openai_fake: OpenAIFake, tmp_path: Path) -> None:
    """200 images without --rpm against 300 a minute (5 in any second), 16 at once, and ten
    more 429s scripted on top: every image is made in its first attempt, even with
    ``--max-attempts 1``. (Before, each 429 was a failed attempt: with the default 5, two
    runs of three ended "failed"; with 1, every branch that met a 429 failed.)"""
    openai_fake.time_scale = 0.02
    openai_fake.limit_rpm(300, per_second=True)
    openai_fake.add_fault(Fault.rate_limited(0.5), after=30, times=10)
    proc, summary = run(
        tmp_path, 200, "-c", "16", "--max-attempts", "1", scale=0.02,
        IMAGEPIPE_RATE_LIMIT_PATIENCE="86400",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert summary["state"] == "resolved"
    assert len(summary["images"]) == 200
    assert {image["attempts"] for image in summary["images"]} == {1}
    assert openai_fake.paid_creates == 200
    assert statuses(openai_fake).count(429) >= 10  # the waits did happen


def test_patience_stops_a_run_whose_rate_limit_lets_nothing_through(
    openai_fake: OpenAIFake, tmp_path: Path
) -> None:
    """Every request is answered 429 (Retry-After 1 s). With a patience of 5 s, the run stops
    once the provider has let nothing through for that long, as on an account-wide error
    (exit 78, its branches pending for a resume), instead of failing each branch after
    --max-attempts 429s; each branch waits at least 1 s between its requests, so no more
    than 4 x (5 + 2) are sent."""
    openai_fake.time_scale = 0.01
    openai_fake.add_fault(Fault.rate_limited(1.0), times=-1)
    proc, _ = run(tmp_path, 4, "-c", "4", scale=0.01, IMAGEPIPE_RATE_LIMIT_PATIENCE="5")
    assert proc.returncode == 78, proc.stderr
    assert proc.stderr.count("\n") == 1, proc.stderr
    assert "run 'limits' stopped, its unfinished branches pending" in proc.stderr
    assert "let no request through for 5 s" in proc.stderr
    assert "IMAGEPIPE_RATE_LIMIT_PATIENCE" in proc.stderr
    assert "imagepipe resume limits" in proc.stderr
    shown = subprocess.run(
        cli_argv("show", "limits", "--json"),
        env=cli_env(tmp_path / "db.sqlite"),
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    branches = json.loads(shown.stdout)["branches"]
    assert [b["state"] for b in branches] == ["pending"] * 4
    assert {b["attempts"] for b in branches} == {1}  # the 429s before were waits
    assert 1 <= len(statuses(openai_fake)) <= 4 * (5 + 2)


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("IMAGEPIPE_RATE_LIMIT_PATIENCE", "soon"),
        ("IMAGEPIPE_RATE_LIMIT_PATIENCE", "-1"),
        ("IMAGEPIPE_RATE_LIMIT_PATIENCE", "nan"),
        ("IMAGEPIPE_COORDINATED_BACKOFF", "maybe"),
    ],
)
def test_a_bad_rate_limit_setting_is_refused_before_anything_is_written(
    openai_fake: OpenAIFake, tmp_path: Path, name: str, value: str
) -> None:
    proc = subprocess.run(
        cli_argv("run", "cats", "-p", "openai", "--out", str(tmp_path / "out")),
        env=cli_env(tmp_path / "db.sqlite", **{name: value}),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1, proc.stderr
    assert name in proc.stderr
    assert not (tmp_path / "db.sqlite").exists()
    assert not (tmp_path / "out").exists()
    assert openai_fake.requests["create"] == 0
