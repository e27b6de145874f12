"""Prompt files: the three formats, every reason a file is refused, identity, and speed."""

from __future__ import annotations

import gc
import json
import subprocess
import time
from pathlib import Path

import pytest

from imagepipe.errors import BadInput
from imagepipe.prompts import (
    MAX_BRANCHES,
    MAX_PROMPT_CHARS,
    MAX_ROWS,
    MAX_VARIATIONS,
    PromptFileError,
    PromptRow,
    branch_count,
    first_changed_row,
    load_prompts,
    prompts_identity,
)
from imagepipe.text import escape_control

from conftest import cli_argv, cli_env


def write(tmp_path: Path, name: str, text: str | bytes) -> Path:
    path = tmp_path / name
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text, encoding="utf-8", newline="")
    return path


def refused(path: Path, **kwargs: int) -> PromptFileError:
    with pytest.raises(PromptFileError) as info:
        load_prompts(path, **kwargs)
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith(escape_control(str(path)))
    return info.value


# -- formats -------------------------------------------------------------------------------


def test_txt_skips_blank_and_comment_lines_and_strips(tmp_path: Path) -> None:
    path = write(tmp_path, "p.txt", "# heading\n\n  a red fox  \r\n\t# indented comment\nb c\n")
    assert load_prompts(path) == [PromptRow(3, "a red fox"), PromptRow(5, "b c")]


def test_txt_without_final_newline_and_with_bom(tmp_path: Path) -> None:
    path = write(tmp_path, "P.TXT", "\ufeffone\ntwo")
    assert [(r.line, r.prompt) for r in load_prompts(path)] == [(1, "one"), (2, "two")]


def test_csv_with_style_and_variations_and_other_columns(tmp_path: Path) -> None:
    text = (
        "id, Prompt ,style,variations,notes\n"
        '1,"a fox, in snow",watercolor,3,x\n'
        "2,plain,,,\n"
        "\n"
        '3,"say ""hi""",oil, 2 \n'
    )
    rows = load_prompts(write(tmp_path, "p.csv", text))
    assert rows == [
        PromptRow(2, "a fox, in snow", "watercolor", 3),
        PromptRow(3, "plain", None, None),
        PromptRow(5, 'say "hi"', "oil", 2),
    ]


def test_csv_with_a_bom_before_the_header_and_crlf_lines(tmp_path: Path) -> None:
    path = write(tmp_path, "P.CSV", "\ufeffprompt,variations\r\nfirst,2\r\n\r\nsecond,\r\n")
    assert load_prompts(path) == [PromptRow(2, "first", None, 2), PromptRow(4, "second")]


def test_csv_line_numbers_count_quoted_line_breaks(tmp_path: Path) -> None:
    text = 'prompt,notes\nfirst,"two\nlines"\nsecond,\n'
    rows = load_prompts(write(tmp_path, "p.csv", text))
    assert [(r.line, r.prompt) for r in rows] == [(2, "first"), (4, "second")]


def test_jsonl_and_ndjson(tmp_path: Path) -> None:
    lines = [
        {"prompt": "a", "style": "ink", "variations": 2},
        {"prompt": " b ", "style": None, "extra": [1]},
    ]
    text = json.dumps(lines[0]) + "\n\n" + json.dumps(lines[1]) + "\n"
    expected = [PromptRow(1, "a", "ink", 2), PromptRow(3, "b", None, None)]
    assert load_prompts(write(tmp_path, "p.jsonl", text)) == expected
    assert load_prompts(write(tmp_path, "p.ndjson", text)) == expected


def test_branch_count_uses_the_runs_counts_where_a_row_says_nothing() -> None:
    rows = [PromptRow(1, "a"), PromptRow(2, "b", "ink"), PromptRow(3, "c", None, 4)]
    assert branch_count(rows, styles=3, variations=2) == 3 * 2 + 1 * 2 + 3 * 4


# -- refusals ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "text", "line", "reason"),
    [
        ("p.txt", "ok\n   \n\x1b[31mred\n", 3, "control character ('\\x1b' at column 1)"),
        ("p.txt", "tab\there\n", 1, "control character ('\\t' at column 4)"),
        ("p.txt", "form\x0cfeed\n", 1, "control character ('\\x0c'"),
        ("p.txt", "x" * (MAX_PROMPT_CHARS + 1), 1, "4,001 characters long; the limit is 4,000"),
        ("p.csv", "prompt\nok\n  \t \n", 3, "the prompt is empty"),
        ("p.csv", "prompt,style\nok,x\n,x\n", 3, "the prompt is empty"),
        ("p.csv", 'prompt\n"two\nlines"\n', 2, "control character ('\\n' at column 4)"),
        ("p.csv", "prompt,style\nok,   \n", 2, "the style is empty"),
        ("p.csv", "prompt,style\nok,a\x07b\n", 2, "the style holds a control character: 'a\\x07b'"),
        ("p.csv", "prompt,variations\nok,two\n", 2, "variations must be a whole number, not 'two'"),
        ("p.csv", "prompt,variations\nok,-1\n", 2, "variations must be a whole number, not '-1'"),
        ("p.csv", "prompt,variations\nok,1.5\n", 2, "not '1.5'"),
        ("p.csv", "prompt,variations\nok,0\n", 2, "variations must be from 1 to 100,000, not 0"),
        ("p.csv", f"prompt,variations\nok,{MAX_VARIATIONS + 1}\n", 2, "not 100001"),
        ("p.csv", "style,notes\nink,x\n", 1, "the header has no 'prompt' column (it has 'style'"),
        ("p.csv", "prompt,Prompt\na,b\n", 1, "the header has 2 'prompt' columns"),
        ("p.csv", 'prompt\nok\n"a"b\n', 3, "invalid CSV"),
        ("p.csv", "", 1, "the file is empty; the first line must be a header"),
        ("p.jsonl", '{"prompt": "a"}\n{"prompt": "b",}\n', 2, "invalid JSON: Expecting"),
        (
            "p.jsonl",
            '{"prompt": "a"} {"prompt": "b"}\n',
            1,
            "invalid JSON: Extra data at column 17",
        ),
        ("p.jsonl", '{"prompt": "a"\n}\n', 1, "invalid JSON: Expecting ',' delimiter"),
        ("p.jsonl", '["a"]\n', 1, "each line must be a JSON object, not a list"),
        ("p.jsonl", '"a"\n', 1, "each line must be a JSON object, not text"),
        ("p.jsonl", '{"text": "a"}\n', 1, "the object has no 'prompt' key"),
        ("p.jsonl", '{"prompt": 5}\n', 1, "the prompt must be text, not a number"),
        ("p.jsonl", '{"prompt": ""}\n', 1, "the prompt is empty"),
        ("p.jsonl", '{"prompt": "a\\u0000b"}\n', 1, "control character ('\\x00' at column 2)"),
        ("p.jsonl", '{"prompt": "a\\u2028b"}\n', 1, "control character ('\\u2028'"),
        ("p.jsonl", '{"prompt": "a", "style": ""}\n', 1, "the style is empty"),
        ("p.jsonl", '{"prompt": "a", "style": 3}\n', 1, "the style must be text, not a number"),
        ("p.jsonl", '{"prompt": "a", "variations": "2"}\n', 1, "whole number, not text ('2')"),
        ("p.jsonl", '{"prompt": "a", "variations": 2.0}\n', 1, "a whole number, not a number"),
        ("p.jsonl", '{"prompt": "a", "variations": true}\n', 1, "whole number, not true/false"),
        ("p.jsonl", '{"prompt": "a", "variations": 0}\n', 1, "from 1 to 100,000, not 0"),
        ("p.jsonl", "[" * 100_000 + "\n", 1, "invalid JSON"),
    ],
)
def test_a_bad_row_is_refused_with_its_line_and_reason(
    tmp_path: Path, name: str, text: str, line: int, reason: str
) -> None:
    error = refused(write(tmp_path, name, text))
    assert error.line == line
    assert reason in error.reason
    assert str(error) == f"{tmp_path / name} line {line}: {error.reason}"


def test_the_message_matches_the_documented_shape(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    write(tmp_path, "prompts.csv", "prompt\n" + "a\n" * 5 + '""\n')
    error = refused(Path("prompts.csv"))
    assert str(error) == "prompts.csv line 7: the prompt is empty"
    assert isinstance(error, BadInput)
    assert error.exit_code == 2
    assert (error.path, error.line, error.reason) == (Path("prompts.csv"), 7, "the prompt is empty")


def test_user_text_in_a_message_has_its_control_characters_escaped(tmp_path: Path) -> None:
    path = write(tmp_path, "evil\x1b[2Jname.txt", "fine\nbad\x1b]0;title\x07\n")
    message = str(refused(path))
    assert "\x1b" not in message
    assert "\x07" not in message
    assert "evil\\x1b[2Jname.txt line 2:" in message
    assert "'bad\\x1b]0;title\\x07'" in message


@pytest.mark.parametrize(
    ("name", "text"),
    [("p.txt", "\n# only a comment\n  \n"), ("p.csv", "prompt,style\n\n"), ("p.jsonl", "\n \n")],
)
def test_a_file_without_prompts_is_refused(tmp_path: Path, name: str, text: str) -> None:
    error = refused(write(tmp_path, name, text))
    assert (error.line, error.reason) == (None, "no prompts in the file")


def test_invalid_utf8_is_refused_with_its_line_and_column(tmp_path: Path) -> None:
    error = refused(write(tmp_path, "p.txt", b"one\ntwo\nth\xffree\n"))
    assert (error.line, error.reason) == (3, "not valid UTF-8 (byte 0xff at column 3)")


def test_an_unknown_extension_names_the_accepted_ones(tmp_path: Path) -> None:
    error = refused(write(tmp_path, "p.md", "a\n"))
    assert error.line is None
    assert error.reason == "unsupported prompt file type ('.md'); use .txt, .csv, .jsonl or .ndjson"
    assert "no extension" in refused(write(tmp_path, "prompts", "a\n")).reason


def test_missing_directory_and_unreadable_files(tmp_path: Path) -> None:
    assert refused(tmp_path / "absent.txt").reason == "no such file"
    (tmp_path / "dir.csv").mkdir()
    assert refused(tmp_path / "dir.csv").reason == "is a directory, not a prompt file"
    write(tmp_path, "file.txt", "a\n")
    assert refused(tmp_path / "file.txt" / "p.txt").reason == "cannot be read: Not a directory"


def test_more_than_max_rows_is_refused_at_the_first_row_too_many(tmp_path: Path) -> None:
    path = write(tmp_path, "p.txt", "# big\n" + "p\n" * (MAX_ROWS + 1))
    error = refused(path)
    assert error.line == MAX_ROWS + 2
    assert error.reason == "more than 100,000 prompts; split the file"


def test_more_than_max_branches_is_refused_at_the_row_that_crosses_the_cap(tmp_path: Path) -> None:
    rows = [{"prompt": f"p{i}", "variations": MAX_VARIATIONS} for i in range(11)]
    path = write(tmp_path, "p.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
    error = refused(path)
    assert error.line == 11
    assert "more than 1,000,000 branches in total" in error.reason
    # The run's own counts apply to rows that do not give theirs.
    path = write(tmp_path, "q.txt", "a\nb\nc\n")
    assert len(load_prompts(path, styles=10, variations=MAX_BRANCHES // 30)) == 3
    assert refused(path, styles=10, variations=MAX_BRANCHES // 30 + 1).line == 3


def test_max_rows_and_max_branches_exactly_are_accepted(tmp_path: Path) -> None:
    path = write(tmp_path, "p.txt", "p\n" * MAX_ROWS)
    rows = load_prompts(path, styles=2, variations=5)
    assert len(rows) == MAX_ROWS
    assert branch_count(rows, 2, 5) == MAX_BRANCHES


def test_loading_leaves_the_garbage_collector_as_it_found_it(tmp_path: Path) -> None:
    good, bad = write(tmp_path, "good.txt", "a\n"), write(tmp_path, "bad.txt", "\x00\n")
    assert gc.isenabled()
    load_prompts(good)
    refused(bad)
    assert gc.isenabled()
    gc.disable()
    try:
        load_prompts(good)
        refused(bad)
        assert not gc.isenabled()
    finally:
        gc.enable()


# -- identity ------------------------------------------------------------------------------


def test_identity_is_json_data_and_equal_files_make_no_difference(tmp_path: Path) -> None:
    first = load_prompts(write(tmp_path, "a.csv", "prompt,style\na,ink\nb,\n"))
    second = load_prompts(write(tmp_path, "b.csv", "prompt,style\n\na,ink\nb,\n"))
    stored = json.loads(json.dumps(prompts_identity(first)))
    assert stored == [
        {"line": 2, "prompt": "a", "style": "ink", "variations": None},
        {"line": 3, "prompt": "b", "style": None, "variations": None},
    ]
    # A blank line moved the rows, but they are the same rows.
    assert first_changed_row(stored, prompts_identity(second)) is None


@pytest.mark.parametrize(
    ("edited", "message"),
    [
        ("a\nb\nc\n", "line 3: prompt 'a' is now 'c'"),
        ("a\nb\n", "the file now has 2 rows, the run has 3"),
        ("a\nb\na\nd\n", "the file now has 4 rows, the run has 3"),
        ("a\nb\na\x1b\n", "control character"),
    ],
)
def test_first_changed_row_names_the_first_difference(
    tmp_path: Path, edited: str, message: str
) -> None:
    stored = prompts_identity(load_prompts(write(tmp_path, "s.txt", "a\nb\na\n")))
    path = write(tmp_path, "g.txt", edited)
    if "\x1b" in edited:
        assert message in refused(path).reason
        return
    assert first_changed_row(stored, prompts_identity(load_prompts(path))) == message


def test_first_changed_row_reports_style_and_variations_with_escaping() -> None:
    stored = prompts_identity([PromptRow(1, "a", "ink", 2), PromptRow(2, "b\x1b", None, None)])
    assert first_changed_row(stored, prompts_identity([PromptRow(4, "a", None, 2)])) == (
        "line 4: style 'ink' is now not given"
    )
    assert first_changed_row(stored, prompts_identity([PromptRow(1, "a", "ink", 3)])) == (
        "line 1: variations 2 is now 3"
    )
    changed = prompts_identity([PromptRow(1, "a", "ink", 2), PromptRow(2, "b", None, None)])
    assert first_changed_row(stored, changed) == "line 2: prompt 'b\\x1b' is now 'b'"
    assert first_changed_row(stored, changed[:1]) == "the file now has 1 row, the run has 2"


# -- speed ---------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["p.txt", "p.csv", "p.jsonl"])
def test_100k_rows_load_well_under_a_second(tmp_path: Path, name: str) -> None:
    prompts = [f"a lighthouse at dusk, number {i}" for i in range(MAX_ROWS)]
    if name.endswith(".txt"):
        text = "".join(p + "\n" for p in prompts)
    elif name.endswith(".csv"):
        text = "prompt,style,variations\n" + "".join(f'"{p}",ink,2\n' for p in prompts)
    else:
        text = "".join(json.dumps({"prompt": p, "variations": 2}) + "\n" for p in prompts)
    path = write(tmp_path, name, text)
    started = time.process_time()  # CPU time: another job on the machine does not count
    rows = load_prompts(path)
    elapsed = time.process_time() - started
    assert len(rows) == MAX_ROWS
    assert rows[-1].prompt == prompts[-1]
    assert elapsed < 0.8, f"{elapsed:.2f} s"


# -- the same run again, through the CLI -----------------------------------------------------


def cli(db: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        cli_argv(*args), env=cli_env(db), capture_output=True, text=True, timeout=60
    )


@pytest.mark.parametrize("detach", [False, True])
def test_comment_and_blank_lines_added_to_the_file_leave_the_run_as_it_is(
    tmp_path: Path, db_path: Path, detach: bool
) -> None:
    path = write(tmp_path, "p.txt", "a red fox\na blue bird\n")
    args = ["run", "--prompts", str(path), "--id", "same", "-s", "cartoon", "--sim-latency", "0"]
    args += ["--detach"] if detach else ["--json"]
    first = cli(db_path, *args)
    assert first.returncode == 0, first.stderr
    write(tmp_path, "p.txt", "# my animals\n\na red fox\n\n   # birds\na blue bird\n\n")
    again = cli(db_path, *args)
    assert again.returncode == 0, again.stderr
    assert again.stderr == ""
    if not detach:  # the stored run, read back, not executed again
        stored, shown = json.loads(first.stdout), json.loads(again.stdout)
        assert shown["state"] == "resolved"
        assert [i["url"] for i in shown["images"]] == [i["url"] for i in stored["images"]]
        assert all(image["replayed"] for image in shown["images"])


def test_a_changed_row_of_a_large_file_is_named_alone_in_one_short_line(
    tmp_path: Path, db_path: Path
) -> None:
    rows = [f"a lighthouse at dusk, number {i}" for i in range(20_000)]
    path = write(tmp_path, "p.txt", "".join(row + "\n" for row in rows))
    args = ["run", "--prompts", str(path), "--id", "big", "-s", "cartoon", "--detach"]
    assert cli(db_path, *args).returncode == 0
    before = db_path.read_bytes()
    # A comment above, and one long row changed, with a right-to-left mark in front.
    rows[12_345] = "\u200f" + "x" * 3000
    write(tmp_path, "p.txt", "# edited\n" + "".join(row + "\n" for row in rows))
    done = cli(db_path, *args)
    assert done.returncode == 2
    assert done.stdout == ""
    assert done.stderr == (
        "error: run 'big' already exists with another prompt file: line 12347: prompt "
        f"'a lighthouse at dusk, number 12345' is now '\\u200f{'x' * 58}…'; "
        "pick another --id or omit it\n"
    )
    assert db_path.read_bytes() == before


def test_a_prompt_file_under_the_id_of_a_single_prompt_run_is_refused_in_one_line(
    tmp_path: Path, db_path: Path
) -> None:
    path = write(tmp_path, "p.txt", "".join(f"prompt {i}\n" for i in range(1000)))
    assert cli(db_path, "run", "a red fox", "--id", "one", "--detach").returncode == 0
    done = cli(db_path, "run", "--prompts", str(path), "--id", "one", "--detach")
    assert done.returncode == 2
    assert done.stderr == (
        "error: run 'one' already exists without a prompt file; pick another --id or omit it\n"
    )


def test_a_changed_template_names_its_one_style_not_every_template_of_the_run(
    tmp_path: Path, db_path: Path
) -> None:
    # Each row may name its own style: a run can hold thousands of templates.
    styles_file = write(tmp_path, "styles.toml", 'ink = "{prompt}, in ink"\n')
    rows = "".join(f"prompt {i},style {i}\n" for i in range(500)) + "a fox,ink\n"
    path = write(tmp_path, "p.csv", "prompt,style\n" + rows)
    args = ["run", "--prompts", str(path), "--id", "tpl", "--detach"]
    env = cli_env(db_path, IMAGEPIPE_STYLES=str(styles_file))
    first = subprocess.run(cli_argv(*args), env=env, capture_output=True, timeout=60)
    assert first.returncode == 0, first.stderr
    write(tmp_path, "styles.toml", 'ink = "{prompt}, in thick ink"\n')
    done = subprocess.run(cli_argv(*args), env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    assert done.stderr == (
        "error: run 'tpl' already exists with the template of style 'ink'='{prompt}, in ink', "
        "not '{prompt}, in thick ink'; pick another --id or omit it\n"
    )


def test_a_long_prompt_under_a_reused_id_is_shortened_in_the_message(db_path: Path) -> None:
    assert cli(db_path, "run", "a" * 4000, "--id", "long", "--detach").returncode == 0
    done = cli(db_path, "run", "a" * 3999 + "b", "--id", "long", "--detach")
    assert done.returncode == 2
    assert done.stderr == (
        f"error: run 'long' already exists with prompt='{'a' * 79}…', not '{'a' * 79}…'; "
        "pick another --id or omit it\n"
    )
