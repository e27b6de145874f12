"""The ``replicate`` provider: Replicate's predictions API, an asynchronous job API.

Never pay twice: the create is a NESTED DURABLE STEP. ``steps.run(create_prediction, ...)``
stores the prediction id before the branch waits for it, so a kill and resume at any point
after that polls the same prediction instead of creating (and paying for) a second one.
The only window left is between the create's answer and its commit to the store.

The wait is a durable step too (``wait_for_prediction``): the prediction's final state is
stored once it has ended. A later attempt that replays a prediction which ended without
an image (``failed``, ``canceled``, or canceled here at the poll deadline) creates a new
one at the next sub-step, so ``imagepipe retry`` can fix such a branch; the attempt that
saw it end reports it (sub-steps, per branch: create, wait, create, wait, ...). A
prediction still running when a process died is polled again, never created again.

- Create: ``POST /v1/models/{owner}/{name}/predictions`` when the model is
  ``owner/name``; ``POST /v1/predictions`` with ``{"version": ...}`` when it is a version id
  (64 hex digits, or ``owner/name:version``). With ``Prefer: wait``: an answer that is
  already final is used as it is.
- Poll ``GET /v1/predictions/{id}`` every ``poll_interval`` s (times ``time_scale``) until
  ``succeeded``, ``failed`` or ``canceled``; then download the output (a URL, or a list
  of them: the first). After ``poll_timeout`` s (times ``time_scale``) of one attempt's
  polling, ``POST /v1/predictions/{id}/cancel``, and the attempt fails as retryable: the
  next creates a new prediction.
- ``failed`` and ``canceled`` are not retryable. A poll that fails (429, 5xx, dropped
  connection) raises a retryable error: the core retries the branch, the replayed create
  step gives back the same id, and polling goes on.

Base URL: ``-o base_url``, else ``$REPLICATE_BASE_URL``, else https://api.replicate.com
(the host root, as in the official client). Token: ``$REPLICATE_API_TOKEN``.

Account errors stop the run (:class:`~imagepipe.providers.base.AccountError`): 401 and 403
(the token), 402 (no credit), and a create answered 404 (no such model) or 422 about the
version (no such version).
"""

from __future__ import annotations

import asyncio
import re
from dataclasses import dataclass
from typing import Any, ClassVar

from imagepipe.providers.base import (
    InvalidRequest,
    PredictionFailed,
    ProviderError,
    ProviderImage,
    ProviderProtocolError,
    ProviderRequest,
    ProviderTimeout,
    SubSteps,
    UnknownModel,
)
from imagepipe.providers.client import HTTPProvider
from imagepipe.providers.http import Reply, json_type, sniff_mime
from imagepipe.providers.options import ProviderOptions, option
from imagepipe.text import quoted

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
    timeout: float = option(
        120.0,
        "seconds one request may take, its whole answer included",
        identity=False,
        positive=True,
    )
    poll_interval: float = option(
        1.0, "seconds between two polls of a prediction", identity=False, positive=True
    )
    poll_timeout: float = option(
        600.0,
        "seconds an attempt polls a prediction before canceling it (then retried)",
        identity=False,
        positive=True,
    )
    max_image_mb: float = option(
        50.0,
        "largest image to accept, in MB; a larger one rejects the branch",
        identity=False,
        positive=True,
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
        headers = self.auth_headers()
        if wait:
            headers["Prefer"] = "wait"
        try:
            reply = await self.request("POST", url, json=body, headers=headers)
        except InvalidRequest as exc:
            # a model that does not exist (or that this token may not use) is a 404; a
            # version id that is not one, a 422 about the version
            about_version = "version" in body and "version" in exc.message.lower()
            if exc.status == 404 or (exc.status == 422 and about_version):
                raise UnknownModel(
                    f"no model {quoted(model)} here ({exc.status}: {exc.message})",
                    status=exc.status,
                    fix=f"{UnknownModel.fix}; or {self.base_url_variable} or -o base_url",
                ) from exc
            raise
        return _prediction(reply)

    async def get_prediction(self, prediction_id: str) -> dict[str, Any]:
        """The prediction's current state (a poll: waits out back-off, not counted in rpm)."""
        url = f"{self.base_url}/v1/predictions/{prediction_id}"
        reply = await self.request("GET", url, paced=False, headers=self.auth_headers())
        return _prediction(reply)

    async def cancel_prediction(self, prediction_id: str) -> dict[str, Any]:
        """Ask the provider to stop a prediction; its state as the answer gives it."""
        url = f"{self.base_url}/v1/predictions/{prediction_id}/cancel"
        reply = await self.request("POST", url, paced=False, headers=self.auth_headers())
        return _prediction(reply)

    async def wait(self, prediction: dict[str, Any]) -> dict[str, Any]:
        """Poll ``prediction`` until it ends; at the poll deadline, cancel it and return it
        as ``canceled`` with ``"timed_out": true`` (unless the cancel's answer says it
        ended meanwhile). A failed poll or cancel raises: nothing is stored then, and the
        next attempt polls the same prediction again."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.options.poll_timeout * self.time_scale
        prediction_id = str(prediction["id"])
        while not is_final(prediction):
            left = deadline - loop.time()
            if left <= 0:
                answer = await self.cancel_prediction(prediction_id)
                if answer["status"] in ("succeeded", "failed"):  # it ended meanwhile
                    return answer
                return {**answer, "status": "canceled", "timed_out": True}
            await asyncio.sleep(min(self.options.poll_interval * self.time_scale, left))
            prediction = await self.get_prediction(prediction_id)
        return prediction

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
        """Create (durably, once), wait until final (durably), download the first output.

        A prediction that an EARLIER attempt saw end without an image is replaced by a new
        one; one that ends so in this attempt is reported (see the module's docstring)."""
        self.api_key()  # a missing token fails before the durable step
        opts = request.options if isinstance(request.options, ReplicateOptions) else self.options
        while True:
            created = await steps.run(
                self.create_prediction, model=opts.model, input=self._input(request)
            )
            waiter = _Waiter(self, created)
            try:
                prediction = await steps.run(
                    waiter.wait_for_prediction, prediction_id=str(created["id"])
                )
            except ProviderError as exc:
                exc.billed = True  # the prediction was created: it runs, and bills
                raise
            if prediction["status"] == "succeeded":
                break
            if waiter.ran:
                raise _ended(prediction, self.options.poll_timeout)
        prediction_id = str(prediction["id"])
        url = _first_output(prediction)
        try:
            data = await self.download(url)
        except ProviderError as exc:
            exc.billed = True  # the prediction succeeded: a failed download does not unbill it
            raise
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


class _Waiter:
    """The durable wait for one prediction; ``ran`` tells a wait of this attempt from one
    replayed from the store (an earlier attempt's)."""

    def __init__(self, provider: ReplicateProvider, created: dict[str, Any]) -> None:
        self.provider = provider
        self.created = created
        self.ran = False

    async def wait_for_prediction(self, prediction_id: str) -> dict[str, Any]:
        """The prediction once it has ended (the sub-step's stored result)."""
        self.ran = True
        return await self.provider.wait(self.created)


def _ended(prediction: dict[str, Any], poll_timeout: float) -> ProviderError:
    """The error of a prediction that ended without an image in this attempt."""
    prediction_id = prediction["id"]
    if prediction.get("timed_out"):
        return ProviderTimeout(
            f"prediction {prediction_id} did not end in {poll_timeout:g} s (-o poll_timeout); "
            "canceled it"
        )
    if prediction["status"] == "failed":
        error = prediction.get("error")
        return PredictionFailed(str(error or f"prediction {prediction_id} failed"))
    return PredictionFailed(f"prediction {prediction_id} was canceled")


def _prediction(reply: Reply) -> dict[str, Any]:
    """The prediction in an answer, reduced to what is kept; a
    :class:`ProviderProtocolError` naming what is not of the documented shape."""
    data = reply.json()
    if not isinstance(data, dict):
        raise ProviderProtocolError(
            f"the provider's answer is {json_type(data)}, not a prediction object"
        )
    if not isinstance(data.get("id"), str) or not data["id"]:
        raise ProviderProtocolError("the provider's answer is not a prediction (no id)")
    if not isinstance(data.get("status"), str):
        raise ProviderProtocolError(
            f"the provider's prediction has status as {json_type(data.get('status'))}, not a string"
        )
    keep = ("id", "status", "output", "error", "model", "metrics")
    return {k: data[k] for k in keep if k in data}


def _first_output(prediction: dict[str, Any]) -> str:
    output = prediction.get("output")
    if isinstance(output, list) and output:
        output = output[0]
    if not isinstance(output, str) or not output:
        raise ProviderProtocolError(
            f"prediction {prediction.get('id')} succeeded without an output URL "
            f"(its output is {json_type(output)})"
        )
    return output


#: raise MissingCredentials ("set REPLICATE_API_TOKEN", exit 2) without a token
check_credentials = ReplicateProvider.check_credentials
