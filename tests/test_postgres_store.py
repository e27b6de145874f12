"""What the PostgreSQL store does beyond the contract suite: opening by URL, one-line
errors without the password, migrations under an advisory lock, lock timeouts, damaged
rows. (The contract suite in tests/store_contract runs on PostgreSQL too.)"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import time

import psycopg
import pytest
from postgres_server import PostgresServer, database_name

from imagepipe.durable import LeaseHeld, StoreMissing, StoreOptions, open_store
from imagepipe.durable.errors import StoreBusy, StoreCorrupt, StoreNewer, StoreUnusable
from imagepipe.durable.postgres import PostgresStore
from imagepipe.durable.postgres_errors import describe_url
from imagepipe.durable.postgres_schema import SCHEMA_VERSION
from imagepipe.durable.records import (
    ChildColumns,
    Fence,
    Lease,
    NewPromise,
    Settlement,
    WriteBatch,
    encode_args,
)

SECRET = "s3cr3t-pw"


def with_password(url: str) -> str:
    """The URL with a password (the test server trusts every login and ignores it)."""
    return url.replace("postgres@", f"postgres:{SECRET}@", 1)


def new(promise_id: str, parent: str | None = None, seq: int | None = None) -> NewPromise:
    return NewPromise(promise_id, parent, seq, "f", encode_args({}), 1.0)


@pytest.mark.parametrize("scheme", ["postgresql://", "postgres://"])
async def test_either_scheme_opens_postgres_and_names_it_without_the_password(
    postgres_url: str, scheme: str
) -> None:
    url = with_password(postgres_url).replace("postgresql://", scheme, 1)
    store = await open_store(url)
    try:
        assert isinstance(store, PostgresStore)
        assert SECRET not in store.where
        assert store.where.startswith("postgres@")
        assert store.where.endswith("/" + database_name(postgres_url))
    finally:
        await store.close()


def test_describe_url_gives_user_host_port_and_database() -> None:
    assert describe_url(f"postgresql://bob:{SECRET}@db.local:5433/runs") == (
        "bob@db.local:5433/runs"
    )
    assert describe_url("postgres://db.local/runs") == "db.local/runs"
    assert SECRET not in describe_url(f"postgresql://bob:{SECRET}@db.local:x:y/runs?foo")


@pytest.mark.parametrize(
    ("url", "reason"),
    [
        (f"postgresql://bob:{SECRET}@127.0.0.1:1/runs", "refused"),
        (f"postgresql://bob:{SECRET}@127.0.0.1:notaport/runs", "port"),
    ],
)
async def test_an_unreachable_or_invalid_url_is_one_line_without_the_password(
    url: str, reason: str
) -> None:
    with pytest.raises(StoreUnusable) as refused:
        await open_store(url)
    message = str(refused.value)
    assert "\n" not in message
    assert SECRET not in message
    assert reason in message.lower()
    assert message.startswith("the store bob@127.0.0.1:")


async def test_a_missing_database_is_unusable_not_created(postgres_url: str) -> None:
    name = database_name(postgres_url)
    url = with_password(postgres_url).replace(f"/{name}?", f"/{name}_gone?", 1)
    with pytest.raises(StoreUnusable) as refused:
        await open_store(url)
    message = str(refused.value)
    assert "does not exist" in message
    assert SECRET not in message
    assert "\n" not in message


async def test_without_create_an_empty_database_is_missing_and_left_empty(
    postgres_url: str, postgres_server: PostgresServer
) -> None:
    with pytest.raises(StoreMissing):
        await open_store(postgres_url, StoreOptions(create=False))
    rows = postgres_server.execute(postgres_url, "SELECT to_regnamespace('imagepipe')::text")
    assert rows == [(None,)]


async def test_stores_opened_at_once_migrate_once(
    postgres_url: str, postgres_server: PostgresServer
) -> None:
    stores = await asyncio.gather(*(open_store(postgres_url) for _ in range(4)))
    for store in stores:
        await store.close()
    rows = postgres_server.execute(postgres_url, "SELECT version FROM imagepipe.schema_version")
    assert rows == [(SCHEMA_VERSION,)]


async def test_a_newer_schema_is_refused(
    postgres_url: str, postgres_server: PostgresServer
) -> None:
    await (await open_store(postgres_url)).close()
    postgres_server.execute(postgres_url, "UPDATE imagepipe.schema_version SET version = 99")
    with pytest.raises(StoreNewer) as refused:
        await open_store(postgres_url)
    assert (refused.value.found, refused.value.known) == (99, SCHEMA_VERSION)


async def test_another_programs_imagepipe_schema_is_refused(
    postgres_url: str, postgres_server: PostgresServer
) -> None:
    postgres_server.execute(
        postgres_url, "CREATE SCHEMA imagepipe; CREATE TABLE imagepipe.things (x int)"
    )
    with pytest.raises(StoreUnusable, match="another program"):
        await open_store(postgres_url)


async def test_a_damaged_row_is_corrupt_not_a_traceback(
    postgres_url: str, postgres_server: PostgresServer
) -> None:
    store = await open_store(postgres_url)
    try:
        await store.apply(WriteBatch(creates=[new("r"), new("r.0", "r", 0)]))
        postgres_server.execute(
            postgres_url, "UPDATE imagepipe.promises SET value = '{oops', state = 'resolved'"
        )
        with pytest.raises(StoreCorrupt, match="damaged value"):
            await store.get("r.0")
        with pytest.raises(StoreCorrupt):
            await store.children("r")
        with pytest.raises(StoreCorrupt, match=r"r\.0.*damaged value"):
            await ChildColumns.collect(store.where, store.child_rows("r"))
    finally:
        await store.close()


async def test_a_batch_waiting_on_a_held_lease_row_is_busy_after_the_timeout(
    postgres_url: str,
) -> None:
    store = await open_store(postgres_url, StoreOptions(busy_timeout=0.2))
    holder = await psycopg.AsyncConnection.connect(postgres_url)
    try:
        lease = await store.acquire_lease(
            Lease("r", "a", os.getpid(), socket.gethostname()),
            stale_after=10,
            holder_gone=lambda h: False,
        )
        # Another session takes the lease row (as a concurrent takeover would) and sits.
        await holder.execute("SELECT * FROM imagepipe.leases WHERE key = 'r' FOR UPDATE")
        started = time.monotonic()
        with pytest.raises(StoreBusy):
            await store.apply(WriteBatch(fence=Fence("r", lease.epoch), creates=[new("r")]))
        assert time.monotonic() - started < 3
        await holder.rollback()
        await store.apply(WriteBatch(fence=Fence("r", lease.epoch), creates=[new("r")]))
        assert await store.get("r") is not None
    finally:
        await holder.close()
        await store.close()


async def test_children_come_back_in_launch_order_by_number_not_text(
    postgres_url: str,
) -> None:
    store = await open_store(postgres_url)
    try:
        kids = [new(f"r.{n}", "r", n) for n in reversed(range(12))]
        await store.apply(WriteBatch(creates=[new("r"), *kids]))
        assert [c.seq for c in await store.children("r")] == list(range(12))
    finally:
        await store.close()


@pytest.mark.parametrize("key_was", ["new", "released"])
async def test_racing_acquirers_leave_exactly_one_holder(postgres_url: str, key_was: str) -> None:
    stores = await asyncio.gather(*(open_store(postgres_url) for _ in range(4)))
    epoch = 1
    try:
        if key_was == "released":
            first = Lease("race", "first", os.getpid(), socket.gethostname())
            await stores[0].release_lease(
                await stores[0].acquire_lease(first, stale_after=10, holder_gone=lambda h: False)
            )
            epoch = 2
        claims = [Lease("race", f"owner{n}", os.getpid(), socket.gethostname()) for n in range(4)]
        outcomes = await asyncio.gather(
            *(
                store.acquire_lease(claim, stale_after=10, holder_gone=lambda h: False)
                for store, claim in zip(stores, claims, strict=True)
            ),
            return_exceptions=True,
        )
        won = [o for o in outcomes if isinstance(o, Lease)]
        assert len(won) == 1, outcomes
        assert all(isinstance(o, LeaseHeld) for o in outcomes if o not in won)
        holder = await stores[0].lease_holder("race")
        assert holder is not None
        assert (holder.owner, holder.epoch) == (won[0].owner, epoch)
    finally:
        for store in stores:
            await store.close()


async def test_racing_settlements_first_wins_and_the_others_read_it(postgres_url: str) -> None:
    stores = await asyncio.gather(*(open_store(postgres_url) for _ in range(4)))
    try:
        await stores[0].apply(WriteBatch(creates=[new("r"), new("r.0", "r", 0)]))
        answers = await asyncio.gather(
            *(
                store.apply(
                    WriteBatch(settlements=[Settlement("r.0", "resolved", f'"{n}"', None, 2.0)])
                )
                for n, store in enumerate(stores)
            )
        )
        record = await stores[0].get("r.0")
        assert record is not None
        winners = [n for n, lost in enumerate(answers) if not lost]
        assert winners == [int(record.value)]
        for lost in answers:
            if lost:
                assert (lost["r.0"].state, lost["r.0"].value) == ("resolved", record.value)
    finally:
        for store in stores:
            await store.close()


async def test_a_watcher_wakes_at_another_stores_write_not_at_its_timeout(
    postgres_url: str,
) -> None:
    import asyncio
    import time

    from imagepipe.durable import open_store
    from imagepipe.durable.records import NewPromise, WriteBatch, encode_args

    watcher, writer = await open_store(postgres_url), await open_store(postgres_url)
    try:
        assert watcher.notifies
        await watcher.wait_for_progress("r", 0.01)  # LISTEN, nothing to hear yet
        root = NewPromise("r", None, None, "wf", encode_args({}), 1.0)
        other = NewPromise("other", None, None, "wf", encode_args({}), 1.0)

        async def write_soon() -> None:
            await asyncio.sleep(0.2)
            await writer.apply(WriteBatch(creates=[other]))  # another run: no wake-up
            await writer.apply(
                WriteBatch(creates=[root, NewPromise("r.0", "r", 0, "f", "{}", 1.0)])
            )

        started = time.monotonic()
        writing = asyncio.create_task(write_soon())
        await watcher.wait_for_progress("r", 30)
        waited = time.monotonic() - started
        await writing
        assert 0.2 <= waited < 10, waited  # woken by the commit, not by the 30 s timeout
    finally:
        await watcher.close()
        await writer.close()


async def test_a_version_1_store_is_migrated_with_its_settled_runs_counted(
    postgres_url: str, postgres_server: PostgresServer
) -> None:
    from imagepipe.durable.postgres_schema import MIGRATIONS

    for statement in MIGRATIONS[0]:  # a store as the previous main left it: version 1
        postgres_server.execute(postgres_url, statement)
    postgres_server.execute(postgres_url, "UPDATE imagepipe.schema_version SET version = 1")
    rows = [("r", None, "resolved"), ("r.0", "r", "resolved"), ("r.1", "r", "rejected")]
    rows += [("p", None, "pending"), ("p.0", "p", "resolved"), ("p.1", "p", "pending")]
    values = ", ".join(
        f"('{i}', {'NULL' if p is None else repr(p)}, 'f', '{{}}', '{s}', 1.0)" for i, p, s in rows
    )
    postgres_server.execute(
        postgres_url,
        "INSERT INTO imagepipe.promises (id, parent_id, func, args, state, created_at)"
        f" VALUES {values}",
    )
    store = await open_store(postgres_url)
    try:
        counts = {r.id: r.counts for r in await store.roots()}
        assert counts == {"r": {"resolved": 1, "rejected": 1}, "p": {"resolved": 1, "pending": 1}}
    finally:
        await store.close()
    stored = dict(
        postgres_server.execute(
            postgres_url,
            "SELECT id, child_counts FROM imagepipe.promises WHERE parent_id IS NULL",
        )
    )
    assert stored["p"] is None  # a pending run is counted when listed
    assert json.loads(stored["r"]) == {"resolved": 1, "rejected": 1}
    version = postgres_server.execute(postgres_url, "SELECT version FROM imagepipe.schema_version")
    assert version == [(SCHEMA_VERSION,)]


async def test_a_claim_leaves_a_branch_leased_after_its_snapshot_alone(postgres_url: str) -> None:
    """The race behind branches claimed twice, played in order. A rival claimer has leased
    branch d.0 but not committed yet, so this claim's snapshot sees the branch free and
    picks it. The claim's lease upsert then waits for the rival's row, and once the rival
    commits it re-checks the lease as committed: the branch is the rival's, and this claim
    leaves it alone rather than lease it a second time."""
    root = NewPromise("d", None, None, "f", encode_args({}), 1.0, '{"detached":true}')
    store = await open_store(postgres_url)
    rival = await psycopg.AsyncConnection.connect(postgres_url)
    watcher = await psycopg.AsyncConnection.connect(postgres_url, autocommit=True)
    try:
        await store.apply(WriteBatch(creates=[root, new("d.0", "d", 0)]))
        await rival.execute(
            "INSERT INTO imagepipe.leases (key, owner, pid, host, heartbeat_at, epoch)"
            " VALUES ('d.0', 'rival', 1, 'elsewhere',"
            " extract(epoch FROM clock_timestamp()), 1)"
        )
        me = Lease("worker-me", "me", os.getpid(), socket.gethostname())
        claiming = asyncio.ensure_future(store.claim(me, limit=4, stale_after=30.0))
        # Until the claim waits on the rival's lock: there is no event for that to await.
        deadline = time.monotonic() + 10
        while not await _waiting_for_a_lock(watcher):
            assert not claiming.done(), "the claim did not wait for the rival's lease"
            assert time.monotonic() < deadline, "the claim never reached the rival's lease"
            await asyncio.sleep(0.01)
        await rival.commit()
        assert await claiming == []
        holders = await store.held_leases("d.")
        assert [(h.key, h.owner, h.epoch) for h in holders] == [("d.0", "rival", 1)]
    finally:
        await rival.close()
        await watcher.close()
        await store.close()


async def _waiting_for_a_lock(conn: psycopg.AsyncConnection[tuple[object, ...]]) -> bool:
    cur = await conn.execute(
        "SELECT count(*) FROM pg_stat_activity"
        " WHERE datname = current_database() AND wait_event_type = 'Lock'"
    )
    row = await cur.fetchone()
    return row is not None and row[0] == 1


async def test_a_write_whose_commit_answer_was_lost_is_looked_up_not_written_again(
    postgres_url: str,
) -> None:
    """The connection is lost after the server committed a batch and before the client
    heard so: the store asks the server (``txid_status``) and returns as if it had heard;
    writing the batch again would insert its failed attempt twice (a conflict)."""
    from pg_proxy import CommitCutter

    from imagepipe.durable.records import AttemptFailure, ErrorInfo

    with CommitCutter(postgres_url) as proxy:
        store = await open_store(proxy.url)
        try:
            await store.apply(WriteBatch(creates=[new("r"), new("r.0", "r", 0)]))
            error = ErrorInfo("E", "x").to_json()
            batch = WriteBatch(
                failures=[AttemptFailure("r.0", 1, 1.0, 2.0, error)],
                settlements=[Settlement("r.0", "resolved", '"ok"', None, 3.0)],
            )
            proxy.cut_next_commit()
            assert await store.apply(batch) == {}
            assert proxy.cuts == 1
            record = await store.get("r.0")
            assert record is not None
            assert (record.state, record.failures) == ("resolved", 1)
            assert len(await store.failed_attempts("r")) == 1
        finally:
            await store.close()


async def test_a_session_paused_inside_a_transaction_does_not_hold_the_lease_row(
    postgres_url: str,
) -> None:
    """A process stopped in the middle of a transaction (SIGSTOP between a lease write and
    its COMMIT) held the lease row locked for as long as it was stopped: nobody could take
    the run over. With ``stalled_after``, the server ends such a session and the lock goes."""
    from imagepipe.durable.lease import holder_gone

    paused = await open_store(postgres_url, StoreOptions(stalled_after=0.3, busy_timeout=5))
    other = await open_store(postgres_url, StoreOptions(busy_timeout=5))
    try:
        first = Lease("stall", "a", 1, "elsewhere")
        await paused.acquire_lease(first, stale_after=0.1, holder_gone=holder_gone)
        async with paused._pool.connection() as conn:  # the paused process's own session
            await conn.execute("BEGIN")
            await conn.execute("UPDATE imagepipe.leases SET owner = owner WHERE key = 'stall'")
            await asyncio.sleep(0.2)  # past the stale lease, before the timeout
            taker = Lease("stall", "b", 2, "elsewhere")
            taken = await asyncio.wait_for(
                other.acquire_lease(taker, stale_after=0.1, holder_gone=holder_gone), 4
            )
            assert taken.epoch == 2
            with pytest.raises(psycopg.errors.IdleInTransactionSessionTimeout):
                await conn.execute("COMMIT")  # the server ended the paused session
    finally:
        await paused.close()
        await other.close()
