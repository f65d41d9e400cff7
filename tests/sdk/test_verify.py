"""Verification through the client: safety numbers, QR codes, trust states, key changes, contact codes."""

from __future__ import annotations

from dataclasses import replace

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from clientsdk.crypto.errors import MalformedMessage
from clientsdk.crypto.verification import LookupHint, ScanVerdict
from clientsdk.errors import ContactKeyChanged
from clientsdk.verify import TrustState, VerificationError
from federation.keys import DeviceEntry, DeviceList
from tests.sdk.conftest import DOMAIN, collect, mock_ms, pending_security_events

ALICE = f"alice@{DOMAIN}"
BOB = f"bob@{DOMAIN}"
CAROL = f"carol@{DOMAIN}"



async def _contacts(world):
    """alice and bob, each a contact of the other."""
    alice = await world.register("alice")
    bob = await world.register("bob")
    async with alice.connect(), bob.connect():
        await alice.send(BOB, "hi")
        await collect(bob, 1)
        await bob.send(ALICE, "hi back")
        await collect(alice, 1)
    return alice, bob


def _swap_master_key(world, user: str) -> None:
    """The malicious server: a new master key and a list signed by it, with a device of its own."""
    state = world.storage.accounts._s
    evil = Ed25519PrivateKey.generate()
    state.accounts[user] = replace(state.accounts[user], master_key=evil.public_key().public_bytes_raw())
    old = state.device_lists[user]
    forged = DeviceList(user, old.version + 1, mock_ms(), mock_ms() + 86_400_000,
                        (DeviceEntry("EEEEEEEEEE", bytes(range(32)), mock_ms()),)).sign(evil)
    state.device_lists[user] = replace(old, version=old.version + 1, body=forged.body, signature=forged.signature)


async def test_safety_numbers_and_qr_codes_agree_on_both_sides(world):
    alice, bob = await _contacts(world)
    number = alice.safety_number(BOB)
    assert number == bob.safety_number(ALICE)
    assert len(number.replace(" ", "")) == 60 and len(number.split()) == 12
    assert alice.trust(BOB) is TrustState.UNVERIFIED

    # bob scans alice's screen: match; alice's own screen scanned back is reported, not verified
    assert await bob.verify_scanned(ALICE, alice.qr_payload(BOB)) is ScanVerdict.MATCH
    assert bob.trust(ALICE) is TrustState.VERIFIED
    assert await alice.verify_scanned(BOB, alice.qr_payload(BOB)) is ScanVerdict.OWN_CODE
    assert alice.trust(BOB) is TrustState.UNVERIFIED
    with pytest.raises(MalformedMessage):
        await alice.verify_scanned(BOB, b"not a code")

    # the humans compared the number: alice marks bob verified; it survives a restart
    await alice.mark_verified(BOB)
    await alice.aclose()
    alice = await world.reopen("alice")
    assert alice.trust(BOB) is TrustState.VERIFIED
    assert alice.safety_number(BOB) == number
    with pytest.raises(VerificationError) as info:
        alice.safety_number(CAROL)
    assert info.value.code == "unknown_contact"
    with pytest.raises(VerificationError):
        alice.safety_number(ALICE)
    await alice.aclose()
    await bob.aclose()


async def test_scanning_a_code_from_another_key_is_a_mismatch(world):
    alice, bob = await _contacts(world)
    async with alice.connect(), bob.connect():
        shown = bob.qr_payload(ALICE)
        _swap_master_key(world, BOB)
        alice._book.mark_stale(BOB)
        # bob is unverified: the server's new key is trusted on first use again (with an event)
        assert await alice.check_contact(BOB) is TrustState.UNVERIFIED
        assert [e.kind for e in pending_security_events(alice)] == ["master_key_changed"]
        assert await alice.verify_scanned(BOB, shown) is ScanVerdict.KEY_MISMATCH
        assert alice.trust(BOB) is TrustState.UNVERIFIED
        assert [e.kind for e in pending_security_events(alice)] == ["verification_mismatch"]
    await alice.aclose()
    await bob.aclose()


async def test_verified_contact_with_swapped_key_stops_until_accepted(world):
    alice, bob = await _contacts(world)
    await alice.mark_verified(BOB)
    number_before = alice.safety_number(BOB)
    async with alice.connect(), bob.connect():
        _swap_master_key(world, BOB)
        alice._book.mark_stale(BOB)                  # as a device_list_changed push would
        for _ in range(2):                           # every attempt is refused, with the event
            with pytest.raises(ContactKeyChanged) as info:
                await alice.send(BOB, "must not go out")
            assert "accepted" in str(info.value)
        assert alice.trust(BOB) is TrustState.CHANGED
        assert [e.kind for e in pending_security_events(alice)] == ["master_key_changed"] * 2
        assert alice.safety_number(BOB) == number_before          # the trusted key until accepted

        await alice.accept_key_change(BOB)
        assert alice.trust(BOB) is TrustState.UNVERIFIED           # verify again
        assert alice.safety_number(BOB) != number_before
        assert "master_key_accepted" in [e.kind for e in pending_security_events(alice)]
        assert alice._book.current(BOB).device_list.device_ids() == {"EEEEEEEEEE"}
        assert not alice._sessions.has(f"{BOB}/{bob.device_id}")   # bob's real device is not in the new list
        with pytest.raises(VerificationError):
            await alice.accept_key_change(BOB)                      # nothing pending any more
    await alice.aclose()
    await bob.aclose()


async def test_accept_refuses_a_key_that_changed_again(world):
    alice, bob = await _contacts(world)
    await alice.mark_verified(BOB)
    async with alice.connect():
        _swap_master_key(world, BOB)
        alice._book.mark_stale(BOB)
        with pytest.raises(ContactKeyChanged):
            await alice.send(BOB, "x")
        _swap_master_key(world, BOB)                                # a second swap before accepting
        with pytest.raises(ContactKeyChanged):
            await alice.accept_key_change(BOB)
        assert alice.trust(BOB) is TrustState.CHANGED
    await alice.aclose()
    await bob.aclose()


async def test_key_change_is_found_again_after_a_restart(world):
    alice, bob = await _contacts(world)
    await alice.mark_verified(BOB)
    async with alice.connect():
        _swap_master_key(world, BOB)
        alice._book.mark_stale(BOB)
        with pytest.raises(ContactKeyChanged):
            await alice.send(BOB, "x")
    await alice.aclose()
    alice = await world.reopen("alice")
    assert alice.trust(BOB) is TrustState.VERIFIED                  # the stored key is still the old one
    async with alice.connect():
        alice._book.mark_stale(BOB)
        with pytest.raises(ContactKeyChanged):
            await alice.send(BOB, "y")
        assert alice.trust(BOB) is TrustState.CHANGED
    await alice.aclose()
    await bob.aclose()


async def test_contact_codes_only_help_find_a_contact(world):
    alice, bob = await _contacts(world)
    carol = await world.register("carol")
    code = carol.contact_code()
    assert code.startswith(f"{CAROL}#") and len(code.split("#")[1]) == 8
    async with alice.connect():
        assert await alice.lookup_contact_code(code) is LookupHint.CONSISTENT
        assert alice.trust(CAROL) is TrustState.UNVERIFIED          # a fitting code never verifies
        wrong = f"{CAROL}#{'0' * 8 if not code.endswith('00000000') else '1' * 8}"
        assert await alice.lookup_contact_code(wrong) is LookupHint.KEY_DIFFERS
        assert await alice.lookup_contact_code(bob.contact_code()) is LookupHint.CONSISTENT
        assert alice.trust(BOB) is TrustState.UNVERIFIED
        await alice.mark_verified(BOB)
        assert await alice.lookup_contact_code(f"{BOB}#00000000") in (LookupHint.KEY_DIFFERS,
                                                                       LookupHint.CONSISTENT)
        assert alice.trust(BOB) is TrustState.VERIFIED              # nor does a code unverify
        with pytest.raises(MalformedMessage):
            await alice.lookup_contact_code("carol#xyz")
    for client in (alice, bob, carol):
        await client.aclose()
