"""The SQLite backend's own concerns: the file, migrations from stores that earlier
versions wrote, and damaged files. (What every backend must do is in store_contract/.)"""

from __future__ import annotations

import asyncio
import json
import os
import sqlite3
import subprocess
from pathlib import Path

import pytest
from typer.testing import CliRunner

from imagepipe.cli import app
from imagepipe.durable import StoreMissing, StoreOptions, open_store
from imagepipe.durable.errors import StoreCorrupt, StoreNewer, StoreUnusable
from imagepipe.durable.records import ChildColumns, Lease, Settlement, WriteBatch
from imagepipe.durable.sqlite_schema import APPLICATION_ID, MIGRATIONS, SCHEMA_VERSION

from conftest import cli_argv, cli_env

FIXTURES = Path(__file__).parent / "fixtures"


def invoke(*args: str) -> object:
    return CliRunner().invoke(app, list(args), catch_exceptions=False)


def previous_main_store(path: Path) -> Path:
    """The store that imagepipe at 1e24929 (schema 2) left, rebuilt from its dump."""
    with sqlite3.connect(path) as db:
        db.executescript((FIXTURES / "main-schema2.sql").read_text())
    return path


async def test_schema_is_versioned(db_path: Path) -> None:
    await (await open_store(str(db_path))).close()
    with sqlite3.connect(db_path) as conn:
        assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION == 7
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


async def test_a_settled_run_stores_its_counts_and_migration_4_fills_them_in(
    db_path: Path,
) -> None:
    conn = sqlite3.connect(db_path, isolation_level=None)
    for migration in MIGRATIONS[:3]:  # a store as the previous main left it
        migration(conn)
    conn.execute("PRAGMA user_version = 3")
    conn.execute(f"PRAGMA application_id = {APPLICATION_ID}")
    rows = [("r", None, "resolved"), ("r.0", "r", "resolved"), ("r.1", "r", "resolved")]
    rows += [("p", None, "pending"), ("p.0", "p", "resolved"), ("p.1", "p", "pending")]
    conn.executemany(
        "INSERT INTO promises (id, parent_id, func, args, state, created_at)"
        " VALUES (?, ?, 'f', '{}', ?, 1.0)",
        rows,
    )
    conn.close()
    store = await open_store(str(db_path))
    roots = {r.id: r.counts for r in await store.roots()}
    assert roots == {"r": {"resolved": 2}, "p": {"resolved": 1, "pending": 1}}
    await store.apply(WriteBatch(settlements=[Settlement("p.1", "resolved", "1", None, 2.0)]))
    await store.apply(WriteBatch(settlements=[Settlement("p", "resolved", "2", None, 2.0)]))
    await store.close()
    with sqlite3.connect(db_path) as db:
        stored = dict(db.execute("SELECT id, child_counts FROM promises WHERE parent_id IS NULL"))
        db.execute("DELETE FROM promises WHERE parent_id IS NOT NULL")
    assert {k: json.loads(v) for k, v in stored.items()} == {
        "r": {"resolved": 2},
        "p": {"resolved": 2},
    }
    # listing reads what was stored: it counts no branch of a settled run again
    store = await open_store(str(db_path))
    assert {r.id: r.counts for r in await store.roots()} == {
        "r": {"resolved": 2},
        "p": {"resolved": 2},
    }
    await store.close()


async def test_migration_5_serves_the_workers_queue_without_reading_settled_branches(
    db_path: Path,
) -> None:
    """A claim and the check whether a run's last branch has settled read the pending
    branches only. Before migration 5 both walked every settled branch of the run, so a
    detached run took time quadratic in its size to work off (20,000 branches: 20 s)."""
    conn = sqlite3.connect(db_path, isolation_level=None)
    for migration in MIGRATIONS[:4]:  # a store as the previous main left it
        migration(conn)
    conn.execute("PRAGMA user_version = 4")
    conn.execute(f"PRAGMA application_id = {APPLICATION_ID}")
    conn.execute(
        "INSERT INTO promises (id, func, args, options, state, created_at)"
        " VALUES ('r', 'f', '{}', '{\"detached\": true}', 'pending', 1.0)"
    )
    settled = [(f"r.{i}", "r", i, "resolved") for i in range(3_000)]
    conn.executemany(
        "INSERT INTO promises (id, parent_id, seq, func, args, state, created_at)"
        " VALUES (?, ?, ?, 'f', '{}', ?, 1.0)",
        [*settled, ("r.3000", "r", 3_000, "pending"), ("r.3001", "r", 3_001, "pending")],
    )
    conn.close()
    store = await open_store(str(db_path))
    # SQLite's own count of the work a statement does: every 100 virtual-machine steps.
    # Walking 3,000 settled rows takes tens of thousands; reading two pending ones, a few.
    steps = [0]
    store._db.set_progress_handler(lambda: steps.__setitem__(0, steps[0] + 1) or 0, 100)  # type: ignore[attr-defined]
    assert await store.any_pending("r")
    worker = Lease("worker-x", "x", os.getpid(), "host")
    claims = await store.claim(worker, limit=16, stale_after=30.0)
    assert steps[0] < 30, f"{steps[0] * 100} steps: the settled branches were read"
    steps[0] = 0
    # a claim for one run (a `resume` of a detached run) walks the same indexes
    again = await store.claim(worker, limit=16, stale_after=-1, run_id="r")
    store._db.set_progress_handler(None, 0)  # type: ignore[attr-defined]
    await store.close()
    assert [c.record.id for c in claims] == ["r.3000", "r.3001"]
    assert [c.record.id for c in again] == ["r.3000", "r.3001"]
    assert steps[0] < 30, f"{steps[0] * 100} steps: one run's claim read settled branches"


async def test_a_version_1_store_is_migrated_with_its_runs_kept(db_path: Path) -> None:
    conn = sqlite3.connect(db_path, isolation_level=None)
    MIGRATIONS[0](conn)  # a store as imagepipe 0.1.0 left it
    conn.execute("PRAGMA user_version = 1")
    conn.execute(f"PRAGMA application_id = {APPLICATION_ID}")
    conn.execute(
        "INSERT INTO promises (id, func, args, state, value, attempts, created_at)"
        " VALUES ('r', 'wf', '[1, \"a\"]', 'resolved', '42', 2, 1.5)"
    )
    conn.close()
    store = await open_store(str(db_path))
    record = await store.get("r")
    assert record is not None
    assert (record.state, record.value, record.attempts, record.created_at) == (
        "resolved",
        42,
        2,
        1.5,
    )
    assert record.args == {"version": 0, "positional": [1, "a"]}
    await store.close()
    with sqlite3.connect(db_path) as conn, pytest.raises(sqlite3.IntegrityError, match="CHECK"):
        conn.execute(
            "INSERT INTO promises (id, func, args, state, created_at) VALUES (?, ?, ?, ?, ?)",
            ("x", "f", "[]", "done", 0),
        )


def test_a_store_written_by_the_previous_main_is_migrated_and_resumed(
    db_path: Path, tmp_path: Path
) -> None:
    previous_main_store(db_path)
    # The killed run: 4 branches resolved, both abstract ones cut off in their back-off.
    shown = json.loads(invoke("show", "killed-run", "--json").stdout)  # type: ignore[attr-defined]
    assert [b["state"] for b in shown["branches"]] == ["resolved"] * 4 + ["pending"] * 2
    with sqlite3.connect(db_path) as db:
        assert db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
        args = db.execute("SELECT args FROM promises WHERE id = 'killed-run.4'").fetchone()[0]
    assert json.loads(args) == {"version": 0, "positional": ["a red fox", "abstract", 0, True]}

    # resumed by this code, through the real CLI (the dead owner's lease is taken over)
    proc = subprocess.run(
        cli_argv("resume", "killed-run", "--json"),
        env=cli_env(db_path, IMAGEPIPE_TIME_SCALE="0.01"),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert result["state"] == "resolved"
    images = result["images"]
    assert [(i["style"], i["attempts"], i["replayed"]) for i in images] == [
        ("photorealistic", 1, True),
        ("photorealistic", 1, True),
        ("cartoon", 1, True),
        ("cartoon", 1, True),
        ("abstract", 2, False),
        ("abstract", 2, False),
    ]
    assert images[0]["url"] == "https://images.example.com/photorealistic-cc830b54.png"
    listed = json.loads(invoke("list", "--json").stdout)  # type: ignore[attr-defined]
    assert {r["id"]: r["state"] for r in listed} == {
        "done-run": "resolved",
        "failed-run": "failed",
        "killed-run": "resolved",
    }
    # ...and the failed run is retried by name, from its positional arguments
    retried = invoke("retry", "failed-run", "--json")
    assert retried.exit_code == 0  # type: ignore[attr-defined]


async def test_newer_schema_is_refused(db_path: Path) -> None:
    await (await open_store(str(db_path))).close()
    with sqlite3.connect(db_path) as conn:
        conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    with pytest.raises(StoreNewer, match="newer than this code knows"):
        await open_store(str(db_path))


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda p: p.write_text("my notes\n"), "not a SQLite database"),
        (lambda p: p.mkdir(), "is a directory"),
        (lambda p: os.mkfifo(p), "not a regular file"),
    ],
)
async def test_a_path_that_cannot_be_a_store_is_refused_and_left_untouched(
    tmp_path: Path, make: object, message: str
) -> None:
    path = tmp_path / "thing"
    make(path)  # type: ignore[operator]
    before = sorted(p.name for p in tmp_path.iterdir())
    with pytest.raises(StoreUnusable, match=message):
        await open_store(str(path))
    assert sorted(p.name for p in tmp_path.iterdir()) == before


async def test_dev_null_is_refused_and_nothing_is_created() -> None:
    Path("/dev/null-journal").unlink(missing_ok=True)  # left by an older imagepipe, if any
    with pytest.raises(StoreUnusable, match="not a regular file"):
        await open_store("/dev/null")
    assert not Path("/dev/null-journal").exists()


async def test_foreign_sqlite_database_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "other.db"
    with sqlite3.connect(path) as conn:
        conn.execute("CREATE TABLE t (x)")
    with pytest.raises(StoreUnusable, match="another program"):
        await open_store(str(path))


async def test_missing_directory_or_store_is_refused(tmp_path: Path) -> None:
    with pytest.raises(StoreUnusable, match="does not exist"):
        await open_store(str(tmp_path / "nope" / "x.db"))
    assert not (tmp_path / "nope").exists()
    with pytest.raises(StoreMissing):
        await open_store(str(tmp_path / "x.db"), StoreOptions(create=False))
    assert not (tmp_path / "x.db").exists()


async def test_sqlite_urls_and_plain_paths_name_the_same_store(tmp_path: Path) -> None:
    path = tmp_path / "s.db"
    for url in (f"sqlite://{path}", str(path)):
        store = await open_store(url)
        assert store.where == str(path)
        await store.close()


def test_damaged_rows_are_a_corrupt_store_error_never_a_traceback(db_path: Path) -> None:
    invoke("run", "a cat", "--id", "r", "--json")
    with sqlite3.connect(db_path) as db:
        db.execute("UPDATE promises SET value = '{not json' WHERE id = 'r.0'")
        db.execute("UPDATE promises SET error = x'00ff1b5b324a' WHERE id = 'r.1'")

    async def read() -> None:
        store = await open_store(str(db_path))
        try:
            with pytest.raises(StoreCorrupt, match=r"r\.0"):
                await store.children("r")
            with pytest.raises(StoreCorrupt, match=r"r\.0.*damaged value"):
                await ChildColumns.collect(store.where, store.child_rows("r"))
        finally:
            await store.close()

    asyncio.run(read())
    result = invoke("show", "r")
    assert result.exit_code == 74  # type: ignore[attr-defined]
    assert result.stderr.count("\n") == 1  # type: ignore[attr-defined]
    assert "corrupt" in result.stderr or "damaged" in result.stderr  # type: ignore[attr-defined]


def test_two_damaged_rows_that_would_make_valid_json_together_are_still_corrupt(
    db_path: Path,
) -> None:
    """Each row's columns are decoded on their own: joined into one JSON text, the value of
    r.0 and the arguments of r.1 (each damaged) made two well-formed rows, and the resume
    replayed a value that no one wrote (then stopped at a replay mismatch, exit 65)."""
    invoke("run", "a cat", "--id", "r", "--json")
    with sqlite3.connect(db_path) as db:
        db.execute(
            "UPDATE promises SET state = 'pending', value = NULL, settled_at = NULL,"
            " child_counts = NULL WHERE id = 'r'"
        )
        db.execute("""UPDATE promises SET value = '{"v":"' WHERE id = 'r.0'""")
        db.execute("""UPDATE promises SET args = 'x"}],[{"b":2}' WHERE id = 'r.1'""")
    result = invoke("resume", "r")
    assert result.exit_code == 74  # type: ignore[attr-defined]
    assert result.stderr.count("\n") == 1  # type: ignore[attr-defined]
    assert "'r.0', holds a damaged value" in result.stderr  # type: ignore[attr-defined]


def test_a_damaged_store_that_needs_migrating_is_not_migrated_by_a_read(db_path: Path) -> None:
    conn = sqlite3.connect(db_path, isolation_level=None)
    for migration in MIGRATIONS[:3]:  # the previous main's schema
        migration(conn)
    conn.execute("PRAGMA user_version = 3")
    conn.execute(f"PRAGMA application_id = {APPLICATION_ID}")
    conn.execute("PRAGMA journal_mode=WAL")
    conn.executemany(
        "INSERT INTO promises (id, parent_id, func, args, state, created_at)"
        " VALUES (?, ?, 'f', '{}', 'resolved', 1.0)",
        [("r", None), ("r.0", "r")],
    )
    conn.execute("PRAGMA ignore_check_constraints = 1")
    conn.execute("UPDATE promises SET state = 'bogus' WHERE id = 'r.0'")
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    conn.close()
    before = db_path.read_bytes()
    for command in (("list",), ("show", "r"), ("show", "r", "--json")):
        result = invoke(*command)
        assert result.exit_code == 74, (command, result.stdout)  # type: ignore[attr-defined]
        assert "is corrupt" in result.stderr  # type: ignore[attr-defined]
        assert db_path.read_bytes() == before, command


@pytest.mark.parametrize(
    "damage", ['{"style":"cartoon"}', '{"duration_ms":"abc"}', '{"duration_ms":1e999}']
)
def test_a_damaged_duration_is_a_corrupt_store_not_a_traceback(db_path: Path, damage: str) -> None:
    assert invoke("run", "a cat", "--id", "r", "-s", "cartoon", "--json").exit_code == 0  # type: ignore[attr-defined]
    with sqlite3.connect(db_path) as db:
        db.execute("UPDATE promises SET value = ? WHERE id = 'r.0'", (damage,))
    for command in (
        ("resume", "r", "--json"),
        ("resume", "r"),
        ("run", "a cat", "--id", "r", "-s", "cartoon"),
    ):
        result = invoke(*command)
        assert result.exit_code == 74, (command, result.stdout)  # type: ignore[attr-defined]
        assert "'r.0' holds a damaged value" in result.stderr  # type: ignore[attr-defined]
        assert result.stderr.count("\n") == 1  # type: ignore[attr-defined]


@pytest.mark.parametrize("counts", ['{"resolved":-5}', '{"done":1}', "[1]", "{oops"])
def test_damaged_stored_counts_are_a_corrupt_store(db_path: Path, counts: str) -> None:
    assert invoke("run", "a cat", "--id", "r", "-s", "cartoon", "--json").exit_code == 0  # type: ignore[attr-defined]
    with sqlite3.connect(db_path) as db:
        db.execute("UPDATE promises SET child_counts = ? WHERE id = 'r'", (counts,))
    result = invoke("list")
    assert result.exit_code == 74, result.stdout  # type: ignore[attr-defined]
    assert "run 'r', holds a damaged" in result.stderr  # type: ignore[attr-defined]
