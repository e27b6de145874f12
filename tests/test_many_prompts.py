"""Issue 13 end to end through the CLI: a prompt file makes one run, the export loads in
the real `datasets`, and the gallery of that run loads in a real browser."""

from __future__ import annotations

import json
import sqlite3
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from browser_check import Browser, require_chromium
from test_export import load_with_datasets
from test_gallery_browser import QUERIES
from typer.testing import CliRunner

from imagepipe.cli import app

from conftest import cli_argv, cli_env

CSV = """prompt,style,variations
a lighthouse at dusk,,
"a cat & a ""dog"" <friends>",,2
mountains in fog,ink wash,
"""


def invoke(*args: str) -> Any:
    return CliRunner().invoke(app, list(args), catch_exceptions=False)


def prompt_run(tmp_path: Path, run_id: str = "many") -> dict[str, Any]:
    prompts = tmp_path / "prompts.csv"
    prompts.write_text(CSV)
    result = invoke(
        "run",
        "--prompts",
        str(prompts),
        "-s",
        "cartoon",
        "-s",
        "sketch",
        "--id",
        run_id,
        "--out",
        str(tmp_path / "images"),
        "--json",
    )
    assert result.exit_code == 0, result.stderr
    data: dict[str, Any] = json.loads(result.stdout)
    return data


def test_a_prompt_file_is_one_run_of_prompts_x_styles_x_variations(tmp_path: Path) -> None:
    data = prompt_run(tmp_path)
    # row 1: 2 styles; row 2: 2 styles x 2 variations; row 3: its own style
    assert len(data["images"]) == 2 + 4 + 1
    names = sorted(Path(i["path"]).name for i in data["images"])
    assert names == [
        "p0-cartoon.png",
        "p0-sketch.png",
        "p1-cartoon-1.png",
        "p1-cartoon.png",
        "p1-sketch-1.png",
        "p1-sketch.png",
        "p2-ink_wash.ad7205c10e.png",  # spaces are made safe, with a hash
    ]
    shown = json.loads(invoke("show", "many", "--json").stdout)
    assert shown["prompt"] == "prompts.csv (3 prompts)"


def test_a_bad_row_is_refused_before_anything_is_written(tmp_path: Path, db_path: Path) -> None:
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt": "ok"}\n{"prompt": "also ok", "variations": 0}\n')
    result = invoke("run", "--prompts", str(prompts))
    assert result.exit_code == 2
    assert result.stderr == (
        f"error: {prompts} line 2: variations must be from 1 to 100,000, not 0\n"
    )
    assert not db_path.exists()


def test_the_same_id_with_an_edited_file_is_refused_naming_the_row(tmp_path: Path) -> None:
    prompt_run(tmp_path)
    (tmp_path / "prompts.csv").write_text(CSV.replace("mountains in fog", "mountains in mist"))
    result = invoke(
        "run",
        "--prompts",
        str(tmp_path / "prompts.csv"),
        "--id",
        "many",
        "-s",
        "cartoon",
        "-s",
        "sketch",
    )
    assert result.exit_code == 2
    assert "line 4: prompt 'mountains in fog' is now 'mountains in mist'" in result.stderr


@pytest.mark.slow
def test_the_export_loads_in_datasets_with_every_row_and_column(
    tmp_path: Path, db_path: Path
) -> None:
    prompt_run(tmp_path)
    with sqlite3.connect(db_path) as db:  # one branch rejected: it is left out, and said so
        db.execute(
            "UPDATE promises SET state = 'rejected', value = NULL,"
            """ error = '{"message":"no","retryable":false,"type":"E"}' WHERE id = 'many.6'"""
        )
    result = invoke("export", "many", str(tmp_path / "ds"))
    assert result.exit_code == 0, result.stderr
    assert "not exported: many.6 (#3 ink wash) rejected: E: no" in result.stderr
    loaded = load_with_datasets(tmp_path, tmp_path / "ds")[str(tmp_path / "ds")]
    assert loaded["splits"] == ["train"]
    assert set(loaded["columns"]) == {
        "image",
        "prompt",
        "style",
        "variation",
        "provider",
        "model",
        "size",
        "seed",
        "sha256",
        "attempts",
        "request_id",
        "cost_micro_usd",
        "cost_currency",
    }
    assert len(loaded["rows"]) == 6
    assert {r["prompt"] for r in loaded["rows"]} == {
        "a lighthouse at dusk",
        'a cat & a "dog" <friends>',
    }
    assert all(r["image"] == [256, 256] for r in loaded["rows"])


def test_show_prompt_n_shows_one_prompts_branches(tmp_path: Path) -> None:
    prompt_run(tmp_path)
    result = invoke("show", "many", "--prompt", "2")
    assert result.exit_code == 0, result.stderr
    assert 'prompt #2: a cat & a "dog" <friends>' in result.stdout
    rows = [line for line in result.stdout.splitlines() if line.startswith("#2 ")]
    assert [row.split()[1] for row in rows] == ["cartoon", "cartoon#1", "sketch", "sketch#1"]
    assert not any(line.startswith(("#1 ", "#3 ")) for line in result.stdout.splitlines())
    assert (
        invoke("show", "many", "--prompt", "4").stderr == "error: --prompt must be 1 to 3, not 4\n"
    )


def test_user_style_templates_come_from_styles_toml(tmp_path: Path, monkeypatch: Any) -> None:
    styles = tmp_path / "styles.toml"
    styles.write_text('noir = "{prompt}, film noir, high contrast"\ncartoon = "{prompt}, toon"\n')
    monkeypatch.setenv("IMAGEPIPE_STYLES", str(styles))
    listed = {s["name"]: s for s in json.loads(invoke("styles", "--json").stdout)}
    assert listed["noir"]["template"] == "{prompt}, film noir, high contrast"
    assert listed["cartoon"]["source"] == str(styles)
    assert listed["sketch"]["source"] == "built-in"
    data = json.loads(
        invoke("run", "a cat", "-s", "noir", "-s", "velvet", "--id", "t", "--json").stdout
    )
    assert data["state"] == "resolved"
    stored = json.loads(invoke("show", "t", "--json").stdout)
    assert stored["state"] == "resolved"
    from imagepipe.service import show_run

    spec = show_run(str(tmp_path / "imagepipe.db"), "t").spec
    assert spec.templates == {
        "noir": "{prompt}, film noir, high contrast",
        "velvet": "{prompt}, {style} style",
    }
    styles.write_text('noir = "no prompt here"\n')
    bad = invoke("run", "a cat", "-s", "noir")
    assert bad.exit_code == 2
    assert "must be a string containing {prompt}" in bad.stderr


# The browser's driver runs an event loop in this thread while its module-scoped fixture
# lives: its test comes last, after every test that runs the CLI in this process.


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    require_chromium()
    with Browser() as browser:
        yield browser


def test_the_gallery_of_a_run_loads_in_a_browser(
    browser: Browser, tmp_path: Path, db_path: Path
) -> None:
    # Real processes: the browser's driver runs an event loop in this thread.
    (tmp_path / "prompts.csv").write_text(CSV)
    run = [
        "run",
        "--prompts",
        str(tmp_path / "prompts.csv"),
        "-s",
        "cartoon",
        "-s",
        "sketch",
        "--id",
        "many",
        "--out",
        str(tmp_path / "images"),
        "--json",
    ]
    for args in (run, ["gallery", "many"]):
        done = subprocess.run(
            cli_argv(*args), env=cli_env(db_path), capture_output=True, text=True, timeout=60
        )
        assert done.returncode == 0, done.stderr
    page = Path(done.stdout.strip())
    assert page == tmp_path / "images" / "index.html"
    report = browser.load(page.as_uri(), queries=QUERIES, screenshot=tmp_path / "shot.png")
    assert len(report.images) == 7
    assert all(i.complete and i.natural_width == 256 for i in report.images)
    assert report.results["styles"] == ["cartoon", "sketch", "ink wash"]
    assert report.results["cells_per_row"] == [3, 3, 3]
    assert report.results["states"].count("resolved") == 5  # 7 images, 2 cells hold 2
    assert report.results["states"].count("empty") == 4
    assert all(url.startswith("file://") for url in report.requests)
