"""Nothing a client owes or is owed is lost when a connection ends right after a message (issue 4).

* a client that leaves right after receiving still sends the delivered receipt
  (it was queued only after the ack's round trip and cancelled with the connection);
* a device list refused on a ``device_list_changed`` push gives its security event
  and keeps the connection (it used to end the pump, so the client reconnected);
* a sender's list the server cannot serve *right now* keeps the envelope for the
  next connection (it used to become a ``decryption_failed`` event and be acked).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import replace
from typing import Any

import pytest
import trio

from clientsdk.events import (
    ConnectionChanged,
    Event,
    MessageReceived,
    ReceiptReceived,
    SecurityEvent,
)
from federation.errors import ErrorCode, RequestRejected
from federation.frames import Op
from federation.transport import MemoryNetwork
from homeserver.app import Homeserver
from homeserver.storage import MemoryStorage
from tests.sdk.conftest import DOMAIN, World, homeserver

ALICE = f"alice@{DOMAIN}"
BOB = f"bob@{DOMAIN}"


@pytest.fixture
async def served(tmp_path) -> AsyncIterator[tuple[World, Homeserver]]:
    """The usual world, plus its homeserver (to push and to fake one op's answer)."""
    network = MemoryNetwork()
    storage = MemoryStorage()
    async with homeserver(tmp_path, network, storage) as running:
        yield World(tmp_path, network, storage), running.homeserver


async def events_until(client, done, timeout: float = 10) -> list[Event]:
    """Every event up to and including the first for which ``done(event)`` holds."""
    seen: list[Event] = []
    with trio.fail_after(timeout):
        async for event in client.events():
            seen.append(event)
            if done(event):
                return seen
    raise AssertionError("event channel closed")


async def test_a_client_that_leaves_right_after_receiving_still_sends_the_delivered_receipt(world):
    alice = await world.register("alice")
    bob = await world.register("bob")
    async with alice.connect():
        message_id = await alice.send(BOB, "while you were away")
    async with bob.connect():
        await events_until(bob, lambda e: isinstance(e, MessageReceived))
        # and leaves at once, as a bot or `securechat receive` does
    async with alice.connect():
        receipt = (await events_until(alice, lambda e: isinstance(e, ReceiptReceived)))[-1]
        assert (receipt.kind, receipt.message_ids, receipt.sender) == ("delivered", (message_id,), BOB)
    await alice.aclose()
    await bob.aclose()


async def test_a_refused_list_on_a_change_push_keeps_the_connection(served):
    world, hs = served
    alice = await world.register("alice")
    bob = await world.register("bob")
    async with alice.connect(), bob.connect():
        await alice.send(BOB, "hi")                       # alice fetched (and watches) bob's list
        await events_until(bob, lambda e: isinstance(e, MessageReceived))
        await events_until(alice, lambda e: isinstance(e, ReceiptReceived))
        lists = world.storage.accounts._s.device_lists     # a server that serves a forged list
        forged = replace(lists[BOB], version=lists[BOB].version + 1, signature=bytes(64))
        lists[BOB] = forged
        assert hs.directory.notify_list_changed(BOB, forged.version) == 1
        seen = await events_until(alice, lambda e: isinstance(e, SecurityEvent))
        assert seen[-1].kind == "device_list_rejected"
        await bob.send(ALICE, "still here")               # alice's pump still runs on the same connection
        seen += await events_until(alice, lambda e: isinstance(e, MessageReceived))
        assert seen[-1].text == "still here"
        assert not [e for e in seen if isinstance(e, ConnectionChanged)]
    await alice.aclose()
    await bob.aclose()


async def test_a_sender_list_unavailable_for_now_keeps_the_message_for_the_next_connection(served):
    world, hs = served
    alice = await world.register("alice")
    bob = await world.register("bob")
    carol = await world.register("carol")
    async with alice.connect():
        await alice.send(BOB, "first contact")            # a prekey message: bob needs alice's list for it
    async with carol.connect():
        await carol.send(BOB, "marker")                   # pushed after alice's, so handled after it
    real, public = hs.dispatcher._ops[Op.GET_DEVICE_LIST]   # one transient failure, then normal
    failed = []

    async def flaky(session: Any, params: dict[str, Any]) -> dict[str, Any]:
        if params.get("user") == ALICE and not failed:
            failed.append(True)
            raise RequestRejected("the peer is unreachable", code=ErrorCode.REMOTE_ERROR)
        return await real(session, params)

    hs.dispatcher._ops[Op.GET_DEVICE_LIST] = (flaky, public)
    async with bob.connect():
        seen = await events_until(bob, lambda e: isinstance(e, MessageReceived))
        assert failed and seen[-1].text == "marker"
        assert not [e for e in seen if isinstance(e, SecurityEvent)]     # no decryption_failed: not lost
    async with bob.connect():                             # the server pushes alice's envelope again
        got = (await events_until(bob, lambda e: isinstance(e, MessageReceived)))[-1]
        assert (got.sender, got.text) == (ALICE, "first contact")
    assert [h.text for h in await bob.history(ALICE)] == ["first contact"]
    for client in (alice, bob, carol):
        await client.aclose()
