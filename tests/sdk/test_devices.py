"""Own devices: listing, linking codes, revocation, and a server that tries to re-add a revoked device."""

from __future__ import annotations

from dataclasses import replace

import pytest
import trio
from hypothesis import given, settings
from hypothesis import strategies as st

from clientsdk.crypto.errors import MalformedMessage, UnsupportedVersion
from clientsdk.devices import DeviceError, LinkingCode, link_tag
from clientsdk.errors import NotMasterDevice, SendFailed
from clientsdk.events import SecurityEvent
from homeserver.storage.models import DeviceState
from tests.sdk.conftest import DOMAIN, collect

ALICE = f"alice@{DOMAIN}"
BOB = f"bob@{DOMAIN}"


def _drain(client) -> list:
    out = []
    while True:
        try:
            out.append(client.events().receive_nowait())
        except trio.WouldBlock:
            return out


def _states(infos) -> dict[str, str]:
    return {d.device_id: d.state for d in infos}


# --- linking codes (sans-I/O) ----------------------------------------------------------------

@settings(max_examples=30, deadline=None)
@given(key=st.binary(min_size=32, max_size=32), other=st.binary(min_size=32, max_size=32))
def test_linking_code_round_trip_and_pinning(key: bytes, other: bytes) -> None:
    code = LinkingCode.for_device(ALICE, "ABCDEFGHIJ", key)
    text = str(code)
    assert text.startswith("ABCDEFGHIJ-") and len(text) == 10 + 4 * 5
    parsed = LinkingCode.parse(text.lower().replace("-", " "))
    assert parsed.device_id == "ABCDEFGHIJ" and parsed.matches(ALICE, key)
    assert parsed.matches(ALICE, other) == (other == key)
    assert not parsed.matches(BOB, key)                      # the user is bound too
    scanned = LinkingCode.from_qr(code.qr_payload(ALICE), ALICE)
    assert scanned.identity_key == key and scanned.matches(ALICE, key)
    assert scanned.matches(ALICE, other) == (other == key)


def test_linking_code_rejects_garbage() -> None:
    for text in ("", "ABCDEFGHIJ", "ABCDEFGHIJ-1111-1111-1111-1111", "abcdefghij-AAAA-AAAA-AAAA-AAA"):
        with pytest.raises(MalformedMessage):
            LinkingCode.parse(text)
    with pytest.raises(UnsupportedVersion):
        LinkingCode.from_qr(b"\x81\xa1v\x02", ALICE)
    with pytest.raises(MalformedMessage):
        LinkingCode.from_qr(b"\x81\xa1v\x01", ALICE)
    code = LinkingCode.for_device(ALICE, "ABCDEFGHIJ", bytes(32))
    with pytest.raises(DeviceError):
        LinkingCode.from_qr(code.qr_payload(ALICE), BOB)
    assert link_tag(ALICE, "ABCDEFGHIJ", bytes(32)) != link_tag(ALICE, "ABCDEFGHIK", bytes(32))


# --- through the server --------------------------------------------------------------------------

async def test_devices_and_approval_by_linking_code(world):
    alice1 = await world.register("alice")
    alice2 = await world.login("alice", "alice2")
    alice3 = await world.login("alice", "alice3")
    async with alice1.connect(), alice2.connect(), alice3.connect():
        infos = await alice1.devices()
        assert _states(infos) == {alice1.device_id: "current", alice2.device_id: "pending",
                                  alice3.device_id: "pending"}
        me = next(d for d in infos if d.this_device)
        assert me.device_id == alice1.device_id and me.server_state == "active"
        pending = next(d for d in infos if d.device_id == alice2.device_id)
        assert pending.linking_code == alice2.linking_code()      # what the master shows to compare

        # a code with the right device id but another key (a server swapping keys) is refused
        forged = str(LinkingCode.for_device(ALICE, alice2.device_id, alice3.identity_key))
        with pytest.raises(DeviceError) as info:
            await alice1.approve_link(forged)
        assert info.value.code == "key_mismatch"
        with pytest.raises(NotMasterDevice):
            await alice2.approve_link(alice3.linking_code())

        assert await alice1.approve_link(alice2.linking_code()) == 2
        assert await alice1.approve_link(alice3.linking_qr()) == 3
        assert _states(await alice2.devices()) == {d: "current" for d in
                                                   (alice1.device_id, alice2.device_id, alice3.device_id)}
        with pytest.raises(DeviceError) as info:
            await alice1.approve_link(alice2.linking_code())     # no longer pending
        assert info.value.code == "not_found"
    for client in (alice1, alice2, alice3):
        await client.aclose()


async def test_revoked_device_gets_nothing_and_server_cannot_re_add_it(world):
    alice1 = await world.register("alice")
    alice2 = await world.login("alice", "alice2")
    bob = await world.register("bob")
    state = world.storage.accounts._s
    async with alice1.connect(), bob.connect():
        async with alice2.connect():
            await alice1.approve_link(alice2.linking_code())
            with_alice2 = state.device_lists[ALICE]
            await bob.send(ALICE, "to both")
            await collect(alice2, 1)
            await collect(alice1, 1)
            with pytest.raises(NotMasterDevice):
                await alice2.revoke_device(alice1.device_id)
            with pytest.raises(DeviceError):
                await alice1.revoke_device(alice1.device_id)

            assert await alice1.revoke_device(alice2.device_id) == 3
            without_alice2 = state.device_lists[ALICE]
            with trio.fail_after(10):
                while not alice2.revoked:
                    await trio.sleep(0.01)
        assert any(isinstance(e, SecurityEvent) and e.kind == "device_revoked" for e in _drain(alice2))
        assert _states(await alice1.devices()) == {alice1.device_id: "current", alice2.device_id: "revoked"}

        # bob's next message goes to alice1 only (his client follows the new signed list)
        _drain(bob)
        await bob.send(ALICE, "after the revocation")
        assert [m.text for m in await collect(alice1, 1)] == ["after the revocation"]
        assert alice2.device_id not in bob._book.current(ALICE).device_list.device_ids()

        # the server re-activates the device and serves the old list that names it: bob refuses it
        key = (ALICE, alice2.device_id)
        state.devices[key] = replace(state.devices[key], state=DeviceState.ACTIVE)
        state.device_lists[ALICE] = with_alice2
        bob._book.mark_stale(ALICE)
        with pytest.raises(SendFailed) as info:
            await bob.send(ALICE, "must not reach the revoked device")
        assert info.value.code == "device_list_rollback"
        assert [e.kind for e in _drain(bob) if isinstance(e, SecurityEvent)] == ["device_list_rollback"]

        # with the genuine list back and the device "active" at the server, nobody encrypts to it
        state.device_lists[ALICE] = without_alice2
        box = f"{ALICE}/{alice2.device_id}"
        queued = len(state.mailboxes.get(box, {}))
        await bob.send(ALICE, "still not for the revoked device")
        assert [m.text for m in await collect(alice1, 1)] == ["still not for the revoked device"]
        assert len(state.mailboxes.get(box, {})) == queued
        infos = {d.device_id: d for d in await alice1.devices()}
        assert (infos[alice2.device_id].state, infos[alice2.device_id].server_state) == ("revoked", "active")

        # offered as pending again, the master device refuses to sign it back in
        state.devices[key] = replace(state.devices[key], state=DeviceState.PENDING)
        with pytest.raises(DeviceError) as info:
            await alice1.approve_link(alice2.linking_code())
        assert info.value.code == "device_revoked"
        assert state.device_lists[ALICE] is without_alice2
    for client in (alice1, alice2, bob):
        await client.aclose()


async def test_revoking_a_pending_device(world):
    alice1 = await world.register("alice")
    alice2 = await world.login("alice", "alice2")
    async with alice1.connect():
        assert await alice1.revoke_device(alice2.device_id) is None
        assert _states(await alice1.devices())[alice2.device_id] == "revoked"
        with pytest.raises(DeviceError) as info:
            await alice1.approve_link(alice2.linking_code())
        assert info.value.code == "device_revoked"
        with pytest.raises(DeviceError) as info:
            await alice1.revoke_device("ZZZZZZZZZZ")
        assert info.value.code == "not_found"
    # the revoked set is persisted: a reopened master device still refuses it
    await alice1.aclose()
    alice1 = await world.reopen("alice")
    async with alice1.connect():
        with pytest.raises(DeviceError):
            await alice1.approve_link(alice2.linking_code())
    await alice1.aclose()
    await alice2.aclose()
