"""Issue 21, prices and cost: what each image cost, summed; the prices file; --dry-run.

Through the real CLI against the loopback fakes: Typer's runner where no process matters,
a real subprocess where "nothing was written" is the point.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from imagepipe.cli import app
from imagepipe.styles import render, templates_for
from tests.fakes.common import Fault
from tests.fakes.openai_server import OUTPUT_TOKENS, OpenAIFake
from tests.fakes.replicate_server import ReplicateFake

from conftest import cli_argv, cli_env

pytest_plugins = ["tests.fakes.plugin"]

runner = CliRunner()
PROMPT = "a lighthouse"
STYLES = ("photorealistic", "cartoon", "abstract")


@pytest.fixture(autouse=True)
def no_user_prices(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """No prices file of the machine's user: only the test's own, if it writes one."""
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))
    monkeypatch.delenv("IMAGEPIPE_PRICES", raising=False)


def invoke(*args: str) -> Any:
    return runner.invoke(app, list(args), catch_exceptions=False)


def json_of(*args: str) -> Any:
    result = invoke(*args)
    assert result.exit_code == 0, result.stderr
    return json.loads(result.stdout)


def words(style: str) -> int:
    """The text tokens the fake counts for the prompt in ``style``: one a word."""
    return len(render(templates_for([style])[style], PROMPT, style).split())


def prices_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, text: str) -> Path:
    path = tmp_path / "prices.toml"
    path.write_text(text)
    monkeypatch.setenv("IMAGEPIPE_PRICES", str(path))
    return path


def openai_run(run_id: str, out: Path, *extra: str) -> list[str]:
    return ["run", PROMPT, "--provider", "openai", "--id", run_id, "--out", str(out), *extra]


# -- costs recorded and summed --------------------------------------------------------


def test_each_image_costs_its_usage_tokens_and_the_run_sums_them(
    openai_fake: OpenAIFake, tmp_path: Path
) -> None:
    """gpt-image-1 at $5 a million text tokens in and $40 out: 5 and 40 micro-dollars."""
    data = json_of(*openai_run("u1", tmp_path / "img", "-o", "quality", "medium", "--json"))
    expected = {s: words(s) * 5 + OUTPUT_TOKENS[("medium", "1024x1024")] * 40 for s in STYLES}
    assert {i["style"]: i["cost"]["micro_usd"] for i in data["images"]} == expected
    assert {i["cost"]["basis"] for i in data["images"]} == {"usage"}
    assert data["cost"]["spent"]["micro_usd"] == sum(expected.values())
    estimated = data["cost"]["estimated"]
    # the published $0.042 an image, less what its rounding may have added: $0.0005
    assert estimated["low_micro_usd"] == 3 * 41_500
    assert estimated["low_micro_usd"] <= sum(expected.values()) <= estimated["high_micro_usd"]

    shown = json_of("show", "u1", "--json")
    assert shown["cost"]["spent"] == data["cost"]["spent"]
    for branch in shown["branches"]:
        assert branch["value"]["cost"] == {
            "micro_usd": expected[branch["style"]],
            "currency": "USD",
            "basis": "usage",
        }
    (listed,) = json_of("list", "--json")
    assert listed["cost"]["micro_usd"] == sum(expected.values())

    total = f"${sum(expected.values()) / 1e6:.4f}"
    text = invoke("show", "u1").stdout
    assert f"Cost: {total} for 3 images" in text
    assert f"cost ${expected['cartoon'] / 1e6:.4f}" in text
    assert total in invoke("list").stdout

    gallery = invoke("gallery", "u1")
    assert gallery.exit_code == 0, gallery.stderr
    page = (tmp_path / "img" / "index.html").read_text()
    assert f"Cost: {total} for 3 images" in page
    assert f"cost ${expected['abstract'] / 1e6:.4f}</figcaption>" in page

    exported = invoke("export", "u1", str(tmp_path / "set"))
    assert exported.exit_code == 0, exported.stderr
    assert f"Cost: {total}" in exported.stdout
    rows = (tmp_path / "set" / "train" / "metadata.jsonl").read_text().splitlines()
    costs = {json.loads(r)["style"]: json.loads(r)["cost_micro_usd"] for r in rows}
    assert costs == expected


def test_a_replicate_model_by_the_second_costs_its_predict_time(
    replicate_fake: ReplicateFake, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A model priced by hardware time: the fake's predict_time of 0.5 s on an L40S."""
    prices_file(tmp_path, monkeypatch, '[replicate."acme/painter"]\nhardware = "gpu-l40s"\n')
    args = ["run", PROMPT, "-p", "replicate", "-o", "model", "acme/painter", "-s", "cartoon"]
    data = json_of(*args, "--id", "r1", "--out", str(tmp_path / "img"), "--json")
    (image,) = data["images"]
    assert image["cost"] == {"micro_usd": 488, "currency": "USD", "basis": "predict-time"}
    # no seconds in the row: what a prediction takes is not known before it runs
    assert data["cost"]["estimated"]["high_micro_usd"] is None

    prices_file(
        tmp_path,
        monkeypatch,
        '[replicate."acme/painter"]\nhardware = "gpu-l40s"\nseconds = [2, 8]\n',
    )
    sent = sum(replicate_fake.requests.values())
    planned = json_of(*args, "-n", "10", "--dry-run", "--json")
    # 2 to 8 s at $0.000975 a second, ten times
    assert planned["cost"] == {"low_micro_usd": 19_500, "high_micro_usd": 78_000, "currency": "USD"}
    assert sum(replicate_fake.requests.values()) == sent


def test_a_dall_e_image_costs_its_per_image_price(openai_fake: OpenAIFake, tmp_path: Path) -> None:
    """No usage in the answer (DALL-E models return none): the price of its size and
    quality, here hd at 1792x1024."""
    args = ["-o", "model", "dall-e-3", "-o", "quality", "hd", "-o", "size", "1792x1024"]
    data = json_of(*openai_run("d1", tmp_path / "img", "-s", "cartoon", *args, "--json"))
    assert data["images"][0]["cost"] == {
        "micro_usd": 120_000,
        "currency": "USD",
        "basis": "per-image",
    }
    assert data["cost"]["estimated"]["low_micro_usd"] == 120_000


def test_a_failed_attempt_that_may_have_been_paid_is_counted_and_a_refused_one_is_not(
    openai_fake: OpenAIFake, tmp_path: Path
) -> None:
    cartoon = render(templates_for(["cartoon"])["cartoon"], PROMPT, "cartoon")
    abstract = render(templates_for(["abstract"])["abstract"], PROMPT, "abstract")
    openai_fake.add_fault(Fault.dropped(), prompt=cartoon, times=1)  # outcome unknown
    openai_fake.add_fault(Fault.server_error(), prompt=abstract, times=1)  # refused
    args = openai_run("f1", tmp_path / "img", "-o", "quality", "low", "-s", "cartoon")
    result = invoke(*args, "-s", "abstract", "--json")
    assert result.exit_code == 0, result.stderr

    spent = json_of("show", "f1", "--json")["cost"]["spent"]
    assert spent["failed_attempts"] == 1
    # the worst case of a low-quality square image: $0.011, and $0.0005 more that its
    # rounding may have taken off, and a token a byte of the prompt at $5 a million
    assert spent["failed_attempts_micro_usd"] == 11_500 + 5 * len(cartoon.encode())
    assert "1 failed attempts that may have been paid" in invoke("show", "f1").stdout


# -- unknown is not zero --------------------------------------------------------------


def test_a_model_without_a_known_price_costs_unknown_not_zero(
    openai_fake: OpenAIFake, tmp_path: Path
) -> None:
    args = openai_run("x1", tmp_path / "img", "-o", "model", "acme-image-9", "-s", "cartoon")
    data = json_of(*args, "--json")
    (image,) = data["images"]
    assert image["cost"] == {"micro_usd": None, "currency": "USD", "basis": "unknown"}
    spent = data["cost"]["spent"]
    assert (spent["micro_usd"], spent["unknown_images"]) == (0, 1)
    assert data["cost"]["estimated"] == {
        "low_micro_usd": None,
        "high_micro_usd": None,
        "currency": "USD",
    }
    assert "(1 of unknown cost, not counted)" in invoke("show", "x1").stdout
    assert "unknown" in invoke("list").stdout

    dry = invoke("run", PROMPT, "-p", "openai", "-o", "model", "acme-image-9", "--dry-run")
    assert "cost:     unknown" in dry.stdout


# -- the prices file ------------------------------------------------------------------


def test_the_prices_file_overrides_a_built_in_model_and_adds_another(
    openai_fake: OpenAIFake, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    prices_file(
        tmp_path,
        monkeypatch,
        'currency = "USD"\n'
        '[openai."gpt-image-1"]\n'
        "text_input_per_1m = 0\nimage_input_per_1m = 0\nimage_output_per_1m = 100\n"
        'per_image = { "low/1024x1024" = 0.03 }\n'
        '[openai."acme-image-9"]\n'
        "per_image = 0.5\n",
    )
    one = json_of(*openai_run("p1", tmp_path / "a", "-s", "cartoon", "--json"))
    assert one["images"][0]["cost"]["micro_usd"] == 272 * 100  # $100 a million output tokens
    # a token-billed model's per-image figure is taken as rounded: $0.03, less $0.005
    assert one["cost"]["estimated"]["low_micro_usd"] == 25_000
    args = openai_run("p2", tmp_path / "b", "-s", "cartoon", "-o", "model", "acme-image-9")
    two = json_of(*args, "--json")
    assert two["images"][0]["cost"] == {
        "micro_usd": 500_000,
        "currency": "USD",
        "basis": "per-image",
    }


BROKEN = {
    "not TOML": ("[openai\n", "is not valid TOML"),
    "another currency": ('currency = "EUR"\n', "'EUR', an unknown currency"),
    "a negative price": ('[openai."m"]\nper_image = -1\n', "must be a number of USD >= 0"),
    "a price of nan": ('[openai."m"]\nper_image = nan\n', "must be a number of USD >= 0"),
    "a price as text": ('[openai."m"]\nper_image = "cheap"\n', "must be a number of USD >= 0"),
    "an unknown key": ('[openai."m"]\nper_imgae = 1\n', "unknown key 'per_imgae'"),
    "unknown hardware": ('[replicate."a/b"]\nhardware = "gpu-z9"\n', "'gpu-z9', which has no"),
    "a row's currency": ('[openai."m"]\nper_image = 1\ncurrency = "GBP"\n', "priced in 'GBP'"),
    # what the file says is shown escaped: it cannot clear the terminal
    "an escape in a name": ('[openai."\\u001b[2J"]\nper_imgae = 1\n', "'openai.\\x1b[2J' has"),
}


@pytest.mark.parametrize("case", sorted(BROKEN))
def test_a_broken_prices_file_is_one_line_exit_2_and_nothing_written(
    case: str, openai_fake: OpenAIFake, tmp_path: Path, db_path: Path
) -> None:
    text, message = BROKEN[case]
    path = tmp_path / "prices.toml"
    path.write_text(text)
    out = tmp_path / "img"
    env = cli_env(db_path, IMAGEPIPE_PRICES=str(path), XDG_DATA_HOME=str(tmp_path / "data"))
    for args in (openai_run("b1", out), [*openai_run("b1", out), "--dry-run"]):
        result = subprocess.run(cli_argv(*args), env=env, capture_output=True, text=True)
        assert result.returncode == 2, result.stderr
        assert result.stderr.count("\n") == 1, result.stderr
        assert result.stderr.startswith("error: "), result.stderr
        assert message in result.stderr, result.stderr
        assert "Traceback" not in result.stderr
        assert "\x1b" not in result.stderr
    assert not db_path.exists()
    assert not out.exists()
    assert not (tmp_path / "data").exists()
    assert sum(openai_fake.requests.values()) == 0


# -- --dry-run --------------------------------------------------------------------------


def test_dry_run_sends_nothing_and_writes_nothing(
    openai_fake: OpenAIFake, tmp_path: Path, db_path: Path
) -> None:
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a lighthouse\na harbour at dusk\n")
    out = tmp_path / "img"
    data_home = tmp_path / "data"
    env = cli_env(db_path, XDG_DATA_HOME=str(data_home), XDG_CONFIG_HOME=str(tmp_path / "c"))
    args = ["run", "--prompts", str(prompts), "-p", "openai", "-n", "2", "--out", str(out)]
    result = subprocess.run(
        cli_argv(*args, "-o", "quality", "high", "--rpm", "6", "--dry-run"),
        env=env,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == "Dry run: nothing was sent and nothing was written."
    assert "12 branches, 12 requests (up to 60 if every attempt failed)" in lines[1]
    assert lines[3].startswith("  cost:     $2.00 to $2.0")  # 12 x $0.167 and the prompts
    assert "at least 110.0 s (--rpm 6" in lines[-1]  # 11 gaps of 10 s
    assert sum(openai_fake.requests.values()) == 0
    assert not db_path.exists()
    assert not out.exists()
    assert not data_home.exists()


def test_dry_run_json_has_the_documented_shape(openai_fake: OpenAIFake, db_path: Path) -> None:
    data = json_of("run", PROMPT, "-p", "openai", "-o", "size", "1024x1536", "--dry-run", "--json")
    assert set(data) == {
        "dry_run",
        "id",
        "prompt",
        "provider",
        "options",
        "branches",
        "requests",
        "max_requests",
        "cost",
        "cost_per_image",
        "price_source",
        "time",
        "cap",
    }
    assert data["cap"] is None  # no --max-cost nor --max-images
    assert (data["dry_run"], data["branches"], data["requests"]) == (True, 3, 3)
    assert data["max_requests"] == 15
    assert data["options"] == {"model": "gpt-image-1", "size": "1024x1536"}
    per_image = data["cost_per_image"]
    assert per_image["low_micro_usd"] == 15_500  # low quality, portrait: $0.016, rounded
    longest = max(len(render(templates_for([s])[s], PROMPT, s).encode()) for s in STYLES)
    # high quality: $0.25 (published so, rounded: half a cent more), and the prompt's bytes
    assert per_image["high_micro_usd"] == 255_000 + 5 * longest
    assert data["cost"]["low_micro_usd"] == 3 * 15_500
    assert data["price_source"]["url"].startswith("https://developers.openai.com/")
    assert data["time"] == {
        "seconds": None,
        "rpm": None,
        "concurrency": 4,
        "basis": "the provider's rate limit depends on your account: give --rpm to estimate",
    }
    assert sum(openai_fake.requests.values()) == 0
    assert not db_path.exists()


def test_dry_run_of_the_simulated_provider_costs_nothing_and_knows_its_time() -> None:
    data = json_of("run", PROMPT, "-n", "4", "-c", "2", "--dry-run", "--json")
    assert data["cost"] == {"low_micro_usd": 0, "high_micro_usd": 0, "currency": "USD"}
    # (1200 + 800 + 1000) x 4 ms over 2 in flight, in real time (not the tests' scale)
    assert data["time"]["seconds"] == 6.0


def test_an_attempt_killed_mid_request_counts_as_may_have_been_paid(
    openai_fake: OpenAIFake,
    db_path: Path,
    tmp_path: Path,
    procs: list[subprocess.Popen[str]],
) -> None:
    """The provider made (and billed) the image, the process died before the answer."""
    openai_fake.add_fault(Fault.paid_then_hang(), times=1)
    args = openai_run("k1", tmp_path / "img", "-s", "cartoon", "-o", "quality", "high")
    env = cli_env(db_path, XDG_CONFIG_HOME=str(tmp_path / "c"))
    proc = subprocess.Popen(cli_argv(*args), env=env, stdout=subprocess.DEVNULL, text=True)
    procs.append(proc)
    openai_fake.wait_for(lambda: openai_fake.paid_creates == 1, timeout=300)
    proc.kill()
    proc.wait()
    cartoon = render(templates_for(["cartoon"])["cartoon"], PROMPT, "cartoon")
    worst = 167_500 + 5 * len(cartoon.encode())  # $0.167, its rounding, the prompt's bytes

    spent = json_of("show", "k1", "--json")["cost"]["spent"]
    assert (spent["images"], spent["failed_attempts"]) == (0, 1)
    assert spent["failed_attempts_micro_usd"] == worst

    resumed = subprocess.run(cli_argv("resume", "k1"), env=env, capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    spent = json_of("show", "k1", "--json")["cost"]["spent"]
    assert (spent["images"], spent["failed_attempts"]) == (1, 1)
    assert spent["micro_usd"] == words("cartoon") * 5 + OUTPUT_TOKENS[("high", "1024x1024")] * 40
    assert spent["failed_attempts_micro_usd"] == worst
