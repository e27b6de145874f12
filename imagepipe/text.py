"""Printing text that a user typed or a store holds, without letting it drive the terminal.

A prompt, run id or stored error message can hold escape sequences (``ESC ] 0 ; title
BEL`` retitles a terminal, ``ESC [ 2 J`` clears it) or, when the command line was not
valid UTF-8, lone surrogates that no stream can encode. :func:`escape_control` turns
those characters into visible backslash escapes and leaves everything else, accented
letters and emoji included, as it is. Every place that prints such a string uses it.
"""

from __future__ import annotations

import unicodedata

__all__ = ["escape_control", "invalid_utf8", "quoted"]

_NAMED = {"\t": "\\t", "\n": "\\n", "\r": "\\r"}
# Invisible reordering controls (bidi embeddings, overrides and isolates): they make the
# text on screen differ from the text stored ("Trojan Source"), so they are shown too.
_BIDI = frozenset("\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069")


def _escape_char(char: str) -> str:
    code = ord(char)
    if char in _NAMED:
        return _NAMED[char]
    if 0xDC80 <= code <= 0xDCFF:  # a byte that was not UTF-8, as Python's argv keeps it
        return f"\\x{code - 0xDC00:02x}"
    if code <= 0xFF:
        return f"\\x{code:02x}"
    return f"\\u{code:04x}"


def _needs_escape(char: str) -> bool:
    return unicodedata.category(char) in ("Cc", "Cs") or char in _BIDI


def escape_control(text: str) -> str:
    """``text`` with C0 controls, DEL, C1 controls, bidi controls and lone surrogates
    written as backslash escapes (``\\x1b``, ``\\n``, ``\\xe9`` for an undecodable byte).

    Printable text, including non-ASCII letters, is returned unchanged; the result is
    always one line and encodable as UTF-8."""
    if text.isprintable():  # fast path: no control, surrogate or bidi character
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
