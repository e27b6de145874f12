"""What the hostile-user tests read of a store, straight from the SQLite file.

Plain ``sqlite3`` and no imagepipe code, so that the same helpers read the store of the
code under test and of the previous code (whose tests must fail for the right reason).
"""

from __future__ import annotations

import hashlib
import sqlite3
import time
from pathlib import Path
from typing import Any

__all__ = ["checkpointed_bytes", "lease_age", "rows", "table_rows"]


def table_rows(db: Path, table: str) -> list[tuple[Any, ...]]:
    """Every row of ``table``, every column, in a stable order."""
    conn = sqlite3.connect(db)
    try:
        return sorted(conn.execute(f"SELECT * FROM {table}").fetchall(), key=repr)
    finally:
        conn.close()


def rows(db: Path) -> dict[str, list[tuple[Any, ...]]]:
    """The whole store, table by table (promises, attempt history, leases)."""
    return {table: table_rows(db, table) for table in ("promises", "attempts", "leases")}


def lease_age(db: Path) -> float | None:
    """Seconds since the newest lease heartbeat (the store's clock is this host's)."""
    conn = sqlite3.connect(db)
    try:
        newest = conn.execute("SELECT max(heartbeat_at) FROM leases").fetchone()[0]
    finally:
        conn.close()
    return None if newest is None else time.time() - newest


def checkpointed_bytes(db: Path) -> str:
    """sha256 of the store's main file once every committed write is in it.

    The WAL is checkpointed (and truncated) first, so a write that some process committed
    to the WAL but nobody checkpointed yet still changes the figure. A read-only open and
    close leaves the file alone, so equal figures mean nothing at all was written: rows,
    leases, schema and header (its change counter) alike."""
    conn = sqlite3.connect(db)
    try:
        busy, _, _ = conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
        assert busy == 0, "another connection kept the checkpoint from finishing"
    finally:
        conn.close()
    return hashlib.sha256(db.read_bytes()).hexdigest()
