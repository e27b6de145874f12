"""How the PostgreSQL store names itself and reports failures: ``where`` without the
password, and every psycopg error turned into one of the core's one-line store errors
(its text masked by :func:`~.secrets.mask_password`: no password, whatever libpq quotes).

- lock and snapshot conflicts (lock timeout, serialization failure, deadlock, statement
  timeout, too many connections) are :class:`StoreBusy`: trying again may work;
- a full disk, a read-only server, a refused write and an I/O error have their own kinds;
- a lost or unreachable server is :class:`StoreUnreachable` ("cannot be reached"): the
  store rides out such an outage for a while (:func:`lost_connection` tells it apart)
  before it gives up with that error.
"""

from __future__ import annotations

import psycopg
from psycopg.conninfo import conninfo_to_dict

from imagepipe.durable.errors import (
    StoreBusy,
    StoreError,
    StoreFull,
    StoreReadOnly,
    StoreUnreachable,
    StoreWriteFailed,
)
from imagepipe.durable.secrets import mask_password

__all__ = ["describe_url", "lost_connection", "reason", "translate"]

#: SQLSTATEs of a lock or snapshot that another transaction held too long
_BUSY = frozenset({"55P03", "40001", "40P01", "57014", "53300"})
#: SQLSTATEs of a session the server ended: shut down (fast or crashed), or
#: ``pg_terminate_backend``, or not accepting connections yet (starting up)
_ENDED = frozenset({"57P01", "57P02", "57P03"})


def describe_url(url: str) -> str:
    """The store's name in messages: ``user@host:port/dbname``, without the password. A
    URL that does not parse is named as written, its passwords masked."""
    try:
        parts = conninfo_to_dict(url)
    except psycopg.Error:
        return mask_password(url, url)
    user = f"{parts['user']}@" if parts.get("user") else ""
    port = f":{parts['port']}" if parts.get("port") else ""
    return f"{user}{parts.get('host') or 'localhost'}{port}/{parts.get('dbname') or ''}"


def reason(exc: BaseException, url: str | None = None) -> str:
    """The one line of a psycopg error worth showing: the server's or libpq's own words
    after the last "failed:", with "FATAL:" taken out and every password masked (``url``'s
    own too, wherever the text quotes it)."""
    text = str(exc).split("failed:")[-1].strip() or type(exc).__name__
    text = " ".join(text.splitlines()[0].removeprefix("FATAL:").split())
    return mask_password(text, url)


def lost_connection(exc: psycopg.Error) -> bool:
    """Whether ``exc`` says the connection to the server is gone (the server restarted or
    went away, the session was terminated, no connection could be had), rather than that
    the server refused a statement: then the statement may be tried again elsewhere."""
    state = exc.sqlstate or ""
    if state in _ENDED or state.startswith("08"):
        return True
    return (
        isinstance(exc, psycopg.OperationalError)
        and not state
        and not isinstance(exc, psycopg.errors.PipelineAborted)
    )


def translate(exc: psycopg.Error, where: str, url: str | None = None) -> StoreError:
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
        return StoreWriteFailed(where, f"could not be written ({reason(exc, url)})")
    if lost_connection(exc):
        return StoreUnreachable(where, f"cannot be reached ({reason(exc, url)})")
    return StoreError(where, f"failed: {reason(exc, url)!r}")
