"""Settings read from the environment, validated into one-line errors.

- ``IMAGEPIPE_DB``: the store's path (``--db`` wins). Default: ``imagepipe.db`` in the
  user data directory (``platformdirs``), e.g. ``~/.local/share/imagepipe/imagepipe.db``.
- ``IMAGEPIPE_TIME_SCALE``: a positive number multiplying every simulated duration and
  retry delay. ``0.01`` makes a 2 s back-off take 20 ms; tests and demos use it.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import platformdirs

from imagepipe.errors import BadInput

__all__ = ["default_db_path", "time_scale"]


def default_db_path() -> Path:
    return Path(platformdirs.user_data_dir("imagepipe", appauthor=False)) / "imagepipe.db"


def time_scale() -> float:
    raw = os.environ.get("IMAGEPIPE_TIME_SCALE", "").strip()
    if not raw:
        return 1.0
    try:
        value = float(raw)
    except ValueError:
        value = math.nan
    if not math.isfinite(value) or value < 0:
        raise BadInput(f"IMAGEPIPE_TIME_SCALE must be a number >= 0, not {raw!r}")
    return value
