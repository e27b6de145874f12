"""Image files on disk: safe names, staged writes, re-hashing for ``verify``.

- :func:`image_file_name` turns any style text into a file name that is safe on Linux, macOS
  and Windows and never the same for two different (style, variation, prompt index).
- :func:`claim_image_dir` makes a run's image folder, checks that it can be written, and
  marks it as the run's (``.imagepipe/run``): another run's images are never written there.
- :func:`stage_image` writes an attempt's bytes under a name no other attempt can use
  (``.imagepipe/staging/<name>.<sha16>.<random>``), fsynced; :func:`promote` renames it to
  its final name. The workflow promotes a staged file only once the store has recorded it
  as the branch's value (a fenced commit), so a stale process, whose commit is refused,
  leaves an orphan in ``staging/`` and never replaces a file another process recorded.
- :func:`reconcile_images` finishes what a kill interrupted: a staged file whose value was
  recorded but not yet renamed is promoted; orphans are removed.
- :func:`save_image` writes bytes atomically (temporary file, fsync, rename, fsync of the
  directory), for files that are not a branch's image.
- :func:`verify_images` re-hashes saved files in chunks and reports missing, changed and
  unreadable ones.

Pillow is imported only inside :func:`save_image` (to read width and height from the header).
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import re
import secrets
import stat
import unicodedata
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, TypedDict

from imagepipe.errors import ImagepipeError
from imagepipe.text import escape_control, quoted

__all__ = [
    "MIME_EXTENSIONS",
    "TEMP_SUFFIX",
    "ImageDirTaken",
    "ImageDirUnusable",
    "ImageFileError",
    "ReconcileReport",
    "SavedImage",
    "StagedImage",
    "VerifyProblem",
    "claim_image_dir",
    "default_image_dir",
    "file_sha256",
    "has_staged",
    "image_dir_owner",
    "image_file_name",
    "promote",
    "reconcile_images",
    "remove_temporaries",
    "save_image",
    "sniff_mime",
    "stage_image",
    "verify_images",
]

#: Suffix of the temporary files :func:`save_image` renames into place; a kill can leave some.
TEMP_SUFFIX = ".imagepipe-tmp"

#: Longest file name produced, in UTF-8 bytes; file systems allow 255 and a temporary name
#: or a ``-dupN`` added by the export must still fit.
MAX_NAME_BYTES = 200

#: imagepipe's own folder inside a run's image folder: the owner mark and the staged files
STATE_DIR = ".imagepipe"
#: the file in :data:`STATE_DIR` that names the run whose images the folder holds
OWNER_FILE = "run"
#: the folder in :data:`STATE_DIR` where attempts write their images before promotion
STAGING_DIR = "staging"
_STAGED_SHA_CHARS = 16
#: the longest owner mark read (a run id is far shorter)
_MAX_OWNER_BYTES = 4096

_HASH_CHARS = 10
_CHUNK = 1 << 20
_EXT = re.compile(r"[a-z0-9]{1,10}")
_WINDOWS_RESERVED = frozenset(
    ["con", "prn", "aux", "nul"]
    + [f"{dev}{n}" for dev in ("com", "lpt") for n in [*"0123456789", "¹", "²", "³"]]
)
# A name without a hash decodes as [p<index>-]<style>[-<variation>]: a style that begins
# like the prefix or ends like the suffix would be ambiguous, so it gets a hash.
_AMBIGUOUS = re.compile(r"\Ap[0-9]+-|-[0-9]+\Z")
#: The file extension for each MIME type :func:`sniff_mime` returns.
MIME_EXTENSIONS = {
    "image/png": "png",
    "image/jpeg": "jpg",
    "image/webp": "webp",
    "image/gif": "gif",
}
_PIL_FORMATS = {"image/png": "PNG", "image/jpeg": "JPEG", "image/webp": "WEBP", "image/gif": "GIF"}


class ImageFileError(ImagepipeError):
    """Image bytes or an image file that cannot be used (unknown format, unreadable)."""


class ImageDirUnusable(ImagepipeError):
    """A run's image folder cannot be created or written (checked before anything is paid)."""

    exit_code = 2
    #: a branch that meets it (a worker's) is rejected at once: retrying cannot help
    retryable = False


class ImageDirTaken(ImageDirUnusable):
    """The image folder holds another run's images."""


class SavedImage(TypedDict):
    """What :func:`save_image` wrote: the parts of a branch's stored value about the file."""

    path: str
    sha256: str
    bytes: int
    mime: str
    width: int
    height: int


@dataclass(frozen=True)
class VerifyProblem:
    """One file that does not match what was stored; ``description`` is one printable line."""

    path: str
    kind: Literal["missing", "changed", "unreadable"]
    description: str


def _clean_char(ch: str) -> bool:
    """A character kept as is: a letter or digit whose case cannot make two names equal on a
    case-insensitive file system (``ß``, dotless ``ı`` and capitals are not kept)."""
    if ch in "-_":
        return True
    return ch.isalnum() and ch.lower() == ch and ch.upper().lower() == ch


def _readable(style: str, budget: int) -> str:
    """The style reduced to kept characters, runs of others as one ``_``, within budget bytes."""
    text = unicodedata.normalize("NFC", style)
    out: list[str] = []
    for ch in text:
        low = ch.lower()
        if len(low) == 1 and _clean_char(low):
            out.append(low)
        elif not out or out[-1] != "_":
            out.append("_")
    readable = "".join(out).lstrip("-_")[:budget]
    while len(readable.encode()) > budget:
        readable = readable[:-1]
    readable = readable or "image"
    if readable in _WINDOWS_RESERVED:
        readable += "_"
    return readable


def image_file_name(style: str, variation: int, ext: str, prompt_index: int | None = None) -> str:
    """``[p<index>-]<style>[-<variation>].<ext>``, safe on Linux, macOS and Windows.

    Variation 0 has no ``-0``. When the style text cannot be kept as is (capitals, spaces,
    slashes, dots, control characters, reserved names such as ``CON``, too long, or a form
    that would read as a prefix or suffix), the name gets ``.<hash>`` of the whole
    (style, variation, index) before the extension, so two inputs never share a name, not
    even on a case-insensitive or normalising file system.
    """
    if variation < 0 or (prompt_index is not None and prompt_index < 0):
        raise ValueError("variation and prompt_index must not be negative")
    ext = ext.removeprefix(".").lower()
    if not _EXT.fullmatch(ext):
        raise ValueError(f"not a file extension: {ext!r}")
    prefix = "" if prompt_index is None else f"p{prompt_index}-"
    suffix = "" if variation == 0 else f"-{variation}"
    budget = MAX_NAME_BYTES - len(prefix) - len(suffix) - (1 + _HASH_CHARS) - (1 + len(ext))
    readable = _readable(style, budget)
    if readable != style or _AMBIGUOUS.search(style):
        key = json.dumps([style, variation, prompt_index]).encode("utf-8", "surrogatepass")
        digest = hashlib.sha256(key).hexdigest()[:_HASH_CHARS]
        return f"{prefix}{readable}{suffix}.{digest}.{ext}"
    return f"{prefix}{readable}{suffix}.{ext}"


def sniff_mime(data: bytes) -> str:
    """The MIME type from the magic bytes: PNG, JPEG, WebP or GIF; anything else is an error."""
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        return "image/png"
    if data.startswith(b"\xff\xd8\xff"):
        return "image/jpeg"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "image/webp"
    if data[:6] in (b"GIF87a", b"GIF89a"):
        return "image/gif"
    raise ImageFileError(f"not a PNG, JPEG, WebP or GIF image (starts with {data[:8]!r})")


def _dimensions(data: bytes, mime: str) -> tuple[int, int]:
    import io

    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data)) as image:  # reads the header only
            fmt, size = image.format, image.size
    except (UnidentifiedImageError, OSError, ValueError) as exc:
        raise ImageFileError(f"unreadable {mime} image: {exc}") from exc
    if fmt != _PIL_FORMATS[mime]:
        raise ImageFileError(f"image says {mime} but Pillow reads it as {fmt}")
    return size


def _check_name(name: str) -> None:
    if (
        not name
        or name in (".", "..")
        or "/" in name
        or "\\" in name
        or "\0" in name
        or name.endswith(TEMP_SUFFIX)
        or len(name.encode("utf-8", "surrogatepass")) > 255
    ):
        raise ValueError(f"not a plain file name: {name!r}")


def _fsync_dir(directory: Path) -> None:
    flags = os.O_RDONLY | getattr(os, "O_DIRECTORY", 0)
    try:
        fd = os.open(directory, flags)
    except OSError:  # Windows cannot open a directory; its rename is durable enough
        return
    try:
        os.fsync(fd)
    except OSError as exc:  # some file systems refuse fsync on a directory
        if exc.errno not in (errno.EINVAL, errno.ENOTSUP, errno.EBADF):
            raise
    finally:
        os.close(fd)


def _make_dirs(directory: Path) -> None:
    """Create ``directory`` and missing parents, fsyncing each parent that gained an entry."""
    if directory.is_dir():
        return
    _make_dirs(directory.parent)
    with contextlib.suppress(FileExistsError):
        directory.mkdir()
    _fsync_dir(directory.parent)


def _write_new_file(path: Path, data: bytes) -> None:
    """Create ``path`` (it must not exist), write all of ``data`` and fsync it; on any
    failure, nothing is left under ``path``."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
    try:
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        finally:
            os.close(fd)
    except BaseException:
        with contextlib.suppress(OSError):
            path.unlink()
        raise


def _write_atomically(directory: Path, final: Path, data: bytes) -> None:
    _make_dirs(directory)
    temp = directory / f".{secrets.token_hex(8)}{TEMP_SUFFIX}"
    _write_new_file(temp, data)
    try:
        os.replace(temp, final)
    except BaseException:
        with contextlib.suppress(OSError):
            temp.unlink()
        raise
    _fsync_dir(directory)


def save_image(directory: Path, name: str, data: bytes) -> SavedImage:
    """Write ``data`` to ``directory/name`` atomically and describe the file.

    The bytes go to a temporary file in the same directory, are fsynced and renamed over the
    final name, then the directory is fsynced. A reader never sees a partial file under
    ``name``; re-saving the same name replaces the file atomically. The directory and its
    parents are created if needed. No copy of ``data`` is made.
    """
    saved = _describe(directory, name, data)
    final = directory / name
    try:
        _write_atomically(directory, final, data)
    except OSError as exc:
        raise ImageFileError(f"cannot write {str(final)!r}: {exc.strerror or exc}") from exc
    return saved


def _describe(directory: Path, name: str, data: bytes) -> SavedImage:
    """What ``data`` saved as ``directory/name`` will be: checked to be a plain file name
    and an image whose header Pillow reads."""
    _check_name(name)
    mime = sniff_mime(data)
    width, height = _dimensions(data, mime)
    return SavedImage(
        path=str((directory / name).absolute()),
        sha256=hashlib.sha256(data).hexdigest(),
        bytes=len(data),
        mime=mime,
        width=width,
        height=height,
    )


class StagedImage(SavedImage):
    """What :func:`stage_image` wrote: the final file's description, and where the bytes
    wait until :func:`promote` renames them there."""

    staged: str


def _staging(directory: Path) -> Path:
    return directory / STATE_DIR / STAGING_DIR


def claim_image_dir(directory: Path, run_id: str, *, mark: bool = True) -> None:
    """Make ``directory`` (and its staging folder) and mark it as ``run_id``'s (with
    ``mark`` false, only check that it could be: for bad input found later, such as a
    reused run id, to leave no mark behind).

    Raises :class:`ImageDirTaken` if the folder is marked as another run's, and
    :class:`ImageDirUnusable` if it cannot be created or written (a file is written to the
    staging folder and removed, as an image would be), or if imagepipe's own folder in it
    is a symbolic link (what is removed from it must be the run's own): checked before any
    request is made, so that no image is paid for that cannot be kept."""
    shown = escape_control(repr(str(directory)))
    try:
        staging = _staging(directory)
        _make_dirs(staging)
        if not _own_staging(directory):
            raise ImageDirUnusable(
                f"cannot write images to {shown}: its {STATE_DIR}/{STAGING_DIR} is not a "
                "folder of its own (a symbolic link?); remove it or choose another --out"
            )
        holder = image_dir_owner(directory)
        if holder is None and mark:
            _mark_owner(directory, run_id)
            holder = image_dir_owner(directory)  # another run may have marked it first
        if holder not in (None, run_id):
            raise ImageDirTaken(
                f"the image folder {shown} holds the images of run {quoted(holder or '')}; "
                "give this run another --out (or omit --out)"
            )
        probe = staging / f"probe.{secrets.token_hex(8)}"
        os.close(os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
        probe.unlink()
    except OSError as exc:
        raise ImageDirUnusable(
            f"cannot write images to {shown}: {exc.strerror or type(exc).__name__}; "
            "choose another --out"
        ) from None


def image_dir_owner(directory: Path) -> str | None:
    """The run whose images ``directory`` holds, by its mark; None if it has none (an
    empty mark, as a crash while writing it may have left, counts as none)."""
    mark = directory / STATE_DIR / OWNER_FILE
    try:
        # a plain file, read without following a link and no further than a run id goes
        # (a FIFO or a link to /dev/zero planted there must not hang or fill the memory)
        fd = os.open(mark, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except FileNotFoundError:
        return None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise ImageDirUnusable(
                f"the image folder {escape_control(repr(str(directory)))} has a "
                f"{STATE_DIR}/{OWNER_FILE} that is not a file; remove it or choose another --out"
            )
        text = os.read(fd, _MAX_OWNER_BYTES)
    finally:
        os.close(fd)
    holder = text.decode("utf-8", "surrogateescape").strip()
    return holder or None


def _mark_owner(directory: Path, run_id: str) -> None:
    """Write the owner mark whole (a temporary file, then a link that fails if a mark
    appeared meanwhile); an empty mark is replaced."""
    state = directory / STATE_DIR
    temp = state / f"{OWNER_FILE}.{secrets.token_hex(8)}"
    _write_new_file(temp, run_id.encode("utf-8", "surrogateescape") + b"\n")
    try:
        owner = state / OWNER_FILE
        try:
            os.link(temp, owner)
        except FileExistsError:
            if image_dir_owner(directory) is None:
                os.replace(temp, owner)  # an empty mark: nobody's
        _fsync_dir(state)
    finally:
        with contextlib.suppress(FileNotFoundError):
            temp.unlink()


def _own_staging(directory: Path) -> bool:
    """True if imagepipe's folder and its staging folder are real folders, not links."""
    state = directory / STATE_DIR
    staging = state / STAGING_DIR
    return not state.is_symlink() and not staging.is_symlink() and staging.is_dir()


def stage_image(directory: Path, name: str, data: bytes) -> StagedImage:
    """Write ``data`` for ``directory/name`` under a staged name no other attempt can use,
    fsynced with its folder; describe the final file (which does not exist yet).

    :func:`promote` makes it ``directory/name``; until then a reader sees the file that
    was there before, if any. Raises :class:`ImageFileError` for bytes that are not an image
    and ``OSError`` when the disk refuses the write."""
    saved = _describe(directory, name, data)
    staging = _staging(directory)
    _make_dirs(staging)
    staged = staging / f"{name}.{saved['sha256'][:_STAGED_SHA_CHARS]}.{secrets.token_hex(4)}"
    _write_new_file(staged, data)
    try:
        _fsync_dir(staging)
    except BaseException:
        with contextlib.suppress(OSError):
            staged.unlink()
        raise
    return StagedImage(**saved, staged=str(staged.absolute()))


def promote(staged: str, final: str) -> bool:
    """Rename a staged image to its final name; False if it is no longer staged (already
    promoted by :func:`reconcile_images`) or the rename failed (it stays staged, and the
    next reconciliation promotes it)."""
    try:
        os.replace(staged, final)
    except OSError:
        return False
    return True


def has_staged(directory: Path) -> bool:
    """True if an attempt left a staged file in ``directory`` (one short listing)."""
    if not _own_staging(directory):
        return False
    try:
        with os.scandir(_staging(directory)) as entries:
            return any(True for _ in entries)
    except OSError:
        return False


@dataclass(frozen=True)
class ReconcileReport:
    """What :func:`reconcile_images` did: staged files promoted, and orphans removed."""

    promoted: int = 0
    removed: int = 0


def reconcile_images(
    directory: Path, recorded: Mapping[str, str], *, exclusive: bool, owner: str
) -> ReconcileReport:
    """Bring ``owner``'s image folder in line with its store: ``recorded`` maps the file
    name of every resolved branch to its stored sha256.

    A staged file whose final name and content match a recorded image is promoted if the
    final file is missing or differs (a kill fell between the record and the rename), then
    the staged copy is removed; if it cannot be promoted (a folder has its name), it stays
    for a later try. A staged file for a recorded name with other content is an orphan (a
    stale process's) and is removed. With ``exclusive`` (no other process can be executing
    the run: it is settled, or this process holds it), every other staged file is an
    orphan too, and is removed; without, it may be an attempt in flight, and stays.

    Nothing is done to a folder marked as another run's (it was cleared and reused), nor to
    a staging folder that is a link, nor to what in it is not a plain file."""
    if image_dir_owner(directory) != owner or not _own_staging(directory):
        return ReconcileReport()
    staging = _staging(directory)
    try:
        entries = sorted(e.name for e in os.scandir(staging) if e.is_file(follow_symlinks=False))
    except OSError:
        return ReconcileReport()
    promoted = removed = 0
    for entry in entries:
        staged = staging / entry
        parts = entry.rsplit(".", 2)  # <final name>.<sha256 prefix>.<random>
        expected = recorded.get(parts[0]) if len(parts) == 3 else None
        if expected is None and not exclusive:
            continue  # maybe an attempt in flight
        if expected is not None:
            outcome = _complete(staged, directory / parts[0], parts[1], expected)
            if outcome == "promoted":
                promoted += 1
            if outcome != "orphan":
                continue
        with contextlib.suppress(OSError):  # gone already, or not ours to remove: left
            staged.unlink()
            removed += 1
    if promoted:
        _fsync_dir(directory)
    return ReconcileReport(promoted, removed)


def _complete(
    staged: Path, final: Path, sha_prefix: str, expected: str
) -> Literal["promoted", "kept", "orphan"]:
    """Promote ``staged`` if it holds the recorded image and ``final`` does not: then
    "promoted", or "kept" if the rename failed (it stays staged, for a later try).
    "orphan": another attempt's bytes, or a copy of what is in place already."""
    expected = expected.lower()
    if not expected.startswith(sha_prefix.lower()):
        return "orphan"  # another attempt's bytes: not what the store recorded
    if _sha256_or_none(final) == expected or _sha256_or_none(staged) != expected:
        return "orphan"
    return "promoted" if promote(str(staged), str(final)) else "kept"


def _sha256_or_none(path: Path) -> str | None:
    try:
        return file_sha256(path)
    except OSError:
        return None


def remove_temporaries(directory: Path) -> int:
    """Delete temporary files a killed :func:`save_image` left in ``directory``; the count.

    Call it only while no other process saves into the directory (e.g. holding the run)."""
    removed = 0
    with contextlib.suppress(FileNotFoundError):
        for entry in directory.iterdir():
            if entry.name.startswith(".") and entry.name.endswith(TEMP_SUFFIX):
                with contextlib.suppress(FileNotFoundError):
                    entry.unlink()
                    removed += 1
    return removed


def file_sha256(path: str | os.PathLike[str]) -> str:
    """The SHA-256 hex digest of a file, read in 1 MiB chunks."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def verify_images(images: Iterable[tuple[str, str]]) -> list[VerifyProblem]:
    """Re-hash each (path, expected sha256); the files that are missing, changed or unreadable.

    Descriptions are one line, with the path's control characters escaped."""
    problems: list[VerifyProblem] = []
    for path, expected in images:
        try:
            actual = file_sha256(path)
        except FileNotFoundError:
            problems.append(VerifyProblem(path, "missing", f"missing: {path!r}"))
        except OSError as exc:
            reason = exc.strerror or type(exc).__name__
            problems.append(VerifyProblem(path, "unreadable", f"unreadable: {path!r}: {reason}"))
        else:
            if actual != expected.lower():
                problems.append(
                    VerifyProblem(
                        path,
                        "changed",
                        f"changed: {path!r}: sha256 is {actual[:12]}..., "
                        f"expected {expected[:12]}...",
                    )
                )
    return problems


def default_image_dir(run_id: str) -> Path:
    """Where a run's images go without ``--out``: ``<user data dir>/images/<run id>``."""
    import platformdirs

    if not run_id or run_id in (".", "..") or any(c in run_id for c in "/\\\0"):
        raise ValueError(f"run id is not one path component: {run_id!r}")
    return Path(platformdirs.user_data_dir("imagepipe", appauthor=False)) / "images" / run_id
