"""The store backends every contract test runs against, and how to get a fresh store.

A backend gives a fresh, empty store location per test (or per hypothesis example); the
same location opened again is the same store, which is how a test simulates a restart.
"""

from __future__ import annotations

import itertools
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

__all__ = ["SQLiteBackend"]


@dataclass
class SQLiteBackend:
    name: str = "sqlite"
    root: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="contract-")))
    _count: itertools.count[int] = field(default_factory=itertools.count)

    async def fresh_url(self) -> str:
        return f"sqlite://{self.root / f'store-{next(self._count)}.db'}"
