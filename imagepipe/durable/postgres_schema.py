"""The PostgreSQL store's schema: numbered migrations, applied in order, each once.

Everything lives in its own schema, ``imagepipe``, so that the store can share a database
with other programs' tables. Schema (version 5), the same model as SQLite's version 7::

    imagepipe.schema_version(version)                                     -- one row
    imagepipe.promises(id PK, parent_id, seq, func, args JSON, options JSON, state,
                       value JSON, error JSON, attempts, failures, created_at, settled_at,
                       child_counts JSON)
    imagepipe.attempts(promise_id, attempt, started_at, finished_at, error JSON)
    imagepipe.leases(key PK, owner, pid, host, heartbeat_at, epoch)
    imagepipe.spending(run_id, meter, cap, spent)
    imagepipe.reservations(promise_id, attempt, meter, reserved, cost)
    imagepipe.notes(run_id, key, value JSON, updated_at)

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
from typing import TYPE_CHECKING, Any

from imagepipe.durable.errors import StoreCorrupt, StoreMissing, StoreNewer, StoreUnusable

if TYPE_CHECKING:
    from psycopg import AsyncConnection

__all__ = ["MIGRATIONS", "MIGRATION_LOCK", "SCHEMA", "SCHEMA_VERSION", "prepare_schema"]

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

#: Version 2: the workers' queue served by indexes. The pending children of a run in launch
#: order (what a claim takes, and whether a run's last branch has settled, without counting
#: its settled ones), and the pending roots oldest first (the runs a claim looks at).
_MIGRATION_2 = (
    "CREATE INDEX promises_pending_children ON imagepipe.promises (parent_id, seq)"
    " WHERE state = 'pending' AND parent_id IS NOT NULL",
    "CREATE INDEX promises_pending_roots ON imagepipe.promises (created_at, id)"
    " WHERE state = 'pending' AND parent_id IS NULL",
)

#: A settled run keeps how many of its children are in each state (``child_counts``, a JSON
#: object), written when its root settles and cleared when it is reopened: listing runs
#: reads it instead of counting every branch of every run again.
_MIGRATION_3 = (
    "ALTER TABLE imagepipe.promises ADD COLUMN child_counts text",
    "UPDATE imagepipe.promises AS p SET child_counts = (SELECT coalesce(json_object_agg("
    "state, n), '{}')::text FROM (SELECT c.state, count(*) AS n FROM imagepipe.promises AS c"
    " WHERE c.parent_id = p.id GROUP BY c.state) AS s)"
    " WHERE p.parent_id IS NULL AND p.state != 'pending'",
)

#: A run's spending caps and what its attempts reserved or cost, per meter (the app's units:
#: micro-dollars, images): a row only for a meter a run caps or has reserved on.
_MIGRATION_4 = (
    """CREATE TABLE imagepipe.spending (
        run_id text COLLATE "C" NOT NULL,
        meter text COLLATE "C" NOT NULL,
        cap bigint,
        spent bigint NOT NULL DEFAULT 0,
        PRIMARY KEY (run_id, meter)
    )""",
    """CREATE TABLE imagepipe.reservations (
        promise_id text COLLATE "C" NOT NULL,
        attempt integer NOT NULL,
        meter text COLLATE "C" NOT NULL,
        reserved bigint NOT NULL,
        cost bigint,
        PRIMARY KEY (promise_id, attempt, meter)
    )""",
)

#: A run's notes: JSON values by key that an app keeps beside a run's promises (the results
#: of its run-level steps, the latest progress it observed).
_MIGRATION_5 = (
    """CREATE TABLE imagepipe.notes (
        run_id text COLLATE "C" NOT NULL,
        key text COLLATE "C" NOT NULL,
        value text NOT NULL,
        updated_at double precision NOT NULL,
        PRIMARY KEY (run_id, key)
    )""",
)

#: Migration N (the N-th entry) turns schema version N-1 into N: statements run in order,
#: in the migrating transaction. Append only; never edit a released one.
MIGRATIONS: Sequence[Sequence[str]] = (
    _MIGRATION_1,
    _MIGRATION_2,
    _MIGRATION_3,
    _MIGRATION_4,
    _MIGRATION_5,
)
SCHEMA_VERSION = len(MIGRATIONS)


async def prepare_schema(conn: AsyncConnection[Any], where: str, *, create: bool) -> None:
    """Check the store's schema version; create or migrate it (under the advisory lock)."""
    version = await _schema_version(conn, where)
    if version is None and not create:
        raise StoreMissing(where, "holds no imagepipe store")
    if version is not None and version > SCHEMA_VERSION:
        raise StoreNewer(where, version, SCHEMA_VERSION)
    if version == SCHEMA_VERSION:
        return
    async with conn.transaction():
        await conn.execute("SELECT pg_advisory_xact_lock(%s)", (MIGRATION_LOCK,))
        # Re-read under the lock: another process may have migrated meanwhile.
        version = await _schema_version(conn, where) or 0
        if version > SCHEMA_VERSION:
            raise StoreNewer(where, version, SCHEMA_VERSION)
        for number in range(version + 1, SCHEMA_VERSION + 1):
            for statement in MIGRATIONS[number - 1]:
                await conn.execute(statement.encode())
            await conn.execute("UPDATE imagepipe.schema_version SET version = %s", (number,))


async def _schema_version(conn: AsyncConnection[Any], where: str) -> int | None:
    """The stored schema version; None if the database holds no store yet."""
    cur = await conn.execute(
        "SELECT to_regclass('imagepipe.schema_version') IS NOT NULL,"
        " (SELECT count(*) FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace"
        "  WHERE n.nspname = %s)",
        (SCHEMA,),
    )
    row = await cur.fetchone()
    assert row is not None
    has_version, relations = row
    if not has_version:
        if relations:
            raise StoreUnusable(where, f"has a schema {SCHEMA!r} of another program")
        return None
    rows = await (await conn.execute("SELECT version FROM imagepipe.schema_version")).fetchall()
    if len(rows) != 1 or not isinstance(rows[0][0], int):
        raise StoreCorrupt(where, "holds a damaged schema version")
    version: int = rows[0][0]
    return version
