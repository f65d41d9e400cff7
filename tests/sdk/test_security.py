"""A malicious homeserver that swaps a master key, serves an old list or forges one is detected."""

from __future__ import annotations

from dataclasses import replace

import pytest
import trio
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from clientsdk.errors import ContactKeyChanged, SendFailed
from clientsdk.events import MessageReceived, SecurityEvent
from clientsdk.verify import TrustState
from federation.keys import DeviceEntry, DeviceList
from tests.sdk.conftest import DOMAIN, collect, mock_ms, pending_security_events

ALICE = f"alice@{DOMAIN}"
BOB = f"bob@{DOMAIN}"
CAROL = f"carol@{DOMAIN}"



async def _talking(world):
    alice = await world.register("alice")
    bob = await world.register("bob")
    return alice, bob


def _new_master_key(world, user: str, devices) -> None:
    """The server reports a new master key for ``user``, with a list it signed naming ``devices``
    (a user who re-keyed, or a server that swapped the key: the client cannot tell them apart)."""
    state = world.storage.accounts._s
    key = Ed25519PrivateKey.generate()
    state.accounts[user] = replace(state.accounts[user], master_key=key.public_key().public_bytes_raw())
    old = state.device_lists[user]
    new = DeviceList(user, old.version + 1, mock_ms(), mock_ms() + 86_400_000,
                     tuple(DeviceEntry(d.device_id, d.identity_key, mock_ms()) for d in devices)).sign(key)
    state.device_lists[user] = replace(old, version=old.version + 1, body=new.body, signature=new.signature)


async def _events_until(client, kind, *, of=SecurityEvent):
    """Events up to and including the first ``of`` event whose kind (or text) is ``kind``."""
    out = []
    with trio.fail_after(10):
        async for event in client.events():
            out.append(event)
            if isinstance(event, of) and getattr(event, "kind", getattr(event, "text", None)) == kind:
                return out
    raise AssertionError("event channel closed")


async def test_changed_master_key_of_unverified_contact_is_trusted_again_and_sending_continues(world):
    alice, bob = await _talking(world)
    async with alice.connect(), bob.connect():
        await alice.send(BOB, "hello")
        await collect(bob, 1)
        number = alice.safety_number(BOB)
        _new_master_key(world, BOB, [bob])
        alice._book.mark_stale(BOB)          # as a device_list_changed push would
        await alice.send(BOB, "still going out")
        assert [m.text for m in await collect(bob, 1)] == ["still going out"]
        assert [e.kind for e in pending_security_events(alice)] == ["master_key_changed"]
        assert alice.trust(BOB) is TrustState.UNVERIFIED          # trusted on first use again, not verified
        assert alice.safety_number(BOB) != number                 # the number shows the new key
        alice._book.mark_stale(BOB)
        await alice.send(BOB, "no second event")                  # the new key is pinned now
        await collect(bob, 1)
        assert pending_security_events(alice) == []
    await alice.aclose()
    await bob.aclose()


async def test_changed_master_key_of_verified_contact_stops_sending_to_it_until_accepted(world):
    alice, bob = await _talking(world)
    carol = await world.register("carol")
    async with alice.connect(), bob.connect(), carol.connect():
        await alice.send(BOB, "hello")
        await collect(bob, 1)
        await alice.mark_verified(BOB)
        _new_master_key(world, BOB, [bob])
        alice._book.mark_stale(BOB)
        for _ in range(2):
            with pytest.raises(ContactKeyChanged) as info:
                await alice.send(BOB, "must not go out")
            assert "verified" in str(info.value) and "accept" in str(info.value)
        assert alice.trust(BOB) is TrustState.CHANGED
        await alice.send(CAROL, "other contacts are not affected")
        assert [m.text for m in await collect(carol, 1)] == ["other contacts are not affected"]
        assert [e.kind for e in pending_security_events(alice)] == ["master_key_changed"] * 2

        await alice.accept_key_change(BOB)
        assert alice.trust(BOB) is TrustState.UNVERIFIED          # verify again
        await alice.send(BOB, "after accepting")
        assert [m.text for m in await collect(bob, 1)] == ["after accepting"]
    for client in (alice, bob, carol):
        await client.aclose()


async def _bob_with_a_device_only_the_new_key_lists(world, alice, *, verified: bool):
    """alice knows bob's list v1 [bob1]; bob1 links bob2 (alice does not look); then bob's master key changes
    and the new key lists [bob1, bob2].  Returns bob1 and bob2 (connect them before use)."""
    bob1 = await world.register("bob")
    async with alice.connect(), bob1.connect():
        await alice.send(BOB, "hello")
        await collect(bob1, 1)
        if verified:
            await alice.mark_verified(BOB)
    bob2 = await world.login("bob", "bob2")
    async with bob1.connect(), bob2.connect():      # alice is offline: no device_list_changed push reaches her
        await bob1.approve_device(bob2.device_id, bob2.identity_key, share_history=False)
    _new_master_key(world, BOB, [bob1, bob2])
    pending_security_events(alice)
    return bob1, bob2


async def test_message_from_a_device_of_a_new_key_follows_the_policy_unverified(world):
    alice = await world.register("alice")
    bob1, bob2 = await _bob_with_a_device_only_the_new_key_lists(world, alice, verified=False)
    async with alice.connect(), bob1.connect(), bob2.connect():
        await bob2.send(ALICE, "from bob's new device")
        events = await _events_until(alice, "from bob's new device", of=MessageReceived)
        assert [e.kind for e in events if isinstance(e, SecurityEvent)] == ["master_key_changed"]
        assert alice.trust(BOB) is TrustState.UNVERIFIED
        assert [h.text for h in await alice.history(BOB)][-1] == "from bob's new device"
    for client in (alice, bob1, bob2):
        await client.aclose()


async def test_message_from_a_device_of_a_new_key_is_held_for_a_verified_contact_until_accepted(world):
    alice = await world.register("alice")
    carol = await world.register("carol")
    bob1, bob2 = await _bob_with_a_device_only_the_new_key_lists(world, alice, verified=True)
    async with alice.connect(), bob1.connect(), bob2.connect(), carol.connect():
        await bob2.send(ALICE, "held 1")
        await bob2.send(ALICE, "held 2")
        await carol.send(ALICE, "after bob's")                  # arrives after both of bob2's messages
        events = await _events_until(alice, "after bob's", of=MessageReceived)
        assert [e.kind for e in events if isinstance(e, SecurityEvent)] == ["master_key_changed", "message_held"]
        assert [e.text for e in events if isinstance(e, MessageReceived)] == ["after bob's"]
        assert alice.trust(BOB) is TrustState.CHANGED
        assert "held 1" not in [h.text for h in await alice.history(BOB)]

        await alice.accept_key_change(BOB)
        got = await collect(alice, 2)
        assert [m.text for m in got] == ["held 1", "held 2"]
        assert all(m.sender_device == str(bob2.address) for m in got)
        assert [h.text for h in await alice.history(BOB)][-2:] == ["held 1", "held 2"]
        assert alice.trust(BOB) is TrustState.UNVERIFIED
    # nothing stays held after a restart
    await alice.aclose()
    alice = await world.reopen("alice")
    assert (await alice._held_messages()).items == []
    for client in (alice, bob1, bob2, carol):
        await client.aclose()


async def test_old_list_and_forged_list_are_refused(world):
    alice, bob1 = await _talking(world)
    bob2 = await world.login("bob", "bob2")
    state = world.storage.accounts._s
    async with alice.connect(), bob1.connect(), bob2.connect():
        old = state.device_lists[BOB]
        await bob1.approve_device(bob2.device_id, bob2.identity_key)
        await alice.send(BOB, "to both bob devices")
        await collect(bob2, 1)
        pending_security_events(alice)
        newer = state.device_lists[BOB]
        # the server serves the older list (rollback)
        state.device_lists[BOB] = old
        alice._book.mark_stale(BOB)
        with pytest.raises(SendFailed) as info:
            await alice.send(BOB, "x")
        assert info.value.code == "device_list_rollback"
        # the server adds its own device with a list it signed itself
        forged = DeviceList(BOB, newer.version + 1, mock_ms(), mock_ms() + 86_400_000,
                            (DeviceEntry("EEEEEEEEEE", bytes(32), mock_ms()),)).sign(Ed25519PrivateKey.generate())
        state.device_lists[BOB] = replace(newer, version=newer.version + 1, body=forged.body,
                                          signature=forged.signature)
        with pytest.raises(SendFailed) as info:
            await alice.send(BOB, "y")
        assert info.value.code == "device_list_rejected"
        kinds = [e.kind for e in pending_security_events(alice)]
        assert kinds == ["device_list_rollback", "device_list_rejected"]
        # the genuine list is accepted again
        state.device_lists[BOB] = newer
        await alice.send(BOB, "z")
        assert [m.text for m in await collect(bob2, 1)] == ["z"]
    for client in (alice, bob1, bob2):
        await client.aclose()
