"""The SQLite store: idempotent create, first settle wins, durable attempts, schema checks."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from imagepipe.durable import ErrorInfo, SQLiteStore
from imagepipe.durable.sqlite import APPLICATION_ID, MIGRATIONS, SCHEMA_VERSION
from imagepipe.durable.store import AttemptStart, NewPromise, Settlement, WriteBatch
from imagepipe.errors import StoreError, UnusableStore


def test_create_is_idempotent_and_returns_the_stored_promise(store: SQLiteStore) -> None:
    first, created = store.create("r.0", func="f", args=["a", 1], parent_id="r", seq=0)
    again, created_again = store.create("r.0", func="g", args=["other"], parent_id="r", seq=0)
    assert created is True
    assert created_again is False
    assert again == first
    assert again.func == "f"
    assert again.args == ["a", 1]


def test_first_settle_wins(store: SQLiteStore) -> None:
    store.create("p", func="f", args=[])
    resolved = store.resolve("p", {"url": "u"})
    rejected = store.reject("p", ErrorInfo("E", "late"))
    resolved_again = store.resolve("p", {"url": "other"})
    assert resolved.state == rejected.state == resolved_again.state == "resolved"
    assert rejected.value == {"url": "u"}
    assert rejected.error is None


def test_a_batch_applies_in_order_and_first_settle_wins_inside_it(store: SQLiteStore) -> None:
    store.create("r", func="wf", args=[])
    store.create("r.1", func="f", args=[1], parent_id="r", seq=1)
    store.resolve("r.1", {"url": "first"})
    batch = WriteBatch(
        creates=[NewPromise("r.0", "r", 0, "f", "[0]", 1.0)],
        starts=[AttemptStart(1, "r.0")],
        settlements=[
            Settlement("resolved", '{"url":"zero"}', None, 2.0, "r.0"),
            Settlement("rejected", None, '{"message":"m","type":"E"}', 2.0, "r.1"),
        ],
    )
    lost = store.apply(batch)
    store.commit()
    assert lost.keys() == {"r.1"}, "r.1 was settled before: its outcome stands"
    assert (lost["r.1"].state, lost["r.1"].value) == ("resolved", {"url": "first"})
    zero, one = store.children("r")
    assert (zero.state, zero.value, zero.attempts) == ("resolved", {"url": "zero"}, 1)
    assert (one.state, one.value) == ("resolved", {"url": "first"})


def test_a_batch_that_would_create_an_existing_branch_is_refused_whole(
    store: SQLiteStore, db_path: Path
) -> None:
    store.create("r", func="wf", args=[])
    store.create("r.0", func="f", args=[0], parent_id="r", seq=0)
    store.commit()
    store.create("r.9", func="f", args=[9], parent_id="r", seq=9)  # same transaction
    batch = WriteBatch(creates=[NewPromise("r.0", "r", 0, "f", "[0]", 1.0)])
    with pytest.raises(StoreError, match="already holds branches of run r"):
        store.apply(batch)
    with pytest.raises(StoreError):  # what the transaction held is gone: no commit lies
        store.commit()
    ids = sqlite3.connect(db_path).execute("SELECT id FROM promises ORDER BY id").fetchall()
    assert ids == [("r",), ("r.0",)]


def test_writes_are_durable_only_after_commit(store: SQLiteStore, db_path: Path) -> None:
    store.create("p", func="f", args=[])
    other = sqlite3.connect(db_path)
    assert other.execute("SELECT count(*) FROM promises").fetchone()[0] == 0
    store.commit()
    assert other.execute("SELECT count(*) FROM promises").fetchone()[0] == 1


def test_attempts_are_counted_and_failures_kept(store: SQLiteStore, db_path: Path) -> None:
    store.create("p", func="f", args=[])
    assert store.start_attempt("p") == 1
    store.fail_attempt("p", 1, ErrorInfo("Timeout", "slow"), started_at=100.0)
    assert store.start_attempt("p") == 2
    store.resolve("p", 42)
    store.commit()
    store.close()
    reopened = SQLiteStore.open(db_path)
    record = reopened.get("p")
    assert record is not None
    assert (record.attempts, record.failures, record.value) == (2, 1, 42)
    history = reopened.attempts("p")
    assert [a.attempt for a in history] == [1]  # only failed attempts have a history row
    assert history[0].error == ErrorInfo("Timeout", "slow")
    assert history[0].started_at == 100.0
    assert history[0].finished_at is not None
    reopened.close()


def test_error_round_trips_intact(store: SQLiteStore) -> None:
    error = ErrorInfo("InvalidRequest", "l'image « refusée »\nsecond line", retryable=False)
    store.create("p", func="f", args=[])
    assert store.reject("p", error).error == error


def test_children_come_in_launch_order(store: SQLiteStore) -> None:
    store.create("r", func="wf", args=[])
    for seq in (2, 0, 1):
        store.create(f"r.{seq}", func="f", args=[seq], parent_id="r", seq=seq)
    assert [c.id for c in store.children("r")] == ["r.0", "r.1", "r.2"]
    assert [r.id for r in store.roots()] == ["r"]
    assert store.child_counts(["r"]) == {"r": {"pending": 3}}


def test_reopen_sets_a_rejected_promise_pending_and_keeps_history(store: SQLiteStore) -> None:
    store.create("p", func="f", args=[])
    store.start_attempt("p")
    store.fail_attempt("p", 1, ErrorInfo("E", "boom"), started_at=0.0)
    store.reject("p", ErrorInfo("E", "boom"))
    store.reopen("p")
    record = store.get("p")
    assert record is not None
    assert (record.state, record.attempts, record.failures) == ("pending", 1, 0)
    assert store.attempts("p")[0].error == ErrorInfo("E", "boom")


def test_schema_is_versioned(store: SQLiteStore, db_path: Path) -> None:
    conn = sqlite3.connect(db_path)
    assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_a_version_1_store_is_migrated_with_its_runs_kept(db_path: Path) -> None:
    conn = sqlite3.connect(db_path, isolation_level=None)
    MIGRATIONS[0](conn)  # a store as imagepipe 0.1.0 left it
    conn.execute("PRAGMA user_version = 1")
    conn.execute(f"PRAGMA application_id = {APPLICATION_ID}")
    conn.execute(
        "INSERT INTO promises (id, func, args, state, value, attempts, created_at)"
        " VALUES ('r', 'wf', '[]', 'resolved', '42', 2, 1.5)"
    )
    conn.close()

    store = SQLiteStore.open(db_path)
    record = store.get("r")
    assert record is not None
    assert (record.state, record.value, record.attempts, record.created_at) == (
        "resolved",
        42,
        2,
        1.5,
    )
    assert [r.id for r in store.roots()] == ["r"]
    store.close()
    conn = sqlite3.connect(db_path)
    assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION == 2
    with pytest.raises(sqlite3.IntegrityError, match="CHECK"):  # the state is still checked
        conn.execute(
            "INSERT INTO promises (id, func, args, state, created_at) VALUES (?, ?, ?, ?, ?)",
            ("x", "f", "[]", "done", 0),
        )


def test_newer_schema_is_refused(db_path: Path) -> None:
    SQLiteStore.open(db_path).close()
    conn = sqlite3.connect(db_path)
    conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    conn.close()
    with pytest.raises(StoreError, match="newer than this imagepipe"):
        SQLiteStore.open(db_path)


def test_not_sqlite_is_refused_and_left_untouched(tmp_path: Path) -> None:
    path = tmp_path / "notes.txt"
    path.write_text("my notes\n")
    with pytest.raises(UnusableStore, match="not a SQLite database"):
        SQLiteStore.open(path)
    assert path.read_text() == "my notes\n"


def test_foreign_sqlite_database_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "other.db"
    conn = sqlite3.connect(path)
    conn.execute("CREATE TABLE t (x)")
    conn.commit()
    conn.close()
    with pytest.raises(UnusableStore, match="another program"):
        SQLiteStore.open(path)


def test_missing_directory_is_refused(tmp_path: Path) -> None:
    with pytest.raises(UnusableStore, match="does not exist"):
        SQLiteStore.open(tmp_path / "nope" / "x.db")
    assert not (tmp_path / "nope").exists()
