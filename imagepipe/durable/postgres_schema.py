"""The PostgreSQL store's schema: numbered migrations, applied in order, each once.

Everything lives in its own schema, ``imagepipe``, so that the store can share a database
with other programs' tables. Schema (version 1), the same model as SQLite's version 3::

    imagepipe.schema_version(version)                                     -- one row
    imagepipe.promises(id PK, parent_id, seq, func, args JSON, options JSON, state,
                       value JSON, error JSON, attempts, failures, created_at, settled_at)
    imagepipe.attempts(promise_id, attempt, started_at, finished_at, error JSON)
    imagepipe.leases(key PK, owner, pid, host, heartbeat_at, epoch)

JSON columns are ``text``, not ``jsonb``: the core writes canonical JSON text and compares
it (a lost settlement is told apart by its exact text), and ``jsonb`` would respace it and
reorder keys. Ids are ``COLLATE "C"`` so that they sort byte-wise, as in SQLite. Times are
Unix seconds (``double precision``); lease heartbeats come from the database's clock.

Migrations run in one transaction under :data:`MIGRATION_LOCK` (a transaction-scoped
advisory lock), so two processes that open a new store at once do not race. Migration N
turns version N-1 into N; a released one is never edited.
"""

from __future__ import annotations

from collections.abc import Sequence

__all__ = ["MIGRATIONS", "MIGRATION_LOCK", "SCHEMA", "SCHEMA_VERSION"]

#: the PostgreSQL schema (namespace) that holds the store's tables
SCHEMA = "imagepipe"

#: key of the advisory lock taken while migrating ("imgp" as a number)
MIGRATION_LOCK = 0x696D6770

_MIGRATION_1 = (
    "CREATE SCHEMA IF NOT EXISTS imagepipe",
    "CREATE TABLE imagepipe.schema_version (version integer NOT NULL)",
    "INSERT INTO imagepipe.schema_version (version) VALUES (0)",
    """CREATE TABLE imagepipe.promises (
        id text COLLATE "C" PRIMARY KEY,
        parent_id text COLLATE "C",
        seq integer,
        func text NOT NULL,
        args text NOT NULL,
        options text NOT NULL DEFAULT '{}',
        state text NOT NULL CHECK (state IN ('pending', 'resolved', 'rejected')),
        value text,
        error text,
        attempts integer NOT NULL DEFAULT 0,
        failures integer NOT NULL DEFAULT 0,
        created_at double precision NOT NULL,
        settled_at double precision
    )""",
    "CREATE INDEX promises_by_parent ON imagepipe.promises (parent_id, seq)",
    "CREATE INDEX promises_roots ON imagepipe.promises (created_at DESC, id DESC)"
    " WHERE parent_id IS NULL",
    """CREATE TABLE imagepipe.attempts (
        promise_id text COLLATE "C" NOT NULL,
        attempt integer NOT NULL,
        started_at double precision NOT NULL,
        finished_at double precision,
        error text,
        PRIMARY KEY (promise_id, attempt)
    )""",
    """CREATE TABLE imagepipe.leases (
        key text COLLATE "C" PRIMARY KEY,
        owner text,
        pid integer,
        host text,
        heartbeat_at double precision NOT NULL,
        epoch bigint NOT NULL DEFAULT 0
    )""",
)

#: Migration N (the N-th entry) turns schema version N-1 into N: statements run in order,
#: in the migrating transaction. Append only; never edit a released one.
MIGRATIONS: Sequence[Sequence[str]] = (_MIGRATION_1,)
SCHEMA_VERSION = len(MIGRATIONS)
