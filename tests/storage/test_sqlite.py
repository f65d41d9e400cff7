"""SQLite-only behaviour of the storage layer: group commit, savepoints, durability,
schema versions, shutdown.  Run as a script to measure deliver throughput:
``python -m tests.storage.test_sqlite [messages]`` prints one JSON object."""

from __future__ import annotations

import json
import sqlite3
import sys
import threading
import time
from pathlib import Path

import pytest
import trio
import trio.testing
from sqlalchemy import Connection, insert, select, text
from sqlalchemy.exc import IntegrityError

from homeserver.storage import (
    SCHEMA_VERSION,
    AccountExists,
    Database,
    DatabaseClosed,
    MailboxRepository,
    SchemaTooNew,
    WriteFailed,
    create_storage_engine,
    open_database,
    open_storage,
)
from homeserver.storage.accounts import _create_account
from homeserver.storage.schema import accounts, blobs, mailbox


def url(tmp_path: Path, name: str = "hs.db") -> str:
    return f"sqlite:///{tmp_path / name}"


def insert_account(user: str) -> object:
    def op(conn: Connection) -> str:
        conn.execute(insert(accounts).values(user=user, password_hash="h", master_key=b"k",
                                             disabled=False, created_ms=1))
        return user
    return op


async def stored_users(db: Database) -> list[str]:
    return await db.read(lambda conn: list(conn.execute(
        select(accounts.c.user).order_by(accounts.c.user)).scalars()))


async def queue_then_run(db: Database, nursery: trio.Nursery, ops: list[object]) -> list[object]:
    """Queue every op before the writer starts, so they all land in one batch."""
    results: list[object] = [None] * len(ops)

    async def call(i: int, op: object) -> None:
        try:
            results[i] = await db.write(op)  # type: ignore[arg-type]
        except Exception as exc:
            results[i] = exc

    async with trio.open_nursery() as callers:
        for i, op in enumerate(ops):      # one at a time: queue order = list order
            callers.start_soon(call, i, op)
            await trio.testing.wait_all_tasks_blocked()
        await nursery.start(db.run)
    return results


async def test_savepoints_isolate_a_failing_op_within_one_batch(tmp_path: Path, nursery) -> None:
    db = open_database(url(tmp_path))

    def insert_then_fail(conn: Connection) -> None:
        insert_account("ghost@x")(conn)  # type: ignore[operator]
        raise ValueError("domain rule broken after a write")

    def taken_name(conn: Connection) -> None:     # the repository's own domain error
        _create_account(conn, "a@x", "h", b"k", 2, None)

    ops = [insert_account("a@x"), taken_name, insert_then_fail, insert_account("a@x"),
           insert_account("b@x")]
    results = await queue_then_run(db, nursery, ops)
    assert db.batches == 1 and db.ops == len(ops)
    assert results[0] == "a@x" and results[4] == "b@x"
    assert isinstance(results[1], AccountExists)
    assert isinstance(results[2], ValueError)
    assert isinstance(results[3], IntegrityError)
    assert await stored_users(db) == ["a@x", "b@x"]     # ghost rolled back with its savepoint
    await db.aclose()


async def test_group_commit_batches_concurrent_writes(tmp_path: Path, nursery) -> None:
    storage = await open_storage(url(tmp_path), nursery)
    db = storage.database

    async def send(i: int) -> None:
        result = await storage.mailboxes.deliver("b@x/B", f"m{i}", b"d", [(["a@x/A"], b"c" * 300)],
                                                 1, 10_000)
        assert result.status == "new"

    async with trio.open_nursery() as senders:
        for i in range(300):
            senders.start_soon(send, i)
    assert db.ops == 300
    assert db.batches < db.ops / 5
    assert db.largest_batch > 10
    assert (await storage.mailboxes.counts())["entries"] == 300
    await storage.aclose()


async def test_an_op_that_breaks_the_transaction_fails_the_whole_batch(tmp_path: Path,
                                                                       nursery) -> None:
    db = open_database(url(tmp_path))

    def sneaky_rollback(conn: Connection) -> str:
        conn.exec_driver_sql("ROLLBACK")
        return "looked fine"

    results = await queue_then_run(db, nursery, [insert_account("a@x"), sneaky_rollback,
                                                 insert_account("b@x")])
    assert all(isinstance(r, WriteFailed) for r in results)
    assert await stored_users(db) == []
    assert await db.write(insert_account("c@x")) == "c@x"    # the writer carries on
    assert await stored_users(db) == ["c@x"]
    await db.aclose()


async def test_a_failed_commit_fails_every_op_of_the_batch(tmp_path: Path, nursery) -> None:
    db = open_database(url(tmp_path))

    def dangling_pointer(conn: Connection) -> None:
        # a deferred foreign key is only checked at COMMIT, so the commit itself fails
        conn.exec_driver_sql("PRAGMA defer_foreign_keys=ON")
        conn.execute(insert(mailbox).values(device="a@x/A", sender="s", message_id="m",
                                            blob_id=12345, ts_ms=1, expires_ms=2))

    def domain_error(conn: Connection) -> None:
        raise AccountExists("user name is taken")

    results = await queue_then_run(db, nursery, [insert_account("a@x"), dangling_pointer,
                                                 domain_error, insert_account("b@x")])
    assert isinstance(results[0], WriteFailed) and isinstance(results[1], WriteFailed)
    assert isinstance(results[0].__cause__, Exception)
    assert isinstance(results[2], AccountExists)         # its own error, as before
    assert isinstance(results[3], WriteFailed)
    assert await stored_users(db) == []
    assert await db.write(insert_account("c@x")) == "c@x"
    await db.aclose()


async def test_acknowledged_means_committed_and_survives_reopen(tmp_path: Path, nursery) -> None:
    storage = await open_storage(url(tmp_path), nursery)
    await storage.accounts.create_account("a@x", "h", b"k" * 32, 1)
    entries = (await storage.mailboxes.deliver("b@x/B", "m1", b"d", [(["a@x/A"], b"c")], 1,
                                               10_000)).entries
    # visible to an independent connection before any close: it was committed
    raw = sqlite3.connect(tmp_path / "hs.db")
    assert raw.execute("SELECT user FROM accounts").fetchall() == [("a@x",)]
    raw.close()
    await storage.aclose()
    async with trio.open_nursery() as again:
        reopened = await open_storage(url(tmp_path), again)
        assert (await reopened.accounts.get_account("a@x")) is not None
        assert await reopened.mailboxes.pending("a@x/A", 0, 10) == list(entries)
        await reopened.aclose()


async def test_pragmas(tmp_path: Path, nursery) -> None:
    storage = await open_storage(url(tmp_path), nursery)
    values = await storage.database.read(lambda conn: [
        conn.exec_driver_sql(f"PRAGMA {name}").scalar()
        for name in ("journal_mode", "synchronous", "foreign_keys", "busy_timeout")])
    assert values[0] == "wal" and values[1] == 2 and values[2] == 1 and values[3] > 0
    await storage.aclose()


def test_schema_version_recorded_and_newer_refused(tmp_path: Path) -> None:
    engine = create_storage_engine(url(tmp_path))
    with engine.connect() as conn:
        assert conn.execute(text("SELECT version FROM schema_version")).scalar() == SCHEMA_VERSION
    engine.dispose()
    create_storage_engine(url(tmp_path)).dispose()       # reopening at the same version is fine
    raw = sqlite3.connect(tmp_path / "hs.db")
    raw.execute("UPDATE schema_version SET version = ?", (SCHEMA_VERSION + 1,))
    raw.commit()
    raw.close()
    with pytest.raises(SchemaTooNew, match="newer than this release"):
        create_storage_engine(url(tmp_path))


async def test_aclose_flushes_queued_writes_then_refuses(tmp_path: Path, nursery) -> None:
    storage = await open_storage(url(tmp_path), nursery)
    statuses: list[str] = []

    async def send(i: int) -> None:
        result = await storage.mailboxes.deliver("b@x/B", f"m{i}", b"d", [(["a@x/A"], b"c")], 1,
                                                 10_000)
        statuses.append(result.status)

    async with trio.open_nursery() as senders:
        for i in range(200):
            senders.start_soon(send, i)
        await trio.testing.wait_all_tasks_blocked()
        await storage.aclose()
    assert statuses == ["new"] * 200
    with pytest.raises(DatabaseClosed):
        await storage.mailboxes.deliver("b@x/B", "late", b"d", [(["a@x/A"], b"c")], 1, 10_000)
    with pytest.raises(DatabaseClosed):
        await storage.mailboxes.counts()
    raw = sqlite3.connect(tmp_path / "hs.db")
    assert raw.execute("SELECT count(*) FROM mailbox").fetchone() == (200,)
    raw.close()


async def test_aclose_without_a_writer_fails_queued_ops(tmp_path: Path) -> None:
    db = open_database(url(tmp_path))
    failures: list[Exception] = []

    async def call() -> None:
        try:
            await db.write(insert_account("a@x"))
        except DatabaseClosed as exc:
            failures.append(exc)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(call)
        await trio.testing.wait_all_tasks_blocked()
        await db.aclose()
    assert len(failures) == 1


async def test_reads_run_beside_a_busy_writer(tmp_path: Path, nursery) -> None:
    storage = await open_storage(url(tmp_path), nursery)
    await storage.accounts.create_account("a@x", "h", b"k", 1)
    release = threading.Event()

    def slow_write(conn: Connection) -> None:
        insert_account("b@x")(conn)  # type: ignore[operator]
        release.wait(10)

    async with trio.open_nursery() as inner:
        inner.start_soon(storage.database.write, slow_write)
        await trio.testing.wait_all_tasks_blocked()
        # the writer holds an open transaction; a WAL read still sees the last commit
        with trio.fail_after(5):
            assert [a.user for a in await storage.accounts.list_accounts()] == ["a@x"]
        release.set()
    assert [a.user for a in await storage.accounts.list_accounts()] == ["a@x", "b@x"]
    await storage.aclose()


async def test_in_memory_sqlite_url(nursery) -> None:
    storage = await open_storage("sqlite://", nursery)
    await storage.accounts.create_account("a@x", "h", b"k", 1)
    assert [a.user for a in await storage.accounts.list_accounts()] == ["a@x"]
    await storage.aclose()


async def test_no_orphan_blob_rows_after_acks(tmp_path: Path, nursery) -> None:
    storage = await open_storage(url(tmp_path), nursery)
    result = await storage.mailboxes.deliver("b@x/B", "m", b"d",
                                             [([f"a@x/D{i}" for i in range(5)], b"group")], 1, 9)
    for entry in result.entries:
        await storage.mailboxes.ack(entry.device, [entry.seq])
    count = await storage.database.read(
        lambda conn: conn.execute(select(blobs.c.id)).all())
    assert count == []
    await storage.aclose()


# --- measurement ------------------------------------------------------------------------------


async def measure_deliver(path: Path, messages: int, callers: int = 50) -> dict[str, float]:
    """Inserts/s for ``deliver``: 1 device per payload, 300-byte ciphertext, ``callers`` at once."""
    async with trio.open_nursery() as nursery:
        storage = await open_storage(f"sqlite:///{path}", nursery)
        mailboxes: MailboxRepository = storage.mailboxes
        per_caller = messages // callers

        async def caller(c: int) -> None:
            for i in range(per_caller):
                await mailboxes.deliver(f"s{c}@x/S", f"m{i}", b"d" * 32,
                                        [([f"r{c}@x/R"], b"c" * 300)], 1, 10**9)

        start = time.perf_counter()
        async with trio.open_nursery() as callers_nursery:
            for c in range(callers):
                callers_nursery.start_soon(caller, c)
        elapsed = time.perf_counter() - start
        db = storage.database
        out = {"deliver_per_s": round(per_caller * callers / elapsed),
               "ops": db.ops, "batches": db.batches, "mean_batch": round(db.ops / db.batches, 1),
               "largest_batch": db.largest_batch, "callers": callers}
        await storage.aclose()
    return out


async def test_deliver_throughput_smoke(tmp_path: Path) -> None:
    result = await measure_deliver(tmp_path / "bench.db", 1_000)
    print(json.dumps(result))
    assert result["batches"] < result["ops"]
    assert result["deliver_per_s"] > 200     # lenient: the machine is shared


if __name__ == "__main__":
    import tempfile

    n = int(sys.argv[1]) if len(sys.argv) > 1 else 20_000
    with tempfile.TemporaryDirectory() as tmp:
        print(json.dumps(trio.run(measure_deliver, Path(tmp) / "bench.db", n)))


async def test_concurrent_acks_share_one_write_op(tmp_path) -> None:
    from homeserver.storage import open_storage
    async with trio.open_nursery() as nursery:
        storage = await open_storage(f"sqlite:///{tmp_path / 'acks.db'}", nursery)
        devices = [f"u{i}@example.org/DEVICEAAAA" for i in range(20)]
        result = await storage.mailboxes.deliver("s@example.org/SENDERAAAA", "m", b"d" * 32,
                                                 [([d], b"ct") for d in devices], 1, 10**9)
        seq_of = {e.device: e.seq for e in result.entries}
        ops_before = storage.database.ops
        removed: dict[str, int] = {}

        async def ack(device: str) -> None:
            removed[device] = await storage.mailboxes.ack(device, [seq_of[device], seq_of[devices[0]] + 10**6])

        async with trio.open_nursery() as acks:
            for device in devices:
                acks.start_soon(ack, device)
        assert removed == {d: 1 for d in devices}            # each caller sees its own count
        assert storage.database.ops - ops_before < len(devices)
        assert (await storage.mailboxes.counts())["entries"] == 0
        await storage.aclose()
        nursery.cancel_scope.cancel()
