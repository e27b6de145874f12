"""A loopback fake of Replicate's predictions API.

- ``POST /v1/models/{owner}/{name}/predictions`` and ``POST /v1/predictions``
  (``{"version", "input"}``) create a prediction: each is a paid create.
- ``Prefer: wait`` gets the final prediction at once when it needs no polls.
- ``GET /v1/predictions/{id}`` answers ``processing`` for :attr:`ReplicateFake.processing_polls`
  polls, then ``succeeded`` with ``output: [<url of a PNG on this fake>]``, or ``failed`` /
  ``canceled`` for the prompts given to :meth:`ReplicateFake.fail_prompt` /
  :meth:`ReplicateFake.cancel_prompt`; those of :meth:`ReplicateFake.stall_prompt` stay
  ``processing`` until canceled.
- ``POST /v1/predictions/{id}/cancel`` cancels a prediction that has not ended
  (:attr:`ReplicateFake.cancels` lists the ids).
- Errors are problem+json (``{"title", "detail", "status"}``), as Replicate's.

Run as a process: ``python -m tests.fakes.replicate_server --port 0`` prints the base URL.
"""

from __future__ import annotations

import itertools
import re
from collections import Counter
from collections.abc import Callable
from typing import Any

from tests.fakes.common import Answer, FakeServer, Request, make_png, serve_main

__all__ = ["ReplicateFake"]

MODEL_CREATE = re.compile(r"/v1/models/([\w.-]+)/([\w.-]+)/predictions")
PREDICTION = re.compile(r"/v1/predictions/([\w-]+)")
CANCEL = re.compile(r"/v1/predictions/([\w-]+)/cancel")


class ReplicateFake(FakeServer):
    base_path = ""

    def __init__(self, *, api_key: str = "test-token", time_scale: float = 1.0) -> None:
        super().__init__(api_key=api_key, time_scale=time_scale)
        #: how many polls a new prediction answers "processing" before it ends
        self.processing_polls = 0
        self.predictions: dict[str, dict[str, Any]] = {}
        self.polls: Counter[str] = Counter()
        self.cancels: list[str] = []
        #: when set, a prediction's output names this URL instead of a file on this fake
        self.image_url: str | None = None
        #: polls left before a prediction ends; None: it never ends (stalled)
        self._polls_left: dict[str, int | None] = {}
        #: by prompt: how its next predictions end, and for how many more (-1: all)
        self._outcomes: dict[str, tuple[str, str | None, int]] = {}
        self._stalls: Counter[str] = Counter()
        #: how each prediction ends: (status, error)
        self._fates: dict[str, tuple[str, str | None]] = {}
        self._ids = itertools.count(1)

    def fail_prompt(
        self, prompt: str, error: str = "NSFW content detected", *, times: int = -1
    ) -> None:
        """The next ``times`` predictions for ``prompt`` (-1: all) end ``failed`` with
        ``error``; later ones succeed."""
        with self.lock:
            self._outcomes[prompt] = ("failed", error, times)

    def cancel_prompt(self, prompt: str, *, times: int = -1) -> None:
        """The next ``times`` predictions for ``prompt`` (-1: all) end ``canceled``."""
        with self.lock:
            self._outcomes[prompt] = ("canceled", None, times)

    def stall_prompt(self, prompt: str, *, times: int = 1) -> None:
        """The next ``times`` predictions for ``prompt`` stay ``processing`` until canceled."""
        with self.lock:
            self._stalls[prompt] += times

    def _fate(self, prompt: str) -> tuple[str, str | None]:  # under the lock
        status, error, times = self._outcomes.get(prompt, ("succeeded", None, -1))
        if times == 0:
            return "succeeded", None
        if times > 0:
            self._outcomes[prompt] = (status, error, times - 1)
        return status, error

    def route(self, request: Request) -> tuple[str, Callable[[Request], Answer]] | None:
        path = request.path
        if request.method == "POST" and (MODEL_CREATE.fullmatch(path) or path == "/v1/predictions"):
            return "create", self._create
        if request.method == "GET" and PREDICTION.fullmatch(path):
            return "poll", self._poll
        if request.method == "POST" and CANCEL.fullmatch(path):
            return "cancel", self._cancel
        if request.method == "GET" and path.startswith("/files/"):
            return "file", self._file
        return None

    def authorized(self, request: Request) -> bool:
        return request.path.startswith("/files/") or super().authorized(request)

    def prompt_of(self, request: Request) -> str | None:
        body = request.body
        if isinstance(body, dict) and isinstance(body.get("input"), dict):
            prompt = body["input"].get("prompt")
            return str(prompt) if prompt is not None else None
        return None

    def error(self, status: int, message: str, code: str | None, type_: str | None) -> Answer:
        titles = {
            401: "Unauthenticated",
            404: "Not found",
            422: "Input validation failed",
            429: "Request was throttled",
        }
        body = {"title": titles.get(status, "Error"), "detail": message, "status": status}
        answer = Answer.json(status, body)
        answer.content_type = "application/problem+json"
        return answer

    def _create(self, request: Request) -> Answer:
        body = request.body if isinstance(request.body, dict) else {}
        prompt = self.prompt_of(request)
        if not prompt:
            return self.error(422, "input.prompt is required", None, None)
        match = MODEL_CREATE.fullmatch(request.path)
        if match:
            model = f"{match[1]}/{match[2]}"
        elif isinstance(body.get("version"), str):
            model = f"version:{body['version']}"
        else:
            return self.error(422, "version is required", None, None)
        with self.lock:
            self.paid_creates += 1
            self.paid_by_prompt[prompt] += 1
            pid = f"p{next(self._ids):05d}"
            prediction: dict[str, Any] = {
                "id": pid,
                "model": model,
                "version": body.get("version"),
                "input": body["input"],
                "status": "starting",
                "output": None,
                "error": None,
                "urls": {"get": f"{self.origin}/v1/predictions/{pid}"},
            }
            self.predictions[pid] = prediction
            self._fates[pid] = self._fate(prompt)
            self._polls_left[pid] = self.processing_polls
            if self._stalls[prompt] > 0:
                self._stalls[prompt] -= 1
                self._polls_left[pid] = None
            if request.headers.get("prefer", "").startswith("wait") and self._polls_left[pid] == 0:
                self._finish(pid)
            return Answer.json(201, dict(prediction))

    def _finish(self, pid: str) -> None:  # under the lock
        prediction = self.predictions[pid]
        status, error = self._fates[pid]
        prediction["status"] = status
        prediction["error"] = error
        if status == "succeeded":
            name = f"{pid}.png"
            self.files[name] = make_png(prediction["input"]["prompt"])
            prediction["output"] = [self.image_url or f"{self.origin}/files/{name}"]
            prediction["metrics"] = {"predict_time": 0.5}

    def _poll(self, request: Request) -> Answer:
        match = PREDICTION.fullmatch(request.path)
        assert match is not None
        pid = match[1]
        with self.lock:
            prediction = self.predictions.get(pid)
            if prediction is None:
                return self.error(404, f"prediction {pid} not found", None, None)
            self.polls[pid] += 1
            if prediction["status"] in ("starting", "processing"):
                left = self._polls_left[pid]
                if left is None or left > 0:
                    self._polls_left[pid] = None if left is None else left - 1
                    prediction["status"] = "processing"
                else:
                    self._finish(pid)
            return Answer.json(200, dict(prediction))

    def _cancel(self, request: Request) -> Answer:
        match = CANCEL.fullmatch(request.path)
        assert match is not None
        pid = match[1]
        with self.lock:
            prediction = self.predictions.get(pid)
            if prediction is None:
                return self.error(404, f"prediction {pid} not found", None, None)
            self.cancels.append(pid)
            if prediction["status"] in ("starting", "processing"):
                prediction["status"] = "canceled"
            return Answer.json(200, dict(prediction))

    def _file(self, request: Request) -> Answer:
        with self.lock:
            png = self.files.get(request.path.removeprefix("/files/"))
        if png is None:
            return self.error(404, "no such file", None, None)
        return Answer(200, png, "image/png")


if __name__ == "__main__":
    serve_main(ReplicateFake, "A loopback fake of Replicate's predictions API.")
