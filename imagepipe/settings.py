"""Settings read from the environment, validated into one-line errors.

- ``IMAGEPIPE_DB``: the store, a path or URL (``--db`` wins): a SQLite file, or
  ``postgresql://user:password@host/db``. Default: ``imagepipe.db`` in the
  user data directory (``platformdirs``), e.g. ``~/.local/share/imagepipe/imagepipe.db``.
- ``IMAGEPIPE_TIME_SCALE``: a number from 0 to 1000 multiplying every simulated duration
  and retry delay. ``0.01`` makes a 2 s back-off take 20 ms; tests and demos use it.
- ``IMAGEPIPE_BUSY_TIMEOUT``: seconds (0 to 86400) to wait for another process's write
  lock on the store before giving up with exit 75 (default 5).
- ``IMAGEPIPE_DB_RECONNECT``: seconds (0 to 86400) a process on a PostgreSQL store rides
  out a lost connection (a server restart, a terminated session) by reconnecting and
  carrying on; a server gone for longer ends it with exit 75 (default 30).
- ``IMAGEPIPE_STYLES``: the style-template file (default ``styles.toml`` in the user
  config directory, e.g. ``~/.config/imagepipe/styles.toml``).
- ``IMAGEPIPE_PRICES``: the prices file (default ``prices.toml`` in the user config
  directory), read by :mod:`imagepipe.prices`.
- ``IMAGEPIPE_LEASE_TIMEOUT``: seconds of silence (no heartbeat) after which another
  process may take a run over (default 10); the owner renews every tenth of it.
- ``IMAGEPIPE_COORDINATED_BACKOFF``: ``0`` turns coordinated back-off off (a 429 then
  pauses only the branch that got it), to measure what it is worth; default on.
- ``IMAGEPIPE_RATE_LIMIT_PATIENCE``: seconds (0 to 86400) a run waits for a provider's
  rate limit to let a request through; rate-limit waits do not count as failed attempts,
  this bounds them instead (default 600).
- ``IMAGEPIPE_BATCH_SIZE``: requests in one provider batch at most (1 to the provider's
  limit, 50,000 for OpenAI; default that limit). Smaller batches finish sooner.
- ``IMAGEPIPE_MAX_BATCHES``: batches one run may create at most (default 100): a run
  that would need more is refused before anything is sent.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

from imagepipe.errors import BadInput
from imagepipe.text import quoted

__all__ = [
    "batch_size",
    "busy_timeout",
    "check_provider_settings",
    "coordinated_backoff",
    "db_reconnect",
    "default_db_path",
    "lease_timeout",
    "max_batches",
    "rate_limit_patience",
    "time_scale",
]


def default_db_path() -> Path:
    import platformdirs  # only when no --db or IMAGEPIPE_DB says where

    return Path(platformdirs.user_data_dir("imagepipe", appauthor=False)) / "imagepipe.db"


def _number(name: str, default: float, maximum: float) -> float:
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    try:
        value = float(raw)
    except ValueError:
        value = math.nan
    if not math.isfinite(value) or value < 0:
        raise BadInput(f"{name} must be a number >= 0, not {quoted(raw)}")
    if value > maximum:  # 1e308 is finite, and would sleep or wait for ever
        raise BadInput(f"{name} must be at most {maximum:g}, not {quoted(raw)}")
    return value


def time_scale() -> float:
    return _number("IMAGEPIPE_TIME_SCALE", 1.0, maximum=1000)


def busy_timeout() -> float:
    return _number("IMAGEPIPE_BUSY_TIMEOUT", 5.0, maximum=86_400)


def db_reconnect() -> float:
    """Seconds a lost connection to a PostgreSQL store is ridden out."""
    return _number("IMAGEPIPE_DB_RECONNECT", 30.0, maximum=86_400)


def rate_limit_patience() -> float | None:
    """Seconds a run waits for a provider's rate limit to let a request through; None
    when unset (the provider's default, 600)."""
    if not os.environ.get("IMAGEPIPE_RATE_LIMIT_PATIENCE", "").strip():
        return None
    return _number("IMAGEPIPE_RATE_LIMIT_PATIENCE", 0.0, maximum=86_400)


def check_provider_settings() -> None:
    """Read the settings a provider is built with, for their one-line error (exit 2)
    before a run is written, not once it is stored."""
    coordinated_backoff()
    rate_limit_patience()


def lease_timeout() -> float:
    """Seconds of silence after which another process may take a run over."""
    seconds = _number("IMAGEPIPE_LEASE_TIMEOUT", 10.0, maximum=86_400)
    if seconds <= 0:
        raise BadInput(f"IMAGEPIPE_LEASE_TIMEOUT must be a number > 0, not {seconds:g}")
    return seconds


def coordinated_backoff() -> bool:
    """Whether a 429 pauses every branch of the provider (``IMAGEPIPE_COORDINATED_BACKOFF``)."""
    raw = os.environ.get("IMAGEPIPE_COORDINATED_BACKOFF", "").strip().lower()
    if raw in ("", "1", "true", "yes", "on"):
        return True
    if raw in ("0", "false", "no", "off"):
        return False
    raise BadInput(f"IMAGEPIPE_COORDINATED_BACKOFF must be 0 or 1, not {quoted(raw)}")


def _count(name: str, default: int, maximum: int) -> int:
    """A whole number from 1 to ``maximum`` (``default`` when unset)."""
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    if not (raw.isascii() and raw.isdigit()) or not 1 <= int(raw) <= maximum:
        raise BadInput(f"{name} must be a whole number from 1 to {maximum:,}, not {quoted(raw)}")
    return int(raw)


def batch_size(limit: int) -> int:
    """Requests in one provider batch at most, within the provider's ``limit``."""
    return _count("IMAGEPIPE_BATCH_SIZE", limit, maximum=limit)


def max_batches() -> int:
    """Batches one run may create at most."""
    return _count("IMAGEPIPE_MAX_BATCHES", 100, maximum=10_000)
