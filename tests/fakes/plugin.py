"""Pytest fixtures for the loopback fakes: ``openai_fake``, ``openai_batch_fake`` and
``replicate_fake``.

Use them from a test module with ``pytest_plugins = ["tests.fakes.plugin"]`` (or from
``tests/conftest.py``). Each starts its fake on a free 127.0.0.1 port, points the
provider's environment variables (key and base URL) at it, and stops it afterwards.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.fakes.openai_batch_server import OpenAIBatchFake
from tests.fakes.openai_server import OpenAIFake
from tests.fakes.replicate_server import ReplicateFake

__all__ = ["openai_batch_fake", "openai_fake", "replicate_fake"]


@pytest.fixture
def openai_fake(monkeypatch: pytest.MonkeyPatch) -> Iterator[OpenAIFake]:
    fake = OpenAIFake(api_key="sk-test")
    monkeypatch.setenv("OPENAI_BASE_URL", fake.start())
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test")
    yield fake
    fake.stop()


@pytest.fixture
def openai_batch_fake(monkeypatch: pytest.MonkeyPatch) -> Iterator[OpenAIBatchFake]:
    """The OpenAI fake with Files and Batches; its clock moves only when the test moves
    it (``openai_batch_fake.clock.advance(seconds)``)."""
    fake = OpenAIBatchFake(api_key="sk-test")
    monkeypatch.setenv("OPENAI_BASE_URL", fake.start())
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test")
    yield fake
    fake.stop()


@pytest.fixture
def replicate_fake(monkeypatch: pytest.MonkeyPatch) -> Iterator[ReplicateFake]:
    fake = ReplicateFake(api_key="r8-test")
    monkeypatch.setenv("REPLICATE_BASE_URL", fake.start())
    monkeypatch.setenv("REPLICATE_API_TOKEN", "r8-test")
    yield fake
    fake.stop()
