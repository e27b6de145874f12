"""The store backends every contract test runs against, and how to get a fresh store.

A backend gives a fresh, empty store location per test (or per hypothesis example); the
same location opened again is the same store, which is how a test simulates a restart.
"""

from __future__ import annotations

import itertools
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from postgres_server import PostgresServer

__all__ = ["PostgresBackend", "SQLiteBackend"]


@dataclass
class SQLiteBackend:
    name: str = "sqlite"
    root: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="contract-")))
    _count: itertools.count[int] = field(default_factory=itertools.count)

    async def fresh_url(self) -> str:
        return f"sqlite://{self.root / f'store-{next(self._count)}.db'}"

    def release(self, url: str) -> None:
        """The store at ``url`` is closed and done with (a new file is cheap: kept)."""

    def cleanup(self) -> None:
        pass


@dataclass
class PostgresBackend:
    """An empty database on the session's one server for each fresh store."""

    server: PostgresServer
    name: str = "postgresql"
    _created: list[str] = field(default_factory=list)

    async def fresh_url(self) -> str:
        url = self.server.new_database()
        self._created.append(url)
        return url

    def release(self, url: str) -> None:
        """The store at ``url`` is closed and done with: its database may serve again."""
        self._created.remove(url)
        self.server.release_database(url)

    def cleanup(self) -> None:
        """Release the databases still held (their stores are closed by now)."""
        for url in list(self._created):
            self.release(url)
