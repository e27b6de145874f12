"""Issue 22: a batch run under --max-cost, through the real CLI against the loopback fake of
OpenAI's Files and Batches APIs. gpt-image-1 at low quality: $0.011 an image published;
at the batch rate (half) a request is reserved at about $0.0058 at worst with its prompt."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from tests.fakes.openai_batch_server import FakeClock, OpenAIBatchFake

from conftest import cli_argv, cli_env

pytest_plugins = ["tests.fakes.plugin"]

LOW = ("-o", "model", "gpt-image-1", "-o", "quality", "low", "-o", "size", "1024x1024")


@pytest.fixture(autouse=True)
def no_user_prices(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))
    monkeypatch.delenv("IMAGEPIPE_PRICES", raising=False)


def imagepipe(db: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = cli_env(db)
    return subprocess.run(cli_argv(*args), env=env, capture_output=True, text=True, timeout=120)


def test_a_capped_batch_run_sends_what_fits_and_plans_again_once_collected(
    openai_batch_fake: OpenAIBatchFake, db_path: Path, tmp_path: Path
) -> None:
    """$0.017 fits two requests at the batch rate (2 x $0.0058), not three: the first batch
    holds two. Each image then costs about $0.0055, which leaves room for one more: resume
    collects the first batch, sends that one in a second batch, collects it, and stops at the
    cap (exit 3). A raised cap finishes the run: every branch in one batch, no more."""
    # the fake's batches run in fake seconds, 1,000 to a real one (12 ms for a batch):
    # each poll of resume finds the batch it polls further on, whatever the machine's speed
    openai_batch_fake.clock = FakeClock(rate=1000)
    out = tmp_path / "img"
    run = imagepipe(db_path, "run", "a lighthouse", "-p", "openai", *LOW, "-n", "2", "--batch",
                    "--id", "capped", "--max-cost", "0.017", "--out", str(out))  # fmt: skip
    assert run.returncode == 0, run.stderr
    assert [len(c.custom_ids) for c in openai_batch_fake.created] == [2]

    resumed = imagepipe(db_path, "resume", "capped")
    assert resumed.returncode == 3, resumed.stderr
    assert resumed.stderr.startswith("error: budget reached: $0.016"), resumed.stderr
    assert [len(c.custom_ids) for c in openai_batch_fake.created] == [2, 1]
    assert len(list(out.glob("*.png"))) == 3

    finished = imagepipe(db_path, "resume", "capped", "--max-cost", "0.04")
    assert finished.returncode == 0, finished.stderr
    assert [len(c.custom_ids) for c in openai_batch_fake.created] == [2, 1, 3]
    assert all(len(b) == 1 for b in openai_batch_fake.batches_of().values())
    assert len(openai_batch_fake.batches_of()) == 6
    assert len(list(out.glob("*.png"))) == 6
    shown = imagepipe(db_path, "show", "capped")
    assert "Cost: $0.03" in shown.stdout, shown.stdout  # 6 x ~$0.0055, at the batch rate


def test_a_batch_cap_that_fits_no_request_sends_nothing(
    openai_batch_fake: OpenAIBatchFake, db_path: Path, tmp_path: Path
) -> None:
    out = tmp_path / "img"
    run = imagepipe(db_path, "run", "a lighthouse", "-p", "openai", *LOW, "--batch",
                    "--id", "tiny", "--max-cost", "0.005", "--out", str(out))  # fmt: skip
    assert run.returncode == 3, run.stderr
    assert run.stderr.startswith("error: budget reached: $0.00 spent of $0.0050;")
    assert "imagepipe resume tiny --max-cost 0.02 goes on" in run.stderr  # 3 x $0.0058
    assert openai_batch_fake.uploads == []
    assert openai_batch_fake.created == []
