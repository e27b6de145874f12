"""Prompt files: load and check a list of prompts for ``imagepipe run --prompts FILE``.

Three formats, chosen by the file's extension (case-insensitive):

``.txt``
    One prompt a line. Blank lines and lines whose first non-blank character is ``#``
    are skipped; surrounding whitespace is stripped.
``.csv``
    A header with a ``prompt`` column; optional ``style`` and ``variations`` columns;
    other columns are ignored. An empty ``style`` or ``variations`` cell means "not given"
    (the run's ``--style`` / ``--variations`` apply to that row).
``.jsonl`` / ``.ndjson``
    One JSON object a line with a ``prompt`` key; optional ``style`` and ``variations``
    (``null`` means "not given"). Blank lines are skipped.

Files are read as UTF-8 (a byte-order mark is tolerated). Every row is checked before
anything starts; the first bad one raises :class:`PromptFileError`, whose message is one
line naming the file, the line and the reason, with anything the user typed shown with
its control characters escaped.

A row's ``style``, when given, replaces the run's styles for that row; its ``variations``,
when given, replaces the run's count. :func:`branch_count` computes the resulting number
of branches, which :func:`load_prompts` caps at :data:`MAX_BRANCHES`.

The run stores :func:`prompts_identity` of the rows; when the same run id is given a file
again, :func:`first_changed_row` says which row differs.
"""

from __future__ import annotations

import csv
import io
import json
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from imagepipe.errors import BadInput
from imagepipe.text import escape_control

__all__ = [
    "MAX_BRANCHES",
    "MAX_PROMPT_CHARS",
    "MAX_ROWS",
    "MAX_VARIATIONS",
    "SUFFIXES",
    "PromptFileError",
    "PromptRow",
    "branch_count",
    "first_changed_row",
    "load_prompts",
    "prompts_identity",
]

#: At most this many prompts (rows) in one file.
MAX_ROWS = 100_000
#: At most this many branches in total: the sum over rows of styles x variations.
MAX_BRANCHES = 1_000_000
#: A prompt longer than this (in characters, after stripping) is refused.
MAX_PROMPT_CHARS = 4000
#: ``variations`` of a row must be in 1..MAX_VARIATIONS.
MAX_VARIATIONS = 100_000
#: The accepted extensions, lower case.
SUFFIXES = (".txt", ".csv", ".jsonl", ".ndjson")

# C0 and C1 controls, DEL, and the Unicode line and paragraph separators.
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029]")
_DIGITS = re.compile(r"[0-9]+")
_SHOWN = 60  # characters of user text quoted in a message


class PromptFileError(BadInput):
    """A prompt file cannot be used; ``str()`` is one line: ``prompts.csv line 7: reason``.

    ``line`` is the 1-based line of the bad row, or None for a problem with the whole
    file (missing, unreadable, wrong type). Exit code 2, like every bad input.
    """

    def __init__(self, path: Path, line: int | None, reason: str) -> None:
        where = escape_control(str(path))
        if line is not None:
            where = f"{where} line {line}"
        super().__init__(f"{where}: {reason}")
        self.path = path
        self.line = line
        self.reason = reason


@dataclass(slots=True)
class PromptRow:
    """One prompt of a file. ``style``/``variations`` are None when the row does not say.

    Not frozen: a frozen dataclass takes three times as long to build, which is a tenth
    of a second over 100,000 rows. Treat it as read-only.
    """

    line: int
    prompt: str
    style: str | None = None
    variations: int | None = None


def _quote(text: str) -> str:
    """User text for a message: quoted, escaped, shortened."""
    if len(text) > _SHOWN:
        text = text[: _SHOWN - 1] + "…"
    return "'" + escape_control(text) + "'"


class _Bad(Exception):
    """A row's problem; turned into a PromptFileError by the loader (which knows the path)."""

    def __init__(self, line: int, reason: str) -> None:
        super().__init__(reason)
        self.line = line
        self.reason = reason


def load_prompts(path: Path, *, styles: int = 1, variations: int = 1) -> list[PromptRow]:
    """Read and check a prompt file; raise :class:`PromptFileError` on the first bad row.

    ``styles`` and ``variations`` are the run's own counts (``--style`` given N times,
    ``--variations``); they only matter for the :data:`MAX_BRANCHES` cap.
    """
    suffix = path.suffix.lower()
    if suffix not in SUFFIXES:
        shown = _quote(path.suffix) if path.suffix else "no extension"
        raise PromptFileError(
            path, None, f"unsupported prompt file type ({shown}); use .txt, .csv, .jsonl or .ndjson"
        )
    text = _read_text(path)
    parse = {".txt": _parse_txt, ".csv": _parse_csv}.get(suffix, _parse_jsonl)
    rows: list[PromptRow] = []
    total = 0
    try:
        for row in parse(text):
            if len(rows) == MAX_ROWS:
                raise _Bad(row.line, f"more than {MAX_ROWS:,} prompts; split the file")
            total += _row_branches(row, styles, variations)
            if total > MAX_BRANCHES:
                raise _Bad(
                    row.line,
                    f"more than {MAX_BRANCHES:,} branches in total "
                    "(prompts × styles × variations); split the file",
                )
            rows.append(row)
    except _Bad as bad:
        raise PromptFileError(path, bad.line, bad.reason) from None
    if not rows:
        raise PromptFileError(path, None, "no prompts in the file")
    return rows


def branch_count(rows: Sequence[PromptRow], styles: int, variations: int) -> int:
    """Branches the rows make when the run has ``styles`` styles and ``variations``."""
    return sum(_row_branches(row, styles, variations) for row in rows)


def _row_branches(row: PromptRow, styles: int, variations: int) -> int:
    return (1 if row.style is not None else styles) * (
        row.variations if row.variations is not None else variations
    )


def _read_text(path: Path) -> str:
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise PromptFileError(path, None, "no such file") from None
    except IsADirectoryError:
        raise PromptFileError(path, None, "is a directory, not a prompt file") from None
    except OSError as exc:
        reason = exc.strerror or type(exc).__name__
        raise PromptFileError(path, None, f"cannot be read: {reason}") from None
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        column = exc.start - (data.rfind(b"\n", 0, exc.start) + 1) + 1
        byte = data[exc.start]
        raise PromptFileError(
            path, line, f"not valid UTF-8 (byte 0x{byte:02x} at column {column})"
        ) from None


def _lines(text: str) -> Iterator[tuple[int, str]]:
    """(1-based number, line) split on ``\\n`` only (a form feed is not a line break here)."""
    for number, line in enumerate(text.split("\n"), start=1):
        yield number, line.removesuffix("\r")


def _check_prompt(line: int, value: object) -> str:
    if not isinstance(value, str):
        raise _Bad(line, f"the prompt must be text, not {_json_type(value)}")
    prompt = value.strip()
    if not prompt:
        raise _Bad(line, "the prompt is empty")
    if len(prompt) > MAX_PROMPT_CHARS:
        raise _Bad(
            line,
            f"the prompt is {len(prompt):,} characters long; the limit is {MAX_PROMPT_CHARS:,}",
        )
    bad = _CONTROL.search(prompt)
    if bad:
        raise _Bad(
            line,
            f"the prompt holds a control character ({_quote(bad.group())} at column "
            f"{bad.start() + 1}): {_quote(prompt)}",
        )
    return prompt


def _check_style(line: int, value: object) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str):
        raise _Bad(line, f"the style must be text, not {_json_type(value)}")
    style = value.strip()
    if not style:
        raise _Bad(line, "the style is empty")
    bad = _CONTROL.search(style)
    if bad:
        raise _Bad(line, f"the style holds a control character: {_quote(style)}")
    return style


def _check_variations(line: int, value: object) -> int | None:
    if value is None:
        return None
    if isinstance(value, str):
        text = value.strip()
        if not _DIGITS.fullmatch(text):
            raise _Bad(line, f"variations must be a whole number, not {_quote(value)}")
        number = int(text)
    elif isinstance(value, int) and not isinstance(value, bool):
        number = value
    else:
        raise _Bad(line, f"variations must be a whole number, not {_json_type(value)}")
    if not 1 <= number <= MAX_VARIATIONS:
        raise _Bad(line, f"variations must be from 1 to {MAX_VARIATIONS:,}, not {number}")
    return number


def _json_type(value: object) -> str:
    names = {bool: "true/false", int: "a number", float: "a number", str: "text"}
    names.update({list: "a list", dict: "an object", type(None): "null"})
    return names.get(type(value), type(value).__name__)


def _parse_txt(text: str) -> Iterator[PromptRow]:
    for number, raw in _lines(text):
        stripped = raw.strip()
        if not stripped or stripped.startswith("#"):
            continue
        yield PromptRow(number, _check_prompt(number, stripped))


def _parse_jsonl(text: str) -> Iterator[PromptRow]:
    for number, raw in _lines(text):
        if not raw.strip():
            continue
        obj = _json_object(number, raw)
        if not isinstance(obj, dict):
            raise _Bad(number, f"each line must be a JSON object, not {_json_type(obj)}")
        if "prompt" not in obj:
            raise _Bad(number, "the object has no 'prompt' key")
        yield PromptRow(
            number,
            _check_prompt(number, obj["prompt"]),
            _check_style(number, obj.get("style")),
            _check_variations(number, _not_text(number, obj.get("variations"))),
        )


def _not_text(line: int, value: object) -> object:
    """JSON gives numbers as numbers: ``"variations": "2"`` is refused, not read as 2."""
    if isinstance(value, str):
        raise _Bad(line, f"variations must be a whole number, not text ({_quote(value)})")
    return value


_DECODER = json.JSONDecoder()


def _json_object(line: int, raw: str) -> object:
    """The one JSON value on ``raw``; :meth:`~json.JSONDecoder.raw_decode` is a third
    faster than :func:`json.loads`, which is kept for the error message."""
    text = raw.strip()
    try:
        value, end = _DECODER.raw_decode(text)
        if end == len(text):
            return value
    except (json.JSONDecodeError, RecursionError):
        pass
    try:
        return json.loads(raw)
    except json.JSONDecodeError as exc:
        raise _Bad(line, f"invalid JSON: {exc.msg} at column {exc.colno}") from None
    except RecursionError:
        raise _Bad(line, "invalid JSON: nested too deeply") from None


def _parse_csv(text: str) -> Iterator[PromptRow]:
    reader = csv.reader(io.StringIO(text, newline=""), strict=True)
    try:
        header = next(reader, None)
    except csv.Error as exc:
        raise _Bad(1, f"invalid CSV header: {exc}") from None
    if header is None or not any(cell.strip() for cell in header):
        raise _Bad(1, "the file is empty; the first line must be a header with a 'prompt' column")
    names = [cell.strip().lower() for cell in header]
    if "prompt" not in names:
        shown = ", ".join(_quote(cell) for cell in header[:10])
        raise _Bad(1, f"the header has no 'prompt' column (it has {shown})")
    for name in ("prompt", "style", "variations"):
        if names.count(name) > 1:
            raise _Bad(1, f"the header has {names.count(name)} {name!r} columns")
    prompt_at = names.index("prompt")
    style_at = names.index("style") if "style" in names else None
    variations_at = names.index("variations") if "variations" in names else None
    end = reader.line_num
    try:
        for record in reader:
            start, end = end + 1, reader.line_num
            if not record:
                continue  # an empty line (a line of spaces is a row with an empty prompt)
            yield PromptRow(
                start,
                _check_prompt(start, _cell(record, prompt_at) or ""),
                _check_style(start, _cell(record, style_at)),
                _check_variations(start, _cell(record, variations_at)),
            )
    except csv.Error as exc:
        raise _Bad(end + 1, f"invalid CSV: {exc}") from None


def _cell(record: list[str], at: int | None) -> str | None:
    """The cell at ``at``; None when there is no such column or the cell is empty."""
    if at is None or at >= len(record) or record[at] == "":
        return None
    return record[at]


# -- identity ------------------------------------------------------------------------------


def prompts_identity(rows: Sequence[PromptRow]) -> list[dict[str, Any]]:
    """The rows as JSON-able data, as a run stores them.

    ``line`` is kept for messages only: :func:`first_changed_row` ignores it, so a comment
    or blank line added to a file does not change the run.
    """
    return [
        {"line": r.line, "prompt": r.prompt, "style": r.style, "variations": r.variations}
        for r in rows
    ]


_FIELDS = ("prompt", "style", "variations")


def first_changed_row(
    stored: Sequence[dict[str, Any]], given: Sequence[dict[str, Any]]
) -> str | None:
    """None when the two identities make the same run, else the first difference, e.g.
    ``"line 3: prompt 'a' is now 'b'"`` or ``"the file now has 5 rows, the run has 4"``."""
    for index, (old, new) in enumerate(zip(stored, given, strict=False)):
        for field in _FIELDS:
            before, after = old.get(field), new.get(field)
            if before != after:
                line = new.get("line", index + 1)
                return f"line {line}: {field} {_shown(before)} is now {_shown(after)}"
    if len(stored) != len(given):
        return f"the file now has {_rows(len(given))}, the run has {len(stored)}"
    return None


def _shown(value: object) -> str:
    if value is None:
        return "not given"
    if isinstance(value, str):
        return _quote(value)
    return escape_control(str(value))


def _rows(count: int) -> str:
    return f"{count} row" if count == 1 else f"{count} rows"
