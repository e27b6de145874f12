"""The CLI as a user meets it, through Typer's runner (fast) and a few real subprocesses."""

from __future__ import annotations

import json
import re
import sqlite3
import subprocess
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from imagepipe.cli import app

from conftest import cli_argv, cli_env

runner = CliRunner()
RESULT_KEYS = {"id", "state", "prompt", "images", "wall_ms", "sequential_ms", "cost"}
IMAGE_KEYS = {"style", "url", "path", "duration_ms", "attempts", "replayed", "cost"}


def invoke(*args: str) -> Any:
    return runner.invoke(app, list(args), catch_exceptions=False)


def run_json(*args: str) -> dict[str, Any]:
    result = invoke("run", *args, "--json")
    assert result.exit_code == 0, result.stderr
    data: dict[str, Any] = json.loads(result.stdout)
    return data


def test_run_json_has_the_documented_shape() -> None:
    data = run_json("A futuristic city skyline", "--id", "r1")
    assert set(data) == RESULT_KEYS
    assert data["id"] == "r1"
    assert data["state"] == "resolved"
    assert [i["style"] for i in data["images"]] == ["photorealistic", "cartoon", "abstract"]
    for image in data["images"]:
        assert set(image) == IMAGE_KEYS
        assert re.fullmatch(
            rf"https://images\.example\.com/{image['style']}-\w{{8}}\.png", image["url"]
        )
        assert image["attempts"] == 1
        assert image["replayed"] is False
        # the image is on disk, a real PNG, before the run reports it
        path = Path(image["path"])
        assert path.name == f"{image['style']}.png"
        assert path.read_bytes().startswith(b"\x89PNG\r\n\x1a\n")
    assert [i["duration_ms"] for i in data["images"]] == [1200, 800, 1000]
    assert data["sequential_ms"] == 3000
    assert len({i["url"] for i in data["images"]}) == 3


def test_crash_mode_retries_only_the_abstract_branch() -> None:
    data = run_json("A futuristic city skyline", "--crash", "--id", "c1")
    assert data["state"] == "resolved"
    attempts = {i["style"]: i["attempts"] for i in data["images"]}
    assert attempts == {"photorealistic": 1, "cartoon": 1, "abstract": 2}


def test_crash_mode_plain_output_has_the_reference_lines() -> None:
    result = invoke("run", "A futuristic city skyline", "--crash", "--id", "c2")
    assert result.exit_code == 0
    out = result.stdout
    assert "If interrupted, resume with: imagepipe resume c2" in out
    assert re.search(r"\[abstract\]\s+Generating image \(attempt 1\)\.\.\.", out)
    assert re.search(
        r"\[abstract\]\s+Function 'generate_image' failed with 'Image generation service "
        r"timeout for style 'abstract'' \(retrying in 0\.02 secs\)",
        out,
    )
    assert re.search(r"\[abstract\]\s+Generating image \(attempt 2\)\.\.\.", out)
    assert re.search(r"\[cartoon\]\s+Done: https://images\.example\.com/cartoon-", out)
    assert re.search(r"Wall time: \d+ms \(parallel execution\)", out)
    assert "Sequential would: 3000ms" in out
    assert "\x1b[" not in out


def test_styles_and_default_id() -> None:
    data = run_json("a cat", "--style", "cartoon", "-s", "watercolor")
    assert re.fullmatch(r"pipeline-\d{13}", data["id"])
    assert [i["style"] for i in data["images"]] == ["cartoon", "watercolor"]
    assert [i["duration_ms"] for i in data["images"]] == [800, 1000]


def test_reusing_the_id_of_a_finished_run_shows_it_without_executing(db_path: Path) -> None:
    first = run_json("a cat", "--id", "same")
    again = run_json("a cat", "--id", "same")
    assert [i["url"] for i in again["images"]] == [i["url"] for i in first["images"]]
    assert all(i["replayed"] for i in again["images"])
    with sqlite3.connect(db_path) as db:
        rows = db.execute("SELECT attempts FROM promises WHERE parent_id = 'same'").fetchall()
    assert [attempts for (attempts,) in rows] == [1, 1, 1]


def test_reusing_an_id_with_other_arguments_is_refused(db_path: Path) -> None:
    run_json("a cat", "--id", "same")
    before = db_path.read_bytes()
    for args in (["a dog"], ["a cat", "--crash"], ["a cat", "-s", "cartoon"]):
        result = invoke("run", *args, "--id", "same")
        assert result.exit_code == 2
        assert result.stderr.startswith("error: run 'same' already exists with ")
        assert result.stderr.count("\n") == 1
    assert db_path.read_bytes() == before


def test_show_and_list_json() -> None:
    run_json("first prompt", "--id", "a1")
    run_json("second prompt", "--id", "a2", "--crash")
    shown = json.loads(invoke("show", "a2", "--json").stdout)
    assert set(shown) == {"id", "state", "prompt", "cost", "branches"}
    assert [b["id"] for b in shown["branches"]] == ["a2.0", "a2.1", "a2.2"]
    branch = shown["branches"][2]
    assert set(branch) == {"id", "style", "state", "attempts", "value", "error"}
    assert (branch["style"], branch["state"], branch["attempts"]) == ("abstract", "resolved", 2)
    assert branch["value"]["url"].startswith("https://images.example.com/abstract-")
    listed = json.loads(invoke("list", "--json").stdout)
    assert [r["id"] for r in listed] == ["a2", "a1"]
    assert set(listed[0]) == {"id", "state", "prompt", "created_at", "cost"}
    assert listed[1]["prompt"] == "first prompt"


def test_show_and_list_render_tables() -> None:
    run_json("a cat", "--id", "t1", "--crash")
    shown = invoke("show", "t1").stdout
    assert re.search(r"abstract\s+t1\.2\s+resolved\s+2\s+https://", shown)
    listed = invoke("list").stdout
    assert re.search(r"t1\s+resolved\s+3/3", listed)


def test_list_of_an_empty_store_says_how_to_start(db_path: Path) -> None:
    result = invoke("list")
    assert result.exit_code == 0
    assert "No runs yet" in result.stdout
    assert not db_path.exists()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["run", ""], "the prompt is empty"),
        (["run", "   "], "the prompt is empty"),
        (["run", "x", "-s", "bad\x01style"], "holds control characters"),
        (["run", "x", "-s", "cartoon", "-s", "cartoon"], "style 'cartoon' is given twice"),
        (["run", "x", "--max-attempts", "0"], "--max-attempts must be at least 1, not 0"),
        (["run", "x", "--id", "bad id"], "run id 'bad id' is not valid"),
        (["run", "x", "--id", "r.3"], "ends like a branch id"),
        (["resume", "nope"], "no run with id 'nope'"),
        (["show", "nope"], "no run with id 'nope'"),
        (["resume", "nope", "--max-attempts", "0"], "--max-attempts must be at least 1"),
    ],
)
def test_bad_input_is_one_line_exit_2_and_store_untouched(
    args: list[str], message: str, db_path: Path
) -> None:
    result = invoke(*args)
    assert result.exit_code == 2
    assert result.stderr.startswith("error: ")
    assert message in result.stderr
    assert result.stderr.count("\n") == 1
    assert result.stdout == ""
    assert not db_path.exists()


def test_unknown_id_in_an_existing_store(db_path: Path) -> None:
    run_json("a cat", "--id", "known")
    before = db_path.read_bytes()
    for command in ("resume", "show"):
        result = invoke(command, "unknown")
        assert result.exit_code == 2
        assert "no run with id 'unknown'" in result.stderr
    assert db_path.read_bytes() == before


def test_db_path_problems(tmp_path: Path) -> None:
    missing = tmp_path / "no" / "such" / "dir" / "x.db"
    result = invoke("run", "x", "--db", str(missing))
    assert result.exit_code == 2
    assert "does not exist" in result.stderr
    assert not missing.parent.exists()

    text = tmp_path / "notes.txt"
    text.write_text("precious\n")
    for command in (["run", "x"], ["resume", "r"], ["show", "r"], ["list"]):
        result = invoke(*command, "--db", str(text))
        assert result.exit_code == 2, command
        assert "is not a SQLite database" in result.stderr
    assert text.read_text() == "precious\n"

    result = invoke("run", "x", "--db", str(tmp_path))
    assert result.exit_code == 2
    assert "is a directory" in result.stderr


def test_bad_time_scale_is_refused(monkeypatch: pytest.MonkeyPatch, db_path: Path) -> None:
    monkeypatch.setenv("IMAGEPIPE_TIME_SCALE", "fast")
    result = invoke("run", "x")
    assert result.exit_code == 2
    assert "IMAGEPIPE_TIME_SCALE must be a number >= 0, not 'fast'" in result.stderr
    assert not db_path.exists()


def test_python_dash_m_is_the_same_command(db_path: Path) -> None:
    env = cli_env(db_path, IMAGEPIPE_TIME_SCALE="0.01")
    proc = subprocess.run(
        cli_argv("run", "a cat", "--id", "m1", "--json"), env=env, capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["id"] == "m1"
    help_text = subprocess.run(cli_argv("--help"), env=env, capture_output=True, text=True)
    assert help_text.returncode == 0
    for command in ("run", "resume", "list", "show"):
        assert command in help_text.stdout
