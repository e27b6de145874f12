"""What a user sees: the live table in a terminal, plain lines in a pipe, the summary at scale."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pexpect
import pytest
from rich.console import Console

from imagepipe.durable import ErrorInfo
from imagepipe.durable.events import (
    AttemptFailed,
    AttemptStarted,
    PromiseQueued,
    PromiseRejectedEvent,
    PromiseResolved,
)
from imagepipe.runs import RunInfo, RunSpec
from imagepipe.ui import FULL_TABLE_LIMIT, Board, board_renderable

from conftest import cli_argv, cli_env

ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")
COLOUR = re.compile(r"\x1b\[[0-9;]*(3[0-7]|9[0-7]|38;[0-9;]+)m")


def in_terminal(db: Path, *args: str, scale: str = "0.05", **env: str) -> str:
    """Run the CLI under a pseudo-terminal and return everything it drew."""
    environment = cli_env(db, IMAGEPIPE_TIME_SCALE=scale, TERM="xterm-256color", **env)
    environment.pop("NO_COLOR", None)
    environment.update(env)
    argv = cli_argv(*args)
    child = pexpect.spawn(
        argv[0], argv[1:], env=environment, dimensions=(40, 160), encoding="utf-8", timeout=60
    )
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0, child.before
    return str(child.before)


def test_live_table_shows_every_branch_the_retry_and_the_final_states(db_path: Path) -> None:
    # Scale 1: the 2 s back-off lasts 2 s, ten frames at 5 frames a second: a machine
    # loaded enough to skip a few frames still draws the retry (0.6 s was three frames).
    screen = in_terminal(
        db_path, "run", "A futuristic city skyline", "--crash", "--id", "tty1", scale="1"
    )
    assert ANSI.search(screen), "a terminal gets a live, redrawn table"
    text = ANSI.sub("", screen)
    assert "tty1" in text
    assert "crash mode" in text
    for header in ("style", "id", "state", "attempt", "elapsed", "result"):
        assert header in text
    # the retry is visible in the table and as the reference's log line above it
    assert re.search(r"abstract\s+tty1\.2\s+retrying\s+1\s+.*retry in \d\.\d s", text)
    assert (
        "Function 'generate_image' failed with 'Image generation service timeout for style "
        "'abstract'' (retrying in 2 secs)" in text
    )
    # the final frame: every branch resolved, with its URL
    final = text[text.rindex("photorealistic  tty1.0") :]
    for n, style in enumerate(("photorealistic", "cartoon", "abstract")):
        assert re.search(rf"{style}\s+tty1\.{n}\s+resolved\s+\d\s+.*https://images", final)
    assert "3 resolved" in final
    assert re.search(r"Wall time: \d+ms \(parallel execution\)", final)
    assert "Sequential would: 3000ms" in final


def test_resume_shows_replayed_branches_at_once(db_path: Path) -> None:
    proc = subprocess.run(
        cli_argv("run", "a cat", "--id", "tty2", "--fail-style", "cartoon", "--json"),
        env=cli_env(db_path, IMAGEPIPE_TIME_SCALE="0.01"),
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 1
    text = ANSI.sub("", in_terminal(db_path, "retry", "tty2"))
    assert re.search(r"photorealistic\s+tty2\.0\s+replayed", text)
    assert re.search(r"abstract\s+tty2\.2\s+replayed", text)
    assert re.search(r"cartoon\s+tty2\.1\s+resolved\s+2", text)
    assert "2 of 3 branches replayed from the store" in text


@pytest.mark.parametrize("switch", [("--no-color",), ()])
def test_no_colour_switches(db_path: Path, switch: tuple[str, ...]) -> None:
    env = {} if switch else {"NO_COLOR": "1"}
    screen = in_terminal(db_path, "run", "a cat", *switch, scale="0.01", **env)
    assert ANSI.search(screen), "still a live display"
    assert not COLOUR.search(screen)


def test_piped_output_is_one_plain_line_per_event(db_path: Path) -> None:
    proc = subprocess.run(
        cli_argv("run", "A futuristic city skyline", "--crash", "--id", "pipe1"),
        env=cli_env(db_path, IMAGEPIPE_TIME_SCALE="0.01", TERM="xterm-256color"),
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0
    assert "\x1b" not in proc.stdout
    events = [line for line in proc.stdout.splitlines() if line.startswith("[")]
    assert len(events) == 8  # 3 starts, 1 failure, 1 restart, 3 done
    assert sorted(events) == sorted(set(events)), "no line is repeated by redraws"
    assert "Done: https://" in events[-1]


def test_quiet_prints_only_the_final_result(db_path: Path) -> None:
    proc = subprocess.run(
        cli_argv("run", "a cat", "--quiet"),
        env=cli_env(db_path, IMAGEPIPE_TIME_SCALE="0.01"),
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0
    assert "Generating" not in proc.stdout
    assert proc.stdout.startswith("Results of pipeline-")
    assert "Sequential would: 3000ms" in proc.stdout


def fake_board(n: int) -> Board:
    """A board fed with the events of ``n`` branches in every state."""
    board = Board(started=100.0)
    board.info = RunInfo("big", RunSpec("many cats", ("cartoon",), False, n), False, 5)
    for i in range(n):
        args = {"prompt": "p", "style": "cartoon", "variation": i, "crash": False}
        board.apply(PromiseQueued(f"big.{i}", "generate_image", args, 0), 100.0)
    for i in range(n):
        t = 100.0 + 2 * i / n  # events arrive over two seconds
        if i % 10 == 9:
            continue  # 10 % stay queued
        board.apply(AttemptStarted(f"big.{i}", "generate_image", 1), t)
        if i % 10 < 6:
            board.apply(PromiseResolved(f"big.{i}", {"url": f"u{i}"}, 1), t)
        elif i % 10 == 6:
            error = ErrorInfo("TransientProviderError", "busy")
            board.apply(AttemptFailed(f"big.{i}", "generate_image", 1, error, 2.0), t)
        elif i % 10 == 7:
            board.apply(PromiseRejectedEvent(f"big.{i}", ErrorInfo("E", "no"), 5), t)
    return board


def test_many_branches_render_as_a_summary_with_only_the_active_rows() -> None:
    board = fake_board(5000)
    assert board.counts["resolved"] == 3000
    assert board.counts["retrying"] == 500
    assert board.counts["rejected"] == 500
    assert board.counts["running"] == 500
    assert board.counts["queued"] == 500
    console = Console(record=True, width=140, force_terminal=False, color_system=None)
    console.print(board_renderable(board, now=102.1))
    lines = console.export_text().splitlines()
    text = "\n".join(lines)
    assert len(lines) < 30, "a summary, never thousands of rows"
    assert "3500/5000" in text  # settled = resolved + rejected
    rate = re.search(r"(\d+)/s", text)
    assert rate is not None
    assert 1000 <= int(rate.group(1)) <= 2500  # 3500 settled in 2 s of events
    assert "ETA 1 s" in text
    assert "500 queued · 500 running · 500 retrying · 3000 resolved · 500 rejected" in text
    shown = [line for line in lines if line.startswith("cartoon#")]
    assert len(shown) == 12
    states = [line.split()[2] for line in shown]
    assert states.count("rejected") == 4
    assert "retrying" in states
    assert "… and 1488 more running, retrying or rejected" in text


def test_up_to_the_limit_every_branch_has_a_row() -> None:
    board = fake_board(FULL_TABLE_LIMIT)
    console = Console(record=True, width=140, color_system=None)
    console.print(board_renderable(board, now=102.1))
    text = console.export_text()
    assert all(f"big.{i} " in text for i in range(FULL_TABLE_LIMIT))


def test_a_prompt_file_run_past_one_screen_shows_one_row_a_prompt() -> None:
    prompts = tuple({"line": i + 1, "prompt": f"prompt {i}"} for i in range(50))
    board = Board(started=100.0)
    spec = RunSpec("prompts.txt (50 prompts)", ("cartoon", "sketch"), prompts=prompts)
    board.info = RunInfo("pf", spec, False, 5)
    for i in range(100):  # 50 prompts x 2 styles
        args = {
            "prompt": f"prompt {i // 2}",
            "style": ("cartoon", "sketch")[i % 2],
            "variation": 0,
            "crash": False,
            "prompt_index": i // 2,
        }
        board.apply(PromiseQueued(f"pf.{i}", "generate_image", args, 0), 100.0)
    for i in range(40):  # prompts 0-19 done
        board.apply(AttemptStarted(f"pf.{i}", "generate_image", 1), 100.5)
        board.apply(PromiseResolved(f"pf.{i}", {"url": "u"}, 1), 100.5)
    for i in (40, 41, 43):  # prompt 20 running, prompt 21 one running
        board.apply(AttemptStarted(f"pf.{i}", "generate_image", 1), 100.6)
    board.apply(PromiseRejectedEvent("pf.41", ErrorInfo("E", "no"), 5), 100.7)
    console = Console(record=True, width=140, force_terminal=False, color_system=None)
    console.print(board_renderable(board, now=101.0))
    lines = console.export_text().splitlines()
    # one row a prompt that is active, with its counts; the finished ones counted
    assert any(re.match(r"#21\s+prompt 20\s+1/2\s+1 running · 1 rejected", line) for line in lines)
    assert any(re.match(r"#22\s+prompt 21\s+0/2\s+1 queued · 1 running", line) for line in lines)
    assert "50 prompts, 20 finished; 48 not shown" in lines
    # the active branches are labelled with their prompt's row
    assert any(line.startswith("#21 sketch") for line in lines)
    assert len(lines) < 30
