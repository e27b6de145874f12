"""The ``openai`` provider: the OpenAI Images API, or any server compatible with it.

``POST {base_url}/images/generations`` with ``n: 1``, ``Authorization: Bearer
$OPENAI_API_KEY`` and ``Idempotency-Key: <branch id>``. The base URL includes ``/v1``, as
in the official SDK: ``-o base_url``, else ``$OPENAI_BASE_URL``, else the public API.

The answer's ``data[0].b64_json`` is decoded; a ``data[0].url`` (DALL·E; it expires after
an hour) is downloaded before :meth:`OpenAIProvider.generate` returns. Errors are
classified by :func:`imagepipe.providers.http.classify`; tenacity in the core is the only
retry layer, so this module never retries.

Guarantee: at least once. The Idempotency-Key lets a compatible server answer a repeated
request without billing it again, but nothing here can prove it did.
"""

from __future__ import annotations

import base64
import binascii
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

from imagepipe.providers.base import (
    ProviderError,
    ProviderImage,
    ProviderRequest,
    SubSteps,
)
from imagepipe.providers.client import HTTPProvider
from imagepipe.providers.http import same_origin, send, sniff_mime
from imagepipe.providers.options import ProviderOptions, option

if TYPE_CHECKING:
    pass

__all__ = ["DEFAULT_BASE_URL", "OpenAIOptions", "OpenAIProvider", "check_credentials"]

DEFAULT_BASE_URL = "https://api.openai.com/v1"
URL_PATTERN = r"https?://\S+"


@dataclass(frozen=True)
class OpenAIOptions(ProviderOptions):
    model: str = option("gpt-image-1", "model name, e.g. gpt-image-1, dall-e-3")
    size: str = option(
        "1024x1024", "WIDTHxHEIGHT or auto, e.g. 1024x1536", pattern=r"auto|[1-9]\d*x[1-9]\d*"
    )
    quality: str | None = option(
        None,
        "image quality (the model's default when unset)",
        choices=("low", "medium", "high", "auto", "standard", "hd"),
    )
    response_format: str | None = option(
        None, "b64_json or url (dall-e models only)", choices=("b64_json", "url")
    )
    base_url: str | None = option(
        None,
        "API base URL including /v1 (default $OPENAI_BASE_URL, else the public API)",
        identity=False,
        pattern=URL_PATTERN,
    )
    timeout: float = option(120.0, "seconds to wait for an answer", identity=False, positive=True)


class OpenAIProvider(HTTPProvider):
    """One instance per run, shared by all its branches (one connection pool, one pacer)."""

    name: ClassVar[str] = "openai"
    description: ClassVar[str] = "OpenAI Images API, or any server compatible with it"
    Options: ClassVar[type[ProviderOptions]] = OpenAIOptions
    default_concurrency: ClassVar[int] = 4
    guarantee: ClassVar[str] = "at least once"
    key_variable: ClassVar[str] = "OPENAI_API_KEY"
    base_url_variable: ClassVar[str] = "OPENAI_BASE_URL"
    default_base_url: ClassVar[str] = DEFAULT_BASE_URL
    options: OpenAIOptions

    def _body(self, request: ProviderRequest) -> dict[str, Any]:
        opts = request.options if isinstance(request.options, OpenAIOptions) else self.options
        body: dict[str, Any] = {"model": opts.model, "prompt": request.prompt, "n": 1}
        body["size"] = opts.size
        if opts.quality is not None:
            body["quality"] = opts.quality
        if opts.response_format is not None:
            body["response_format"] = opts.response_format
        return body

    async def generate(self, request: ProviderRequest, steps: SubSteps) -> ProviderImage:
        """Make one image: one paced POST (an error is raised classified), then decode it."""
        key = self.api_key()
        client = self.http()
        headers = {"Authorization": f"Bearer {key}", "Idempotency-Key": request.idempotency_key}
        response = await send(
            client,
            "POST",
            f"{self.base_url}/images/generations",
            pacer=self.pacer,
            json=self._body(request),
            headers=headers,
        )
        try:
            answer = response.json()
            item = answer["data"][0]
        except (ValueError, KeyError, IndexError, TypeError):
            raise ProviderError("the provider's answer has no image (data[0] is missing)") from None
        source_url = None
        if item.get("b64_json"):
            try:
                data = base64.b64decode(item["b64_json"], validate=True)
            except (binascii.Error, ValueError):
                raise ProviderError("the provider's b64_json is not valid base64") from None
        elif item.get("url"):
            source_url = str(item["url"])
            data = await self._download(source_url, key)
        else:
            raise ProviderError("the provider's answer has neither b64_json nor url")
        usage = answer.get("usage")
        return ProviderImage(
            data=data,
            mime=sniff_mime(data),
            model=str(answer.get("model") or self._body(request)["model"]),
            request_id=response.headers.get("x-request-id"),
            revised_prompt=item.get("revised_prompt"),
            usage=usage if isinstance(usage, dict) else None,
            source_url=source_url,
        )

    async def _download(self, url: str, key: str) -> bytes:
        # The key goes only to the API's own origin, never to a CDN.
        headers = {"Authorization": f"Bearer {key}"} if same_origin(url, self.base_url) else {}
        response = await send(
            self.http(), "GET", url, pacer=self.pacer, paced=False, headers=headers
        )
        return response.content


#: raise MissingCredentials ("set OPENAI_API_KEY", exit 2) when there is no key
check_credentials = OpenAIProvider.check_credentials
