"""A loopback fake of the OpenAI Images API: ``POST /v1/images/generations``.

Answers ``{"created", "data": [{"b64_json" | "url", "revised_prompt"}], "usage"}`` (``usage``
for gpt-image models only, with ``input_tokens_details``, as the API documents it) with an
``x-request-id``; ``respond_with_url = True`` gives a URL served by the same fake
(``GET /files/<name>.png``). A repeated Idempotency-Key replays the first successful answer
and is not counted as a paid create, as OpenAI documents for its idempotent requests.
``big_image = N`` answers every create with one cached PNG of about N bytes of
random-looking pixels (cheap to serve a thousand times), for memory tests.

Run as a process: ``python -m tests.fakes.openai_server --port 0`` prints the base URL.
"""

from __future__ import annotations

import base64
import functools
import itertools
import json
import time
from collections.abc import Callable
from typing import Any

from tests.fakes.common import Answer, FakeServer, Request, make_big_png, make_png, serve_main

__all__ = ["OpenAIFake"]


class OpenAIFake(FakeServer):
    base_path = "/v1"

    def __init__(self, *, api_key: str = "test-key", time_scale: float = 1.0) -> None:
        super().__init__(api_key=api_key, time_scale=time_scale)
        self.respond_with_url = False
        #: when set, a URL answer names this URL instead of a file on this fake
        self.image_url: str | None = None
        self.image_size = (32, 32)
        #: when set, every image is one cached PNG of about this many bytes
        self.big_image: int | None = None
        #: when set, every answer holds another image, even one replayed for an idempotency
        #: key (which then only saves the money), so that a file written from one answer
        #: can be told from another's
        self.unique_images = False
        self._answers = itertools.count(1)
        self._ids = itertools.count(1)
        #: what a key's first successful answer was made of, to replay it (not the bytes:
        #: a thousand big answers would fill the test's memory)
        self._by_key: dict[str, tuple[int, int, str, dict[str, Any]]] = {}

    def route(self, request: Request) -> tuple[str, Callable[[Request], Answer]] | None:
        if request.method == "POST" and request.path == "/v1/images/generations":
            return "create", self._create
        if request.method == "GET" and request.path.startswith("/files/"):
            return "file", self._file
        return None

    def authorized(self, request: Request) -> bool:
        if request.path.startswith("/files/"):
            return True  # like a CDN: the URL is the secret
        return super().authorized(request)

    def prompt_of(self, request: Request) -> str | None:
        body = request.body
        return str(body.get("prompt")) if isinstance(body, dict) else None

    def error(self, status: int, message: str, code: str | None, type_: str | None) -> Answer:
        body = {"error": {"message": message, "type": type_, "param": None, "code": code}}
        return Answer.json(status, body, **{"x-request-id": f"req_err_{next(self._ids)}"})

    def _create(self, request: Request) -> Answer:
        body = request.body if isinstance(request.body, dict) else {}
        prompt = body.get("prompt")
        if not isinstance(prompt, str) or not prompt:
            return self.error(400, "prompt is required", "invalid_value", "invalid_request_error")
        if body.get("n", 1) != 1:
            return self.error(400, "this fake makes one image", "invalid_value", None)
        key = request.headers.get("idempotency-key")
        with self.lock:
            made = None if key is None else self._by_key.get(key)
            if made is None:
                self.paid_creates += 1
                self.paid_by_prompt[prompt] += 1
                made = (next(self._ids), int(time.time()), prompt, body)
                if key is not None:
                    self._by_key[key] = made
        # a replay is not paid again; made outside the lock, which _make takes for a URL
        return self._make(*made)

    def _make(self, n: int, created: int, prompt: str, body: dict[str, Any]) -> Answer:
        big = self.big_image
        seed = f"{prompt} #{next(self._answers)}" if self.unique_images else prompt
        png = make_big_png(big) if big else make_png(seed, *self.image_size)
        item: dict[str, str] = {"revised_prompt": f"{prompt}, revised"}
        if self.respond_with_url or body.get("response_format") == "url":
            name = f"img-{n}.png"
            with self.lock:
                self.files[name] = png
            item["url"] = self.image_url or f"{self.origin}/files/{name}"
        elif big:
            item["b64_json"] = _BIG_MARK  # spliced in below: the same bytes every time
        else:
            item["b64_json"] = base64.b64encode(png).decode()
        data: dict[str, Any] = {"created": created, "data": [item]}
        if str(body.get("model", "gpt-image-1")).startswith("gpt-image"):
            data["usage"] = _usage(prompt, body)  # "for the GPT image models only"
        body = json.dumps(data).encode()
        if big and "b64_json" in item:
            # Encoding a megabyte-long string as JSON costs ~5 ms of the test process's CPU
            # an answer (a thousand in the memory test): splice the cached text in instead.
            head, tail = body.rsplit(_BIG_MARK.encode(), 1)
            body = b"".join((head, _big_b64(big), tail))
        return Answer(200, body, headers={"x-request-id": f"req_{n}"})

    def _file(self, request: Request) -> Answer:
        name = request.path.removeprefix("/files/")
        with self.lock:
            png = self.files.get(name)
        if png is None:
            return self.error(404, "no such file", None, None)
        return Answer(200, png, "image/png")


#: image output tokens by quality and size: figures a forum thread gives for gpt-image-1
#: (https://community.openai.com/t/gpt-image-1-collected-pricing-information-and-why-
#: responses-is-undocumented/1275254); "auto" (the default) answers as "low"
OUTPUT_TOKENS = {
    ("low", "1024x1024"): 272,
    ("low", "1024x1536"): 408,
    ("low", "1536x1024"): 400,
    ("medium", "1024x1024"): 1056,
    ("medium", "1024x1536"): 1584,
    ("medium", "1536x1024"): 1568,
    ("high", "1024x1024"): 4160,
    ("high", "1024x1536"): 6240,
    ("high", "1536x1024"): 6208,
}


def _usage(prompt: str, body: dict[str, Any]) -> dict[str, Any]:
    """``usage`` as the Images API documents it: input tokens (of text here, one a word)
    with their details, and the output image's tokens."""
    quality = str(body.get("quality") or "auto").replace("auto", "low")
    size = str(body.get("size") or "1024x1024").replace("auto", "1024x1024")
    text = len(prompt.split())
    output = OUTPUT_TOKENS.get((quality, size), 272)
    return {
        "input_tokens": text,
        "input_tokens_details": {"text_tokens": text, "image_tokens": 0},
        "output_tokens": output,
        "total_tokens": text + output,
    }


#: stands for the big image's base64 text in an answer until it is spliced in
_BIG_MARK = "big-image-b64-goes-here"


@functools.lru_cache(maxsize=2)
def _big_b64(nbytes: int) -> bytes:
    return base64.b64encode(make_big_png(nbytes))


if __name__ == "__main__":
    serve_main(OpenAIFake, "A loopback fake of the OpenAI Images API.")
