"""Export a run's images as a Hugging Face ``imagefolder`` dataset.

``export_dataset(items, out_dir)`` writes ``out_dir/train/`` with one file per image and a
``metadata.jsonl`` (or ``metadata.csv``) whose ``file_name`` column names them, so that
``datasets.load_dataset("imagefolder", data_dir=out_dir)`` loads one ``train`` split with the
image and every metadata column.

Why ``train/`` and not the images directly in ``out_dir``: ``datasets`` guesses splits from
file names, so a flat folder holding ``test.png`` or ``p0-dev-1.png`` (styles are free text)
would load as a ``test`` split of that one image and silently drop the rest. Under a
``train/`` directory, names do not matter.

Each file is copied (or hard-linked) to a temporary name, its SHA-256 checked against the
stored one, then renamed into place; the metadata file is written last, the same way. Any
missing or changed source stops the export and removes what it wrote.
"""

from __future__ import annotations

import contextlib
import csv
import errno
import hashlib
import io
import json
import os
import secrets
import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from imagepipe.errors import BadInput, ImagepipeError
from imagepipe.files import TEMP_SUFFIX, VerifyProblem

__all__ = [
    "METADATA_COLUMNS",
    "SPLIT_DIR",
    "ExportError",
    "ExportItem",
    "ExportReport",
    "export_dataset",
]

#: The columns of ``metadata.jsonl`` / ``metadata.csv``, in order.
METADATA_COLUMNS = (
    "file_name",
    "prompt",
    "style",
    "variation",
    "provider",
    "model",
    "size",
    "seed",
    "sha256",
    "attempts",
    "request_id",
    "cost_micro_usd",
    "cost_currency",
)
#: The directory under ``out_dir`` that holds the images and the metadata.
SPLIT_DIR = "train"

_CHUNK = 1 << 20


class ExportError(ImagepipeError):
    """A source image is missing or changed, or the export could not be written."""


@dataclass(frozen=True)
class ExportItem:
    """One resolved image to export: where its file is and what is known about it."""

    source: str
    prompt: str
    style: str
    variation: int
    provider: str
    model: str
    size: str | None
    seed: int | None
    sha256: str
    attempts: int
    request_id: str | None
    #: what the image cost, in micro-dollars (None: unknown)
    cost_micro_usd: int | None = None
    cost_currency: str = "USD"


@dataclass(frozen=True)
class ExportReport:
    """What :func:`export_dataset` wrote."""

    out_dir: Path
    data_dir: Path
    metadata: Path
    files: tuple[str, ...]
    bytes: int
    linked: bool


def _unique_names(items: Sequence[ExportItem]) -> list[str]:
    """Each source's own file name, with ``-dupN`` where two would be equal (also on a
    case-insensitive file system) or where a name is hidden or the metadata file's."""
    taken: set[str] = set()
    names: list[str] = []
    for item in items:
        source = Path(item.source)
        stem, suffix = source.stem.lstrip("."), source.suffix
        name, n = f"{stem}{suffix}", 1
        while (
            not stem
            or _key(name) in taken
            or _key(name) in ("metadata.jsonl", "metadata.csv")
            or name.endswith(TEMP_SUFFIX)
        ):
            n += 1
            stem = stem or "image"
            name = f"{stem}-dup{n}{suffix}"
        taken.add(_key(name))
        names.append(name)
    return names


def _key(name: str) -> str:
    return unicodedata.normalize("NFD", name.casefold())


def _refuse_non_empty(out_dir: Path) -> bool:
    """Make sure ``out_dir`` is an empty directory; True when this call created it."""
    if out_dir.exists() and not out_dir.is_dir():
        raise BadInput(f"export target {str(out_dir)!r} exists and is not a directory")
    if out_dir.is_dir():
        if any(out_dir.iterdir()):
            raise BadInput(
                f"export directory {str(out_dir)!r} is not empty; give a new or empty directory"
            )
        return False
    try:
        out_dir.mkdir(parents=True)
    except OSError as exc:
        raise BadInput(f"cannot create {str(out_dir)!r}: {exc.strerror}") from exc
    return True


def _hash_file(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _copy(source: Path, temp: Path) -> str:
    """Copy in chunks, hashing on the way; the copy is fsynced. The source's SHA-256."""
    digest = hashlib.sha256()
    buffer = bytearray(_CHUNK)
    view = memoryview(buffer)
    with open(source, "rb") as src:
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0)
        fd = os.open(temp, flags, 0o666)
        with open(fd, "wb", closefd=True) as dst:
            while n := src.readinto(buffer):
                digest.update(view[:n])
                dst.write(view[:n])
            dst.flush()
            os.fsync(dst.fileno())
    return digest.hexdigest()


def _link(source: Path, temp: Path, data_dir: Path) -> str:
    try:
        os.link(source, temp)
    except OSError as exc:
        if exc.errno == errno.EXDEV:
            raise BadInput(
                f"cannot hard-link {str(source)!r} into {str(data_dir)!r}: they are on "
                "different file systems; export without --link to copy"
            ) from exc
        raise
    return _hash_file(temp)


def _fsync_dir(directory: Path) -> None:
    with contextlib.suppress(OSError):  # not possible on Windows nor on some file systems
        fd = os.open(directory, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _row(item: ExportItem, name: str) -> dict[str, Any]:
    row: dict[str, Any] = {"file_name": name}
    for column in METADATA_COLUMNS[1:]:
        row[column] = getattr(item, column)
    return row


def _metadata_text(rows: list[dict[str, Any]], fmt: Literal["jsonl", "csv"]) -> str:
    if fmt == "jsonl":
        return "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=METADATA_COLUMNS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)  # None is written as an empty field
    return out.getvalue()


def _write_atomically(path: Path, text: str) -> None:
    temp = path.with_name(f".{secrets.token_hex(8)}{TEMP_SUFFIX}")
    try:
        with open(temp, "x", encoding="utf-8", newline="") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(temp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            temp.unlink()


def _problem(source: str, exc: OSError) -> VerifyProblem:
    if isinstance(exc, FileNotFoundError):
        return VerifyProblem(source, "missing", f"missing: {source!r}")
    reason = exc.strerror or type(exc).__name__
    return VerifyProblem(source, "unreadable", f"unreadable: {source!r}: {reason}")


def export_dataset(
    items: Sequence[ExportItem],
    out_dir: Path,
    *,
    link: bool = False,
    fmt: Literal["jsonl", "csv"] = "jsonl",
) -> ExportReport:
    """Write ``items`` as an ``imagefolder`` dataset under ``out_dir`` (which must be empty
    or new): images and ``metadata.<fmt>`` in ``out_dir/train/``.

    ``link=True`` hard-links the files instead of copying them (same file system only).
    Every source is checked against its ``sha256``; a missing or changed one raises
    :class:`ExportError` and nothing is left behind. A non-empty ``out_dir`` raises
    :class:`~imagepipe.errors.BadInput`.
    """
    if fmt not in ("jsonl", "csv"):
        raise BadInput(f"unknown export format {fmt!r}: use jsonl or csv")
    if not items:
        raise BadInput("nothing to export: there is no resolved image")
    created_out = _refuse_non_empty(out_dir)
    data_dir = out_dir / SPLIT_DIR
    names = _unique_names(items)
    written: list[Path] = []
    problems: list[VerifyProblem] = []
    total = 0
    try:
        data_dir.mkdir()
        for item, name in zip(items, names, strict=True):
            temp = data_dir / f".{secrets.token_hex(8)}{TEMP_SUFFIX}"
            source = Path(item.source)
            try:
                actual = _link(source, temp, data_dir) if link else _copy(source, temp)
            except OSError as exc:
                with contextlib.suppress(FileNotFoundError):
                    temp.unlink()
                if exc.filename is None or os.fspath(exc.filename) != os.fspath(source):
                    raise
                problems.append(_problem(item.source, exc))
                continue
            if actual != item.sha256.lower():
                temp.unlink()
                problems.append(
                    VerifyProblem(
                        item.source,
                        "changed",
                        f"changed: {item.source!r}: sha256 is {actual[:12]}..., "
                        f"expected {item.sha256[:12]}...",
                    )
                )
                continue
            final = data_dir / name
            os.replace(temp, final)
            written.append(final)
            total += final.stat().st_size
        if problems:
            more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
            raise ExportError(
                f"{len(problems)} of {len(items)} source images cannot be exported, "
                f"nothing was written: {problems[0].description}{more}"
            )
        _fsync_dir(data_dir)
        metadata = data_dir / f"metadata.{fmt}"
        rows = [_row(item, name) for item, name in zip(items, names, strict=True)]
        _write_atomically(metadata, _metadata_text(rows, fmt))
        _fsync_dir(data_dir)
    except BaseException as exc:
        for path in written:
            with contextlib.suppress(OSError):
                path.unlink()
        with contextlib.suppress(OSError):
            data_dir.rmdir()
        if created_out:
            with contextlib.suppress(OSError):
                out_dir.rmdir()
        if isinstance(exc, OSError):
            raise ExportError(f"cannot write the export into {str(data_dir)!r}: {exc}") from exc
        raise
    return ExportReport(out_dir, data_dir, metadata, tuple(names), total, link)
