"""A malicious homeserver that swaps a master key, serves an old list or forges one is detected."""

from __future__ import annotations

from dataclasses import replace

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from clientsdk.errors import ContactKeyChanged, SendFailed
from federation.keys import DeviceEntry, DeviceList
from tests.sdk.conftest import DOMAIN, collect, mock_ms, pending_security_events

ALICE = f"alice@{DOMAIN}"
BOB = f"bob@{DOMAIN}"



async def _talking(world):
    alice = await world.register("alice")
    bob = await world.register("bob")
    return alice, bob


async def test_swapped_master_key_stops_sending(world):
    alice, bob = await _talking(world)
    async with alice.connect(), bob.connect():
        await alice.send(BOB, "hello")
        await collect(bob, 1)
        state = world.storage.accounts._s
        evil = Ed25519PrivateKey.generate().public_key().public_bytes_raw()
        state.accounts[BOB] = replace(state.accounts[BOB], master_key=evil)
        alice._book.mark_stale(BOB)          # as a device_list_changed push would
        with pytest.raises(ContactKeyChanged):
            await alice.send(BOB, "must not go out")
        assert [e.kind for e in pending_security_events(alice)] == ["master_key_changed"]
    await alice.aclose()
    await bob.aclose()


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
