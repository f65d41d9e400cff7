"""Delivery and read receipts (stored), typing and presence (ephemeral), over the memory network."""

from __future__ import annotations

import trio

from clientsdk.content import Content
from clientsdk.events import (
    Event,
    MessageReceived,
    PresenceChanged,
    ReceiptReceived,
    TypingChanged,
)
from tests.sdk.conftest import DOMAIN

ALICE = f"alice@{DOMAIN}"
BOB = f"bob@{DOMAIN}"


async def next_of(client, kind: type[Event], timeout: float = 10) -> Event:
    with trio.fail_after(timeout):
        async for event in client.events():
            if isinstance(event, kind):
                return event
    raise AssertionError("event channel closed")


async def test_delivery_and_read_receipts_reach_the_sender_and_my_other_devices(world):
    alice = await world.register("alice")
    bob1 = await world.register("bob")
    bob2 = await world.login("bob", "bob2")
    async with alice.connect(), bob1.connect(), bob2.connect():
        await bob1.approve_device(bob2.device_id, bob2.identity_key)
        message_id = await alice.send(BOB, "hello")
        got = await next_of(bob1, MessageReceived)
        assert got.message_id == message_id
        # each bob device stored it and sends a delivery receipt on its own
        first = await next_of(alice, ReceiptReceived)
        second = await next_of(alice, ReceiptReceived)
        assert {first.sender_device, second.sender_device} == {str(bob1.address), str(bob2.address)}
        for receipt in (first, second):
            assert (receipt.kind, receipt.message_ids, receipt.conversation, receipt.sender, receipt.outgoing) \
                == ("delivered", (message_id,), BOB, BOB, False)
        await bob1.mark_read(message_id)
        read = await next_of(alice, ReceiptReceived)
        while read.kind != "read":
            read = await next_of(alice, ReceiptReceived)
        assert (read.message_ids, read.sender_device) == ((message_id,), str(bob1.address))
        # bob's other device learns that the message was read elsewhere
        mine = await next_of(bob2, ReceiptReceived)
        while mine.kind != "read":
            mine = await next_of(bob2, ReceiptReceived)
        assert (mine.outgoing, mine.conversation, mine.message_ids) == (True, ALICE, (message_id,))
        # receipts are not history, and a receipt is never answered by a receipt
        assert [h.text for h in await alice.history(BOB)] == ["hello"]
        assert alice._receipts_due == {}
    for client in (alice, bob1, bob2):
        await client.aclose()


async def test_receipts_reach_an_offline_sender_later(world):
    alice = await world.register("alice")
    bob = await world.register("bob")
    async with alice.connect():
        message_id = await alice.send(BOB, "while you were away")
    async with bob.connect():
        await next_of(bob, MessageReceived)
        with trio.fail_after(10):
            while bob._receipts_due:       # noqa: SLF001 - the delivered receipt goes out in the background
                await trio.sleep(0.01)
        await bob.mark_read(message_id)
    async with alice.connect():
        kinds = [(await next_of(alice, ReceiptReceived)).kind for _ in range(2)]
        assert kinds == ["delivered", "read"]
    await alice.aclose()
    await bob.aclose()


async def test_typing_and_presence_are_ephemeral(world):
    alice = await world.register("alice")
    bob = await world.register("bob")
    async with alice.connect(), bob.connect():
        await alice.send(BOB, "hi")                       # sessions and contacts exist both ways
        await next_of(bob, MessageReceived)
        await alice.set_typing(BOB, True)
        typing = await next_of(bob, TypingChanged)
        assert (typing.user, typing.device, typing.typing) == (ALICE, str(alice.address), True)
        await alice.set_typing(BOB, False)
        assert (await next_of(bob, TypingChanged)).typing is False
        await bob.set_presence("away", "lunch")
        presence = await next_of(alice, PresenceChanged)
        assert (presence.user, presence.state, presence.status) == (BOB, "away", "lunch")
    # while bob is offline, typing goes nowhere and is not stored for later
    async with alice.connect():
        await alice.set_typing(BOB, True)
        await alice.set_presence("online")
    seen: list[Event] = []
    async with bob.connect():
        await alice_sends_after(alice, seen, bob)
    assert not any(isinstance(e, (TypingChanged, PresenceChanged)) for e in seen)
    await alice.aclose()
    await bob.aclose()


async def alice_sends_after(alice, seen: list[Event], bob) -> None:
    async with alice.connect():
        await alice.send(BOB, "marker")
        with trio.fail_after(10):
            async for event in bob.events():
                seen.append(event)
                if isinstance(event, MessageReceived) and event.text == "marker":
                    return


def test_content_extra_fields_round_trip_and_text_bytes_are_unchanged():
    plain = Content("text", "id1", BOB, "x", 5, 1, bytes(32))
    assert b"refs" not in plain.to_bytes() and b"state" not in plain.to_bytes()
    receipt = Content("receipt", "id2", BOB, "", 5, 1, bytes(32), ("a", "b"), "read")
    assert Content.from_bytes(receipt.to_bytes()) == receipt
