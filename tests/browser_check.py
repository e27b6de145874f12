"""Load a local page in Debian's headless Chromium (driven by Playwright) and report on it.

Playwright's Python package drives the browser over the DevTools protocol; it is given
the system's ``/usr/bin/chromium`` (``executable_path``), so ``playwright install`` (which
downloads a browser) is never needed. :func:`require_chromium` skips a test when
Chromium is missing on a developer's machine and fails it when ``CI`` is set.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

if TYPE_CHECKING:
    from playwright.sync_api import BrowserContext, Route

__all__ = ["CHROMIUM", "CHROMIUM_ARGS", "Browser", "ImageState", "PageReport", "require_chromium"]

CHROMIUM = Path("/usr/bin/chromium")
#: Flags that work as root on a machine with no display, no GPU and no network.
CHROMIUM_ARGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
)


def require_chromium() -> Path:
    """The Chromium binary; skip (locally) or fail (under CI) when it is not installed."""
    if CHROMIUM.is_file() and os.access(CHROMIUM, os.X_OK):
        return CHROMIUM
    if os.environ.get("CI"):
        pytest.fail(f"CI is set but {CHROMIUM} is missing: .ci/run installs Debian's chromium")
    pytest.skip(f"{CHROMIUM} is missing: `apt-get install chromium` to run the browser tests")


@dataclass(frozen=True)
class ImageState:
    src: str
    complete: bool
    natural_width: int
    natural_height: int


@dataclass
class PageReport:
    """What happened while a page loaded."""

    requests: list[str] = field(default_factory=list)
    failed_requests: list[str] = field(default_factory=list)
    console: list[str] = field(default_factory=list)
    images: list[ImageState] = field(default_factory=list)
    #: results of the ``queries`` given to :meth:`Browser.load`, by name
    results: dict[str, Any] = field(default_factory=dict)


class Browser:
    """One headless Chromium with a fresh profile; :meth:`load` opens a page in a new tab.

    Use as a context manager. Every request a page makes is recorded; any that is not
    ``file://`` is also aborted, so a page that reaches for the network shows it without
    waiting on it.
    """

    def __init__(self, viewport: tuple[int, int] = (1400, 1000)) -> None:
        self.viewport = viewport
        self._stack = contextlib.ExitStack()
        self._context: BrowserContext | None = None

    def __enter__(self) -> Browser:
        from playwright.sync_api import sync_playwright

        try:
            profile = self._stack.enter_context(
                tempfile.TemporaryDirectory(prefix="imagepipe-chromium-")
            )
            playwright = self._stack.enter_context(sync_playwright())
            context = playwright.chromium.launch_persistent_context(
                profile,
                executable_path=str(require_chromium()),
                args=list(CHROMIUM_ARGS),
                headless=True,
                viewport={"width": self.viewport[0], "height": self.viewport[1]},
                offline=True,
            )
            self._stack.callback(context.close)
            context.route("**/*", _file_only)
        except BaseException:
            self._stack.close()
            raise
        self._context = context
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._context = None
        self._stack.close()

    def load(
        self, url: str, *, queries: dict[str, str] | None = None, screenshot: Path | None = None
    ) -> PageReport:
        """Open ``url``, wait until it has loaded, evaluate ``queries`` (JavaScript
        expressions, by name) and take a full-page ``screenshot``."""
        assert self._context is not None, "use Browser as a context manager"
        report = PageReport()
        page = self._context.new_page()
        try:
            page.on("request", lambda request: report.requests.append(request.url))
            page.on("requestfailed", lambda request: report.failed_requests.append(request.url))
            page.on("console", lambda message: report.console.append(message.text))
            page.goto(url, wait_until="load")
            images = page.eval_on_selector_all(
                "img",
                "els => els.map(e => [e.currentSrc, e.complete, e.naturalWidth, e.naturalHeight])",
            )
            report.images = [ImageState(str(s), bool(c), int(w), int(h)) for s, c, w, h in images]
            for name, expression in (queries or {}).items():
                report.results[name] = page.evaluate(expression)
            if screenshot is not None:
                page.screenshot(path=str(screenshot), full_page=True)
        finally:
            page.close()
        return report


def _file_only(route: Route) -> None:
    if route.request.url.startswith("file://"):
        route.continue_()
    else:
        route.abort()
