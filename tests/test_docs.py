"""The docs stay complete and true.

- The reference pages document every command, option and setting (a new one fails here
  until it is), and the README stays a front page whose links lead somewhere.
- Every checked transcript of the README and ``docs/`` is run against a fresh store and
  compared with what the page shows. The convention (also in docs/internals/testing.md):
  a ```console block whose lines starting with ``$ `` are commands is a transcript; each
  command is ``imagepipe ...``, or ``imagepipe ... & sleep N; kill -9 $!`` (killed once it
  has printed the lines shown). A transcript that cannot be run here (a fake server,
  background workers) is preceded by ``<!-- transcript not checked: REASON -->``.
"""

from __future__ import annotations

import re
import shlex
import signal
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import pytest
import typer

from imagepipe.cli import app

from conftest import cli_env

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
README = ROOT / "README.md"
COMMANDS_PAGE = DOCS / "reference" / "commands.md"
SETTINGS_PAGE = DOCS / "reference" / "settings.md"
UNCHECKED = "<!-- transcript not checked:"


def test_every_command_and_option_is_in_the_reference() -> None:
    text = COMMANDS_PAGE.read_text()
    group = typer.main.get_command(app)
    commands = group.commands  # type: ignore[attr-defined]
    assert set(commands) == {
        "run",
        "resume",
        "retry",
        "list",
        "show",
        "db-path",
        "providers",
        "styles",
        "verify",
        "export",
        "gallery",
        "worker",
        "watch",
        "workers",
        "cancel",
    }
    missing = []
    for name, command in commands.items():
        if f"imagepipe {name}" not in text:
            missing.append(f"imagepipe {name}")
        for param in command.params:
            for opt in param.opts:
                if opt.startswith("--") and opt != "--help" and f"`{opt}" not in text:
                    missing.append(f"{name} {opt}")
    assert not missing, f"undocumented in {COMMANDS_PAGE.relative_to(ROOT)}: {missing}"


def test_every_setting_is_in_the_reference() -> None:
    from imagepipe import settings

    text = SETTINGS_PAGE.read_text()
    names = [word for word in (settings.__doc__ or "").split("``") if word.startswith("IMAGEPIPE_")]
    assert len(names) >= 4
    for name in names:
        assert f"`{name}`" in text, name


def test_the_readme_is_a_front_page_whose_links_lead_somewhere() -> None:
    text = README.read_text()
    assert len(text.splitlines()) <= 250
    targets = re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", text)
    local = [target for target in targets if "://" not in target]
    assert any(target.startswith("docs/") for target in local)
    broken = [target for target in local if not (ROOT / target).exists()]
    assert not broken, broken


# --- transcripts ----------------------------------------------------------------------------

#: Parts of the output that differ from run to run, replaced on both sides before comparing.
VOLATILE = [
    (re.compile(r"\S*/imagepipe/images/"), "<data>/imagepipe/images/"),
    (re.compile(r"\d{4}-\d{2}-\d{2} \d{2}:\d{2}(:\d{2})?"), "<date>"),
    (re.compile(r"\b\d{2}:\d{2}:\d{2}\b"), "<time>"),
    (re.compile(r"Wall time: \d+ms"), "Wall time: <n>ms"),
    (re.compile(r"^[\d.]+× (faster than sequential|the sequential time: .*)$"), "<speed-up>"),
    # IMAGEPIPE_TIME_SCALE shrinks the back-off it announces
    (re.compile(r"retrying in [\d.]+ secs"), "retrying in <n> secs"),
    # the PNGs' sizes depend on Pillow's and zlib's versions
    (re.compile(r"\b[\d,]+ B\)"), "<n> B)"),
]
KILLED = re.compile(r"^(imagepipe .*) & sleep [\d.]+; kill -9 \$!$")
EVENT = re.compile(r"^\[([^\]]+)\]")


@dataclass(frozen=True)
class Step:
    command: str
    output: tuple[str, ...]


@dataclass(frozen=True)
class Transcript:
    where: str
    steps: tuple[Step, ...]


def console_blocks(path: Path) -> list[tuple[int, list[str], bool]]:
    """(line number, lines, checked) of each ```console block of a page."""
    blocks = []
    lines = path.read_text().splitlines()
    index = 0
    while index < len(lines):
        if lines[index].strip() == "```console":
            start = index
            end = lines.index("```", start + 1)
            checked = not (start > 0 and lines[start - 1].startswith(UNCHECKED))
            blocks.append((start + 1, lines[start + 1 : end], checked))
            index = end
        index += 1
    return blocks


def pages() -> list[Path]:
    return [README, *sorted(p for p in DOCS.rglob("*.md") if "_build" not in p.parts)]


def transcripts() -> list[Transcript]:
    found: dict[tuple[Step, ...], list[str]] = {}
    for page in pages():
        for line_number, lines, checked in console_blocks(page):
            if not checked or not any(line.startswith("$ ") for line in lines):
                continue
            steps: list[Step] = []
            command: str | None = None
            output: list[str] = []
            for line in [*lines, "$ "]:
                if line.startswith("$ "):
                    if command is not None:
                        while output and not output[-1].strip():
                            output.pop()
                        steps.append(Step(command, tuple(output)))
                    command, output = line[2:], []
                elif command is None:
                    raise AssertionError(f"{page}:{line_number}: output before the first command")
                else:
                    output.append(line)
            where = f"{page.relative_to(ROOT)}:{line_number}"
            found.setdefault(tuple(steps), []).append(where)
    return [Transcript(" and ".join(wheres), steps) for steps, wheres in found.items()]


def normalise(lines: list[str] | tuple[str, ...]) -> list[str]:
    """The volatile parts replaced, spacing collapsed, and each run of event lines
    (``[style] ...``) grouped by branch: the order between branches depends on the clock,
    the order within one is what the transcript shows."""
    out: list[str] = []
    for line in lines:
        for pattern, replacement in VOLATILE:
            line = pattern.sub(replacement, line)
        line = " ".join(line.split())
        if line:
            out.append(line)
    grouped: list[str] = []
    branches: dict[str, list[str]] = {}
    for line in [*out, ""]:
        event = EVENT.match(line)
        if event:
            branches.setdefault(event.group(1), []).append(line)
            continue
        for events in branches.values():  # each branch's events, in its first line's order
            grouped += events
        branches = {}
        if line:
            grouped.append(line)
    return grouped


def argv(command: str) -> list[str]:
    words = shlex.split(command)
    assert words[0] == "imagepipe", f"only imagepipe commands are run: {command!r}"
    assert not {"|", ">", "&", ";", "&&"} & set(words), f"no shell here: {command!r}"
    return [sys.executable, "-m", "imagepipe", *words[1:]]


def run_until_shown(args: list[str], env: dict[str, str], cwd: str, shown: int) -> list[str]:
    """Start a command, read what it prints until it has printed ``shown`` lines, kill -9."""
    proc = subprocess.Popen(
        args, env=env, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    assert proc.stdout is not None
    lines: list[str] = []
    try:
        while len(lines) < shown:
            line = proc.stdout.readline()
            if not line:
                break
            lines.append(line.rstrip("\n"))
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        proc.stdout.close()
    return lines


def replay(transcript: Transcript, kill_scale: str) -> list[tuple[str, list[str], list[str]]]:
    """Run the transcript's commands in a fresh folder and store; each command's
    (command, expected, actual) output, normalised."""
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        env = cli_env(
            Path(tmp) / "imagepipe.db",
            IMAGEPIPE_TIME_SCALE="0.01",
            XDG_DATA_HOME=str(Path(tmp) / "xdg"),
            XDG_CONFIG_HOME=str(Path(tmp) / "config"),
        )
        for step in transcript.steps:
            killed = KILLED.match(step.command)
            if killed:
                # The kill must land where the page shows it (in the crash demo: during
                # the 2 s back-off), so this command keeps a slower clock; it is killed
                # as soon as it has printed what the page shows, never after a sleep.
                shown = len([line for line in step.output if line.strip()])
                actual = run_until_shown(
                    argv(killed.group(1)), {**env, "IMAGEPIPE_TIME_SCALE": kill_scale}, tmp, shown
                )
            else:
                proc = subprocess.run(
                    argv(step.command),
                    env=env,
                    cwd=tmp,
                    stdout=subprocess.PIPE,
                    stderr=subprocess.STDOUT,
                    text=True,
                    timeout=60,
                )
                actual = proc.stdout.splitlines()
            results.append((step.command, normalise(step.output), normalise(actual)))
    return results


@pytest.mark.parametrize("transcript", transcripts(), ids=lambda t: t.where)
def test_transcript_is_true(transcript: Transcript) -> None:
    results = replay(transcript, kill_scale="1")
    if any(KILLED.match(step.command) for step in transcript.steps) and any(
        expected != actual for _, expected, actual in results
    ):
        # On a loaded machine the kill may land after the back-off it aims at: play it
        # again with a clock five times slower before calling the transcript stale.
        results = replay(transcript, kill_scale="5")
    for command, expected, actual in results:
        assert actual == expected, f"{transcript.where}: `{command}` printed otherwise"


def test_transcripts_are_found_and_a_stale_one_fails() -> None:
    found = transcripts()
    commands = [step.command for t in found for step in t.steps]
    assert any(c.startswith("imagepipe run --crash") and "kill -9" in c for c in commands)
    assert any(c.startswith("imagepipe resume") for c in commands)
    assert any("README.md" in t.where for t in found)
    # A transcript whose image URL went stale is caught: the comparison does not
    # normalise it away.
    run = next(t for t in found if t.steps[0].command.startswith('imagepipe run "A futuristic'))
    step = run.steps[0]
    stale = tuple(line.replace("cartoon-1e93ca0c", "cartoon-00000000") for line in step.output)
    assert stale != step.output
    [(_, expected, actual)] = replay(Transcript("stale", (Step(step.command, stale),)), "1")
    assert expected != actual
    assert [line for line in expected if line not in actual] == [
        "[cartoon] Done: https://images.example.com/cartoon-00000000.png",
        "cartoon https://images.example.com/cartoon-00000000.png cartoon.png 800ms 1 computed",
    ]


def test_an_unchecked_transcript_says_why() -> None:
    for page in pages():
        lines = page.read_text().splitlines()
        for index, line in enumerate(lines):
            if line.startswith(UNCHECKED):
                where = f"{page.relative_to(ROOT)}:{index + 1}"
                reason = line.removeprefix(UNCHECKED).strip().removesuffix("-->").strip()
                assert reason, f"{where}: say why the transcript is not checked"
                assert lines[index + 1] == "```console", f"{where}: marks no transcript"
