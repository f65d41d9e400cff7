import dataclasses

import pytest

from clientsdk.crypto.errors import (
    DecryptionFailed, InvalidKey, MalformedMessage, ReplayedMessage, UnknownPrekey, UnsupportedVersion,
)
from clientsdk.crypto.session import (
    NormalMessage, PrekeyMessage, Session, accept_prekey_message, parse_message,
)
from federation import codec
from tests.crypto.test_identity import counter_rng
from tests.crypto.test_pqxdh import ALICE, ALICE_ID, BOB, make_bob

T0 = 1_700_000_000_000


def start(with_otk=True, seed=b"s"):
    bob = make_bob(with_otk=with_otk)
    rng = counter_rng(seed)
    alice = Session.initiate(ALICE_ID, ALICE, bob.bundle, rng=rng)
    return alice, bob, rng


def accept(bob, wire, rng):
    return accept_prekey_message(bob.identity, BOB, bob.store, ALICE, ALICE_ID.public_key, wire, T0, rng)


@pytest.mark.parametrize("with_otk", [True, False])
def test_prekey_messages_until_first_reply(with_otk):
    alice, bob, rng = start(with_otk)
    otk_count = len(bob.store.one_time)
    w1, w2 = alice.encrypt(b"one"), alice.encrypt(b"two")
    assert all(isinstance(parse_message(w), PrekeyMessage) for w in (w1, w2))
    bob_session, plaintext = accept(bob, w1, rng)
    assert plaintext == b"one"
    assert len(bob.store.one_time) == otk_count - (1 if with_otk else 0)
    assert bob_session.belongs_here(parse_message(w2))
    assert bob_session.decrypt(w2, T0, rng) == b"two"
    assert alice.awaiting_reply
    assert alice.decrypt(bob_session.encrypt(b"reply"), T0, rng) == b"reply"
    assert not alice.awaiting_reply
    w3 = alice.encrypt(b"three")
    assert isinstance(parse_message(w3), NormalMessage)
    assert bob_session.decrypt(w3, T0, rng) == b"three"
    assert bob_session.associated_data == alice.associated_data
    assert bob_session.their_identity_key == ALICE_ID.public_key


def test_second_prekey_message_arriving_first():
    alice, bob, rng = start()
    w1, w2 = alice.encrypt(b"one"), alice.encrypt(b"two")
    bob_session, plaintext = accept(bob, w2, rng)
    assert plaintext == b"two"
    with pytest.raises(ReplayedMessage):         # the PQXDH run is recorded: a new session is refused
        accept(bob, w1, rng)
    assert bob_session.decrypt(w1, T0, rng) == b"one"


def test_replayed_initial_message_rejected():
    alice, bob, rng = start(with_otk=False)
    w1 = alice.encrypt(b"one")
    bob_session, _ = accept(bob, w1, rng)
    with pytest.raises(ReplayedMessage):
        accept(bob, w1, rng)
    with pytest.raises(ReplayedMessage):
        bob_session.decrypt(w1, T0, rng)


def test_failed_first_message_burns_nothing():
    alice, bob, rng = start()
    w1 = alice.encrypt(b"one")
    store_before = bob.store.to_bytes()
    msg = parse_message(w1)
    body = bytearray(msg.body)
    body[-1] ^= 1
    with pytest.raises(DecryptionFailed):
        accept(bob, PrekeyMessage(msg.initial, bytes(body)), rng)
    # every PQXDH field is bound by the key: tampering fails authentication
    kem = bytearray(msg.initial.kem_ciphertext)
    kem[100] ^= 1
    for initial in (dataclasses.replace(msg.initial, kem_ciphertext=bytes(kem)),
                    dataclasses.replace(msg.initial, one_time_prekey_id=None)):
        with pytest.raises(DecryptionFailed):
            accept(bob, PrekeyMessage(initial, msg.body), rng)
    assert bob.store.to_bytes() == store_before
    _, plaintext = accept(bob, w1, rng)
    assert plaintext == b"one"
    assert bob.store.to_bytes() != store_before


def test_identity_key_must_match_the_device_list():
    alice, bob, rng = start()
    w1 = alice.encrypt(b"one")
    with pytest.raises(InvalidKey):
        accept_prekey_message(bob.identity, BOB, bob.store, ALICE, b"\x09" * 32, w1, T0, rng)


def test_unknown_prekey_and_foreign_prekey_message():
    alice, bob, rng = start()
    msg = parse_message(alice.encrypt(b"one"))
    with pytest.raises(UnknownPrekey):
        accept(bob, PrekeyMessage(dataclasses.replace(msg.initial, signed_prekey_id=12345), msg.body), rng)
    bob_session, _ = accept(bob, msg, rng)
    other_alice = Session.initiate(ALICE_ID, ALICE, make_bob().bundle, rng=counter_rng(b"other"))
    with pytest.raises(MalformedMessage):
        bob_session.decrypt(other_alice.encrypt(b"new run"), T0, rng)
    with pytest.raises(MalformedMessage):
        accept(bob, bob_session.encrypt(b"normal"), rng)


def test_sessions_serialise():
    alice, bob, rng = start()
    w1 = alice.encrypt(b"one")
    alice = Session.from_bytes(alice.to_bytes())
    assert alice.awaiting_reply
    bob_session, _ = accept(bob, w1, rng)
    w2 = alice.encrypt(b"two")
    assert isinstance(parse_message(w2), PrekeyMessage)
    bob_session = Session.from_bytes(bob_session.to_bytes())
    assert bob_session.decrypt(w2, T0, rng) == b"two"
    assert alice.decrypt(bob_session.encrypt(b"r"), T0, rng) == b"r"
    alice = Session.from_bytes(alice.to_bytes())
    assert not alice.awaiting_reply
    assert bob_session.decrypt(alice.encrypt(b"n"), T0, rng) == b"n"
    assert alice.their_address == BOB and bob_session.their_address == ALICE
    with pytest.raises(UnsupportedVersion):
        Session.from_bytes(codec.encode({**codec.decode(alice.to_bytes()), "v": 7}))
    with pytest.raises(MalformedMessage):
        Session.from_bytes(codec.encode({**codec.decode(alice.to_bytes()), "me": "nonsense"}))


def test_bad_wire_messages():
    alice, bob, rng = start()
    w1 = alice.encrypt(b"one")
    for cut in (0, 1, 10, len(w1) // 2, len(w1) - 1):
        with pytest.raises(MalformedMessage):
            parse_message(w1[:cut])
    obj = codec.decode(w1)
    with pytest.raises(UnsupportedVersion):
        parse_message(codec.encode({**obj, "v": 2}))
    for bad in ({"type": "other"}, {"ik": b"x" * 31}, {"kem": b"x" * 100}, {"spk": -1}, {"otk": "1"},
                {"extra": 1}, {"body": "text"}):
        with pytest.raises(MalformedMessage):
            parse_message(codec.encode({**obj, **bad}))
    with pytest.raises(MalformedMessage):           # body too short for a ratchet message
        accept(bob, codec.encode({**obj, "body": b"x" * 50}), rng)
    with pytest.raises(MalformedMessage):
        parse_message(codec.encode({"v": 1, "type": "msg", "body": b"x", "ik": b"y"}))
