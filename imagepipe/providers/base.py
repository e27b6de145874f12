"""What every image provider offers, and the errors it may raise."""

from __future__ import annotations

from typing import NamedTuple, Protocol, TypedDict

__all__ = [
    "GeneratedImage",
    "ImageRequest",
    "InvalidRequest",
    "Provider",
    "ProviderError",
    "ProviderTimeout",
    "TransientProviderError",
]


class ImageRequest(NamedTuple):
    prompt: str
    style: str
    variation: int
    #: the branch's durable id: a real provider must send it as the idempotency key,
    #: so that a call repeated after a crash is not billed twice
    idempotency_key: str
    attempt: int
    #: demo crash mode: the ``abstract`` style fails its first attempt
    fail_first_attempt: bool = False


class GeneratedImage(TypedDict):
    style: str
    variation: int
    url: str
    duration_ms: int


class Provider(Protocol):
    name: str

    async def generate(self, request: ImageRequest) -> GeneratedImage: ...


class ProviderError(Exception):
    """A failure reported by the provider. ``retryable`` says whether to try again."""

    retryable = True


class TransientProviderError(ProviderError):
    """Overloaded, rate limited, a dropped connection: worth another attempt."""


class ProviderTimeout(TransientProviderError):
    """The provider did not answer in time."""


class InvalidRequest(ProviderError):
    """The provider refuses the request itself (content policy, bad style): never retried."""

    retryable = False
