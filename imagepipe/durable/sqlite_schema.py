"""The SQLite store's schema: numbered migrations, applied in order, each once.

Schema (version 7)::

    promises(id PK, parent_id, seq, func, args JSON, options JSON, state, value JSON,
             error JSON, attempts, failures, created_at, settled_at, child_counts JSON)
        -- indexed by (parent_id, seq); the pending ones also by parent and by age
    attempts(promise_id, attempt, started_at, finished_at, error JSON)   -- failed ones
    leases(key PK, owner, pid, host, heartbeat_at, epoch)                 -- who executes
    spending(run_id, meter, cap, spent)                     -- a run's caps, what it spent
    reservations(promise_id, attempt, meter, reserved, cost)   -- each paid attempt's part
    notes(run_id, key, value JSON, updated_at)      -- what an app keeps beside a run

``PRAGMA user_version`` is the schema version and ``PRAGMA application_id`` marks the file
as imagepipe's. Migration N turns version N-1 into N; a released one is never edited (they
are frozen snapshots, so migration 2 repeats migration 1's table on purpose).
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable

__all__ = ["APPLICATION_ID", "MIGRATIONS", "SCHEMA_VERSION"]

APPLICATION_ID = 0x696D6770  # "imgp": marks a SQLite file as an imagepipe store


def _migration_1(db: sqlite3.Connection) -> None:
    db.execute(
        """CREATE TABLE promises (
            id TEXT PRIMARY KEY,
            parent_id TEXT,
            seq INTEGER,
            func TEXT NOT NULL,
            args TEXT NOT NULL,
            options TEXT NOT NULL DEFAULT '{}',
            state TEXT NOT NULL CHECK (state IN ('pending', 'resolved', 'rejected')),
            value TEXT,
            error TEXT,
            attempts INTEGER NOT NULL DEFAULT 0,
            failures INTEGER NOT NULL DEFAULT 0,
            created_at REAL NOT NULL,
            settled_at REAL
        )"""
    )
    db.execute("CREATE INDEX promises_by_parent ON promises (parent_id, seq)")
    db.execute("CREATE INDEX promises_roots ON promises (created_at) WHERE parent_id IS NULL")
    db.execute(
        """CREATE TABLE attempts (
            promise_id TEXT NOT NULL,
            attempt INTEGER NOT NULL,
            started_at REAL NOT NULL,
            finished_at REAL,
            error TEXT,
            PRIMARY KEY (promise_id, attempt)
        ) WITHOUT ROWID"""
    )
    db.execute(
        """CREATE TABLE leases (
            run_id TEXT PRIMARY KEY,
            owner TEXT NOT NULL,
            pid INTEGER NOT NULL,
            host TEXT NOT NULL,
            heartbeat_at REAL NOT NULL
        )"""
    )


def _migration_2(db: sqlite3.Connection) -> None:
    """Same table, with ``state`` checked by comparisons instead of ``IN (...)``: SQLite
    builds an ephemeral table for the list on every row written, which cost ~2 µs per
    insert and per settle (a third of the store's work per branch, measured)."""
    db.execute(
        """CREATE TABLE promises_v2 (
            id TEXT PRIMARY KEY,
            parent_id TEXT,
            seq INTEGER,
            func TEXT NOT NULL,
            args TEXT NOT NULL,
            options TEXT NOT NULL DEFAULT '{}',
            state TEXT NOT NULL
                CHECK (state = 'pending' OR state = 'resolved' OR state = 'rejected'),
            value TEXT,
            error TEXT,
            attempts INTEGER NOT NULL DEFAULT 0,
            failures INTEGER NOT NULL DEFAULT 0,
            created_at REAL NOT NULL,
            settled_at REAL
        )"""
    )
    db.execute("INSERT INTO promises_v2 SELECT * FROM promises")
    db.execute("DROP TABLE promises")  # drops its indexes too
    db.execute("ALTER TABLE promises_v2 RENAME TO promises")
    db.execute("CREATE INDEX promises_by_parent ON promises (parent_id, seq)")
    db.execute("CREATE INDEX promises_roots ON promises (created_at) WHERE parent_id IS NULL")


def _migration_3(db: sqlite3.Connection) -> None:
    """Arguments by name, and leases with fencing.

    - ``args``: a positional list (version 0) becomes ``{"version": 0, "positional": [...]}``,
      which the code names from the function's signature when it reads it; new rows hold
      ``{"version": 1, "kwargs": {...}}``.
    - ``leases``: keyed by ``key`` with an ``epoch`` that every acquisition increments; a
      released lease keeps its row (owner NULL) so that the next epoch is higher still.
      ``heartbeat_at`` is the store's clock."""
    db.execute(
        "UPDATE promises SET args = json_object('version', 0, 'positional', json(args))"
        " WHERE json_type(args) = 'array'"
    )
    db.execute(
        """CREATE TABLE leases_v3 (
            key TEXT PRIMARY KEY,
            owner TEXT,
            pid INTEGER,
            host TEXT,
            heartbeat_at REAL NOT NULL,
            epoch INTEGER NOT NULL DEFAULT 0
        )"""
    )
    db.execute(
        "INSERT INTO leases_v3 (key, owner, pid, host, heartbeat_at, epoch)"
        " SELECT run_id, owner, pid, host, heartbeat_at, 1 FROM leases"
    )
    db.execute("DROP TABLE leases")
    db.execute("ALTER TABLE leases_v3 RENAME TO leases")


def _migration_4(db: sqlite3.Connection) -> None:
    """A settled run keeps how many of its children are in each state (``child_counts``,
    a JSON object), written when its root settles and cleared when it is reopened:
    listing runs reads it instead of counting every branch of every run again."""
    db.execute("ALTER TABLE promises ADD COLUMN child_counts TEXT")
    db.execute(
        "UPDATE promises SET child_counts = (SELECT json_group_object(state, n) FROM"
        " (SELECT c.state, count(*) AS n FROM promises AS c WHERE c.parent_id = promises.id"
        " GROUP BY c.state)) WHERE parent_id IS NULL AND state != 'pending'"
    )


def _migration_5(db: sqlite3.Connection) -> None:
    """The workers' queue served by indexes, as PostgreSQL's migration 2: the pending
    children of a run in launch order (what a claim takes, and whether a run's last branch
    has settled), and the pending roots oldest first. Without them, each claim and each
    check walked every settled branch of the run: a 20,000-branch detached run took 20 s
    to work off instead of 2."""
    db.execute(
        "CREATE INDEX promises_pending_children ON promises (parent_id, seq)"
        " WHERE state = 'pending' AND parent_id IS NOT NULL"
    )
    db.execute(
        "CREATE INDEX promises_pending_roots ON promises (created_at, id)"
        " WHERE state = 'pending' AND parent_id IS NULL"
    )


def _migration_6(db: sqlite3.Connection) -> None:
    """A run's spending caps and what its attempts reserved or cost, per meter (the app's
    units: micro-dollars, images): a row only for a meter a run caps or has reserved on."""
    db.execute(
        "CREATE TABLE spending (run_id TEXT NOT NULL, meter TEXT NOT NULL, cap INTEGER,"
        " spent INTEGER NOT NULL DEFAULT 0, PRIMARY KEY (run_id, meter))"
    )
    db.execute(
        "CREATE TABLE reservations (promise_id TEXT NOT NULL, attempt INTEGER NOT NULL,"
        " meter TEXT NOT NULL, reserved INTEGER NOT NULL, cost INTEGER,"
        " PRIMARY KEY (promise_id, attempt, meter))"
    )


def _migration_7(db: sqlite3.Connection) -> None:
    """A run's notes: JSON values by key that an app keeps beside a run's promises (the
    results of its run-level steps, the latest progress it observed)."""
    db.execute(
        "CREATE TABLE notes (run_id TEXT NOT NULL, key TEXT NOT NULL, value TEXT NOT NULL,"
        " updated_at REAL NOT NULL, PRIMARY KEY (run_id, key))"
    )


#: Migration N turns schema version N-1 into N. Append only; never edit a released one.
MIGRATIONS: list[Callable[[sqlite3.Connection], None]] = [
    _migration_1,
    _migration_2,
    _migration_3,
    _migration_4,
    _migration_5,
    _migration_6,
    _migration_7,
]
SCHEMA_VERSION = len(MIGRATIONS)
