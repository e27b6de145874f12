"""Text a hostile user types, or a store holds, never drives the terminal when printed."""

from __future__ import annotations

import json
import sqlite3
import subprocess
from pathlib import Path

import pexpect
import pytest
from typer.testing import CliRunner

from imagepipe.cli import app
from imagepipe.text import escape_control, quoted
from tests.fakes.openai_server import OpenAIFake

from conftest import cli_argv, cli_env

pytest_plugins = ["tests.fakes.plugin"]

runner = CliRunner()
# Retitles the terminal, then clears it; the fox and the accent must survive as they are.
HOSTILE = "a \x1b]0;pwned\x07\x1b[2J\u202e[red]fox café 🦊"
SHOWN = "a \\x1b]0;pwned\\x07\\x1b[2J\\u202e[red]fox café 🦊"
RAW = ("\x1b]", "\x07", "\x1b[2J", "\u202e")


def assert_escaped(out: str) -> None:
    for raw in RAW:
        assert raw not in out
    assert SHOWN in out


@pytest.mark.parametrize(
    ("text", "shown"),
    [
        ("plain ascii", "plain ascii"),
        ("café 🦊 Ωμέγα 東京", "café 🦊 Ωμέγα 東京"),
        ("zero\u200dwidth joiner", "zero\u200dwidth joiner"),  # emoji sequences need it
        ("a\x1b[2Jb", "a\\x1b[2Jb"),
        ("bell\x07 del\x7f c1\x9b", "bell\\x07 del\\x7f c1\\x9b"),
        ("two\nlines\tand\r", "two\\nlines\\tand\\r"),
        ("caf\udce9", "caf\\xe9"),  # an undecodable byte, as Python keeps it in argv
        ("lone \ud800", "lone \\ud800"),
        ("\u202eevil\u2066", "\\u202eevil\\u2066"),
        # Every invisible format character (Cf) but the joiners, and the line separators.
        ("rlm\u200f alm\u061c lrm\u200e", "rlm\\u200f alm\\u061c lrm\\u200e"),
        ("zero\u200bwidth\ufeffbom soft\xadhyphen", "zero\\u200bwidth\\ufeffbom soft\\xadhyphen"),
        ("hidden \U000e0041\U000e0042 tags", "hidden \\U000e0041\\U000e0042 tags"),
        ("line\u2028para\u2029", "line\\u2028para\\u2029"),
        ("non\u200cjoiner", "non\u200cjoiner"),  # Persian and Indic scripts need it
    ],
)
def test_escape_control(text: str, shown: str) -> None:
    assert escape_control(text) == shown
    escape_control(text).encode("utf-8")  # always printable on a UTF-8 stream


def test_quoted_is_single_quoted_and_escaped() -> None:
    assert quoted("caf\udce9") == "'caf\\xe9'"


def _run(*args: str) -> str:
    result = runner.invoke(app, list(args), catch_exceptions=False)
    assert result.exit_code == 0, result.stderr
    return str(result.stdout)


def test_plain_lines_show_and_list_escape_the_prompt() -> None:
    plain = _run("run", HOSTILE, "--id", "h1", "--style", "cartoon")
    assert_escaped(plain)
    assert_escaped(_run("show", "h1"))
    listing = _run("list")
    for raw in RAW:
        assert raw not in listing
    assert SHOWN in listing  # and no rich markup: "[red]" is text


def test_json_stays_valid_json_with_the_text_intact() -> None:
    data = json.loads(_run("run", HOSTILE, "--id", "h2", "--style", "cartoon", "--json"))
    assert data["prompt"] == HOSTILE
    assert json.loads(_run("show", "h2", "--json"))["prompt"] == HOSTILE
    assert json.loads(_run("list", "--json"))[0]["prompt"] == HOSTILE


def test_show_json_escapes_what_stored_values_hold(
    db_path: Path,
) -> None:
    # A value a provider answered (say a revised prompt) holds any text; JSON keeps a C0
    # control escaped, but a C1 control (\x9b: CSI) would reach the terminal raw.
    _run("run", "a fox", "--id", "h5", "--style", "cartoon", "-n", "2")
    hostile = {"revised": "c1\x9b[2J café", "duration_ms": 1, "style": "cartoon"}
    plain = {"url": "https://x/y.png", "duration_ms": 2, "style": "cartoon"}
    with sqlite3.connect(db_path) as db:
        for branch, value in (("h5.0", hostile), ("h5.1", plain)):
            text = json.dumps(value, ensure_ascii=False, separators=(",", ":"))
            db.execute("UPDATE promises SET value = ? WHERE id = ?", (text, branch))
    out = _run("show", "h5", "--json")
    assert out.isascii(), "non-ASCII reached the terminal raw"
    shown = json.loads(out)["branches"]
    assert [b["value"] for b in shown] == [hostile, plain]


def test_an_out_folder_that_is_not_utf8_is_refused_before_anything_is_written(
    db_path: Path,
) -> None:
    result = runner.invoke(app, ["run", "a fox", "--id", "o1", "--out", "/tmp/b\udcffz"])
    assert result.exit_code == 2
    assert "--out is not valid UTF-8: '/tmp/b\\xffz'" in result.stderr
    assert not db_path.exists()


def test_error_messages_escape_what_they_quote(db_path: Path) -> None:
    _run("run", "a fox", "--id", "h3", "--style", "cartoon")
    result = runner.invoke(app, ["run", HOSTILE, "--id", "h3", "--style", "cartoon"])
    assert result.exit_code == 2
    assert_escaped(result.stderr)
    assert result.stderr.count("\n") == 1


def test_stored_error_messages_are_escaped_in_show(db_path: Path) -> None:
    # A style name reaches the stored error message of a refused branch.
    bad = "cartoon"
    result = runner.invoke(app, ["run", HOSTILE, "--id", "h4", "-s", bad, "-o", "fail_style", bad])
    assert result.exit_code == 1
    assert_escaped(result.stdout)
    assert_escaped(_run("show", "h4"))


def test_live_view_escapes_the_prompt(db_path: Path) -> None:
    environment = cli_env(db_path, IMAGEPIPE_TIME_SCALE="0.01", TERM="xterm-256color")
    environment.pop("NO_COLOR", None)
    argv = cli_argv("run", HOSTILE, "--id", "tty", "--style", "cartoon")
    child = pexpect.spawn(
        argv[0], argv[1:], env=environment, dimensions=(40, 160), encoding="utf-8", timeout=60
    )
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0, child.before
    screen = str(child.before)
    assert "\x1b[" in screen, "a terminal gets the live view"
    for raw in RAW:
        assert raw not in screen
    assert "\\x1b]0;pwned\\x07\\x1b[2J" in screen


def test_a_real_process_prints_escaped_errors(db_path: Path) -> None:
    done = subprocess.run(
        cli_argv("run", "x", "--style", "car\x1b[2Jtoon"),
        env=cli_env(db_path),
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert done.returncode == 2
    assert done.stderr == ("error: style 'car\\x1b[2Jtoon' holds control characters\n")


def _process(db: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        cli_argv(*args),
        env=cli_env(db, IMAGEPIPE_TIME_SCALE="0.01"),
        capture_output=True,
        text=True,
        errors="surrogateescape",
        timeout=60,
    )


def test_invisible_format_characters_are_shown_in_the_terminal(db_path: Path) -> None:
    # A right-to-left mark, an isolate and tag characters (invisible "ASCII smuggling").
    prompt = "a fox\u200f\u2067 hidden\U000e0068\U000e0069"
    done = _process(db_path, "run", prompt, "--id", "cf", "-s", "cartoon")
    assert done.returncode == 0, done.stderr
    shown = _process(db_path, "show", "cf")
    for out in (done.stdout, shown.stdout):
        assert "a fox\\u200f\\u2067 hidden\\U000e0068\\U000e0069" in out
        for raw in ("\u200f", "\u2067", "\U000e0068"):
            assert raw not in out


def test_a_prompts_own_placeholders_reach_the_provider_as_typed(
    db_path: Path, openai_fake: OpenAIFake
) -> None:
    # The template's {prompt} and {style} are filled in, once; the prompt's own braces are
    # text, whatever the template: a built-in one, or the one for any style text.
    prompt = "a {style} of {prompt} \\1 \\g<0>"
    done = _process(
        db_path, "run", prompt, "--id", "ph", "-p", "openai", "-s", "cartoon", "-s", "ink"
    )
    assert done.returncode == 0, done.stderr
    assert sorted(openai_fake.prompts) == [f"{prompt}, in a cartoon style", f"{prompt}, ink style"]


def _damage_schema(db: Path, sql: str) -> bytes:
    """Put bytes that are not UTF-8 into the store's schema, as a bad disk or tool might."""
    conn = sqlite3.connect(db)
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    conn.execute("PRAGMA writable_schema = ON")
    conn.execute(sql)
    conn.commit()
    conn.close()
    return db.read_bytes()


CORRUPT_SCHEMA = "is corrupt (its schema is not UTF-8); restore it from a backup\n"


def test_a_schema_that_is_not_utf8_is_a_corrupt_store_for_every_command(db_path: Path) -> None:
    assert _process(db_path, "run", "a fox", "--id", "s1", "-s", "cartoon").returncode == 0
    # SQLite cannot parse the damaged schema, and its message quotes the byte.
    damaged = _damage_schema(
        db_path,
        "UPDATE sqlite_master SET sql = sql || CAST(x'20ff' AS TEXT) WHERE name = 'leases'",
    )
    for args in (
        ["list"],
        ["show", "s1"],
        ["resume", "s1"],
        ["run", "a cat", "--id", "s2", "-s", "cartoon"],
        ["verify", "s1"],
        ["gallery", "s1"],
        ["workers"],
        ["worker", "--once"],
    ):
        done = _process(db_path, *args)
        assert done.returncode == 74, (args, done.stderr)
        assert done.stderr == f"error: the store {db_path} {CORRUPT_SCHEMA}", args
        assert db_path.read_bytes() == damaged, args


def test_a_schema_constraint_that_is_not_utf8_is_a_corrupt_store(db_path: Path) -> None:
    # A schema that SQLite parses, whose CHECK fails when a run takes its lease; the
    # error SQLite gives quotes the constraint, byte and all.
    assert _process(db_path, "run", "a fox", "--id", "s1", "-s", "cartoon").returncode == 0
    _damage_schema(
        db_path,
        "UPDATE sqlite_master SET sql = replace(sql, 'heartbeat_at REAL NOT NULL',"
        " 'heartbeat_at REAL NOT NULL CHECK (owner IS NULL OR owner = '''"
        " || CAST(x'ff' AS TEXT) || ''')') WHERE name = 'leases'",
    )
    done = _process(db_path, "run", "a cat", "--id", "s2", "-s", "cartoon")
    assert done.returncode == 74, done.stderr
    assert "Traceback" not in done.stderr
    assert done.stderr.endswith(f"error: the store {db_path} {CORRUPT_SCHEMA}")
