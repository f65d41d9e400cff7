import dataclasses

import pytest
from cryptography.hazmat.primitives.asymmetric.mlkem import MLKEM1024PrivateKey

from clientsdk.crypto import pqxdh, primitives
from clientsdk.crypto.errors import InvalidKey, MalformedMessage, ReplayedMessage, UnknownPrekey
from clientsdk.crypto.identity import DeviceIdentity, PrekeyStore
from federation import codec, signing
from federation.addresses import DeviceAddress
from federation.keys import BadBundle, PqPrekey, PrekeyBundle, SignedPrekey
from federation.signing import Purpose
from tests.crypto.test_identity import SMALL_ORDER, counter_rng

ALICE = DeviceAddress.parse("alice@example.org/AAAAAAAAAA")
BOB = DeviceAddress.parse("bob@example.net/BBBBBBBBBB")
T0 = 1_700_000_000_000


@dataclasses.dataclass
class Party:
    identity: DeviceIdentity
    store: PrekeyStore
    bundle: PrekeyBundle


def make_bob(seed=b"bob", with_otk=True, pq_one_time=False) -> Party:
    rng = counter_rng(seed)
    identity = DeviceIdentity.generate(rng)
    store = PrekeyStore()
    up = store.build_uploads(identity, T0, one_time_count=2, pq_one_time_count=1 if pq_one_time else 0, rng=rng)
    pq = up.pq_one_time_prekeys[0] if pq_one_time else up.pq_last_resort
    bundle = PrekeyBundle(str(BOB), identity.public_key, up.signed_prekey, pq,
                          up.one_time_prekeys[0] if with_otk else None)
    return Party(identity, store, bundle)


ALICE_ID = DeviceIdentity.generate(counter_rng(b"alice"))


@pytest.mark.parametrize("with_otk", [True, False])
def test_both_sides_agree(with_otk):
    bob = make_bob(with_otk=with_otk)
    before = bob.store.to_bytes()
    a = pqxdh.initiate(ALICE_ID, ALICE, bob.bundle, counter_rng(b"eph"))
    b = pqxdh.respond(bob.identity, BOB, ALICE, bob.store, a.initial)
    assert a.shared_key == b.shared_key and len(a.shared_key) == 32
    assert a.associated_data == b.associated_data
    assert a.associated_data == ALICE_ID.public_key + bob.identity.public_key + codec.encode([str(ALICE), str(BOB)])
    assert (a.initial.one_time_prekey_id is not None) == with_otk
    assert a.their_ratchet_key == bob.bundle.signed_prekey.public_key
    assert primitives.x25519_public_bytes(b.my_ratchet_key) == a.their_ratchet_key
    assert bob.store.to_bytes() == before          # the responder computation never mutates the store


def test_kdf_input_layout_is_normative():
    bob = make_bob()
    recorded = {}

    def encapsulate(pk):
        ct, ss = pqxdh.mlkem_encapsulate(pk)
        recorded["ss"] = ss
        return ct, ss

    eph_rng = counter_rng(b"eph2")
    a = pqxdh.initiate(ALICE_ID, ALICE, bob.bundle, eph_rng, encapsulate)
    ek = primitives.x25519_from_seed(counter_rng(b"eph2")(32))
    spk = bob.bundle.signed_prekey.public_key
    dh = [primitives.x25519(ALICE_ID.dh_private, spk), primitives.x25519(ek, bob.identity.dh_public),
          primitives.x25519(ek, spk), primitives.x25519(ek, bob.bundle.one_time_prekey.public_key)]
    ikm = b"\xff" * 32 + b"".join(dh) + recorded["ss"]
    expected = primitives.hkdf_sha256(ikm, bytes(32), b"SecureChat_PQXDH_X25519_SHA-256_ML-KEM-1024_v1", 32)
    assert a.shared_key == expected


def test_encapsulation_is_injectable_and_deterministic():
    bob = make_bob()
    fixed = pqxdh.mlkem_encapsulate(bob.bundle.pq_prekey.public_key)
    a1 = pqxdh.initiate(ALICE_ID, ALICE, bob.bundle, counter_rng(b"e"), lambda pk: fixed)
    a2 = pqxdh.initiate(ALICE_ID, ALICE, bob.bundle, counter_rng(b"e"), lambda pk: fixed)
    assert a1.shared_key == a2.shared_key and a1.initial == a2.initial


def test_pq_one_time_prekey():
    bob = make_bob(pq_one_time=True)
    a = pqxdh.initiate(ALICE_ID, ALICE, bob.bundle, counter_rng(b"e"))
    assert pqxdh.respond(bob.identity, BOB, ALICE, bob.store, a.initial).shared_key == a.shared_key


def test_encode_kem():
    pk = MLKEM1024PrivateKey.from_seed_bytes(bytes(64)).public_key().public_bytes_raw()
    assert pqxdh.encode_kem(pk) == b"\x01" + pk and len(pqxdh.encode_kem(pk)) == 1569
    with pytest.raises(InvalidKey):
        pqxdh.encode_kem(pk[:-1])


# --- bad bundles ------------------------------------------------------------------------


def test_bundle_without_pq_prekey_refused():
    bob = make_bob()
    wire = bob.bundle.to_wire()
    del wire["pq_prekey"]
    with pytest.raises(BadBundle):
        PrekeyBundle.from_wire(wire)
    with pytest.raises(BadBundle):
        pqxdh.initiate(ALICE_ID, ALICE, dataclasses.replace(bob.bundle, pq_prekey=None), counter_rng(b"e"))


def test_bad_signatures_refused():
    bob = make_bob()
    spk = bob.bundle.signed_prekey
    bad_spk = dataclasses.replace(spk, signature=bytes(64))
    with pytest.raises(BadBundle):
        pqxdh.initiate(ALICE_ID, ALICE, dataclasses.replace(bob.bundle, signed_prekey=bad_spk), counter_rng(b"e"))
    pq = bob.bundle.pq_prekey
    # a PQ prekey signed under the signed-prekey purpose (purpose confusion) is refused
    confused = dataclasses.replace(pq, signature=signing.sign(bob.identity.signing_key, Purpose.SIGNED_PREKEY,
                                                              pq.fields()))
    with pytest.raises(BadBundle):
        pqxdh.initiate(ALICE_ID, ALICE, dataclasses.replace(bob.bundle, pq_prekey=confused), counter_rng(b"e"))
    # keys signed by someone else
    mallory = DeviceIdentity.generate(counter_rng(b"mallory"))
    foreign = PqPrekey.create(mallory.signing_key, pq.key_id, pq.public_key, True, T0)
    with pytest.raises(BadBundle):
        pqxdh.initiate(ALICE_ID, ALICE, dataclasses.replace(bob.bundle, pq_prekey=foreign), counter_rng(b"e"))
    with pytest.raises(BadBundle):
        pqxdh.initiate(ALICE_ID, ALICE, dataclasses.replace(bob.bundle, device="not-an-address"),
                       counter_rng(b"e"))


def test_small_order_keys_refused():
    bob = make_bob()
    # small-order signed prekey, validly signed by Bob
    spk = SignedPrekey.create(bob.identity.signing_key, 99, bytes(32), T0)
    with pytest.raises(InvalidKey):
        pqxdh.initiate(ALICE_ID, ALICE, dataclasses.replace(bob.bundle, signed_prekey=spk), counter_rng(b"e"))
    from federation.keys import OneTimePrekey
    with pytest.raises(InvalidKey):
        pqxdh.initiate(ALICE_ID, ALICE, dataclasses.replace(bob.bundle, one_time_prekey=OneTimePrekey(5, bytes(32))),
                       counter_rng(b"e"))
    a = pqxdh.initiate(ALICE_ID, ALICE, bob.bundle, counter_rng(b"e"))
    with pytest.raises(InvalidKey):
        pqxdh.respond(bob.identity, BOB, ALICE, bob.store, dataclasses.replace(a.initial, ephemeral_key=bytes(32)))
    with pytest.raises(InvalidKey):
        pqxdh.respond(bob.identity, BOB, ALICE, bob.store, dataclasses.replace(a.initial, identity_key=SMALL_ORDER))


def test_wrong_lengths():
    bob = make_bob()
    a = pqxdh.initiate(ALICE_ID, ALICE, bob.bundle, counter_rng(b"e"))
    for change in ({"kem_ciphertext": a.initial.kem_ciphertext[:-1]}, {"ephemeral_key": b"x" * 31},
                   {"identity_key": b"x" * 33}):
        with pytest.raises(MalformedMessage):
            dataclasses.replace(a.initial, **change)
    with pytest.raises(InvalidKey):
        pqxdh.initiate(ALICE_ID, ALICE, bob.bundle, counter_rng(b"e"), lambda pk: (bytes(1568), b"short"))


def test_unknown_prekey_ids():
    bob = make_bob()
    a = pqxdh.initiate(ALICE_ID, ALICE, bob.bundle, counter_rng(b"e"))
    for change in ({"signed_prekey_id": 999}, {"one_time_prekey_id": 999}, {"pq_prekey_id": 999}):
        with pytest.raises(UnknownPrekey):
            pqxdh.respond(bob.identity, BOB, ALICE, bob.store, dataclasses.replace(a.initial, **change))


def test_replay_rejected_until_signed_prekey_deleted():
    bob = make_bob(with_otk=False)
    a = pqxdh.initiate(ALICE_ID, ALICE, bob.bundle, counter_rng(b"e"))
    pqxdh.respond(bob.identity, BOB, ALICE, bob.store, a.initial)
    bob.store.commit_initial(a.initial.signed_prekey_id, a.initial.replay_hash, None, a.initial.pq_prekey_id)
    with pytest.raises(ReplayedMessage):
        pqxdh.respond(bob.identity, BOB, ALICE, bob.store, a.initial)
    bob.store.delete_signed_prekey(a.initial.signed_prekey_id)
    with pytest.raises(UnknownPrekey):       # the key is gone, so the message is useless anyway
        pqxdh.respond(bob.identity, BOB, ALICE, bob.store, a.initial)


def test_tampered_kem_ciphertext_gives_other_key():
    bob = make_bob()
    a = pqxdh.initiate(ALICE_ID, ALICE, bob.bundle, counter_rng(b"e"))
    ct = bytearray(a.initial.kem_ciphertext)
    ct[0] ^= 1
    b = pqxdh.respond(bob.identity, BOB, ALICE, bob.store, dataclasses.replace(a.initial, kem_ciphertext=bytes(ct)))
    assert b.shared_key != a.shared_key       # ML-KEM implicit rejection; the ratchet MAC then fails
