"""What the HTTP providers share: :class:`HTTPProvider`, one per run.

It holds the run's options, one connection pool (httpx, imported on first use) and one
:class:`~imagepipe.providers.http.Pacer` shared by all the run's branches, the base URL
(``-o base_url``, else the provider's environment variable, else the public API) and the
key, read from the environment when a request needs it, so that a missing one is
:class:`~imagepipe.providers.base.MissingCredentials` (exit 2) naming the variable.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, ClassVar

from imagepipe.providers.base import MissingCredentials
from imagepipe.providers.http import Pacer
from imagepipe.providers.options import ProviderOptions

if TYPE_CHECKING:
    import httpx

__all__ = ["HTTPProvider"]


class HTTPProvider:
    """Base of a provider that calls an HTTP API. A subclass sets ``Options`` (a dataclass
    with ``base_url`` and ``timeout`` among its fields) and the class variables below."""

    Options: ClassVar[type[ProviderOptions]]
    #: the environment variable that holds the API key
    key_variable: ClassVar[str]
    #: the environment variable that may set the base URL, and the URL without either
    base_url_variable: ClassVar[str]
    default_base_url: ClassVar[str]

    def __init__(
        self,
        options: ProviderOptions | None = None,
        *,
        pacer: Pacer | None = None,
        time_scale: float = 1.0,
        api_key: str | None = None,
    ) -> None:
        opts = options if options is not None else self.Options()
        if not isinstance(opts, self.Options):
            raise TypeError(
                f"{type(self).__name__} needs {self.Options.__name__}, not {type(opts).__name__}"
            )
        self.options = opts
        self.time_scale = time_scale
        self.pacer = pacer if pacer is not None else Pacer(time_scale=time_scale)
        base_url = getattr(opts, "base_url", None)
        self.base_url = (
            base_url or os.environ.get(self.base_url_variable) or self.default_base_url
        ).rstrip("/")
        self._api_key = api_key
        self._client: httpx.AsyncClient | None = None

    @classmethod
    def check_credentials(cls, options: ProviderOptions | None = None) -> None:
        """Raise :class:`MissingCredentials` (exit 2, naming the variable) without a key."""
        if not os.environ.get(cls.key_variable):
            raise MissingCredentials(cls.key_variable)

    def api_key(self) -> str:
        key = self._api_key or os.environ.get(self.key_variable)
        if not key:
            raise MissingCredentials(self.key_variable)
        return key

    def http(self) -> httpx.AsyncClient:
        """The run's connection pool, opened on first use."""
        if self._client is None:
            import httpx

            timeout: float = getattr(self.options, "timeout", 120.0)
            self._client = httpx.AsyncClient(timeout=httpx.Timeout(timeout))
        return self._client

    async def aclose(self) -> None:
        """Close the connection pool; call once when the run ends."""
        if self._client is not None:
            await self._client.aclose()
            self._client = None
