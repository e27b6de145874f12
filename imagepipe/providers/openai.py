"""The ``openai`` provider: the OpenAI Images API, or any server compatible with it.

``POST {base_url}/images/generations`` with ``n: 1``, ``Authorization: Bearer
$OPENAI_API_KEY`` and ``Idempotency-Key: <branch id>``. The base URL includes ``/v1``, as
in the official SDK: ``-o base_url``, else ``$OPENAI_BASE_URL``, else the public API.

The answer's ``data[0].b64_json`` is decoded; a ``data[0].url`` (DALL·E; it expires after
an hour) is downloaded before :meth:`OpenAIProvider.generate` returns, if
:func:`~imagepipe.providers.http.check_image_url` allows it. The answer is read within a
limit that follows ``-o max_image_mb`` (its base64 image included); an answer of another
shape is a :class:`~imagepipe.providers.base.ProviderProtocolError`. Errors are
classified by :func:`imagepipe.providers.http.classify`; tenacity in the core is the only
retry layer, so this module never retries. A 404 that names no model means that nothing
serves the Images API at the base URL (one without ``/v1``, say): the set-up's fault,
:class:`~imagepipe.providers.base.BaseURLUnusable`.

Guarantee: at least once. The Idempotency-Key lets a compatible server answer a repeated
request without billing it again, but nothing here can prove it did.
"""

from __future__ import annotations

import base64
import binascii
from dataclasses import dataclass
from typing import Any, ClassVar

from imagepipe.providers.base import (
    BaseURLUnusable,
    InvalidRequest,
    ProviderError,
    ProviderImage,
    ProviderProtocolError,
    ProviderRequest,
    SubSteps,
)
from imagepipe.providers.client import HTTPProvider
from imagepipe.providers.http import BodyLimit, json_type, sniff_mime
from imagepipe.providers.options import ProviderOptions, option
from imagepipe.text import quoted

__all__ = [
    "DEFAULT_BASE_URL",
    "OpenAIOptions",
    "OpenAIProvider",
    "b64_image",
    "check_credentials",
    "image_item",
    "image_request_body",
    "provider_image",
]

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
    timeout: float = option(
        120.0,
        "seconds one request may take, its whole answer included",
        identity=False,
        positive=True,
    )
    max_image_mb: float = option(
        50.0,
        "largest image to accept, in MB; a larger answer rejects the branch",
        identity=False,
        positive=True,
    )


class OpenAIProvider(HTTPProvider):
    """One instance per run, shared by all its branches (one connection pool, one pacer)."""

    name: ClassVar[str] = "openai"
    description: ClassVar[str] = "OpenAI Images API, or any server compatible with it"
    Options: ClassVar[type[ProviderOptions]] = OpenAIOptions
    default_concurrency: ClassVar[int] = 4
    guarantee: ClassVar[str] = "at least once"
    #: its batch mode (``run --batch``): a :class:`~imagepipe.providers.openai_batch.
    #: BatchProvider`, as ``module:Class`` (loaded only for a batch run)
    batch_mode: ClassVar[str] = "imagepipe.providers.openai_batch:OpenAIBatchClient"
    key_variable: ClassVar[str] = "OPENAI_API_KEY"
    base_url_variable: ClassVar[str] = "OPENAI_BASE_URL"
    default_base_url: ClassVar[str] = DEFAULT_BASE_URL
    options: OpenAIOptions

    def _body(self, request: ProviderRequest) -> dict[str, Any]:
        return image_request_body(request, self.options)

    async def generate(self, request: ProviderRequest, steps: SubSteps) -> ProviderImage:
        """Make one image: one paced POST (an error is raised classified), then decode it."""
        self.api_key()  # a missing key fails before any request
        headers = {**self.auth_headers(), "Idempotency-Key": request.idempotency_key}
        endpoint = f"{self.base_url}/images/generations"
        try:
            reply = await self.request("POST", endpoint, json=self._body(request), headers=headers)
        except InvalidRequest as exc:
            if exc.status != 404:
                raise
            raise BaseURLUnusable(
                f"{quoted(endpoint)} answered 404 ({exc.message}): no Images API at the base URL "
                f"(it includes /v1, as in {DEFAULT_BASE_URL})",
                status=404,
                fix=self._base_url_fix(),
            ) from exc
        answer, item = image_item(reply.json())
        source_url = None
        url = item.get("url")
        if item.get("b64_json"):
            data = b64_image(item, self.image_limit)
        elif url:
            if not isinstance(url, str):
                raise _shape("data[0].url", "a string", url)
            source_url = url
            try:
                data = await self.download(source_url)
            except ProviderError as exc:
                exc.billed = True  # the image was made: a failed download does not unbill it
                raise
        else:
            raise ProviderProtocolError("the provider's answer has neither b64_json nor url")
        return provider_image(
            answer,
            item,
            data,
            model=self._body(request)["model"],
            request_id=reply.headers.get("x-request-id"),
            source_url=source_url,
        )


def image_request_body(request: ProviderRequest, default: OpenAIOptions) -> dict[str, Any]:
    """The JSON body of ``POST /images/generations`` for one branch (``n: 1``), with the
    request's own options, or ``default`` when it carries another provider's. The batch
    client (:mod:`imagepipe.providers.openai_batch`) sends the same body in each line."""
    opts = request.options if isinstance(request.options, OpenAIOptions) else default
    body: dict[str, Any] = {"model": opts.model, "prompt": request.prompt, "n": 1}
    body["size"] = opts.size
    if opts.quality is not None:
        body["quality"] = opts.quality
    if opts.response_format is not None:
        body["response_format"] = opts.response_format
    return body


def b64_image(item: dict[str, Any], limit: BodyLimit) -> bytes:
    """The image in an answer's ``data[0].b64_json``, decoded, within ``limit``."""
    b64 = item.get("b64_json")
    if not isinstance(b64, str):
        raise _shape("data[0].b64_json", "a string", b64)
    try:
        data = base64.b64decode(b64, validate=True)
    except (binascii.Error, ValueError):
        raise ProviderError("the provider's b64_json is not valid base64") from None
    if len(data) > limit.bytes:
        raise limit.error()
    return data


def provider_image(
    answer: dict[str, Any],
    item: dict[str, Any],
    data: bytes,
    *,
    model: str,
    request_id: str | None,
    source_url: str | None = None,
) -> ProviderImage:
    """The :class:`ProviderImage` of an answer and its decoded image; ``model`` is the one
    asked for, used when the answer does not name one."""
    usage = answer.get("usage")
    named = answer.get("model")
    revised = item.get("revised_prompt")
    return ProviderImage(
        data=data,
        mime=sniff_mime(data),
        model=named if isinstance(named, str) and named else model,
        request_id=request_id,
        revised_prompt=revised if isinstance(revised, str) else None,
        usage=usage if isinstance(usage, dict) else None,
        source_url=source_url,
    )


def _shape(field: str, expected: str, value: Any) -> ProviderProtocolError:
    return ProviderProtocolError(
        f"the provider's answer has {field} as {json_type(value)}, not {expected}"
    )


def image_item(answer: Any) -> tuple[dict[str, Any], dict[str, Any]]:
    """The answer and its ``data[0]``, or a :class:`ProviderProtocolError` naming what is
    not of the documented shape."""
    if not isinstance(answer, dict):
        raise ProviderProtocolError(f"the provider's answer is {json_type(answer)}, not an object")
    data = answer.get("data")
    if not isinstance(data, list):
        raise _shape("data", "a list", data)
    if not data:
        raise ProviderProtocolError("the provider's answer has no image (data is empty)")
    item = data[0]
    if not isinstance(item, dict):
        raise _shape("data[0]", "an object", item)
    return answer, item


#: raise MissingCredentials ("set OPENAI_API_KEY", exit 2) when there is no key
check_credentials = OpenAIProvider.check_credentials
