"""Sessions that heal: an undecryptable message triggers one rate-limited reset and one clear event."""

from __future__ import annotations

import shutil

import pytest
import trio

from clientsdk.errors import StoreCorrupted
from clientsdk.events import MessageReceived, SecurityEvent
from clientsdk.resets import ResetBook, ResetDecision
from clientsdk.store import Batch
from tests.sdk.conftest import DOMAIN, collect, mock_ms, pending_security_events

ALICE = f"alice@{DOMAIN}"
BOB = f"bob@{DOMAIN}"
HOUR_MS = 3_600_000



async def _texts(client, count: int, security: list) -> list[str]:
    others: list = []
    with trio.fail_after(20):
        got = await collect(client, count, others)
    security.extend(e for e in others if isinstance(e, SecurityEvent))
    return [m.text for m in got]


async def test_restored_old_store_heals_with_exactly_one_event(world, tmp_path):
    """LESSONS #8: bob's ratchet state rolls back (an old copy of his store); messages flow again."""
    alice = await world.register("alice")
    bob = await world.register("bob")
    async with alice.connect(), bob.connect():
        await alice.send(BOB, "one")
        await collect(bob, 1)
    await bob.aclose()
    snapshot = tmp_path / "bob-old"
    snapshot.mkdir()
    for f in tmp_path.glob("bob.db*"):
        shutil.copy(f, snapshot / f.name)
    bob = await world.reopen("bob")
    async with alice.connect(), bob.connect():             # both ratchet keys move on after the snapshot
        for text in ("two", "three", "four", "five"):
            sender, receiver = (bob, alice) if text in ("two", "four") else (alice, bob)
            await sender.send(receiver.user, text)
            await collect(receiver, 1)
        await trio.sleep(0.3)                              # acks and receipts settle
    await bob.aclose()
    for f in tmp_path.glob("bob.db*"):
        f.unlink()
    for f in snapshot.iterdir():
        shutil.copy(f, tmp_path / f.name)                  # restore the old copy
    bob = await world.reopen("bob")
    bob_security: list[SecurityEvent] = []
    async with alice.connect(), bob.connect():
        pending_security_events(alice)
        await alice.send(BOB, "lost 1")                    # cannot be decrypted by the rolled-back state
        await alice.send(BOB, "lost 2")
        with trio.fail_after(20):
            async for event in bob.events():
                if isinstance(event, SecurityEvent):
                    bob_security.append(event)
                    break
                assert not isinstance(event, MessageReceived)
        await trio.sleep(1)                                # the reset reaches alice; her device switches
        await alice.send(BOB, "after reset")
        assert await _texts(bob, 1, bob_security) == ["after reset"]
        await bob.send(ALICE, "bob again")
        assert await _texts(alice, 1, []) == ["bob again"]
        await alice.send(BOB, "and again")
        assert await _texts(bob, 1, bob_security) == ["and again"]
        bob_security += pending_security_events(bob)
        assert [(e.kind, e.user, e.device) for e in bob_security] == [("session_reset", ALICE, str(alice.address))]
        assert pending_security_events(alice) == []
        # the loss is recorded in the history, not silent
        history = await bob.history(ALICE)
        assert [(h.kind, h.outgoing) for h in history if h.kind == "notice"] == [("notice", False)]
        assert not bob._resets.open and not bob._resets.unsent
    await alice.aclose()
    await bob.aclose()


async def _reset_sent(client) -> None:
    with trio.fail_after(10):
        await trio.sleep(0.2)
        while client._resets.unsent:
            await trio.sleep(0.05)
        await trio.sleep(0.3)                              # the session_reset reaches the peer


async def test_lost_session_resets_once_per_hour(world):
    alice = await world.register("alice")
    bob = await world.register("bob")
    shift = [0]
    bob._clock = lambda: mock_ms() + shift[0]              # bob's clock, moved by the test
    address = str(alice.address)
    async with alice.connect(), bob.connect():
        await alice.send(BOB, "hi")
        await collect(bob, 1)
        await trio.sleep(0.3)                              # bob's delivery receipt is out
        events: list[SecurityEvent] = []

        async def break_and_send(text: str) -> None:
            async with bob._lock:                          # bob loses his session with alice
                bob._sessions.drop(address)
                await bob._persist(Batch(deleted_sessions={address}))
            await alice.send(BOB, text)
            await _reset_sent(bob)

        await break_and_send("lost")
        await alice.send(BOB, "healed")
        assert await _texts(bob, 1, events) == ["healed"]
        await trio.sleep(0.3)
        shift[0] += 30 * 60_000                            # half an hour later
        await break_and_send("lost again, within the hour")
        events += pending_security_events(bob)
        assert [e.kind for e in events] == ["session_reset", "decryption_failed"]
        shift[0] += 2 * HOUR_MS                            # later, a new failure resets again
        await break_and_send("lost after two hours")
        await alice.send(BOB, "healed again")
        assert await _texts(bob, 1, events) == ["healed again"]
        assert [e.kind for e in events] == ["session_reset", "decryption_failed", "session_reset"]
    await alice.aclose()
    await bob.aclose()


async def test_pending_reset_survives_a_restart(world):
    alice = await world.register("alice")
    bob = await world.register("bob")
    async with alice.connect(), bob.connect():
        await alice.send(BOB, "hi")
        await collect(bob, 1)
    address = str(alice.address)
    bob._sessions.drop(address)
    await bob._persist(Batch(deleted_sessions={address}))
    bob._send_receipts = False
    bob._background_sends = _never                          # type: ignore[method-assign]  # crash before sending
    async with alice.connect(), bob.connect():
        await alice.send(BOB, "lost")
        with trio.fail_after(10):
            while not bob._resets.unsent:
                await trio.sleep(0.05)
    await bob.aclose()
    bob = await world.reopen("bob")
    assert bob._resets.unsent == {address}
    async with alice.connect(), bob.connect():
        with trio.fail_after(10):
            while bob._resets.unsent:
                await trio.sleep(0.05)
        await trio.sleep(0.5)
        await alice.send(BOB, "healed after restart")
        assert await _texts(bob, 1, []) == ["healed after restart"]
    await alice.aclose()
    await bob.aclose()


async def _never() -> None:
    await trio.sleep_forever()


def test_reset_book_rate_limit_and_persistence():
    book = ResetBook(HOUR_MS)
    d = "alice@example.org/AAAAAAAAAA"
    assert book.on_failure(d, 0) is ResetDecision.RESET
    assert book.on_failure(d, 10) is ResetDecision.FOLD            # same breakage, no second event
    assert book.on_decrypted(d) and not book.on_decrypted(d)
    assert book.on_failure(d, 20) is ResetDecision.RATE_LIMITED
    again = ResetBook.from_bytes(book.to_bytes(), HOUR_MS)
    assert (again.last_ms, again.open, again.unsent) == (book.last_ms, book.open, book.unsent)
    assert book.on_failure(d, HOUR_MS) is ResetDecision.RESET
    book.sent(d)
    book.prune(3 * HOUR_MS)
    assert book.last_ms == {} and book.open == set()
    with pytest.raises(StoreCorrupted):
        ResetBook.from_bytes(b"\x01", HOUR_MS)


async def test_a_message_whose_handling_always_fails_does_not_block_the_inbox(world):
    """Only interruptions undo a decryption: an error that would repeat on every redelivery
    (here a damaged local record) ends in one session reset, and later messages flow."""
    alice = await world.register("alice")
    bob = await world.register("bob")
    failures: list[str] = []
    async with alice.connect(), bob.connect():
        await alice.send(BOB, "hello")
        await collect(bob, 1)
        real_handle = bob._handle_content

        async def handle(rpc, sender, plaintext, content, batch):
            if content.text == "poison":
                failures.append(content.text)
                raise StoreCorrupted("a local record does not parse")
            return await real_handle(rpc, sender, plaintext, content, batch)

        bob._handle_content = handle
        await alice.send(BOB, "poison")
        await alice.send(BOB, "after")
        events: list[SecurityEvent] = []
        assert await _texts(bob, 1, events) == ["after"]
        assert failures == ["poison"]                       # handled once, not on every redelivery
        events += pending_security_events(bob)
        assert [e.kind for e in events] == ["session_reset"]
    await alice.aclose()
    await bob.aclose()
