"""Bad input a hostile user gives through a real process: one line, exit 2, nothing written."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from imagepipe.cli import app

from conftest import cli_argv, cli_env

runner = CliRunner()


def run_cli(db: Path, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        cli_argv(*args),
        env=cli_env(db, **env),
        capture_output=True,
        text=True,
        errors="surrogateescape",
        timeout=30,
    )


def assert_refused(done: subprocess.CompletedProcess[str], message: str) -> None:
    assert done.returncode == 2, done.stderr
    assert done.stderr == f"error: {message}\n"
    assert done.stdout == ""


# Arguments that were not UTF-8 reach Python as lone surrogates: "\udce9" was byte 0xE9.
@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["run", "caf\udce9"], "the prompt is not valid UTF-8: 'caf\\xe9'"),
        (["run", "x", "--id", "r\udcff"], "the run id is not valid UTF-8: 'r\\xff'"),
        (["show", "x\udcff"], "the run id is not valid UTF-8: 'x\\xff'"),
        (["resume", "x\udcff"], "the run id is not valid UTF-8: 'x\\xff'"),
        (["run", "x", "-s", "\udcffcartoon"], "--style is not valid UTF-8: '\\xffcartoon'"),
        (["run", "x", "-o", "fail_style", "\udcff"], "-o fail_style is not valid UTF-8: '\\xff'"),
        # -o KEY VALUE, -o KEY=VALUE: the name and the value; for every command that runs
        (["run", "x", "-o", "model", "gpt\udcff"], "-o model is not valid UTF-8: 'gpt\\xff'"),
        (["run", "x", "-o", "model=gpt\udcff"], "-o model is not valid UTF-8: 'gpt\\xff'"),
        (
            ["run", "x", "-o", "mo\udcffdel", "gpt"],
            "-o: the option name is not valid UTF-8: 'mo\\xffdel'",
        ),
        (["resume", "x", "-o", "size", "\udce9"], "-o size is not valid UTF-8: '\\xe9'"),
        (["retry", "x", "-o", "size", "\udce9"], "-o size is not valid UTF-8: '\\xe9'"),
        (["worker", "--once", "-o", "size", "\udce9"], "-o size is not valid UTF-8: '\\xe9'"),
        (["run", "x", "-p", "open\udcffai"], "--provider is not valid UTF-8: 'open\\xffai'"),
    ],
)
def test_invalid_utf8_arguments_are_one_line_errors(
    db_path: Path, args: list[str], message: str
) -> None:
    assert_refused(run_cli(db_path, *args), message)
    assert not db_path.exists()


@pytest.mark.parametrize("command", [["run", "x"], ["list"], ["db-path"]])
def test_an_invalid_utf8_store_path_is_refused_and_not_created(
    tmp_path: Path, command: list[str]
) -> None:
    db = Path(os.fsdecode(bytes(tmp_path) + b"/t\xff.db"))
    assert_refused(run_cli(db, *command), f"--db is not valid UTF-8: '{tmp_path}/t\\xff.db'")
    assert os.listdir(tmp_path) == []


def test_a_prompt_file_whose_name_is_not_utf8_is_refused(tmp_path: Path, db_path: Path) -> None:
    # The file exists and reads well; its name would be stored as the run's label.
    path = Path(os.fsdecode(bytes(tmp_path) + b"/p\xff.txt"))
    path.write_text("a red fox\n", encoding="utf-8")
    done = run_cli(db_path, "run", "--prompts", str(path), "-s", "cartoon")
    assert_refused(done, f"--prompts is not valid UTF-8: '{tmp_path}/p\\xff.txt'")
    assert not db_path.exists()


def invoke(*args: str) -> Any:
    """In process: these refusals are about validation, not about the process."""
    return runner.invoke(app, list(args))


def test_an_empty_run_id_is_refused(db_path: Path) -> None:
    result = invoke("run", "x", "--id", "")
    assert result.exit_code == 2
    assert result.stderr == (
        "error: the run id is empty; name the run or omit --id for a generated one\n"
    )
    assert not db_path.exists()


@pytest.mark.parametrize("value", ["nan", "inf", "-inf", "-1", "0", "1e308"])
def test_attempt_timeout_must_be_a_sensible_number(db_path: Path, value: str) -> None:
    result = invoke("run", "x", f"--attempt-timeout={value}")
    assert result.exit_code == 2
    assert result.stderr.startswith("error: --attempt-timeout must be a number of seconds above 0")
    assert result.stderr.count("\n") == 1
    assert not db_path.exists()


@pytest.mark.parametrize("name", ["IMAGEPIPE_TIME_SCALE", "IMAGEPIPE_BUSY_TIMEOUT"])
@pytest.mark.parametrize("value", ["nan", "inf", "-1", "1e308", "1e5"])
def test_numeric_settings_must_be_sensible(
    db_path: Path, monkeypatch: pytest.MonkeyPatch, name: str, value: str
) -> None:
    monkeypatch.setenv(name, value)
    result = invoke("run", "x")
    assert result.exit_code == 2
    assert result.stderr.startswith(f"error: {name} must be ")
    assert result.stderr.endswith(f"not '{value}'\n")
    assert not db_path.exists()


def test_dev_null_as_the_store_is_refused(tmp_path: Path) -> None:
    journal = Path("/dev/null-journal")
    before = journal.stat().st_mtime_ns if journal.exists() else None
    for args in (["run", "x"], ["list"]):
        assert_refused(run_cli(Path("/dev/null"), *args), "--db /dev/null is not a regular file")
    assert (journal.stat().st_mtime_ns if journal.exists() else None) == before


def test_a_fifo_or_a_directory_as_the_store_is_refused(tmp_path: Path) -> None:
    fifo = tmp_path / "fifo.db"
    os.mkfifo(fifo)
    assert_refused(run_cli(fifo, "run", "x"), f"--db {fifo} is not a regular file")
    assert_refused(
        run_cli(tmp_path, "run", "x"), f"--db {tmp_path} is a directory, not a database file"
    )
    assert os.listdir(tmp_path) == ["fifo.db"]
