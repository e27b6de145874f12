"""Every test in this package runs once per store backend."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable

import pytest

from imagepipe.durable import Store, open_store
from store_contract.backends import SQLiteBackend

Backend = SQLiteBackend


@pytest.fixture(params=["sqlite"])
def backend(request: pytest.FixtureRequest) -> Backend:
    return SQLiteBackend()


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
