"""Printing text that a user typed or a store holds, without letting it drive the terminal.

A prompt, run id or stored error message can hold escape sequences (``ESC ] 0 ; title
BEL`` retitles a terminal, ``ESC [ 2 J`` clears it), invisible format characters (U+202E
makes the text on screen read backwards, "Trojan Source"; tag characters hide a whole
text) or, when the command line was not valid UTF-8, lone surrogates that no stream can
encode. :func:`escape_control` turns those characters into visible backslash escapes and
leaves everything else, accented letters and emoji included, as it is. Every place that
prints such a string uses it: the terminal, error messages, the HTML gallery.
"""

from __future__ import annotations

import unicodedata

__all__ = ["escape_control", "invalid_utf8", "one_line", "quoted"]

_NAMED = {"\t": "\\t", "\n": "\\n", "\r": "\\r"}
# Escaped: controls (Cc), lone surrogates (Cs), invisible format characters (Cf: bidi
# marks, embeddings, overrides and isolates, zero-width space, soft hyphen, BOM, tags) and
# the line and paragraph separators (Zl, Zp), at which some terminals break the line.
_ESCAPED = frozenset(("Cc", "Cs", "Cf", "Zl", "Zp"))
# Format characters that real text needs are kept: the zero-width joiner builds emoji
# sequences (a family, a profession) and, with the non-joiner, shapes Indic and Persian.
_KEPT = frozenset("\u200c\u200d")


def _escape_char(char: str) -> str:
    code = ord(char)
    if char in _NAMED:
        return _NAMED[char]
    if 0xDC80 <= code <= 0xDCFF:  # a byte that was not UTF-8, as Python's argv keeps it
        return f"\\x{code - 0xDC00:02x}"
    if code <= 0xFF:
        return f"\\x{code:02x}"
    if code <= 0xFFFF:
        return f"\\u{code:04x}"
    return f"\\U{code:08x}"  # a tag character: U+E0041 is not "\ue004" and "1"


def _needs_escape(char: str) -> bool:
    return unicodedata.category(char) in _ESCAPED and char not in _KEPT


def escape_control(text: str) -> str:
    """``text`` with C0 controls, DEL, C1 controls, lone surrogates, invisible format
    characters (bidi controls, zero-width space, ...) and line separators written as
    backslash escapes (``\\x1b``, ``\\n``, ``\\u202e``, ``\\xe9`` for an undecodable byte).

    Printable text, including non-ASCII letters and emoji (with their zero-width joiners),
    is returned unchanged; the result is always one line and encodable as UTF-8."""
    if text.isprintable():  # fast path: every character above is non-printable
        return text
    return "".join(_escape_char(c) if _needs_escape(c) else c for c in text)


def quoted(text: str) -> str:
    """``text`` escaped and in single quotes, for error messages: ``'caf\\xe9'``."""
    return f"'{escape_control(text)}'"


def invalid_utf8(text: str) -> bool:
    """True if ``text`` came from bytes that were not valid UTF-8 (it holds surrogates)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


def one_line(text: str, limit: int = 500) -> str:
    """``text`` on one line: whitespace runs become one space, control characters escaped."""
    out: list[str] = []
    for ch in " ".join(text.split()):
        if unicodedata.category(ch) in ("Cc", "Cf", "Zl", "Zp"):
            out.append(ch.encode("unicode_escape").decode("ascii"))
        else:
            out.append(ch)
    flat = "".join(out)
    return flat if len(flat) <= limit else flat[: limit - 1] + "…"
