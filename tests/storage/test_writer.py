"""The group-commit writer's cheaper paths (SQLite): quick batches on the trio thread,
the batch wait, completion callbacks; and that none of them weakens what an
acknowledged write means."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest
import trio
import trio.testing
from sqlalchemy import Connection, insert, select
from sqlalchemy.exc import IntegrityError

from homeserver.storage import DatabaseClosed, WriteFailed, open_database, open_storage
from homeserver.storage.schema import accounts


def url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'hs.db'}"


def insert_account(user: str):
    def op(conn: Connection) -> str:
        conn.execute(insert(accounts).values(user=user, password_hash="h", master_key=b"k",
                                             disabled=False, created_ms=1))
        return user
    return op


async def users(db) -> list[str]:
    return await db.read(lambda conn: list(conn.execute(select(accounts.c.user).order_by(accounts.c.user)).scalars()))


async def test_quick_batches_run_inline_and_are_committed_before_callers_wake(tmp_path: Path, nursery) -> None:
    storage = await open_storage(url(tmp_path), nursery)
    result = await storage.mailboxes.deliver("b@x/B", "m1", b"d", [(["a@x/A"], b"c")], 1, 10_000)
    (entry,) = result.entries
    assert storage.database.inline_batches >= 1
    raw = sqlite3.connect(tmp_path / "hs.db")        # another connection already sees it
    assert raw.execute("SELECT count(*) FROM mailbox").fetchone() == (1,)
    assert await storage.mailboxes.ack("a@x/A", [entry.seq]) == 1
    assert raw.execute("SELECT count(*) FROM mailbox").fetchone() == (0,)
    raw.close()
    await storage.aclose()


async def test_a_held_write_lock_never_blocks_the_event_loop(tmp_path: Path, nursery) -> None:
    """Another process (the admin CLI) holding the lock: the batch waits in the writer thread."""
    storage = await open_storage(url(tmp_path), nursery)
    other = sqlite3.connect(tmp_path / "hs.db", isolation_level=None, check_same_thread=False)
    other.execute("BEGIN IMMEDIATE")
    done = trio.Event()

    async def send() -> None:
        await storage.mailboxes.deliver("b@x/B", "m1", b"d", [(["a@x/A"], b"c")], 1, 10_000)
        done.set()

    nursery.start_soon(send)
    ticks = 0
    with trio.fail_after(5):
        while ticks < 20:              # the loop keeps running while the writer waits for the lock
            await trio.sleep(0.01)
            ticks += 1
    assert not done.is_set()
    other.execute("COMMIT")
    other.close()
    with trio.fail_after(10):
        await done.wait()
    assert (await storage.mailboxes.counts())["entries"] == 1
    await storage.aclose()


async def test_ops_arriving_during_the_batch_wait_share_one_commit(tmp_path: Path, nursery) -> None:
    db = open_database(url(tmp_path), batch_wait_s=0.05)
    await nursery.start(db.run)
    results: list[str] = []

    async def write(user: str, delay: float) -> None:
        await trio.sleep(delay)
        results.append(await db.write(insert_account(user)))

    async with trio.open_nursery() as writers:
        writers.start_soon(write, "a@x", 0)
        writers.start_soon(write, "b@x", 0.01)      # within the first op's wait
    assert sorted(results) == ["a@x", "b@x"]
    assert db.batches == 1 and db.ops == 2
    await db.aclose()


async def test_no_batch_wait_when_disabled(tmp_path: Path, nursery) -> None:
    db = open_database(url(tmp_path), batch_wait_s=0)
    await nursery.start(db.run)
    with trio.fail_after(5):
        assert await db.write(insert_account("a@x")) == "a@x"
    assert await users(db) == ["a@x"]
    await db.aclose()


async def test_on_done_callbacks_run_after_the_commit_in_queue_order(tmp_path: Path, nursery) -> None:
    db = open_database(url(tmp_path))
    seen: list[tuple[str, object]] = []
    first = await db.queue(insert_account("a@x"), quick=True)
    failing = await db.queue(insert_account("a@x"), quick=True)           # same key: IntegrityError
    assert first.on_done(lambda: seen.append(("a", first.result_now())))

    def record_failure() -> None:
        try:
            failing.result_now()
        except IntegrityError as exc:
            seen.append(("dup", type(exc).__name__))

    assert failing.on_done(record_failure)
    with pytest.raises(RuntimeError):
        first.result_now()                          # not finished yet
    await nursery.start(db.run)
    assert await first.result() == "a@x"
    assert seen == [("a", "a@x"), ("dup", "IntegrityError")]
    late: list[str] = []
    assert first.on_done(lambda: late.append("now"))   # already done: called at once
    assert late == ["now"]
    await db.aclose()


async def test_callbacks_of_ops_never_run_report_closed(tmp_path: Path) -> None:
    db = open_database(url(tmp_path))
    queued = await db.queue(insert_account("a@x"), quick=True)
    outcomes: list[str] = []

    def record() -> None:
        try:
            queued.result_now()
        except DatabaseClosed:
            outcomes.append("closed")

    queued.on_done(record)
    await db.aclose()                                # no writer ever ran
    assert outcomes == ["closed"]


async def test_a_quick_batch_that_breaks_its_transaction_fails_whole(tmp_path: Path, nursery) -> None:
    db = open_database(url(tmp_path))

    def sneaky_rollback(conn: Connection) -> str:
        conn.exec_driver_sql("ROLLBACK")
        return "looked fine"

    first = await db.queue(insert_account("a@x"), quick=True)
    second = await db.queue(sneaky_rollback, quick=True)
    await nursery.start(db.run)
    for queued in (first, second):
        with pytest.raises(WriteFailed):
            await queued.result()
    assert await users(db) == []
    assert await db.write(insert_account("c@x")) == "c@x"      # a fresh writer connection carries on
    assert await users(db) == ["c@x"]
    await db.aclose()


async def test_cancelling_the_writer_in_its_batch_wait_fails_the_batch_cleanly(tmp_path: Path) -> None:
    db = open_database(url(tmp_path), batch_wait_s=10)
    queued = await db.queue(insert_account("a@x"), quick=True)
    async with trio.open_nursery() as nursery:
        await nursery.start(db.run)
        await trio.testing.wait_all_tasks_blocked()          # the writer sleeps in its batch wait
        nursery.cancel_scope.cancel()
    with pytest.raises(DatabaseClosed):
        await queued.result()
    await db.aclose()
    raw = sqlite3.connect(tmp_path / "hs.db")
    assert raw.execute("SELECT count(*) FROM accounts").fetchone() == (0,)
    raw.close()


async def test_coalesced_acks_answer_each_caller_through_on_done(tmp_path: Path, nursery) -> None:
    storage = await open_storage(url(tmp_path), nursery)
    devices = [f"u{i}@x/DEVICEAAAA" for i in range(5)]
    result = await storage.mailboxes.deliver("s@x/SENDERAAAA", "m", b"d", [([d], b"ct") for d in devices], 1, 10**9)
    answers: dict[str, int] = {}
    slots = []
    ops_before = storage.database.ops
    for entry in result.entries:
        slot = await storage.mailboxes.queue_ack(entry.device, [entry.seq, entry.seq + 10**6])
        assert slot.on_done(lambda slot=slot, device=entry.device: answers.__setitem__(device, slot.result_now()))
        slots.append(slot)
    with trio.fail_after(5):
        for slot in slots:
            await slot.result()
    assert answers == {d: 1 for d in devices}
    assert storage.database.ops - ops_before < len(devices)        # one ack op for them all
    await storage.aclose()
