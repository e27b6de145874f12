"""Opening a store: the backend a URL names (:func:`open_store`).

Apart from :mod:`.store`, so that the interface does not import its backends, which
implement it: a plain path or ``sqlite://`` is :mod:`.sqlite`, ``postgresql://`` is
:mod:`.postgres` (imported only then: SQLite runs and ``--help`` never load psycopg).
"""

from __future__ import annotations

from imagepipe.durable.store import Store, StoreOptions

__all__ = ["open_store", "store_location"]


def store_location(url: str) -> tuple[str, str]:
    """``(scheme, rest)`` of a store URL; a plain path is a SQLite file."""
    for scheme in ("sqlite://", "postgresql://", "postgres://"):
        if url.startswith(scheme):
            rest = url[len(scheme) :]
            if scheme == "sqlite://":  # sqlite:///abs/path.db, sqlite://relative/path.db
                return "sqlite", rest
            return "postgresql", url
    return "sqlite", url


async def open_store(url: str, options: StoreOptions | None = None) -> Store:
    """Open (creating and migrating as needed) the store at ``url``."""
    scheme, rest = store_location(url)
    options = options or StoreOptions()
    if scheme == "sqlite":
        from imagepipe.durable.sqlite import SQLiteStore

        return SQLiteStore.open(rest, options)
    # Imported here only: SQLite runs and ``--help`` never load psycopg.
    from imagepipe.durable.postgres import PostgresStore

    return await PostgresStore.open(url, options)
