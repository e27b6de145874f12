"""How the PostgreSQL store names itself and reports failures: ``where`` without the
password, and every psycopg error turned into one of the core's one-line store errors.

- lock and snapshot conflicts (lock timeout, serialization failure, deadlock, statement
  timeout, too many connections) are :class:`StoreBusy`: trying again may work;
- a full disk, a read-only server, a refused write and an I/O error have their own kinds;
- a lost or unreachable server is a plain :class:`StoreError` ("cannot be reached").
"""

from __future__ import annotations

import re

import psycopg
from psycopg.conninfo import conninfo_to_dict

from imagepipe.durable.errors import (
    StoreBusy,
    StoreError,
    StoreFull,
    StoreReadOnly,
    StoreWriteFailed,
)
from imagepipe.durable.guard import translating

__all__ = ["describe_url", "guarded", "reason", "translate"]

#: SQLSTATEs of a lock or snapshot that another transaction held too long
_BUSY = frozenset({"55P03", "40001", "40P01", "57014", "53300"})


def describe_url(url: str) -> str:
    """The store's name in messages: ``user@host:port/dbname``, without the password."""
    try:
        parts = conninfo_to_dict(url)
    except psycopg.Error:
        return re.sub(r"(://[^:/@]*):[^@/]*@", r"\1@", url)
    user = f"{parts['user']}@" if parts.get("user") else ""
    port = f":{parts['port']}" if parts.get("port") else ""
    return f"{user}{parts.get('host') or 'localhost'}{port}/{parts.get('dbname') or ''}"


def reason(exc: BaseException, secret: str | None = None) -> str:
    """The one line of a psycopg error worth showing: the server's or libpq's own words
    after the last "failed:", with "FATAL:" and any password taken out."""
    text = str(exc).split("failed:")[-1].strip() or type(exc).__name__
    text = " ".join(text.splitlines()[0].removeprefix("FATAL:").split())
    if secret:
        text = text.replace(secret, "***")
    return text


def translate(exc: psycopg.Error, where: str) -> StoreError:
    """The core's error for a psycopg error met while using the store at ``where``."""
    state = exc.sqlstate or ""
    if state in _BUSY:
        return StoreBusy(where, "is locked by another process")
    if state == "53100":
        return StoreFull(where, "cannot grow: the database server's disk is full")
    if state == "25006":
        return StoreReadOnly(where, "is read-only (a standby server, or a read-only database)")
    if state == "42501":
        return StoreReadOnly(where, "refuses this user's writes (permission denied)")
    if state == "58030" or state.startswith("53"):
        return StoreWriteFailed(where, f"could not be written ({reason(exc)})")
    if isinstance(exc, psycopg.OperationalError) and not state:
        return StoreError(where, f"cannot be reached ({reason(exc)})")
    return StoreError(where, f"failed: {reason(exc)!r}")


#: turn any psycopg error into a one-line :class:`StoreError`
guarded = translating(psycopg.Error, translate)
