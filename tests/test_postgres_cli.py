"""The CLI on a PostgreSQL store (``IMAGEPIPE_DB=postgresql://...``), through Typer's runner."""

from __future__ import annotations

import json
from typing import Any

import pytest
from typer.testing import CliRunner

from imagepipe.cli import app

runner = CliRunner()
SECRET = "s3cr3t-pw"


@pytest.fixture
def pg_db(postgres_url: str, monkeypatch: pytest.MonkeyPatch) -> str:
    """The test's database as the store, with a password in the URL (the server ignores it)."""
    url = postgres_url.replace("postgres@", f"postgres:{SECRET}@", 1)
    monkeypatch.setenv("IMAGEPIPE_DB", url)
    return url


def invoke(*args: str) -> Any:
    return runner.invoke(app, list(args), catch_exceptions=False)


def test_run_list_show_and_resume_on_postgres(pg_db: str) -> None:
    ran = invoke("run", "a cat", "--crash", "--id", "cat", "--json")
    assert ran.exit_code == 0, ran.stderr
    data = json.loads(ran.stdout)
    assert data["state"] == "resolved"
    assert {i["style"]: i["attempts"] for i in data["images"]} == {
        "photorealistic": 1,
        "cartoon": 1,
        "abstract": 2,
    }
    listed = invoke("list")
    assert listed.exit_code == 0
    assert "cat" in listed.stdout
    assert "3/3" in listed.stdout
    shown = invoke("show", "cat", "--json")
    assert shown.exit_code == 0
    assert [b["state"] for b in json.loads(shown.stdout)["branches"]] == ["resolved"] * 3
    resumed = invoke("resume", "cat", "--json")
    assert resumed.exit_code == 0
    assert [i["url"] for i in json.loads(resumed.stdout)["images"]] == [
        i["url"] for i in data["images"]
    ]
    assert all(i["replayed"] for i in json.loads(resumed.stdout)["images"])


@pytest.mark.parametrize("command", ["show", "resume"])
def test_an_unknown_run_in_an_empty_database_does_not_print_the_password(
    pg_db: str, command: str
) -> None:
    result = invoke(command, "nope")
    assert result.exit_code == 2
    assert "no run with id 'nope'" in result.stderr
    assert SECRET not in result.stderr + result.stdout


def test_an_unreachable_server_is_exit_2_in_one_line_without_the_password(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("IMAGEPIPE_DB", f"postgresql://bob:{SECRET}@127.0.0.1:1/runs")
    result = invoke("run", "a cat", "--json")
    assert result.exit_code == 2
    assert result.stderr.count("\n") == 1
    assert "Connection refused" in result.stderr
    assert SECRET not in result.stderr


def test_watch_of_an_unknown_run_does_not_print_the_password(pg_db: str) -> None:
    result = invoke("watch", "nope")
    assert result.exit_code == 2
    assert "no run with id 'nope'" in result.stderr
    assert SECRET not in result.stderr + result.stdout


@pytest.mark.parametrize(
    ("url", "secrets"),
    [
        # libpq quotes the bad percent-encoding: the password itself
        ("postgresql://u:Pw%ZZ_{s}@/db?host=/tmp", ["ZZ_"]),
        # malformed: spaces in the password and in the host, two ports
        ("postgresql://u:pass {s}@ho st:x:y/db", ["pass "]),
        # the password as a query parameter of a URL that does not parse
        ("postgresql://u@/db?host=/tmp&password={s}&bogus=1", []),
        ("postgresql://u@/db?host=/tmp&password='{s} x'&sslmode=bogus", []),
        # not a store URL at all
        ("mysql://u:{s}@db.local/runs", []),
    ],
)
def test_a_url_that_cannot_be_used_is_one_line_without_the_password(
    url: str, secrets: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("IMAGEPIPE_DB", url.format(s=SECRET))
    result = invoke("list")
    assert result.exit_code == 2, result.stderr
    assert result.stderr.count("\n") == 1
    assert result.stderr.startswith("error: ")
    for secret in [SECRET, *secrets]:
        assert secret not in result.stderr + result.stdout


def test_text_that_is_not_utf8_in_the_url_is_refused_without_the_password() -> None:
    result = invoke("list", "--db", f"postgresql://u:{SECRET}\udcff@db.local/runs")
    assert result.exit_code == 2
    assert "--db is not valid UTF-8" in result.stderr
    assert SECRET not in result.stderr


@pytest.mark.parametrize(
    "url",
    [
        "postgresql://bob:{s}@db.local:5433/runs",
        "postgres://bob@db.local/runs?password={s}&sslmode=require",
        "postgresql://bob:p@ss{s}@db.local/runs",
    ],
)
def test_db_path_prints_the_url_without_its_password(url: str) -> None:
    result = invoke("db-path", "--db", url.format(s=SECRET))
    assert result.exit_code == 0
    assert SECRET not in result.stdout
    assert "***" in result.stdout
    assert "db.local" in result.stdout
