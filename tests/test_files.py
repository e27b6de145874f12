"""Image files on disk: safe and injective names, atomic saves under SIGKILL, verify."""

from __future__ import annotations

import hashlib
import io
import os
import re
import signal
import subprocess
import sys
import tracemalloc
import unicodedata
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from imagepipe.files import (
    MAX_NAME_BYTES,
    TEMP_SUFFIX,
    ImageDirTaken,
    ImageDirUnusable,
    ImageFileError,
    claim_image_dir,
    default_image_dir,
    file_sha256,
    image_file_name,
    promote,
    reconcile_images,
    remove_temporaries,
    save_image,
    sniff_mime,
    stage_image,
    verify_images,
)

WINDOWS_RESERVED = re.compile(r"(con|prn|aux|nul|com[0-9¹²³]|lpt[0-9¹²³])", re.IGNORECASE)


def encoded(fmt: str, size: tuple[int, int] = (7, 5)) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", size, (200, 30, 60)).save(out, format=fmt)
    return out.getvalue()


def assert_safe(name: str) -> None:
    assert len(name.encode()) <= 255
    assert not any(c in name for c in '<>:"/\\|?*'), name
    assert all(unicodedata.category(c)[0] not in "CZ" for c in name), name
    assert name[0] not in ".- ", name
    assert name[-1] not in ". ", name
    assert not WINDOWS_RESERVED.fullmatch(name.split(".")[0]), name
    assert name == unicodedata.normalize("NFC", name)


def folded(name: str) -> tuple[str, str]:
    """How case-insensitive, normalising file systems compare names: by case folding (macOS)
    or upper case (Windows), and in decomposed form (macOS)."""
    return (
        unicodedata.normalize("NFD", name.casefold()),
        unicodedata.normalize("NFD", name.upper()),
    )


# -- names ----------------------------------------------------------------------------------


def test_plain_styles_keep_their_names() -> None:
    assert image_file_name("cartoon", 0, "png") == "cartoon.png"
    assert image_file_name("pixel-art", 2, "png") == "pixel-art-2.png"
    assert image_file_name("watercolor", 1, ".JPG", prompt_index=3) == "p3-watercolor-1.jpg"
    assert image_file_name("水彩", 0, "webp") == "水彩.webp"


@pytest.mark.parametrize(
    ("a", "b"),
    [
        (("cartoon", 1, None), ("cartoon-1", 0, None)),
        (("cartoon", 0, 1), ("p1-cartoon", 0, None)),
        (("Cartoon", 0, None), ("cartoon", 0, None)),
        (("a/b", 0, None), ("a_b", 0, None)),
        (("a/b", 0, None), ("a\\b", 0, None)),
        (("ı", 0, None), ("i", 0, None)),  # dotless i: the same as "i" on NTFS
        (("é", 0, None), ("e\u0301", 0, None)),  # NFC and NFD: the same on macOS
        (("x" * 300, 0, None), ("x" * 301, 0, None)),
    ],
)
def test_names_differ_where_sanitising_loses_information(
    a: tuple[str, int, int | None], b: tuple[str, int, int | None]
) -> None:
    name_a = image_file_name(a[0], a[1], "png", a[2])
    name_b = image_file_name(b[0], b[1], "png", b[2])
    assert folded(name_a)[0] != folded(name_b)[0], (name_a, name_b)
    assert folded(name_a)[1] != folded(name_b)[1], (name_a, name_b)
    assert_safe(name_a)
    assert_safe(name_b)


@pytest.mark.parametrize(
    "style",
    ["CON", "con", "Nul", "com1", "LPT9", "..", ".", "", "-rf", "a\x1b[31mb", "\n", "x" * 5000],
)
def test_hostile_styles_give_safe_names(style: str) -> None:
    for variation, index in ((0, None), (1, None), (0, 4)):
        name = image_file_name(style, variation, "png", index)
        assert_safe(name)
        assert len(name.encode()) <= MAX_NAME_BYTES
        assert name.endswith(".png")


styles = st.text(max_size=40) | st.sampled_from(["cartoon", "CON", "a-1", "p0-a", "ß", "ss"])
keys = st.tuples(styles, st.integers(0, 12), st.none() | st.integers(0, 12))


@settings(max_examples=150, deadline=None)
@given(st.sets(keys, min_size=2, max_size=40))
def test_names_are_safe_and_injective(keyset: set[tuple[str, int, int | None]]) -> None:
    names = [image_file_name(s, v, "png", i) for s, v, i in keyset]
    for name in names:
        assert_safe(name)
    assert len({folded(n)[0] for n in names}) == len(names), sorted(names)
    assert len({folded(n)[1] for n in names}) == len(names), sorted(names)


def test_bad_arguments_are_refused() -> None:
    with pytest.raises(ValueError, match="extension"):
        image_file_name("cartoon", 0, "p/ng")
    with pytest.raises(ValueError, match="negative"):
        image_file_name("cartoon", -1, "png")


# -- save -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fmt", "mime"),
    [("PNG", "image/png"), ("JPEG", "image/jpeg"), ("WEBP", "image/webp"), ("GIF", "image/gif")],
)
def test_save_image_describes_the_file(tmp_path: Path, fmt: str, mime: str) -> None:
    data = encoded(fmt)
    saved = save_image(tmp_path / "a" / "b", "x.img", data)
    path = Path(saved["path"])
    assert path == tmp_path / "a" / "b" / "x.img"
    assert path.read_bytes() == data
    assert saved == {
        "path": str(path),
        "sha256": hashlib.sha256(data).hexdigest(),
        "bytes": len(data),
        "mime": mime,
        "width": 7,
        "height": 5,
    }
    assert os.listdir(path.parent) == ["x.img"]  # no temporary left behind


def test_resaving_replaces_the_file(tmp_path: Path) -> None:
    save_image(tmp_path, "x.png", encoded("PNG", (3, 3)))
    second = encoded("PNG", (9, 4))
    saved = save_image(tmp_path, "x.png", second)
    assert (tmp_path / "x.png").read_bytes() == second
    assert (saved["width"], saved["height"]) == (9, 4)
    assert os.listdir(tmp_path) == ["x.png"]


@pytest.mark.parametrize(
    "data", [b"", b"<html>not an image</html>", b"\x89PNG\r\n\x1a\n" + b"\0" * 40, b"GIF89a"]
)
def test_save_image_refuses_what_is_not_an_image(tmp_path: Path, data: bytes) -> None:
    with pytest.raises(ImageFileError) as info:
        save_image(tmp_path, "x.png", data)
    assert "\n" not in info.value.message
    assert not (tmp_path / "x.png").exists()


def test_magic_bytes_alone_are_not_enough(tmp_path: Path) -> None:
    png_as_jpeg = b"\xff\xd8\xff" + encoded("PNG")
    with pytest.raises(ImageFileError, match="unreadable image/jpeg"):
        save_image(tmp_path, "x.jpg", png_as_jpeg)
    assert sniff_mime(encoded("JPEG")) == "image/jpeg"


@pytest.mark.parametrize("name", ["", ".", "..", "a/b.png", "..\\x.png", "x\0.png", "x" * 256])
def test_save_image_refuses_names_that_are_not_plain(tmp_path: Path, name: str) -> None:
    with pytest.raises(ValueError, match="plain file name"):
        save_image(tmp_path, name, encoded("PNG"))


def test_a_write_error_is_one_line(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("not a directory")
    with pytest.raises(ImageFileError, match=r"^cannot write ") as info:
        save_image(tmp_path / "file" / "sub\nline", "x.png", encoded("PNG"))
    assert "\n" not in info.value.message
    assert "sub\\nline" in info.value.message  # escaped as typed


def test_save_image_holds_no_copy_of_the_bytes(tmp_path: Path) -> None:
    data = encoded("PNG") + bytes(1 << 20)  # 1 MB: bytes after IEND are kept, not decoded
    save_image(tmp_path, "warm.png", data)
    tracemalloc.start()
    try:
        save_image(tmp_path, "x.png", data)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 64 * 1024, peak


WRITER = """
import io, sys
from pathlib import Path
from PIL import Image
from imagepipe.files import save_image
out = io.BytesIO()
Image.new("RGB", (4, 4), (200, 30, 60)).save(out, format="PNG")
head, size = out.getvalue(), int(sys.argv[2])
for i in range(10**6):
    save_image(Path(sys.argv[1]), f"img{i % 3}.png", head + bytes([i % 251]) * size)
    print(i, flush=True)
"""


def temporaries(directory: Path) -> list[str]:
    return [n for n in os.listdir(directory) if n.endswith(TEMP_SUFFIX)]


@pytest.mark.slow
def test_sigkill_while_saving_never_leaves_a_partial_final_file(tmp_path: Path) -> None:
    """Kill the writer right after a save, or while a temporary file exists (mid-write or
    mid-fsync); every final file is then one complete image."""
    head = encoded("PNG", (4, 4))
    size = 4 << 20
    left_temporaries = 0
    trials = [(2, False), (5, True), (3, True), (4, True)]
    for trial, (saves, mid_write) in enumerate(trials):
        directory = tmp_path / f"t{trial}"
        child = subprocess.Popen(
            [sys.executable, "-c", WRITER, str(directory), str(size)],
            stdout=subprocess.PIPE,
            text=True,
        )
        assert child.stdout is not None
        for _ in range(saves):
            assert child.stdout.readline(), "the writer died on its own"
        while mid_write and not temporaries(directory):
            pass  # the next save creates its temporary file within milliseconds
        child.send_signal(signal.SIGKILL)
        child.wait()
        child.stdout.close()
        left_temporaries += len(temporaries(directory))
        finals = sorted(p for p in directory.iterdir() if not p.name.endswith(TEMP_SUFFIX))
        assert [p.name for p in finals] == ["img0.png", "img1.png", "img2.png"][: len(finals)]
        assert len(finals) >= min(saves, 3)
        for path in finals:
            data = path.read_bytes()
            assert len(data) == len(head) + size, path
            fill = data[len(head) :]
            assert data.startswith(head), path
            assert fill == fill[:1] * size, path
        remove_temporaries(directory)
        assert temporaries(directory) == []
    # Evidence that the kills did land mid-write (each of three would have to miss a
    # window of milliseconds that had already begun for this to fail).
    assert left_temporaries >= 1
    print(f"kills that left a temporary file: {left_temporaries} of {len(trials)}")


# -- verify ---------------------------------------------------------------------------------


def test_verify_finds_missing_changed_and_unreadable_files(tmp_path: Path) -> None:
    saved = [save_image(tmp_path, f"{n}.png", encoded("PNG", (n, n))) for n in range(1, 5)]
    listing = [(s["path"], s["sha256"]) for s in saved]
    assert verify_images(listing) == []

    Path(saved[0]["path"]).unlink()
    Path(saved[1]["path"]).write_bytes(encoded("PNG", (50, 50)))
    Path(saved[2]["path"]).unlink()
    Path(saved[2]["path"]).mkdir()  # exists, but cannot be read as a file
    odd = tmp_path / "new\nline\x1b.png"
    listing.append((str(odd), "0" * 64))

    problems = verify_images(listing)
    assert [(p.path, p.kind) for p in problems] == [
        (saved[0]["path"], "missing"),
        (saved[1]["path"], "changed"),
        (saved[2]["path"], "unreadable"),
        (str(odd), "missing"),
    ]
    for problem in problems:
        assert problem.description.startswith(problem.kind + ": ")
        assert problem.description.isprintable(), problem.description


def test_verify_reads_big_files_in_chunks(tmp_path: Path) -> None:
    big = tmp_path / "big.png"
    data = encoded("PNG") + bytes(8 << 20)
    big.write_bytes(data)
    tracemalloc.start()
    try:
        problems = verify_images([(str(big), hashlib.sha256(data).hexdigest())])
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert problems == []
    assert peak < 2 << 20, peak


def test_default_image_dir_is_under_the_user_data_dir(tmp_path: Path) -> None:
    # conftest points XDG_DATA_HOME into tmp_path
    assert default_image_dir("run-1") == tmp_path / "xdg" / "imagepipe" / "images" / "run-1"
    for bad in ("", "..", "a/b"):
        with pytest.raises(ValueError, match="path component"):
            default_image_dir(bad)


def test_a_staged_image_is_invisible_until_promoted(tmp_path: Path) -> None:
    first = encoded("PNG", (3, 3))
    (tmp_path / "x.png").write_bytes(first)  # the file another process recorded
    staged = stage_image(tmp_path, "x.png", encoded("PNG", (4, 4)))
    assert (tmp_path / "x.png").read_bytes() == first, "staging replaces nothing"
    assert Path(staged["staged"]).parent == tmp_path / ".imagepipe" / "staging"
    assert staged["path"] == str(tmp_path / "x.png")
    assert promote(staged["staged"], staged["path"])
    assert file_sha256(tmp_path / "x.png") == staged["sha256"]
    assert not promote(staged["staged"], staged["path"]), "already promoted"


def test_reconcile_promotes_what_was_recorded_and_removes_orphans(tmp_path: Path) -> None:
    claim_image_dir(tmp_path, "run")
    recorded = stage_image(tmp_path, "a.png", encoded("PNG", (3, 3)))
    orphan = stage_image(tmp_path, "a.png", encoded("PNG", (5, 5)))  # a stale attempt's
    in_flight = stage_image(tmp_path, "b.png", encoded("PNG", (6, 6)))  # pending branch
    # a partial write under the recorded image's prefix: never promoted
    partial = Path(recorded["staged"]).with_name(f"a.png.{recorded['sha256'][:16]}.feedbeef")
    partial.write_bytes(b"\x89PNG partial")
    names = {"a.png": recorded["sha256"]}

    assert reconcile_images(tmp_path, names, exclusive=True, owner="other").removed == 0
    shared = reconcile_images(tmp_path, names, exclusive=False, owner="run")
    assert (shared.promoted, shared.removed) == (1, 2)
    assert file_sha256(tmp_path / "a.png") == recorded["sha256"]
    assert [p.name for p in (tmp_path / ".imagepipe" / "staging").iterdir()] == [
        Path(in_flight["staged"]).name
    ], "an attempt that may be in flight stays"
    assert not Path(orphan["staged"]).exists()

    alone = reconcile_images(tmp_path, names, exclusive=True, owner="run")
    assert (alone.promoted, alone.removed) == (0, 1)
    assert not (tmp_path / "b.png").exists(), "an unrecorded image is never promoted"
    assert file_sha256(tmp_path / "a.png") == recorded["sha256"]


def test_an_image_folder_belongs_to_one_run(tmp_path: Path) -> None:
    claim_image_dir(tmp_path / "d", "one")
    claim_image_dir(tmp_path / "d", "one")  # its own run again: fine
    with pytest.raises(ImageDirTaken, match="holds the images of run 'one'"):
        claim_image_dir(tmp_path / "d", "two")
    (tmp_path / "file").write_text("")
    with pytest.raises(ImageDirUnusable, match="cannot write images to"):
        claim_image_dir(tmp_path / "file" / "d", "one")
