"""The gallery page's content, read back with an HTML parser (the browser test loads it)."""

from __future__ import annotations

import os
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

import pytest

from imagepipe.gallery import EAGER_ROWS, GalleryCell, GalleryRun, gallery_html, write_gallery

from conftest import cli_argv, cli_env


class Page(HTMLParser):
    """Start tags with their attributes, and the text inside each element with a class."""

    def __init__(self, text: str) -> None:
        super().__init__(convert_charrefs=True)
        self.tags: list[tuple[str, dict[str, str]]] = []
        self.texts: dict[str, list[str]] = {}
        self._open: list[tuple[str, str | None]] = []
        self.feed(text)
        self.close()

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        attributes = {k: v or "" for k, v in attrs}
        self.tags.append((tag, attributes))
        if tag not in ("img", "meta"):
            self._open.append((tag, attributes.get("class")))

    def handle_endtag(self, tag: str) -> None:
        while self._open and self._open.pop()[0] != tag:
            pass

    def handle_data(self, data: str) -> None:
        for _, classes in self._open:
            for name in (classes or "").split():
                self.texts.setdefault(name, []).append(data)

    def all(self, tag: str, **want: str) -> list[dict[str, str]]:
        return [a for t, a in self.tags if t == tag and all(a.get(k) == v for k, v in want.items())]

    def text(self, name: str) -> str:
        return "".join(self.texts.get(name, []))


def png(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"\x89PNG\r\n\x1a\n")  # the page only needs the file to exist
    return path


def cell(p: int, style: str, v: int = 1, **kw: object) -> GalleryCell:
    fields: dict[str, object] = {"state": "resolved", "attempts": 1, "duration_ms": 1200}
    fields.update(kw)
    return GalleryCell(p, f"prompt {p}", style, v, **fields)  # type: ignore[arg-type]


def test_rows_are_prompts_in_order_and_columns_are_styles_in_first_seen_order(
    tmp_path: Path,
) -> None:
    cells = (
        cell(2, "ink", image=png(tmp_path / "a.png")),
        cell(0, "oil", v=2, image=png(tmp_path / "b.png")),
        cell(0, "ink", image=png(tmp_path / "c.png")),
        cell(0, "oil", v=1, image=png(tmp_path / "d.png")),
    )
    page = Page(gallery_html(GalleryRun("r", 0.0, cells), tmp_path))
    assert [a["data-prompt-index"] for a in page.all("tr")[1:]] == ["0", "2"]
    assert page.all("tr", **{"class": "prompt-row"})[0]["data-prompt-index"] == "0"
    assert page.text("style") == "inkoil"
    assert page.text("prompt") == "1prompt 03prompt 2"
    # Prompt 0: ink, then oil with variations 1 and 2 in order. Prompt 2 has no oil.
    assert [a["src"] for a in page.all("img")] == ["c.png", "d.png", "b.png", "a.png"]
    states = [a["data-state"] for a in page.all("td")]
    assert states == ["resolved", "resolved", "resolved", "empty"]
    assert [a["data-variation"] for a in page.all("figure")] == ["1", "1", "2", "1"]


def test_each_cell_shows_attempts_and_time_errors_and_pending(tmp_path: Path) -> None:
    cells = (
        cell(0, "ink", attempts=3, duration_ms=850, image=png(tmp_path / "x.png")),
        cell(0, "oil", state="rejected", attempts=5, duration_ms=61_400, error="HTTP 503"),
        cell(1, "ink", state="pending", attempts=2, duration_ms=None),
        cell(1, "oil", image=tmp_path / "gone.png"),
        cell(1, "oil", v=2, state="rejected", error=None),
    )
    page = Page(gallery_html(GalleryRun("r", 0.0, cells), tmp_path))
    assert page.text("error") == "rejectedHTTP 503rejectedrejected"
    assert page.text("pending") == "pending"
    assert page.text("missing") == "image file missing"
    captions = [c for c in page.texts.get("variation", []) if c.startswith("v")]
    assert captions == [
        "v1 · 3 attempts · 850 ms",
        "v1 · 5 attempts · 1 min 1 s",
        "v1 · 2 attempts",
        "v1 · 1 attempt · 1.2 s",
        "v2 · 1 attempt · 1.2 s",
    ]
    # A cell is as bad as its worst variation.
    assert [a["data-state"] for a in page.all("td")] == [
        "resolved",
        "rejected",
        "pending",
        "rejected",
    ]
    assert len(page.all("img")) == 1
    assert page.text("summary").startswith(
        "2 prompts · 2 styles · 2 images · 2 rejected · 1 pending"
    )


def test_every_text_is_escaped_and_control_characters_are_made_visible(tmp_path: Path) -> None:
    evil = '<script>alert("x")</script> & \x1b[31mred\x07'
    cells = (
        GalleryCell(0, evil, "<b>bold</b>", 1, "rejected", None, 1, 10, "</td><img src=x>\r"),
        GalleryCell(0, evil, "ok", 1, "resolved", png(tmp_path / "y.png"), 1, 10),
    )
    text = gallery_html(GalleryRun("id<&>\x1b", 0.0, cells), tmp_path)
    assert "\x1b" not in text
    assert "\x07" not in text
    assert "\r" not in text
    page = Page(text)
    assert [t for t, _ in page.tags].count("script") == 0
    assert [t for t, _ in page.tags].count("b") == 0
    assert len(page.all("img")) == 1
    assert page.text("prompt") == '1<script>alert("x")</script> & \\x1b[31mred\\x07'
    assert page.text("style") == "<b>bold</b>ok"
    assert page.text("error") == "rejected</td><img src=x>\\r"
    assert page.text("run-id") == "id<&>\\x1b"
    alt = page.all("img")[0]["alt"]
    assert alt == '<script>alert("x")</script> & \\x1b[31mred\\x07 (ok, variation 1)'


def test_image_sources_are_relative_inside_the_folder_and_file_uris_outside(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "run"
    inside = png(out / "sub dir" / "a#1 %.png")
    outside = png(tmp_path / "other" / "b c.png")
    monkeypatch.chdir(out)
    relative = Path("sub dir") / "a#1 %.png"  # a relative path is taken from the cwd
    cells = (
        cell(0, "a", image=inside),
        cell(0, "b", image=outside),
        cell(0, "c", image=relative),
        cell(0, "d", image=out / "sub dir" / ".." / "sub dir" / "a#1 %.png"),
        cell(0, "e", image=out / ".." / "other" / "b c.png"),
        cell(0, "f", image=tmp_path / "link" / "sub dir" / "a#1 %.png"),
    )
    (tmp_path / "link").symlink_to(out)
    page = Page(gallery_html(GalleryRun("r", 0.0, cells), out))
    srcs = [a["src"] for a in page.all("img")]
    assert srcs[0] == "sub%20dir/a%231%20%25.png"
    assert srcs[1] == outside.as_uri()
    assert srcs[1].startswith("file:///")
    assert srcs[1].endswith("/other/b%20c.png")
    assert srcs[2] == srcs[0]
    assert srcs[3] == srcs[0]
    assert srcs[4] == srcs[1]
    assert srcs[5] == srcs[0]  # under the folder once the symbolic link is followed
    assert [a["href"] for a in page.all("a")] == srcs


def test_the_page_is_self_contained(tmp_path: Path) -> None:
    cells = tuple(cell(p, "s", image=png(tmp_path / f"{p}.png")) for p in range(EAGER_ROWS + 2))
    text = gallery_html(GalleryRun("r", 1_764_300_000.0, cells), tmp_path)
    page = Page(text)
    tags = {t for t, _ in page.tags}
    assert "script" not in tags
    assert "link" not in tags
    assert "style" in tags
    assert "http" not in text.replace('http-equiv="Content-Security-Policy"', "")
    assert "@import" not in text
    csp = page.all("meta", **{"http-equiv": "Content-Security-Policy"})[0]["content"]
    assert csp == "default-src 'none'; img-src 'self' file:; style-src 'unsafe-inline'"
    # Rows past the first screenful load their images lazily.
    lazy = [a.get("loading") for a in page.all("img")]
    assert lazy == [None] * EAGER_ROWS + ["lazy", "lazy"]
    assert "created 2025-11-28 03:20 UTC" in page.text("summary")


def test_write_gallery_replaces_index_html_atomically(tmp_path: Path) -> None:
    out = tmp_path / "new" / "folder"
    run = GalleryRun("first", 0.0, (cell(0, "s", state="pending"),))
    index = write_gallery(run, out)
    assert index == out / "index.html"
    assert "first" in index.read_text(encoding="utf-8")
    assert index.stat().st_mode & 0o777 == 0o644
    write_gallery(GalleryRun("second", 0.0, run.cells), out)
    assert "second" in index.read_text(encoding="utf-8")
    assert sorted(p.name for p in out.iterdir()) == ["index.html"]


def test_a_failed_write_keeps_the_old_page_and_leaves_no_temporary_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    run = GalleryRun("old", 0.0, (cell(0, "s", state="pending"),))
    index = write_gallery(run, tmp_path)

    def disk_full(fd: int) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", disk_full)
    with pytest.raises(OSError, match="No space left"):
        write_gallery(GalleryRun("new", 0.0, run.cells), tmp_path)
    assert "old" in index.read_text(encoding="utf-8")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["index.html"]


def test_open_in_browser_hands_the_file_uri_to_the_users_browser(tmp_path: Path) -> None:
    """$BROWSER is the webbrowser module's documented hook: a command given the URL."""
    seen = tmp_path / "seen.txt"
    browser = tmp_path / "fake-browser"
    browser.write_text(f'#!/bin/sh\nprintf %s "$1" > "{seen}"\n')
    browser.chmod(0o755)
    index = write_gallery(GalleryRun("r", 0.0, (cell(0, "s", state="pending"),)), tmp_path / "g")
    code = "import sys; from pathlib import Path; from imagepipe.gallery import open_in_browser;"
    code += "print(open_in_browser(Path(sys.argv[1])))"
    env = {"PATH": os.environ["PATH"], "BROWSER": f"{browser} %s"}
    for path in (index, Path("g") / "index.html"):
        seen.unlink(missing_ok=True)
        result = subprocess.run(
            [sys.executable, "-c", code, str(path)],
            env=env,
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=30,
            check=True,
        )
        assert result.stdout.strip() == "True"
        assert seen.read_text() == index.as_uri()
    # A browser that fails, and no other to fall back on (an empty PATH): False.
    (tmp_path / "empty").mkdir()
    env = {"PATH": str(tmp_path / "empty"), "BROWSER": "/bin/false %s"}
    result = subprocess.run(
        [sys.executable, "-c", code, str(index)],
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )
    assert result.stdout.strip() == "False"


def test_the_gallery_command_makes_bidi_and_other_invisible_characters_visible(
    db_path: Path,
) -> None:
    # U+202E turns "gpj.exe" around on screen ("Trojan Source"); U+2066 opens an isolate;
    # U+200B hides inside a word. The style is any style text, shown as a column header.
    prompt = "a fox \u202egpj.exe\u2066 in the sno\u200bw"
    style = "ink\u202e"
    env = cli_env(db_path, IMAGEPIPE_TIME_SCALE="0.01")
    run = [*cli_argv("run", prompt, "--id", "bidi", "-s", style, "-s", "cartoon"), "-q"]
    assert subprocess.run(run, env=env, capture_output=True, timeout=60).returncode == 0
    done = subprocess.run(
        cli_argv("gallery", "bidi"), env=env, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    text = Path(done.stdout.strip()).read_text(encoding="utf-8")
    for raw in ("\u202e", "\u2066", "\u200b"):
        assert raw not in text
    page = Page(text)
    assert page.text("prompt") == "1a fox \\u202egpj.exe\\u2066 in the sno\\u200bw"
    assert page.text("style") == "ink\\u202ecartoon"
