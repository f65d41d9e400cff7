"""The SDK's sans-I/O parts: content format, events, prekey upkeep, backoff, sessions, contact book."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from clientsdk.connection import Backoff
from clientsdk.content import TEXT, Content, content_event
from clientsdk.crypto.errors import MalformedMessage, UnsupportedVersion
from clientsdk.crypto.identity import DeviceIdentity, MasterKey, PrekeyStore, new_device_list
from clientsdk.crypto.session import Session, parse_message
from clientsdk.devicelists import ContactBook
from clientsdk.events import MessageReceived, SecurityEvent
from clientsdk.sessions import NoSession, SessionBook, verified_bundle
from clientsdk.upkeep import SIGNED_PREKEY_MAX_AGE_MS, plan_prekey_upload
from federation import codec
from federation.addresses import DeviceAddress
from federation.keys import BadBundle, DeviceEntry, PrekeyBundle

ALICE = "alice@example.org"
BOB = "bob@example.org"
NOW = 1_800_000_000_000


@settings(max_examples=50, deadline=None)
@given(text=st.text(max_size=200), version=st.integers(0, 2**32), sent=st.integers(-(2**40), 2**40))
def test_content_round_trip(text, version, sent):
    content = Content(TEXT, "m1", BOB, text, sent, version, bytes(32))
    assert Content.from_bytes(content.to_bytes()) == content


def test_content_rejects_bad_input():
    good = Content(TEXT, "m1", BOB, "hi", 1, 1, bytes(32)).to_bytes()
    obj = codec.decode(good)
    with pytest.raises(UnsupportedVersion):
        Content.from_bytes(codec.encode({**obj, "v": 2}))
    with pytest.raises(MalformedMessage):
        Content.from_bytes(codec.encode({**obj, "list_hash": b"short"}))
    with pytest.raises(MalformedMessage):
        Content.from_bytes(good + b"\x00")


def test_content_event_files_copies_and_refuses_misaddressed():
    alice1 = DeviceAddress.parse(f"{ALICE}/AAAAAAAAAA")
    event = content_event(Content(TEXT, "m", BOB, "hi", 1, 1, bytes(32)), alice1, BOB, 5)
    assert isinstance(event, MessageReceived) and (event.conversation, event.outgoing) == (ALICE, False)
    copy = content_event(Content(TEXT, "m", BOB, "hi", 1, 1, bytes(32)), alice1, ALICE, 5)
    assert isinstance(copy, MessageReceived) and (copy.conversation, copy.outgoing) == (BOB, True)
    wrong = content_event(Content(TEXT, "m", "carol@example.org", "hi", 1, 1, bytes(32)), alice1, BOB, 5)
    assert isinstance(wrong, SecurityEvent) and wrong.kind == "misaddressed_message"
    assert content_event(Content("future-type", "m", BOB, "", 1, 1, bytes(32)), alice1, BOB, 5) is None


def test_prekey_upkeep_refills_below_half_and_rotates_weekly():
    identity = DeviceIdentity.generate()
    prekeys = PrekeyStore()
    first = plan_prekey_upload(prekeys, identity, NOW, 0, 20)
    assert first is not None and len(first["one_time_prekeys"]) == 20 and "signed_prekey" in first
    assert plan_prekey_upload(prekeys, identity, NOW, 11, 20) is None          # more than half left
    refill = plan_prekey_upload(prekeys, identity, NOW, 9, 20)
    assert refill is not None and len(refill["one_time_prekeys"]) == 11 and "signed_prekey" not in refill
    rotated = plan_prekey_upload(prekeys, identity, NOW + SIGNED_PREKEY_MAX_AGE_MS, 20, 20)
    assert rotated is not None and set(rotated) == {"signed_prekey"}
    assert rotated["signed_prekey"]["id"] > first["signed_prekey"]["id"]


def test_backoff_grows_with_jitter_and_is_capped():
    backoff = Backoff(initial_s=1, maximum_s=30)
    assert backoff.delay(0, lambda: 0.0) == 0.5 and backoff.delay(0, lambda: 1.0) == 1.0
    assert backoff.delay(3, lambda: 1.0) == 8
    assert backoff.delay(100, lambda: 1.0) == 30


def _device(user: str, device_id: str) -> tuple[DeviceIdentity, DeviceAddress, PrekeyStore, PrekeyBundle]:
    identity = DeviceIdentity.generate()
    prekeys = PrekeyStore()
    uploads = prekeys.build_uploads(identity, NOW, one_time_count=2)
    address = DeviceAddress.parse(f"{user}/{device_id}")
    bundle = PrekeyBundle(str(address), identity.public_key, uploads.signed_prekey, uploads.pq_last_resort,
                          uploads.one_time_prekeys[0])
    return identity, address, prekeys, bundle


def test_simultaneous_initiation_converges():
    """Both devices start a session at once; keeping both lets them settle on one (Sesame)."""
    a_id, a_addr, a_pre, a_bundle = _device(ALICE, "AAAAAAAAAA")
    b_id, b_addr, b_pre, b_bundle = _device(BOB, "BBBBBBBBBB")
    a_book, b_book = SessionBook(), SessionBook()
    a_book.add(str(b_addr), Session.initiate(a_id, a_addr, b_bundle))
    b_book.add(str(a_addr), Session.initiate(b_id, b_addr, a_bundle))
    from_a, _ = a_book.encrypt(str(b_addr), b"a1")
    from_b, _ = b_book.encrypt(str(a_addr), b"b1")
    for book, me, my_addr, pre, sender, key, data in (
            (b_book, b_id, b_addr, b_pre, a_addr, a_id.public_key, from_a),
            (a_book, a_id, a_addr, a_pre, b_addr, b_id.public_key, from_b)):
        message = parse_message(data)
        assert book.decrypt_existing(str(sender), message, NOW) is None
        assert book.accept(me, my_addr, pre, sender, key, message, NOW) in (b"a1", b"b1")
    for i in range(3):   # ping-pong on whatever each side now considers current
        out, _ = a_book.encrypt(str(b_addr), b"a%d" % i)
        assert b_book.decrypt_existing(str(a_addr), parse_message(out), NOW) == b"a%d" % i
        back, _ = b_book.encrypt(str(a_addr), b"b%d" % i)
        assert a_book.decrypt_existing(str(b_addr), parse_message(back), NOW) == b"b%d" % i
    restored = SessionBook()
    restored.load(str(b_addr), a_book.state_bytes(str(b_addr)))
    assert restored.has(str(b_addr))
    with pytest.raises(NoSession):
        SessionBook().encrypt(str(b_addr), b"x")


def test_bundle_must_match_the_signed_list():
    _, _, _, bundle = _device(BOB, "BBBBBBBBBB")
    assert verified_bundle(bundle.to_wire(), lambda d: bundle.identity_key) == bundle
    with pytest.raises(BadBundle):
        verified_bundle(bundle.to_wire(), lambda d: None)                  # not listed
    with pytest.raises(BadBundle):
        verified_bundle(bundle.to_wire(), lambda d: bytes(32))            # another key listed


def test_contact_book_tofu_version_hash_and_equivocation():
    events = []
    book = ContactBook(ALICE, events.append)
    master = MasterKey.generate()
    entry = DeviceEntry("BBBBBBBBBB", DeviceIdentity.generate().public_key, NOW)
    v1 = new_device_list(master, BOB, [entry], NOW)
    outcome = book.accept(BOB, {"master_key": master.public_key, "device_list": v1.to_wire()}, NOW)
    assert outcome.changed and book.fresh(BOB) is not None and book.contacts[BOB].trust == "tofu"
    # a peer's message announcing version 2 makes the cached list stale
    book.note_sender_list(BOB, Content(TEXT, "m", ALICE, "", 1, 2, bytes(32)))
    assert book.fresh(BOB) is None
    # same version, different hash: equivocation
    book.note_sender_list(BOB, Content(TEXT, "m", ALICE, "", 1, 1, bytes(32)))
    assert [e.kind for e in events if isinstance(e, SecurityEvent)] == ["device_list_equivocation"]
