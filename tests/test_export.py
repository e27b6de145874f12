"""The dataset export: an imagefolder that the real `datasets` loads, checked and atomic."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any, Literal

import pytest

from imagepipe.errors import BadInput
from imagepipe.export import (
    METADATA_COLUMNS,
    ExportError,
    ExportItem,
    ExportReport,
    export_dataset,
)
from imagepipe.files import image_file_name, save_image
from imagepipe.providers.sim_image import draw_png

# "test" and "dev" as styles: a flat imagefolder would turn them into splits.
STYLES = ("cartoon", "test", "Pixel Art", "dev")


def make_items(
    images: Path, prompts: tuple[str, ...] = ("a lighthouse", "a lamp")
) -> list[ExportItem]:
    items = []
    for p, prompt in enumerate(prompts):
        for style in STYLES:
            for variation in (0, 1):
                data = draw_png(prompt, style, variation, 32, 32)
                name = image_file_name(style, variation, "png", p)
                saved = save_image(images, name, data)
                items.append(
                    ExportItem(
                        source=saved["path"],
                        prompt=prompt,
                        style=style,
                        variation=variation,
                        provider="simulated",
                        model="sim-1",
                        size="32x32" if variation else None,
                        seed=None if p else 7,
                        sha256=saved["sha256"],
                        attempts=1 + variation,
                        request_id=f"req-{p}-{style}-{variation}",
                    )
                )
    return items


@pytest.fixture
def items(tmp_path: Path) -> list[ExportItem]:
    return make_items(tmp_path / "images")


LOADER = """
import json, sys, time
start = time.perf_counter()
import datasets
imported = time.perf_counter()
datasets.disable_progress_bars()
out = {}
for data_dir in sys.argv[2:]:
    loaded = datasets.load_dataset("imagefolder", data_dir=data_dir, cache_dir=sys.argv[1])
    train = loaded["train"]
    rows = [{**{k: v for k, v in row.items() if k != "image"}, "image": row["image"].size}
            for row in train]
    out[data_dir] = {"splits": list(loaded), "columns": train.column_names, "rows": rows}
out["timing"] = [imported - start, time.perf_counter() - imported]
print(json.dumps(out))
"""


def load_with_datasets(tmp_path: Path, *data_dirs: Path) -> dict[str, Any]:
    """Load exports with the real `datasets`, offline, in a child process (importing it
    here would slow every later test's garbage collection), its home in tmp_path."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGINGFACE"))}
    env.update(
        HF_HOME=str(tmp_path / "hf"),
        HF_DATASETS_OFFLINE="1",
        HF_HUB_OFFLINE="1",
        HF_HUB_DISABLE_TELEMETRY="1",
    )
    args = [str(tmp_path / "hf" / "cache"), *map(str, data_dirs)]
    done = subprocess.run(
        [sys.executable, "-c", LOADER, *args], env=env, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr[-3000:]
    result: dict[str, Any] = json.loads(done.stdout)
    return result


@pytest.mark.slow
def test_datasets_loads_the_export(items: list[ExportItem], tmp_path: Path) -> None:
    formats: tuple[Literal["jsonl", "csv"], ...] = ("jsonl", "csv")
    for fmt in formats:
        report = export_dataset(items, tmp_path / fmt, fmt=fmt)
        assert report.metadata == tmp_path / fmt / "train" / f"metadata.{fmt}"
        assert len(report.files) == len(items) == 16

    loaded = load_with_datasets(tmp_path, *(tmp_path / fmt for fmt in formats))
    imported, load = loaded.pop("timing")
    print(f"import datasets: {imported:.2f} s; load_dataset jsonl + csv: {load:.2f} s")
    for fmt in formats:
        result = loaded[str(tmp_path / fmt)]
        assert result["splits"] == ["train"], fmt
        assert set(result["columns"]) == {"image", *METADATA_COLUMNS[1:]}, fmt
        assert len(result["rows"]) == len(items), fmt
        rows = {row["request_id"]: row for row in result["rows"]}
        for item in items:
            row = rows[item.request_id]
            assert (row["prompt"], row["style"], row["variation"]) == (
                item.prompt,
                item.style,
                item.variation,
            )
            assert (row["sha256"], row["attempts"]) == (item.sha256, item.attempts)
            assert row["image"] == [32, 32]  # datasets decoded the exported file


def test_metadata_lines_name_the_files(items: list[ExportItem], tmp_path: Path) -> None:
    report = export_dataset(items, tmp_path / "out")
    lines = report.metadata.read_text(encoding="utf-8").splitlines()
    rows = [json.loads(line) for line in lines]
    assert [r["file_name"] for r in rows] == list(report.files)
    assert list(rows[0]) == list(METADATA_COLUMNS)
    assert rows[0]["seed"] == 7
    assert rows[-1]["seed"] is None
    assert rows[0]["size"] is None
    for row, item in zip(rows, items, strict=True):
        assert (report.data_dir / row["file_name"]).read_bytes() == Path(item.source).read_bytes()
    assert sorted(os.listdir(report.data_dir)) == sorted([*report.files, "metadata.jsonl"])
    assert report.bytes == sum(Path(i.source).stat().st_size for i in items)


def test_csv_has_the_same_columns(items: list[ExportItem], tmp_path: Path) -> None:
    report = export_dataset(items, tmp_path / "out", fmt="csv")
    with report.metadata.open(newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == list(METADATA_COLUMNS)
    assert [r["file_name"] for r in rows] == list(report.files)
    assert rows[0]["size"] == ""  # None
    assert rows[1]["size"] == "32x32"


def test_copies_are_copies_and_links_are_links(items: list[ExportItem], tmp_path: Path) -> None:
    copied = export_dataset(items, tmp_path / "copy")
    linked = export_dataset(items, tmp_path / "link", link=True)
    assert linked.linked
    for item, c_name, l_name in zip(items, copied.files, linked.files, strict=True):
        source = os.stat(item.source)
        assert os.stat(copied.data_dir / c_name).st_ino != source.st_ino
        assert os.stat(linked.data_dir / l_name).st_ino == source.st_ino


def test_equal_source_names_get_unique_names(tmp_path: Path) -> None:
    first = make_items(tmp_path / "run1", ("one",))
    second = make_items(tmp_path / "run2", ("two",))
    report = export_dataset([*first, *second], tmp_path / "out")
    assert len(set(report.files)) == len(report.files) == 16
    assert report.files[8] == Path(second[0].source).stem + "-dup2.png"


def test_a_non_empty_directory_is_refused(items: list[ExportItem], tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(BadInput, match="not empty") as info:
        export_dataset(items, out)
    assert "\n" not in info.value.message
    assert os.listdir(out) == ["keep.txt"]


@pytest.mark.parametrize("damage", ["changed", "missing", "unreadable"])
def test_a_damaged_source_stops_the_export(
    items: list[ExportItem], tmp_path: Path, damage: str
) -> None:
    victim = Path(items[5].source)
    if damage == "changed":
        victim.write_bytes(draw_png("something else", "x", 0, 32, 32))
    else:
        victim.unlink()
        if damage == "unreadable":
            victim.mkdir()
    out = tmp_path / "out"
    with pytest.raises(ExportError) as info:
        export_dataset(items, out)
    message = info.value.message
    assert message.startswith(
        f"1 of 16 source images cannot be exported, nothing was written: {damage}: "
    )
    assert repr(str(victim)) in message
    assert not out.exists()  # it did not exist before: nothing is left


def test_nothing_to_export_is_refused(tmp_path: Path) -> None:
    with pytest.raises(BadInput, match="nothing to export"):
        export_dataset([], tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_linking_across_file_systems_says_so(items: list[ExportItem], tmp_path: Path) -> None:
    shm = Path("/dev/shm")
    if not shm.is_dir() or os.stat(shm).st_dev == os.stat(tmp_path).st_dev:
        pytest.skip("needs /dev/shm on another file system than the temporary directory")
    with tempfile.TemporaryDirectory(dir=shm) as other:
        out = Path(other) / "out"
        with pytest.raises(BadInput, match="different file systems; export without --link"):
            export_dataset(items, out, link=True)
        assert not out.exists()
        report: ExportReport = export_dataset(items, out)  # a copy works
        assert len(report.files) == len(items)
