"""Store URLs without their passwords: the one helper every place that prints, logs or
stores a URL (or a driver's message about one) goes through.

A password can sit in three places of a PostgreSQL URL or connection string: the userinfo
(``postgresql://user:PASSWORD@host/db``), a query parameter (``?password=PASSWORD``) and a
keyword (``password=PASSWORD host=...``). :func:`mask_password` replaces each with
``***``. It works on text that does not parse too (a malformed URL is what a parse error
echoes), and, given the URL a message is about, it also masks that URL's passwords where a
driver quotes them on their own (libpq: ``invalid percent-encoded token: "Pw%ZZ"``).
"""

from __future__ import annotations

import re
from urllib.parse import unquote

__all__ = ["MASK", "mask_password", "url_passwords"]

MASK = "***"

#: ``scheme://user:`` then the password, up to the last ``@`` (a password may hold
#: anything a user typed, ``@``, ``/`` and spaces included, when the URL is malformed)
_USERINFO_ANYTHING = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*://[^:/@?#\s]*:)(.*)@", re.DOTALL)
#: the same inside a longer text: the password ends at the last ``@`` before a space
_USERINFO = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*://[^:/@?#\s]*:)(\S*)@")
#: ``password=`` as a query parameter or a keyword, its value quoted or not
_PARAMETER = re.compile(r"(\bpassword\s*=\s*)('(?:[^'\\]|\\.)*'?|[^\s&]*)", re.IGNORECASE)


def url_passwords(url: str) -> set[str]:
    """Every password ``url`` holds, as written and percent-decoded (empty ones left out)."""
    found = [m.group(2) for m in _USERINFO_ANYTHING.finditer(url)]
    found += [m.group(2) for m in _PARAMETER.finditer(url)]
    forms = {form for text in found for form in (text, unquote(text))}
    return {form for text in forms for form in (text, text.strip("'")) if form}


def mask_password(text: str, url: str | None = None) -> str:
    """``text`` with every password in it replaced by ``***``: a URL's userinfo password and
    any ``password=`` parameter; and, if ``text`` is about ``url``, each password of ``url``
    wherever ``text`` quotes it (longest first, so that no part of one is left)."""
    if url is not None:
        for secret in sorted(url_passwords(url), key=len, reverse=True):
            text = text.replace(secret, MASK)
    text = _USERINFO.sub(lambda m: f"{m.group(1)}{MASK}@", text)
    return _PARAMETER.sub(lambda m: f"{m.group(1)}{MASK}", text)
