"""The client's hot path: group commit of sends, order, durability, live dedupe, prekey writes.

Concurrent sends of one client share store commits, yet no ciphertext leaves before
the stored state covers its message key (a restart from the store skips past it: the
send lease), and they leave in the order they were encrypted.  Received envelopes that a connection pushes after its backlog skip
the dedupe read; a redelivered one is still recognised.  The prekey store is written
when a prekey message was accepted.
"""

from __future__ import annotations

import shutil
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path

import pytest
import trio
import trio.testing

from clientsdk.client import _new_message_id
from clientsdk.group_commit import GroupCommit
from clientsdk.connection import memory_connector
from clientsdk.crypto.ratchet import RatchetMessage
from clientsdk.crypto.session import SEND_LEASE, Session, parse_message
from clientsdk.errors import StoreCorrupted
from clientsdk.store import Batch, Store
from federation import codec
from federation.transport import Transport
from tests.sdk.conftest import DOMAIN, collect, pending_security_events
from tests.sdk.test_delivery import LoseFirstAck

ALICE = f"alice@{DOMAIN}"
BOB = f"bob@{DOMAIN}"


async def _pair(world):
    return await world.register("alice"), await world.register("bob")


async def _greet(alice, bob) -> None:
    """A session confirmed both ways: later messages are normal ratchet messages."""
    await alice.send(BOB, "hello")
    await collect(bob, 1)
    await bob.send(ALICE, "hi")
    await collect(alice, 1)


async def test_concurrent_sends_share_commits_and_arrive_in_encryption_order(world):
    alice, bob = await _pair(world)
    async with alice.connect(), bob.connect():
        await _greet(alice, bob)
        commits: list[int] = []
        stage = alice._commits._stage

        def counting(batch: Batch, now_ms: int, durable: bool) -> bool:
            commits.append(len(batch.messages))
            return stage(batch, now_ms, durable)

        alice._commits._stage = counting
        async with trio.open_nursery() as nursery:
            for i in range(16):
                nursery.start_soon(alice.send, BOB, f"m{i:02d}")
        got = await collect(bob, 16)
    assert sum(commits) == 16 and len(commits) < 16          # one commit for several sends
    sent = [h.text for h in await alice.history(BOB) if h.outgoing and h.text.startswith("m")]
    assert sorted(sent) == [f"m{i:02d}" for i in range(16)]
    assert [m.text for m in got] == sent                     # the order the ratchet numbered them
    assert [h.text for h in await bob.history(ALICE) if h.text.startswith("m")] == sent
    assert not pending_security_events(bob)
    await alice.aclose()
    await bob.aclose()


def committed_sessions(path: Path, key: bytes) -> dict[str, bytes]:
    """The sessions a crash right now would recover: a copy of the store file and its WAL, opened.

    The running client holds its store exclusively (``StoreInUse``); the copy also shows
    only committed transactions (WAL recovery stops at the last commit), not staged rows.
    """
    with tempfile.TemporaryDirectory() as tmp:
        copy = Path(tmp) / path.name
        shutil.copyfile(path, copy)
        wal = path.with_name(path.name + "-wal")
        if wal.exists():
            shutil.copyfile(wal, copy.with_name(copy.name + "-wal"))
        store = Store.open(copy, store_key=key)
        try:
            return store.load().sessions
        finally:
            store.close()


class CheckStoredBeforeSend(Transport):
    """Before each ``send`` op leaves, reads the sender's store file: a restart from it must skip the key."""

    checked = 0

    def __init__(self, inner: Transport, store_path, store_key: bytes, peer: str) -> None:
        self.inner = inner
        self.store_path = store_path
        self.store_key = store_key
        self.peer = peer

    async def send(self, frame: bytes) -> None:
        request = codec.decode(frame)
        if request.get("op") == "send":
            for payload in request["payloads"]:
                if payload["devices"] == [self.peer]:
                    message = RatchetMessage.from_bytes(parse_message(payload["ciphertext"]).body)
                    stored = committed_sessions(Path(self.store_path), self.store_key)[self.peer]
                    session = Session.from_bytes(codec.decode(stored)[0])
                    session.recover_send_lease()          # what a restart from this store does
                    sent, _, previous = session.ratchet.counters
                    # The stored chain is this message's (and, after the skip, past it), or a later
                    # one (a reply from the peer moved the ratchet on) whose previous chain counts it.
                    if session.ratchet.ratchet_public_key == message.ratchet_key:
                        assert sent > message.number, "a restart from the store could reuse this key"
                    else:
                        assert previous > message.number, "a restart from the store could reuse this key"
                    CheckStoredBeforeSend.checked += 1
        await self.inner.send(frame)

    async def receive(self) -> bytes:
        return await self.inner.receive()

    async def aclose(self, code: int = 1000, reason: str = "") -> None:
        await self.inner.aclose(code, reason)

    @property
    def close_code(self) -> int | None:
        return self.inner.close_code


async def test_no_ciphertext_leaves_before_a_restart_from_the_store_would_skip_its_key(world):
    alice, bob = await _pair(world)
    plain = memory_connector(world.network, DOMAIN)
    async with bob.connect():
        async with alice.connect():
            await _greet(alice, bob)
        peer = f"{BOB}/{bob.device_id}"
        CheckStoredBeforeSend.checked = 0

        async def checking(nursery: trio.Nursery) -> Transport:
            return CheckStoredBeforeSend(await plain(nursery), world.path("alice"), b"alice".ljust(32, b"k"), peer)

        async with alice.connect(checking):
            async with trio.open_nursery() as nursery:
                for i in range(12):
                    nursery.start_soon(alice.send, BOB, f"m{i}")
            got = await collect(bob, 12)
        assert CheckStoredBeforeSend.checked >= 12          # the 12 sends (and any receipt)
        assert sorted(m.text for m in got) == sorted(f"m{i}" for i in range(12))
        # A restart from the store continues the chain: nothing is numbered twice.
        await alice.aclose()
        restarted = await world.reopen("alice")
        async with restarted.connect():
            await restarted.send(BOB, "after a restart")
            [after] = await collect(bob, 1)
        assert after.text == "after a restart"
        assert not pending_security_events(bob)
    await restarted.aclose()
    await bob.aclose()


def _copy_store(source: Path, target: Path) -> None:
    """The store file and its WAL, as they are on disk now (a missing WAL is missing in the copy)."""
    shutil.copyfile(source, target)
    wal, target_wal = source.with_name(source.name + "-wal"), target.with_name(target.name + "-wal")
    target_wal.unlink(missing_ok=True)
    if wal.exists():
        shutil.copyfile(wal, target_wal)


async def test_a_power_cut_reuses_no_message_key_and_loses_no_received_message(world, tmp_path):
    """Sends inside a send lease are not fsynced: a power cut may lose the sender's own copy, never a key.

    The test keeps a copy of alice's store at each fsynced commit; the "power cut"
    puts the last copy back, as a disk would after losing unsynced writes.  No
    receipts, so that every commit of alice's is one of the steps below.
    """
    alice, bob = await _pair(world)
    alice._send_receipts = bob._send_receipts = False
    synced = tmp_path / "synced.db"
    sends_fsynced: list[bool] = []
    stage, commit = alice._commits._stage, alice._commits._commit
    last_durable = [True]

    def staging(batch: Batch, now_ms: int, durable: bool) -> bool:
        last_durable[0] = durable
        if any(entry.outgoing for entry in batch.messages):
            sends_fsynced.append(durable)
        return stage(batch, now_ms, durable)

    def committing() -> None:
        commit()
        if last_durable[0]:
            _copy_store(world.path("alice"), synced)

    alice._commits._stage, alice._commits._commit = staging, committing
    async with alice.connect(), bob.connect():
        await _greet(alice, bob)             # bob's reply gave alice a new chain, and its lease
        for i in range(5):
            await alice.send(BOB, f"m{i}")
        got = await collect(bob, 5)
    assert sends_fsynced == [True] + [False] * 5         # "hello" took the first lease; m0-m4 are inside one
    alice._store.close()                                 # the process dies, then the power
    _copy_store(synced, world.path("alice"))             # the disk keeps only what was fsynced
    restarted = await world.reopen("alice")
    async with restarted.connect(), bob.connect():
        await restarted.send(BOB, "after the power cut")
        got += await collect(bob, 1)
    assert [m.text for m in got] == ["m0", "m1", "m2", "m3", "m4", "after the power cut"]
    assert not pending_security_events(bob)              # no reused key, so no failed decryption
    assert [h.text for h in await bob.history(ALICE)][-6:] == [m.text for m in got]
    [session] = bob._sessions._sessions[f"{ALICE}/{alice.device_id}"][:1]
    assert session.ratchet.skipped_count == SEND_LEASE - 5          # the restart skipped the whole lease
    # What the cut lost: alice's own copy of the unsynced sends (her other devices have theirs).
    assert [h.text for h in await restarted.history(BOB) if h.outgoing] == ["hello", "after the power cut"]
    await restarted.aclose()
    await bob.aclose()


async def test_a_clean_close_returns_the_send_lease(world):
    alice, bob = await _pair(world)
    async with bob.connect():
        async with alice.connect():
            await _greet(alice, bob)
            await alice.send(BOB, "before")
            await collect(bob, 1)
        await alice.aclose()
        restarted = await world.reopen("alice")
        async with restarted.connect():
            await restarted.send(BOB, "after")
            await collect(bob, 1)
    [session] = bob._sessions._sessions[f"{ALICE}/{alice.device_id}"][:1]
    assert session.ratchet.skipped_count == 0                   # the restart skipped no message key
    await restarted.aclose()
    await bob.aclose()


async def test_live_envelope_whose_ack_was_lost_is_recognised_when_redelivered(world, autojump_clock):
    LoseFirstAck.fired = False
    alice, bob = await _pair(world)
    plain = memory_connector(world.network, DOMAIN)

    async def lossy(nursery: trio.Nursery) -> Transport:
        return LoseFirstAck(await plain(nursery))

    read: list[list[str]] = []
    processed = bob._store.processed

    def spying(keys):
        keys = list(keys)
        read.append(keys)
        return processed(keys)

    bob._store.processed = spying
    async with alice.connect(), bob.connect(lossy):
        await trio.sleep(1)                         # bob's (empty) backlog is done: what comes now is live
        one_id = await alice.send(BOB, "one")
        [first] = await collect(bob, 1)             # stored; then its ack is lost and the connection drops
        await trio.sleep(1)
        assert LoseFirstAck.fired
        await alice.send(BOB, "two")
        rest = await collect(bob, 1)                # after the reconnect: "one" again (skipped), then "two"
        with trio.move_on_after(5):
            extra = await collect(bob, 1)
            raise AssertionError(f"delivered twice: {extra}")
    assert [first.text] + [m.text for m in rest] == ["one", "two"]
    assert [h.text for h in await bob.history(ALICE)] == ["one", "two"]
    # "one" came live first (no read), then in the next connection's backlog (read: found processed)
    assert sum(keys.count(f"{ALICE}/{alice.device_id}|{one_id}") for keys in read) == 1
    assert not pending_security_events(bob)
    await alice.aclose()
    await bob.aclose()


async def test_accepted_prekey_message_updates_the_stored_prekeys(world):
    alice = await world.register("alice")
    bob = await world.register("bob")
    before = set(bob._prekeys.one_time)
    async with alice.connect(), bob.connect():
        await alice.send(BOB, "first: a prekey message")
        await collect(bob, 1)
        await alice.send(BOB, "second")
        await collect(bob, 1)
    used = before - set(bob._prekeys.one_time)
    assert len(used) == 1
    await bob.aclose()
    reopened = await world.reopen("bob")
    assert not used & set(reopened._prekeys.one_time)       # the used one-time key is gone on disk too
    await reopened.aclose()
    await alice.aclose()


# --- GroupCommit on its own --------------------------------------------------------------


def _group_commit(apply: Callable[[Batch, int], None]) -> GroupCommit:
    """A GroupCommit whose commit step (the one in a worker thread) runs ``apply`` on the staged batch."""
    staged: list[tuple[Batch, int]] = []

    def stage(batch: Batch, now_ms: int, durable: bool) -> bool:
        staged.append((batch, now_ms))
        return True

    return GroupCommit(stage, lambda: apply(*staged.pop()), staged.clear, trio.CapacityLimiter(1))


async def test_group_commit_merges_what_queues_behind_a_running_commit():
    gate = threading.Event()
    written: list[list[str]] = []

    def apply(batch: Batch, now_ms: int) -> None:
        if not written:
            gate.wait(10)
        written.append(sorted(batch.processed))

    commits = _group_commit(apply)
    async with trio.open_nursery() as nursery:
        for key in ("k1", "k2", "k3", "k4"):
            nursery.start_soon(commits.wait, commits.add(Batch(processed={key}), 1))
            await trio.testing.wait_all_tasks_blocked()
        gate.set()
    assert written == [["k1"], ["k2", "k3", "k4"]]


async def test_group_commit_failure_reaches_every_waiter_and_the_next_commit_works():
    gate = threading.Event()
    written: list[list[str]] = []

    def apply(batch: Batch, now_ms: int) -> None:
        if not written:
            gate.wait(10)
            written.append(sorted(batch.processed))
            return
        if "bad" in batch.processed:
            raise StoreCorrupted("store file is unreadable (OperationalError)")
        written.append(sorted(batch.processed))

    commits = _group_commit(apply)
    failed: list[str] = []

    async def waiter(key: str) -> None:
        try:
            await commits.wait(commits.add(Batch(processed={key}), 1))
        except StoreCorrupted:
            failed.append(key)

    async with trio.open_nursery() as nursery:
        for key in ("first", "bad", "shares-the-failure"):
            nursery.start_soon(waiter, key)
            await trio.testing.wait_all_tasks_blocked()
        gate.set()
    assert sorted(failed) == ["bad", "shares-the-failure"]
    await commits.wait(commits.add(Batch(processed={"later"}), 2))
    assert written == [["first"], ["later"]]


async def test_a_cancelled_waiter_still_has_its_batch_written():
    written: list[list[str]] = []
    commits = _group_commit(lambda batch, now: written.append(sorted(batch.processed)))
    with trio.CancelScope() as scope:
        scope.cancel()
        await commits.wait(commits.add(Batch(processed={"k"}), 1))
    assert written == [["k"]]


def test_message_ids_are_random_hex_and_do_not_repeat_across_pool_refills():
    ids = [_new_message_id() for _ in range(1500)]
    assert len(set(ids)) == len(ids)
    assert all(len(i) == 32 and int(i, 16) >= 0 and i == i.lower() for i in ids)


async def test_rows_staged_for_a_commit_that_never_ran_are_not_committed_later(tmp_path, monkeypatch):
    store = Store.create(tmp_path / "s.db", store_key=bytes(32))
    commits = GroupCommit(store.stage, store.commit_staged, store.abort_staged, trio.CapacityLimiter(1))
    real_run_sync = trio.to_thread.run_sync

    async def no_thread(*args, **kwargs):
        raise RuntimeError("can't start new thread")

    monkeypatch.setattr(trio.to_thread, "run_sync", no_thread)
    with pytest.raises(RuntimeError):
        await commits.wait(commits.add(Batch(processed={"never committed"}, kv={"prekeys": b"staged"}), 1))
    monkeypatch.setattr(trio.to_thread, "run_sync", real_run_sync)
    await commits.wait(commits.add(Batch(processed={"committed"}), 2))
    assert store.processed(["never committed", "committed"]) == {"committed"}
    await commits.wait(commits.add(Batch(kv={"prekeys": b"staged"}), 3))    # not mistaken for "unchanged"
    assert store.get_kv("prekeys") == b"staged"
    store.close()
