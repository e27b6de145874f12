#!/usr/bin/env python3
"""Make a demo gallery and save a real screenshot of it (``docs/gallery.png`` by default).

Draws a few stand-in images with Pillow (3 prompts x 3 styles, one branch with two
variations, one rejected, one pending), writes the page with
:func:`imagepipe.gallery.write_gallery`, and photographs it in Debian's headless Chromium
with the same harness as the browser test (``tests/browser_check.py``). Needs the
``test`` extra and ``/usr/bin/chromium``.

    python scripts/gallery_screenshot.py [--out docs/gallery.png] [--keep DIR]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from browser_check import Browser  # noqa: E402

from imagepipe.gallery import GalleryCell, GalleryRun, write_gallery  # noqa: E402

PROMPTS = [
    "a lighthouse on a cliff at dusk",
    'a fox & a crow sharing "breakfast" <early>',
    "mountains rising out of morning fog",
]
STYLES = ["watercolor", "pixel art", "ink"]
PALETTES = [
    [(255, 183, 107), (232, 93, 117), (72, 61, 139), (25, 25, 60)],
    [(247, 220, 111), (222, 120, 66), (113, 70, 48), (46, 67, 44)],
    [(210, 226, 236), (150, 178, 200), (88, 110, 140), (45, 55, 80)],
]
SIZE = 256


def draw(prompt_index: int, style: str, variation: int, path: Path) -> Path:
    """A small abstract picture: a sky gradient, hills and a sun, in the style's manner."""
    from PIL import Image, ImageDraw, ImageFilter, ImageOps

    top, middle, low, ground = PALETTES[prompt_index]
    image = Image.new("RGB", (SIZE, SIZE))
    pixels = ImageDraw.Draw(image)
    for y in range(SIZE):
        t = y / SIZE
        pixels.line(
            [(0, y), (SIZE, y)],
            fill=tuple(int(a + (b - a) * t) for a, b in zip(top, low, strict=True)),
        )
    sun_x = 70 + variation * 60 + prompt_index * 20
    pixels.ellipse((sun_x - 28, 60, sun_x + 28, 116), fill=middle)
    for layer, height in enumerate((150, 180, 205)):
        shade = tuple(
            int(c * (1 - layer * 0.25) + g * layer * 0.25) for c, g in zip(low, ground, strict=True)
        )
        offset = (variation * 37 + layer * 53 + prompt_index * 29) % 90
        points = [(x, height - 30 * abs(((x + offset) % 120) - 60) / 60) for x in range(0, 257, 8)]
        pixels.polygon([(0, SIZE), *points, (SIZE, SIZE)], fill=shade)
    if style == "watercolor":
        image = image.filter(ImageFilter.GaussianBlur(3))
    elif style == "pixel art":
        image = image.resize((32, 32), Image.Resampling.BILINEAR).quantize(12).convert("RGB")
        image = image.resize((SIZE, SIZE), Image.Resampling.NEAREST)
    else:
        edges = ImageOps.grayscale(image).filter(ImageFilter.FIND_EDGES)
        image = ImageOps.colorize(
            ImageOps.invert(edges).point(lambda v: 255 if v > 235 else 0),
            black=(20, 20, 30),
            white=(246, 240, 226),
        )
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, optimize=True)
    return path


def demo_run(out: Path) -> GalleryRun:
    cells: list[GalleryCell] = []
    for p, prompt in enumerate(PROMPTS):
        for s, style in enumerate(STYLES):
            variations = (1, 2) if (p, style) == (0, "watercolor") else (1,)
            for v in variations:
                attempts = 1 + (p + s + v) % 3
                if (p, style) == (1, "ink"):
                    error = "ProviderError: HTTP 503 <Service Unavailable> after 5 attempts"
                    cells.append(GalleryCell(p, prompt, style, v, "rejected", None, 5, 9400, error))
                elif (p, style) == (2, "pixel art"):
                    cells.append(GalleryCell(p, prompt, style, v, "pending", None, 2, None))
                else:
                    image = draw(p, style, v, out / f"{p:03d}-{style.replace(' ', '-')}-{v}.png")
                    ms = 700 + 450 * attempts + 37 * (p + s)
                    cells.append(GalleryCell(p, prompt, style, v, "resolved", image, attempts, ms))
    return GalleryRun("lighthouse-7f3a", 1_764_300_000.0, tuple(cells))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "gallery.png")
    parser.add_argument("--keep", type=Path, help="write the demo gallery here and keep it")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="imagepipe-gallery-") as scratch:
        folder = args.keep or Path(scratch)
        page = write_gallery(demo_run(folder), folder)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        with Browser(viewport=(1180, 700)) as browser:
            report = browser.load(page.as_uri(), screenshot=args.out)
    broken = [i.src for i in report.images if not (i.complete and i.natural_width > 0)]
    if broken:
        print(f"images that did not load: {broken}", file=sys.stderr)
        return 1
    print(f"{args.out} ({args.out.stat().st_size // 1024} KB), page: {page}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
