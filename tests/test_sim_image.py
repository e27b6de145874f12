"""The simulated provider's PNGs: real, deterministic, distinct per style, fast, lazy Pillow."""

from __future__ import annotations

import io
import subprocess
import sys
import time

import pytest
from PIL import Image

from imagepipe.files import sniff_mime
from imagepipe.providers.sim_image import draw_png


def decode(data: bytes) -> Image.Image:
    image = Image.open(io.BytesIO(data))
    image.load()  # decodes every pixel: the PNG is complete and valid
    return image


def test_draws_a_real_png_of_the_asked_size() -> None:
    data = draw_png("a lighthouse", "cartoon", 0, width=320, height=200)
    assert sniff_mime(data) == "image/png"
    image = decode(data)
    assert (image.format, image.mode, image.size) == ("PNG", "RGB", (320, 200))


def test_same_input_same_bytes_and_other_input_other_bytes() -> None:
    first = draw_png("a lighthouse", "cartoon", 1)
    assert draw_png("a lighthouse", "cartoon", 1) == first
    assert draw_png("a lighthouse", "cartoon", 2) != first
    assert draw_png("a lighthouse", "sketch", 1) != first
    assert draw_png("a lamp", "cartoon", 1) != first


def test_gradient_colours_come_from_style_and_variation() -> None:
    def middle(style: str, variation: int) -> tuple[int, ...]:
        pixel = decode(draw_png("p", style, variation)).getpixel((128, 128))
        assert isinstance(pixel, tuple)
        return pixel

    assert middle("cartoon", 0) == middle("cartoon", 0)
    colours = {middle(style, v) for style in ("cartoon", "abstract", "sketch") for v in (0, 1)}
    assert len(colours) == 6
    corners = decode(draw_png("p", "cartoon", 0))
    assert corners.getpixel((0, 128)) != corners.getpixel((255, 128))  # a gradient


def test_text_is_drawn() -> None:
    with_text = decode(draw_png("WWWW MMMM", "cartoon", 0))
    without = decode(draw_png("", "cartoon", 0))
    band = (0, 0, 256, 40)
    assert with_text.crop(band).tobytes() != without.crop(band).tobytes()


@pytest.mark.parametrize(
    "prompt",
    ["", "\x1b[31mred\x07\n\ttab", "水彩の灯台 🌊", "word " * 500, "x" * 10_000],
)
def test_any_prompt_and_style_draw(prompt: str) -> None:
    for width, height in ((256, 256), (16, 16), (1, 1)):
        image = decode(draw_png(prompt, prompt[:300], 3, width, height))
        assert image.size == (width, height)


def test_size_is_bounded() -> None:
    with pytest.raises(ValueError, match=r"1\.\.4096"):
        draw_png("p", "cartoon", 0, 0, 10)
    with pytest.raises(ValueError, match=r"1\.\.4096"):
        draw_png("p", "cartoon", 0, 10, 100_000)


def test_takes_a_few_milliseconds() -> None:
    draw_png("warm-up", "cartoon", 0)
    times = []
    for variation in range(9):
        start = time.process_time()  # CPU time: another job on the machine does not count
        draw_png("a lighthouse on a cliff at dusk", "watercolor", variation)
        times.append(time.process_time() - start)
    median = sorted(times)[len(times) // 2]
    print(f"draw_png 256x256: median {median * 1000:.1f} ms of CPU")
    assert median < 0.05  # ~5 ms here


def test_importing_the_media_modules_does_not_import_pillow() -> None:
    code = (
        "import sys, imagepipe.files, imagepipe.providers.sim_image, imagepipe.export\n"
        "heavy = [m for m in ('PIL', 'datasets', 'platformdirs') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
