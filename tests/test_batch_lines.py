"""Issue 22: what each line of a batch's files does to its branch, through the real CLI
against the loopback fake of OpenAI's Files and Batches APIs (its clock moved by the
test): an image resolves it, a refusal rejects it, and an error that a synchronous attempt
would retry (a 5xx, a 429) sends it back to pending with that error, for the next batch."""

from __future__ import annotations

import contextlib
import json
import subprocess
from pathlib import Path

from imagepipe.styles import BUILTIN_TEMPLATES, render
from tests.fakes.common import Fault
from tests.fakes.openai_batch_server import OpenAIBatchFake

from conftest import cli_argv, cli_env

pytest_plugins = ["tests.fakes.plugin"]


def imagepipe(db: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = cli_env(db, IMAGEPIPE_TIME_SCALE="0.01")
    return subprocess.run(cli_argv(*args), env=env, capture_output=True, text=True, timeout=60)


def sent(style: str) -> str:
    return render(BUILTIN_TEMPLATES[style], "a lighthouse", style)


def test_a_refused_line_rejects_its_branch_and_a_retryable_one_goes_back_to_pending(
    openai_batch_fake: OpenAIBatchFake, db_path: Path, tmp_path: Path
) -> None:
    fake = openai_batch_fake
    fake.fail_prompt(sent("cartoon"))  # a content policy refusal: a 400
    fake.fail_prompt(sent("abstract"), Fault.server_error(502))
    out = str(tmp_path / "img")
    run = imagepipe(db_path, "run", "a lighthouse", "-p", "openai", "-o", "model",
                    "gpt-image-1", "--batch", "--id", "lines", "--out", out)  # fmt: skip
    assert run.returncode == 0, run.stderr
    fake.clock.advance(3600)
    collected = imagepipe(db_path, "resume", "lines")
    assert collected.returncode == 4, collected.stderr
    assert "1 branch not run" in collected.stderr
    assert "with an error worth retrying" in collected.stderr
    shown = json.loads(imagepipe(db_path, "show", "lines", "--json").stdout)
    by_style = {b["style"]: b for b in shown["branches"]}
    assert by_style["photorealistic"]["state"] == "resolved"
    assert by_style["cartoon"]["state"] == "rejected"
    assert by_style["abstract"]["state"] == "pending"
    assert by_style["abstract"]["attempts"] == 1

    # the next resume sends the pending one again, in a batch of its own
    fake.heal_prompt(sent("abstract"))  # the provider is well again
    again = subprocess.Popen(
        cli_argv("resume", "lines"),
        env=cli_env(db_path, IMAGEPIPE_TIME_SCALE="0.01"),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    while again.poll() is None:  # the fake's clock moves on until the resume is done
        fake.clock.advance(60)
        with contextlib.suppress(subprocess.TimeoutExpired):
            again.wait(timeout=0.05)
    assert again.returncode == 1  # the run settles failed: its cartoon branch was refused
    assert [len(c.custom_ids) for c in fake.created] == [3, 1]
    shown = json.loads(imagepipe(db_path, "show", "lines", "--json").stdout)
    by_style = {b["style"]: b for b in shown["branches"]}
    assert by_style["abstract"]["state"] == "resolved"
    assert by_style["abstract"]["attempts"] == 2
