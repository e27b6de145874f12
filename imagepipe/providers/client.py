"""What the HTTP providers share: :class:`HTTPProvider`, one per run.

It holds the run's options, one connection pool (httpx, imported on first use) and one
:class:`~imagepipe.providers.http.Pacer` shared by all the run's branches, the base URL
(``-o base_url``, else the provider's environment variable, else the public API) and the
key, read from the environment when a request needs it, so that a missing one is
:class:`~imagepipe.providers.base.MissingCredentials` (exit 2) naming the variable.

Every request goes through :meth:`HTTPProvider.request`: within ``-o timeout`` seconds as a
whole, its answer within a size limit that follows ``-o max_image_mb``, the key redacted
from whatever the provider sends back. :meth:`HTTPProvider.download` fetches an image URL
from an answer only if :func:`~imagepipe.providers.http.check_image_url` allows it.

The account's errors (:class:`~imagepipe.providers.base.AccountError`) leave it naming
what to fix: the key's variable, the base URL's variable and option. A base URL without a
scheme or host is refused before the run starts (:meth:`HTTPProvider.check_credentials`),
and one that :data:`UNREACHABLE_AFTER` requests in a row, across the run's branches,
cannot connect to (refused, host not found) is :class:`~imagepipe.providers.base.
BaseURLUnusable`.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any, ClassVar, Self
from urllib.parse import urlsplit

from imagepipe.providers.base import (
    AccountError,
    BaseURLUnusable,
    CannotConnect,
    CredentialsError,
    MissingCredentials,
    QuotaExceeded,
    UnknownModel,
)
from imagepipe.providers.http import (
    ACCEPT_ENCODING,
    MB,
    BodyLimit,
    Pacer,
    Reply,
    check_image_url,
    same_origin,
    send,
)
from imagepipe.providers.options import ProviderOptions
from imagepipe.text import quoted

if TYPE_CHECKING:
    import httpx

    from imagepipe.providers.contract import ProviderSettings

__all__ = ["UNREACHABLE_AFTER", "HTTPProvider"]

#: requests to the base URL in a row, with no answer in between, that could not connect
#: (refused, host not found) before the base URL is taken for the set-up's fault
UNREACHABLE_AFTER = 3


class HTTPProvider:
    """Base of a provider that calls an HTTP API. A subclass sets ``Options`` (a dataclass
    with ``base_url``, ``timeout`` and ``max_image_mb`` among its fields) and the class
    variables below."""

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
        self.base_url = self._base_url(opts).rstrip("/")
        self._api_key = api_key
        self._client: httpx.AsyncClient | None = None
        #: requests to the base URL in a row that could not connect (see UNREACHABLE_AFTER)
        self._unreachable = 0

    @classmethod
    def _base_url(cls, options: ProviderOptions | None) -> str:
        """``-o base_url``, else the provider's environment variable, else the public API."""
        given = getattr(options, "base_url", None)
        return str(given or os.environ.get(cls.base_url_variable) or cls.default_base_url)

    @classmethod
    def check_credentials(cls, options: ProviderOptions | None = None) -> None:
        """Before the run starts: raise :class:`MissingCredentials` (exit 2, naming the
        variable) without a key, and :class:`BaseURLUnusable` (exit 2) for a base URL
        without an http(s) scheme or a host (or with a control character)."""
        if not os.environ.get(cls.key_variable):
            raise MissingCredentials(cls.key_variable)
        url = cls._base_url(options)
        try:
            parts = urlsplit(url)
            # reading the port checks it: one that is not a number raises ValueError
            port_ok = parts.port is None or parts.port >= 0
            usable = parts.scheme in ("http", "https") and bool(parts.hostname) and port_ok
            usable = usable and url.isprintable()
        except ValueError:
            usable = False
        if not usable:
            raise BaseURLUnusable(
                f"the base URL {quoted(url)} ({cls._base_url_source(options)}) is not an "
                f"http(s) URL with a host, such as {cls.default_base_url}",
                fix=cls._base_url_fix(),
            )

    @classmethod
    def _base_url_source(cls, options: ProviderOptions | None) -> str:
        if getattr(options, "base_url", None):
            return "-o base_url"
        return f"from {cls.base_url_variable}"

    @classmethod
    def _base_url_fix(cls) -> str:
        return f"check {cls.base_url_variable} or -o base_url"

    @classmethod
    def create(cls, options: ProviderOptions, settings: ProviderSettings) -> Self:
        """The run's instance, with a pacer for this invocation's ``--rpm``."""
        return cls(options, pacer=settings.pacer(), time_scale=settings.time_scale)

    def api_key(self) -> str:
        key = self._api_key or os.environ.get(self.key_variable)
        if not key:
            raise MissingCredentials(self.key_variable)
        return key

    @property
    def timeout(self) -> float:
        """Seconds one request may take as a whole (and each of its reads)."""
        timeout: float = getattr(self.options, "timeout", 120.0)
        return timeout

    @property
    def image_limit(self) -> BodyLimit:
        """The largest image accepted (``-o max_image_mb``)."""
        max_mb: float = getattr(self.options, "max_image_mb", 50.0)
        return BodyLimit(int(max_mb * MB), "image")

    @property
    def answer_limit(self) -> BodyLimit:
        """The largest API (JSON) answer accepted: room for an image of
        :attr:`image_limit` in base64 (4 bytes for 3), and 1 MB for the rest."""
        return BodyLimit(self.image_limit.bytes * 4 // 3 + MB, "answer")

    def http(self) -> httpx.AsyncClient:
        """The run's connection pool, opened on first use."""
        if self._client is None:
            import httpx

            self._client = httpx.AsyncClient(
                timeout=httpx.Timeout(self.timeout),
                headers={"Accept-Encoding": ACCEPT_ENCODING},
            )
        return self._client

    async def request(
        self,
        method: str,
        url: str,
        *,
        limit: BodyLimit | None = None,
        paced: bool = True,
        **kwargs: Any,
    ) -> Reply:
        """One request to the provider (see :func:`~imagepipe.providers.http.send`):
        within :attr:`timeout`, its body within ``limit`` (default :attr:`answer_limit`),
        the key redacted from the answer's text and from any error."""
        to_base = same_origin(url, self.base_url)
        try:
            reply = await send(
                self.http(),
                method,
                url,
                pacer=self.pacer,
                paced=paced,
                limit=limit or self.answer_limit,
                deadline=self.timeout,
                secret=self._api_key or os.environ.get(self.key_variable),
                **kwargs,
            )
        except CannotConnect as exc:
            if to_base:
                self._unreachable += 1
                if self._unreachable >= UNREACHABLE_AFTER:
                    raise BaseURLUnusable(
                        f"the base URL {quoted(self.base_url)} cannot be reached "
                        f"({self._unreachable} requests in a row: {exc.message})",
                        fix=self._base_url_fix(),
                    ) from exc
            raise
        except Exception as exc:
            if to_base:
                self._unreachable = 0  # it was reached (it answered, or dropped the line)
            if isinstance(exc, AccountError):
                exc.fix = self.what_to_fix(exc)
            raise
        if to_base:
            self._unreachable = 0
        return reply

    def what_to_fix(self, error: AccountError) -> str:
        """What to fix for an account error of this provider, naming its variables."""
        key = self.key_variable
        if isinstance(error, CredentialsError):
            return f"check {key}"
        if isinstance(error, QuotaExceeded):
            return f"add credit to the account of {key} or raise its spending limit"
        if isinstance(error, UnknownModel):
            return UnknownModel.fix
        if isinstance(error, BaseURLUnusable):
            return self._base_url_fix()
        return error.fix

    async def download(self, url: str) -> bytes:
        """The image at ``url`` (from the provider's answer), within :attr:`image_limit`;
        a URL :func:`~imagepipe.providers.http.check_image_url` refuses is never fetched.
        The key goes only to the API's own origin, never to a CDN."""
        await check_image_url(url, self.base_url)
        headers = self.auth_headers() if same_origin(url, self.base_url) else {}
        reply = await self.request("GET", url, limit=self.image_limit, paced=False, headers=headers)
        return reply.body

    def auth_headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key()}"}

    async def aclose(self) -> None:
        """Close the connection pool; call once when the run ends."""
        if self._client is not None:
            await self._client.aclose()
            self._client = None
