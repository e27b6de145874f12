"""The gallery page in a real browser: Debian's headless Chromium loads it from disk.

Skipped only when Chromium is missing and ``CI`` is unset (see ``browser_check``).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import browser_check
import pytest
from browser_check import Browser, require_chromium

from imagepipe.gallery import GalleryCell, GalleryRun, write_gallery

PROMPTS = ["a lighthouse at dusk", 'a cat & a "dog" <friends>', "mountains in fog"]
STYLES = ["watercolor", "pixel art", "ink"]
ERROR = "ProviderError: HTTP 503 <Service Unavailable> after 5 attempts"


def make_png(path: Path, seed: int) -> Path:
    from PIL import Image, ImageDraw

    path.parent.mkdir(parents=True, exist_ok=True)
    image = Image.new("RGB", (320, 240), (40 + seed * 23 % 200, 90, 160 - seed * 11 % 120))
    draw = ImageDraw.Draw(image)
    draw.ellipse((60 + seed * 7 % 80, 40, 220, 200), fill=(240, 200 - seed * 13 % 150, 90))
    image.save(path)
    return path


def make_run(tmp_path: Path) -> tuple[GalleryRun, Path]:
    """3 prompts x 3 styles; (1, ink) rejected, (0, watercolor) with two variations, and
    one image outside the page's directory whose name needs quoting in a URL."""
    out = tmp_path / "run"
    cells: list[GalleryCell] = []
    seed = 0
    for p, prompt in enumerate(PROMPTS):
        for style in STYLES:
            for variation in (1, 2) if (p, style) == (0, "watercolor") else (1,):
                seed += 1
                if (p, style) == (1, "ink"):
                    cells.append(
                        GalleryCell(p, prompt, style, variation, "rejected", None, 5, 4200, ERROR)
                    )
                    continue
                if (p, style) == (2, "pixel art"):
                    image = make_png(tmp_path / "elsewhere" / "odd #name 1.png", seed)
                else:
                    image = make_png(out / f"{p}-{style}-{variation}.png", seed)
                cells.append(
                    GalleryCell(p, prompt, style, variation, "resolved", image, 1 + seed % 3, 900)
                )
    return GalleryRun("demo-1", 1_760_000_000.0, tuple(cells)), out


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    require_chromium()
    with Browser() as browser:
        yield browser


QUERIES = {
    "rows": "[...document.querySelectorAll('tr.prompt-row')].map(r => r.querySelector("
    "'th.prompt').textContent)",
    "styles": "[...document.querySelectorAll('th.style')].map(th => th.textContent)",
    "cells_per_row": "[...document.querySelectorAll('tr.prompt-row')].map(r =>"
    " r.querySelectorAll('td.cell').length)",
    "states": "[...document.querySelectorAll('td.cell')].map(td => td.dataset.state)",
    "rejected": "[...document.querySelectorAll('td.cell[data-state=rejected]')].map(td =>"
    " td.innerText)",
    "first_cell_images": "document.querySelector('tr.prompt-row td.cell')"
    ".querySelectorAll('img').length",
    "captions": "document.querySelector('tr.prompt-row td.cell figcaption').textContent",
}


def test_the_gallery_loads_from_disk_with_every_image_and_no_network(
    browser: Browser, tmp_path: Path
) -> None:
    run, out = make_run(tmp_path)
    page = write_gallery(run, out)
    shot = tmp_path / "gallery.png"

    started = time.perf_counter()
    report = browser.load(page.as_uri(), queries=QUERIES, screenshot=shot)
    elapsed = time.perf_counter() - started

    # Every image: 9 cells, one rejected, one with two variations.
    assert len(report.images) == 9
    assert all(i.complete and i.natural_width == 320 for i in report.images), report.images
    assert any(i.src.endswith("/elsewhere/odd%20%23name%201.png") for i in report.images)
    # The grid: prompts are rows (in order), styles are columns (in first-seen order).
    assert [text.removeprefix(str(n + 1)) for n, text in enumerate(report.results["rows"])] == (
        PROMPTS
    )
    assert report.results["styles"] == STYLES
    assert report.results["cells_per_row"] == [3, 3, 3]
    assert report.results["states"].count("rejected") == 1
    assert report.results["states"].count("resolved") == 8
    assert report.results["first_cell_images"] == 2
    assert report.results["captions"] == "v1 · 2 attempts · 900 ms"
    [rejected] = report.results["rejected"]
    assert ERROR in rejected
    # Only the page and its images were fetched, all from disk; nothing failed or
    # complained (a Content-Security-Policy violation would show in the console).
    assert report.requests, "no requests recorded: the recorder is broken"
    assert all(url.startswith("file://") for url in report.requests), report.requests
    assert len(report.requests) == 1 + 9
    assert report.failed_requests == []
    assert report.console == []
    # A real screenshot: a PNG the size of the page, with plenty going on.
    from PIL import Image

    with Image.open(shot) as image:
        assert image.format == "PNG"
        assert image.width >= 1000
        assert image.height >= 600
        colors = image.convert("RGB").getcolors(maxcolors=1 << 20)
        assert colors is None or len(colors) > 500
    assert elapsed < 15, f"the browser test took {elapsed:.1f} s"


def test_the_page_reaches_no_network_even_when_an_image_is_remote(
    browser: Browser, tmp_path: Path
) -> None:
    """An image that points at the network is recorded, blocked, and never loads."""
    run, out = make_run(tmp_path)
    page = write_gallery(run, out)
    text = page.read_text(encoding="utf-8")
    page.write_text(
        text.replace("</body>", '<img id="remote" src="http://127.0.0.1:9/x.png"></body>'),
        encoding="utf-8",
    )
    report = browser.load(
        page.as_uri(), queries={"remote": "document.getElementById('remote').naturalWidth"}
    )
    assert report.results["remote"] == 0
    # The recorder sees the attempt (so the test above would catch one), the page's
    # Content-Security-Policy blocks it, and the request fails without reaching anything.
    remote = [url for url in report.requests if not url.startswith("file://")]
    assert remote == ["http://127.0.0.1:9/x.png"]
    assert report.failed_requests == ["http://127.0.0.1:9/x.png"]
    assert any("Content Security Policy" in line for line in report.console), report.console


def test_without_chromium_it_skips_locally_and_fails_under_ci(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setattr(browser_check, "CHROMIUM", tmp_path / "no-chromium")
    monkeypatch.delenv("CI", raising=False)
    with pytest.raises(pytest.skip.Exception, match="no-chromium is missing: `apt-get install"):
        require_chromium()
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match=r"CI is set but .*no-chromium is missing"):
        require_chromium()
