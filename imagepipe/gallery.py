"""The gallery: one static ``index.html`` that shows a run's images as a grid.

Rows are prompts (in prompt order), columns are styles (in first-seen order); the
variations of one prompt and style sit side by side in their cell. Each image is shown
from its own file: a relative ``src`` when the file is under the page's directory, a
``file://`` URI otherwise. Each image shows its attempt count and time; a rejected branch
shows its error, a pending one says so.

The page is self-contained: CSS inline, no scripts, no fonts or anything else fetched,
and a Content-Security-Policy that forbids any request but the images' own files, so it
opens from disk with no server and no network.

Hooks for tests and tools: ``tr.prompt-row`` (``data-prompt-index``), ``th.style``,
``td.cell`` (``data-state``: resolved, rejected, pending, or empty for a prompt without
that style), ``figure.variation`` (``data-state``, ``data-variation``) and one ``img`` per
image file.
"""

from __future__ import annotations

import html
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal
from urllib.parse import quote

from imagepipe.text import escape_control

__all__ = [
    "EAGER_ROWS",
    "GalleryCell",
    "GalleryRun",
    "State",
    "gallery_html",
    "open_in_browser",
    "write_gallery",
]

State = Literal["resolved", "rejected", "pending"]

#: Rows past this many load their images lazily (when scrolled near).
EAGER_ROWS = 40


@dataclass(frozen=True, slots=True)
class GalleryCell:
    """One branch: a variation of a prompt in a style."""

    prompt_index: int
    prompt: str
    style: str
    variation: int
    state: State
    image: Path | None = None
    attempts: int = 0
    duration_ms: int | None = None
    error: str | None = None
    #: what the image cost, as a line shows it (``cost $0.0109``, ``cost unknown``)
    cost: str | None = None


@dataclass(frozen=True, slots=True)
class GalleryRun:
    """What the page shows: a run's id, creation time (epoch seconds) and branches."""

    run_id: str
    created_at: float
    cells: tuple[GalleryCell, ...]
    #: the run's cost line (``Cost: $0.0327 for 3 images (estimated ...)``)
    cost: str | None = None


def write_gallery(run: GalleryRun, out_dir: Path) -> Path:
    """Write ``out_dir/index.html`` atomically (a temporary file, then a rename); return it."""
    import tempfile

    out_dir.mkdir(parents=True, exist_ok=True)
    page = gallery_html(run, out_dir)
    target = out_dir / "index.html"
    fd, tmp = tempfile.mkstemp(prefix=".index.html.", suffix=".tmp", dir=out_dir)
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="\n") as f:
            f.write(page)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return target


def open_in_browser(path: Path) -> bool:
    """Open the page with :mod:`webbrowser`; False when no browser could be started."""
    import webbrowser

    try:
        return webbrowser.open(path.resolve().as_uri())
    except webbrowser.Error:
        return False


def gallery_html(run: GalleryRun, out_dir: Path) -> str:
    """The page's text; image paths are made relative to ``out_dir`` where they can be."""
    base = (Path(os.path.normpath(os.path.abspath(out_dir))), out_dir.resolve())
    styles: dict[str, None] = {}
    prompts: dict[int, str] = {}
    grid: dict[tuple[int, str], list[GalleryCell]] = {}
    for cell in run.cells:
        styles.setdefault(cell.style, None)
        prompts.setdefault(cell.prompt_index, cell.prompt)
        grid.setdefault((cell.prompt_index, cell.style), []).append(cell)
    counts = {state: 0 for state in ("resolved", "rejected", "pending")}
    for cell in run.cells:
        counts[cell.state] += 1

    out: list[str] = [_head(run, len(prompts), len(styles), counts)]
    out.append('<table class="grid">\n<thead><tr><th class="corner" scope="col">Prompt</th>')
    out.extend(f'<th class="style" scope="col">{_text(style)}</th>' for style in styles)
    out.append("</tr></thead>\n<tbody>\n")
    for row_number, index in enumerate(sorted(prompts)):
        lazy = row_number >= EAGER_ROWS
        out.append(
            f'<tr class="prompt-row" data-prompt-index="{index}">'
            f'<th class="prompt" scope="row"><span class="num">{index + 1}</span>'
            f"{_text(prompts[index])}</th>"
        )
        for style in styles:
            out.append(_cell(grid.get((index, style), []), base, lazy))
        out.append("</tr>\n")
    out.append("</tbody>\n</table>\n</body>\n</html>\n")
    return "".join(out)


def _head(run: GalleryRun, prompts: int, styles: int, counts: dict[str, int]) -> str:
    created = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(run.created_at))
    parts = [
        _plural(prompts, "prompt"),
        _plural(styles, "style"),
        _plural(counts["resolved"], "image"),
    ]
    parts.extend(f"{counts[s]} {s}" for s in ("rejected", "pending") if counts[s])
    summary = " · ".join(parts)
    run_id = _text(run.run_id)
    cost = "" if run.cost is None else f'<p class="cost">{_text(run.cost)}</p>'
    return (
        '<!doctype html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        '<meta http-equiv="Content-Security-Policy" content="default-src \'none\'; '
        "img-src 'self' file:; style-src 'unsafe-inline'\">\n"
        '<meta name="viewport" content="width=device-width, initial-scale=1">\n'
        '<meta name="referrer" content="no-referrer">\n'
        f"<title>imagepipe · {run_id}</title>\n<style>{_CSS}</style>\n</head>\n<body>\n"
        f'<header><h1>Run <span class="run-id">{run_id}</span></h1>'
        f'<p class="summary">{summary} · created {created}</p>{cost}</header>\n'
    )


def _cell(cells: list[GalleryCell], base: tuple[Path, ...], lazy: bool) -> str:
    if not cells:
        return '<td class="cell empty" data-state="empty"></td>'
    states = {c.state for c in cells}
    state = next(s for s in ("rejected", "pending", "resolved") if s in states)
    figures = "".join(_figure(c, base, lazy) for c in sorted(cells, key=lambda c: c.variation))
    return f'<td class="cell" data-state="{state}"><div class="variations">{figures}</div></td>'


def _figure(cell: GalleryCell, base: tuple[Path, ...], lazy: bool) -> str:
    meta = [f"v{cell.variation}", _plural(cell.attempts, "attempt")]
    if cell.duration_ms is not None:
        meta.append(_duration(cell.duration_ms))
    if cell.cost is not None:
        meta.append(_text(cell.cost))
    caption = f"<figcaption>{' · '.join(meta)}</figcaption>"
    if cell.state == "resolved" and cell.image is not None and cell.image.is_file():
        src = html.escape(_src(cell.image, base))
        alt = _text(f"{cell.prompt} ({cell.style}, variation {cell.variation})")
        loading = ' loading="lazy"' if lazy else ""
        body = f'<a href="{src}"><img src="{src}" alt="{alt}" decoding="async"{loading}></a>'
    elif cell.state == "resolved":
        body = '<div class="box missing">image file missing</div>'
    elif cell.state == "rejected":
        error = _text(cell.error or "rejected")
        body = f'<div class="box error"><strong>rejected</strong><p>{error}</p></div>'
    else:
        body = '<div class="box pending">pending</div>'
    return (
        f'<figure class="variation" data-state="{cell.state}" '
        f'data-variation="{cell.variation}">{body}{caption}</figure>'
    )


def _src(image: Path, bases: tuple[Path, ...]) -> str:
    """A relative URL when the file is under one of ``bases`` (the page's folder as given
    and resolved), else a ``file://`` URI."""
    path = Path(os.path.normpath(os.path.abspath(image)))
    for candidate in (path, path.resolve()):
        for base in bases:
            if candidate.is_relative_to(base):
                return quote(candidate.relative_to(base).as_posix())
    return path.as_uri()


def _text(value: str) -> str:
    """User text for the page: control and invisible format characters (bidi overrides)
    made visible, then HTML-escaped."""
    return html.escape(escape_control(value))


def _plural(count: int, noun: str) -> str:
    return f"{count:,} {noun}" if count == 1 else f"{count:,} {noun}s"


def _duration(ms: int) -> str:
    if ms < 1000:
        return f"{ms} ms"
    if ms < 60_000:
        return f"{ms / 1000:.1f} s"
    minutes, seconds = divmod(round(ms / 1000), 60)
    return f"{minutes} min {seconds} s"


def _lines(*rules: str) -> str:
    return "\n" + "\n".join(rules) + "\n"


_CSS = _lines(
    ":root { color-scheme: light dark; --bg: #f6f6f4; --fg: #1d1d1f; --muted: #6b6b70;",
    "  --card: #ffffff; --line: #dcdcd8; --bad: #b3261e; --bad-bg: #fdecea; --wait: #8a6d00;",
    "  --thumb: 256px; font: 14px/1.45 system-ui, -apple-system, 'Segoe UI', sans-serif; }",
    "@media (prefers-color-scheme: dark) { :root { --bg: #17171a; --fg: #e8e8ea;",
    "  --muted: #9a9aa2; --card: #222227; --line: #34343b; --bad: #ff8a80;",
    "  --bad-bg: #3a1f1f; --wait: #e0c060; } }",
    "* { box-sizing: border-box; }",
    "body { margin: 0; padding: 24px; background: var(--bg); color: var(--fg);",
    "  width: max-content; min-width: 100%; }",
    "header { margin-bottom: 20px; }",
    "h1 { font-size: 20px; font-weight: 600; margin: 0 0 4px; }",
    ".run-id { font-family: ui-monospace, 'SF Mono', Menlo, Consolas, monospace; }",
    ".summary { margin: 0; color: var(--muted); }",
    ".grid { border-collapse: separate; border-spacing: 0; }",
    ".grid th, .grid td { border-bottom: 1px solid var(--line); padding: 12px;",
    "  vertical-align: top; text-align: left; }",
    "thead th { position: sticky; top: 0; z-index: 2; background: var(--bg);",
    "  font-size: 12px; font-weight: 600; letter-spacing: .04em; text-transform: uppercase;",
    "  color: var(--muted); }",
    "th.corner { left: 0; z-index: 3; }",
    "th.prompt { position: sticky; left: 0; z-index: 1; background: var(--bg);",
    "  width: 240px; min-width: 180px; max-width: 280px; font-weight: 500;",
    "  overflow-wrap: anywhere; white-space: pre-wrap; }",
    ".num { display: block; font-size: 11px; color: var(--muted); font-weight: 400; }",
    ".variations { display: flex; gap: 10px; }",
    "figure { margin: 0; width: var(--thumb); background: var(--card);",
    "  border: 1px solid var(--line); border-radius: 10px; overflow: hidden; }",
    "figure img, .box { display: block; width: var(--thumb); height: var(--thumb);",
    "  object-fit: contain; }",
    "figure a { display: block; }",
    ".box { padding: 16px; overflow: auto; overflow-wrap: anywhere; }",
    ".box p { margin: 6px 0 0; white-space: pre-wrap; }",
    ".error { background: var(--bad-bg); color: var(--bad); }",
    ".pending, .missing { display: flex; align-items: center; justify-content: center;",
    "  color: var(--wait); font-style: italic; }",
    "figcaption { padding: 6px 10px; font-size: 12px; color: var(--muted);",
    "  border-top: 1px solid var(--line); font-variant-numeric: tabular-nums; }",
    "td.empty { background: repeating-linear-gradient(45deg, transparent 0 6px,",
    "  var(--line) 6px 7px); opacity: .5; }",
)
