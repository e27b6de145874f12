"""Every test in this package runs once per store backend."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable, Iterator

import pytest

from imagepipe.durable import Store, open_store
from store_contract.backends import PostgresBackend, SQLiteBackend

Backend = SQLiteBackend | PostgresBackend


@pytest.fixture(params=["sqlite", "postgresql"])
def backend(request: pytest.FixtureRequest) -> Iterator[Backend]:
    chosen: Backend
    if request.param == "postgresql":
        chosen = PostgresBackend(request.getfixturevalue("postgres_server"))
    else:
        chosen = SQLiteBackend()
    yield chosen
    chosen.cleanup()


@pytest.fixture
async def store_url(backend: Backend) -> str:
    return await backend.fresh_url()


@pytest.fixture
async def reopen(store_url: str) -> AsyncIterator[Callable[[], Awaitable[Store]]]:
    """Open the test's store (again): each call is a new process's view of it."""
    opened: list[Store] = []

    async def open_again() -> Store:
        store = await open_store(store_url)
        opened.append(store)
        return store

    yield open_again
    for store in opened:
        await store.close()


@pytest.fixture
async def store(reopen: Callable[[], Awaitable[Store]]) -> Store:
    return await reopen()
