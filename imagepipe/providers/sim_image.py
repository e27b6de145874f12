"""The simulated provider's pixels: a small real PNG per (prompt, style, variation).

A diagonal gradient whose two colours come from a hash of (style, variation), with the
prompt (wrapped, at most a few lines) and the style written on it in Pillow's default font.
The same input gives the same bytes (for one Pillow version), so a resumed run writes the
same file. Pillow is imported only when a picture is drawn.
"""

from __future__ import annotations

import hashlib
import io
import textwrap
import unicodedata

__all__ = ["draw_png"]

_MAX_LINES = 4
_MARGIN = 10


def _colours(style: str, variation: int) -> tuple[tuple[int, int, int], tuple[int, int, int]]:
    """Two mid-dark colours picked from a hash of (style, variation); white text stays legible."""
    digest = hashlib.sha256(f"{style}\0{variation}".encode("utf-8", "surrogatepass")).digest()
    first = (40 + digest[0] % 150, 40 + digest[1] % 150, 40 + digest[2] % 150)
    second = (40 + digest[3] % 150, 40 + digest[4] % 150, 40 + digest[5] % 150)
    return first, second


def _printable(text: str) -> str:
    """Text fit for drawing: control and other invisible characters become spaces."""
    return "".join(" " if unicodedata.category(ch)[0] in "CZ" else ch for ch in text).strip()


def _wrap(prompt: str, columns: int) -> list[str]:
    lines = textwrap.wrap(_printable(prompt), width=max(columns, 4)) or [""]
    if len(lines) > _MAX_LINES:
        lines = lines[:_MAX_LINES]
        lines[-1] = lines[-1][: max(columns - 3, 1)].rstrip() + "..."
    return lines


def draw_png(prompt: str, style: str, variation: int, width: int = 256, height: int = 256) -> bytes:
    """A PNG of ``width`` x ``height``: a gradient coloured by (style, variation), with the
    prompt and the style written on it. Deterministic and takes a few milliseconds."""
    if not (1 <= width <= 4096 and 1 <= height <= 4096):
        raise ValueError(f"image size must be 1..4096 pixels a side, not {width}x{height}")
    from PIL import Image, ImageDraw, ImageFont, ImageOps

    first, second = _colours(style, variation)
    down = Image.linear_gradient("L")
    ramp = Image.blend(down, down.transpose(Image.Transpose.ROTATE_90), 0.5)
    ramp = ramp.resize((width, height), Image.Resampling.BILINEAR)
    picture = ImageOps.colorize(ramp, black=first, white=second).convert("RGB")

    size = max(10, min(width, height) // 16)
    font = ImageFont.load_default(size=size)
    draw = ImageDraw.Draw(picture, "RGBA")
    char_width = max(1.0, font.getlength("abcdefghijklmnopqrstuvwxyz") / 26)
    columns = int((width - 2 * _MARGIN) / char_width)
    line_height = size + size // 3

    lines = _wrap(prompt, columns)
    box_bottom = _MARGIN + line_height * len(lines)
    draw.rectangle((0, 0, width, box_bottom + _MARGIN // 2), fill=(0, 0, 0, 110))
    for i, line in enumerate(lines):
        draw.text((_MARGIN, _MARGIN + i * line_height), line, font=font, fill=(255, 255, 255))

    label = _printable(style) + (f" #{variation}" if variation else "")
    label = label if len(label) <= columns else label[: max(columns - 3, 1)] + "..."
    top = height - _MARGIN - line_height
    draw.rectangle((0, top - _MARGIN // 2, width, height), fill=(0, 0, 0, 110))
    draw.text((_MARGIN, top), label, font=font, fill=(255, 255, 210))

    out = io.BytesIO()
    picture.save(out, format="PNG", optimize=False, compress_level=6)
    return out.getvalue()
