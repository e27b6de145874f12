"""The ``replicate`` provider: Replicate's predictions API, an asynchronous job API.

Never pay twice: the create is a NESTED DURABLE STEP. ``steps.run(create_prediction, ...)``
stores the prediction id before the branch waits for it, so a kill and resume at any point
after that polls the same prediction instead of creating (and paying for) a second one.
The only window left is between the create's answer and its commit to the store.

- Create: ``POST /v1/models/{owner}/{name}/predictions`` when the model is
  ``owner/name``; ``POST /v1/predictions`` with ``{"version": ...}`` when it is a version id
  (64 hex digits, or ``owner/name:version``). With ``Prefer: wait``: an answer that is
  already final is used as it is.
- Poll ``GET /v1/predictions/{id}`` every ``poll_interval`` s (times ``time_scale``) until
  ``succeeded``, ``failed`` or ``canceled``; then download the output (a URL, or a list
  of them: the first).
- ``failed`` and ``canceled`` are not retryable. A poll that fails (429, 5xx, dropped
  connection) raises a retryable error: the core retries the branch, the replayed create
  step gives back the same id, and polling goes on.

Base URL: ``-o base_url``, else ``$REPLICATE_BASE_URL``, else https://api.replicate.com
(the host root, as in the official client). Token: ``$REPLICATE_API_TOKEN``.
"""

from __future__ import annotations

import asyncio
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

from imagepipe.providers.base import (
    PredictionFailed,
    ProviderError,
    ProviderImage,
    ProviderRequest,
    SubSteps,
)
from imagepipe.providers.client import HTTPProvider
from imagepipe.providers.http import same_origin, send, sniff_mime
from imagepipe.providers.options import ProviderOptions, option

if TYPE_CHECKING:
    import httpx

__all__ = [
    "DEFAULT_BASE_URL",
    "ReplicateOptions",
    "ReplicateProvider",
    "check_credentials",
    "is_final",
]

DEFAULT_BASE_URL = "https://api.replicate.com"
FINAL_STATES = ("succeeded", "failed", "canceled")
VERSION_ID = re.compile(r"[0-9a-f]{64}")


@dataclass(frozen=True)
class ReplicateOptions(ProviderOptions):
    model: str = option(
        "black-forest-labs/flux-schnell",
        "owner/name, owner/name:version or a version id",
        pattern=r"[\w.-]+/[\w.-]+(:[0-9a-f]{64})?|[0-9a-f]{64}",
    )
    aspect_ratio: str = option("1:1", "W:H, e.g. 16:9", pattern=r"[1-9]\d*:[1-9]\d*")
    output_format: str = option("webp", "image format", choices=("webp", "png", "jpg"))
    seed: int | None = option(None, "random seed, for a repeatable image", minimum=0)
    base_url: str | None = option(
        None,
        "API host root (default $REPLICATE_BASE_URL, else https://api.replicate.com)",
        identity=False,
        pattern=r"https?://\S+",
    )
    timeout: float = option(120.0, "seconds to wait for one answer", identity=False, positive=True)
    poll_interval: float = option(
        1.0, "seconds between two polls of a prediction", identity=False, positive=True
    )


def is_final(prediction: dict[str, Any]) -> bool:
    """Whether a prediction has ended (succeeded, failed or canceled)."""
    return prediction.get("status") in FINAL_STATES


class ReplicateProvider(HTTPProvider):
    """One instance per run, shared by all its branches (one connection pool, one pacer)."""

    name: ClassVar[str] = "replicate"
    description: ClassVar[str] = "Replicate predictions API (asynchronous jobs)"
    Options: ClassVar[type[ProviderOptions]] = ReplicateOptions
    default_concurrency: ClassVar[int] = 8
    guarantee: ClassVar[str] = "exactly one paid create per image"
    key_variable: ClassVar[str] = "REPLICATE_API_TOKEN"
    base_url_variable: ClassVar[str] = "REPLICATE_BASE_URL"
    default_base_url: ClassVar[str] = DEFAULT_BASE_URL
    options: ReplicateOptions

    def _headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key()}"}

    async def create_prediction(
        self, *, model: str, input: dict[str, Any], wait: bool = True
    ) -> dict[str, Any]:
        """Create one prediction (the paid step); returns ``{"id", "status", ...}`` (JSON).

        Run through :meth:`SubSteps.run`, so its answer is stored before anything waits.
        """
        owner_name, _, version = model.partition(":")
        if VERSION_ID.fullmatch(model):
            url, body = f"{self.base_url}/v1/predictions", {"version": model, "input": input}
        elif version:
            url, body = f"{self.base_url}/v1/predictions", {"version": version, "input": input}
        else:
            url = f"{self.base_url}/v1/models/{owner_name}/predictions"
            body = {"input": input}
        headers = self._headers()
        if wait:
            headers["Prefer"] = "wait"
        response = await send(
            self.http(), "POST", url, pacer=self.pacer, json=body, headers=headers
        )
        return _prediction(response)

    async def get_prediction(self, prediction_id: str) -> dict[str, Any]:
        """The prediction's current state (a poll: waits out back-off, not counted in rpm)."""
        response = await send(
            self.http(),
            "GET",
            f"{self.base_url}/v1/predictions/{prediction_id}",
            pacer=self.pacer,
            paced=False,
            headers=self._headers(),
        )
        return _prediction(response)

    def _input(self, request: ProviderRequest) -> dict[str, Any]:
        opts = request.options if isinstance(request.options, ReplicateOptions) else self.options
        data: dict[str, Any] = {
            "prompt": request.prompt,
            "aspect_ratio": opts.aspect_ratio,
            "output_format": opts.output_format,
        }
        if opts.seed is not None:
            data["seed"] = opts.seed
        return data

    async def generate(self, request: ProviderRequest, steps: SubSteps) -> ProviderImage:
        """Create (durably, once), poll until final, download the first output."""
        self._headers()  # a missing token fails before the durable step
        opts = request.options if isinstance(request.options, ReplicateOptions) else self.options
        prediction = await steps.run(
            self.create_prediction, model=opts.model, input=self._input(request)
        )
        prediction_id = str(prediction["id"])
        while not is_final(prediction):
            await asyncio.sleep(self.options.poll_interval * self.time_scale)
            prediction = await self.get_prediction(prediction_id)
        status = prediction["status"]
        if status == "failed":
            raise PredictionFailed(
                str(prediction.get("error") or f"prediction {prediction_id} failed")
            )
        if status == "canceled":
            raise PredictionFailed(f"prediction {prediction_id} was canceled")
        url = _first_output(prediction)
        data = await self._download(url)
        metrics = prediction.get("metrics")
        seed = self._input(request).get("seed")
        return ProviderImage(
            data=data,
            mime=sniff_mime(data),
            model=str(prediction.get("model") or opts.model),
            request_id=prediction_id,
            usage=metrics if isinstance(metrics, dict) else None,
            seed=seed if isinstance(seed, int) else None,
            source_url=url,
        )

    async def _download(self, url: str) -> bytes:
        # The token goes only to the API's own origin, never to the file CDN.
        headers = self._headers() if same_origin(url, self.base_url) else {}
        response = await send(
            self.http(), "GET", url, pacer=self.pacer, paced=False, headers=headers
        )
        return response.content


def _prediction(response: httpx.Response) -> dict[str, Any]:
    try:
        data = response.json()
    except ValueError:
        data = None
    if not isinstance(data, dict) or not isinstance(data.get("id"), str):
        raise ProviderError("the provider's answer is not a prediction (no id)")
    keep = ("id", "status", "output", "error", "model", "metrics")
    return {k: data[k] for k in keep if k in data}


def _first_output(prediction: dict[str, Any]) -> str:
    output = prediction.get("output")
    if isinstance(output, list) and output:
        output = output[0]
    if not isinstance(output, str) or not output:
        raise ProviderError(f"prediction {prediction.get('id')} succeeded without an output URL")
    return output


#: raise MissingCredentials ("set REPLICATE_API_TOKEN", exit 2) without a token
check_credentials = ReplicateProvider.check_credentials
