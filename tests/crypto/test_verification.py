"""Safety numbers (Signal's NumericFingerprint v0), QR payloads and contact codes (DESIGN §4)."""

import hashlib

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import given, settings
from hypothesis import strategies as st

from clientsdk.crypto import verification as v
from clientsdk.crypto.errors import InvalidKey, MalformedMessage, UnsupportedVersion
from clientsdk.crypto.verification import (
    ContactCode, LookupHint, Party, SafetyNumber, ScanVerdict, compare_scanned, displayable, fingerprint,
    numeric_fingerprint_hash, qr_payload, safety_number,
)
from federation import codec
from federation.addresses import UserAddress


def key(seed: int) -> bytes:
    return Ed25519PrivateKey.from_private_bytes(bytes([seed]) * 32).public_key().public_bytes_raw()


ALICE = Party(UserAddress.parse("alice@example.org"), key(1))
BOB = Party(UserAddress.parse("bob@example.net"), key(2))
MALLORY_AS_BOB = Party(BOB.address, key(3))


# --- Signal's own test vector (libsignal rust/protocol/src/fingerprint.rs, fingerprint_test_v1) ----
# Cross-checks the iteration and display encoding against Signal's implementation; Signal hashes
# its 33-byte serialised identity key and an E.164 number, we hash the 32-byte master key and the
# user address, with exactly the same construction.

SIGNAL_ALICE_KEY = bytes.fromhex("0506863bc66d02b40d27b8d49ca7c09e9239236f9d7d25d6fcca5ce13c7064d868")
SIGNAL_BOB_KEY = bytes.fromhex("05f781b6fb32fed9ba1cf2de978d4d5da28dc34046ae814402b5c0dbd96fda907b")


def test_matches_libsignal_numeric_fingerprint_vector():
    alice = numeric_fingerprint_hash(SIGNAL_ALICE_KEY, b"+14152222222")
    bob = numeric_fingerprint_hash(SIGNAL_BOB_KEY, b"+14153333333")
    assert alice[:32].hex() == "1e301a0353dce3dbe7684cb8336e85136cdc0ee96219494ada305d62a7bd61df"
    assert bob[:32].hex() == "d62cbf73a11592015b6b9f1682ac306fea3aaf3885b84d12bca631e9d4fb3a4d"
    halves = sorted([displayable(alice), displayable(bob)])
    assert "".join(halves) == "300354477692869396892869876765458257569162576843440918079131"


def test_iteration_definition():
    """hash_1 = SHA-512(0x0000 ‖ key ‖ id ‖ key); hash_{i+1} = SHA-512(hash_i ‖ key); 5,200 hashes."""
    k, sid = key(9), b"x@example.org"
    h = hashlib.sha512(b"\x00\x00" + k + sid + k).digest()
    for _ in range(v.ITERATIONS - 1):
        h = hashlib.sha512(h + k).digest()
    assert numeric_fingerprint_hash(k, sid) == h
    assert fingerprint(Party(UserAddress.parse("x@example.org"), k)) == h
    assert v.ITERATIONS == 5200


def test_displayable_encoding():
    chunks = ["ffffffffff", "0000000001", "00000186a0", "00000186a1", "0102030405", "0000000000"]
    fp = bytes.fromhex("".join(chunks)) + bytes(34)
    assert displayable(fp) == "".join(["%05d" % (0xFFFFFFFFFF % 100000), "00001", "00000", "00001",
                                       "%05d" % (0x0102030405 % 100000), "00000"])
    with pytest.raises(ValueError):
        displayable(bytes(29))


# --- safety numbers -----------------------------------------------------------------

def test_safety_number_identical_on_both_sides():
    a_view = safety_number(ALICE, BOB)
    b_view = safety_number(BOB, ALICE)
    assert a_view == b_view
    assert len(a_view.digits) == 60 and a_view.digits.isdigit()
    assert len(a_view.groups()) == 12 and all(len(g) == 5 for g in a_view.groups())
    assert str(a_view) == " ".join(a_view.groups())
    halves = sorted([displayable(fingerprint(ALICE)), displayable(fingerprint(BOB))])
    assert a_view.digits == "".join(halves)  # lower half first


def test_safety_number_changes_with_key_or_address():
    base = safety_number(ALICE, BOB)
    assert safety_number(ALICE, MALLORY_AS_BOB) != base
    assert safety_number(ALICE, Party(UserAddress.parse("bob@example.org"), BOB.master_public_key)) != base


@given(st.binary(min_size=32, max_size=32), st.binary(min_size=32, max_size=32))
@settings(max_examples=5, deadline=None)
def test_symmetric_for_any_keys(k1, k2):
    a, b = Party(ALICE.address, k1), Party(BOB.address, k2)
    assert safety_number(a, b) == safety_number(b, a)


def test_party_validation():
    with pytest.raises(InvalidKey):
        Party(ALICE.address, bytes(31))
    assert Party.of("alice@example.org", key(1)) == ALICE
    with pytest.raises(ValueError):
        safety_number(ALICE, ALICE)
    with pytest.raises(ValueError):
        SafetyNumber("123")


# --- QR payload ---------------------------------------------------------------------

def test_qr_round_trip_match():
    shown_by_bob = qr_payload(BOB, ALICE)
    assert compare_scanned(shown_by_bob, ALICE, BOB) is ScanVerdict.MATCH
    assert compare_scanned(qr_payload(ALICE, BOB), BOB, ALICE) is ScanVerdict.MATCH
    obj = codec.decode(shown_by_bob)
    assert obj["v"] == 1
    assert obj["shown_by"] == {"address": "bob@example.net", "fingerprint": fingerprint(BOB)}
    assert obj["shown_to"] == {"address": "alice@example.org", "fingerprint": fingerprint(ALICE)}
    assert len(obj["shown_by"]["fingerprint"]) == 64  # the FULL fingerprint


def test_qr_key_mismatch_either_side():
    # Alice's view of Bob is Mallory's key (MITM): Bob's screen disagrees
    assert compare_scanned(qr_payload(BOB, ALICE), ALICE, MALLORY_AS_BOB) is ScanVerdict.KEY_MISMATCH
    # Bob's view of Alice is a wrong key
    assert compare_scanned(qr_payload(BOB, Party(ALICE.address, key(4))), ALICE, BOB) is ScanVerdict.KEY_MISMATCH


def test_qr_wrong_contact_and_own_code():
    carol = Party(UserAddress.parse("carol@example.org"), key(5))
    assert compare_scanned(qr_payload(carol, ALICE), ALICE, BOB) is ScanVerdict.WRONG_CONTACT
    assert compare_scanned(qr_payload(BOB, carol), ALICE, BOB) is ScanVerdict.WRONG_CONTACT
    assert compare_scanned(qr_payload(ALICE, BOB), ALICE, BOB) is ScanVerdict.OWN_CODE


def test_qr_malformed_and_versions():
    good = codec.decode(qr_payload(BOB, ALICE))
    with pytest.raises(UnsupportedVersion):
        compare_scanned(codec.encode({**good, "v": 2}), ALICE, BOB)
    bad_payloads = [
        b"https://example.org/not-a-securechat-code",
        b"\xc1",
        codec.encode([1]),
        codec.encode({**good, "extra": 1}),
        codec.encode({k: val for k, val in good.items() if k != "shown_to"}),
        codec.encode({**good, "shown_by": {**good["shown_by"], "fingerprint": bytes(32)}}),
        codec.encode({**good, "shown_by": {**good["shown_by"], "address": "not an address"}}),
        codec.encode({**good, "shown_to": {"address": "alice@example.org"}}),
        codec.encode({**good, "v": "1"}),
    ]
    for payload in bad_payloads:
        with pytest.raises(MalformedMessage):
            compare_scanned(payload, ALICE, BOB)


# --- contact codes: lookup hints, never trust ---------------------------------------

def test_contact_code_format_and_round_trip():
    code = ContactCode.for_key(ALICE.address, ALICE.master_public_key)
    text = str(code)
    local, tag = text.split("#")
    assert local == "alice@example.org" and len(tag) == 8 and tag == tag.upper()
    assert tag == hashlib.sha256(b"SecureChat_ContactCode_v1" + ALICE.master_public_key).digest()[:4].hex().upper()
    assert ContactCode.parse(text) == code
    assert ContactCode.parse(text.lower()) == code


def test_contact_code_is_only_a_lookup_hint():
    code = ContactCode.for_key(ALICE.address, ALICE.master_public_key)
    hint = code.matches(ALICE.address, ALICE.master_public_key)
    assert hint is LookupHint.CONSISTENT
    assert isinstance(hint, LookupHint) and not isinstance(hint, ScanVerdict)
    assert not hint.verifies_contact  # visible in the type: a hint never marks a contact verified
    assert code.matches(ALICE.address, key(7)) is LookupHint.KEY_DIFFERS
    assert code.matches(BOB.address, ALICE.master_public_key) is LookupHint.OTHER_USER
    assert all(not h.verifies_contact for h in LookupHint)


@pytest.mark.parametrize("text", ["alice@example.org", "alice@example.org#", "alice@example.org#1A2B3C4",
                                  "alice@example.org#1A2B3C4D5", "alice@example.org#1A2B3C4G",
                                  "#1A2B3C4D", "Alice@@example.org#1A2B3C4D", "alice@example.org#1A2B#3C4D",
                                  "alice@example.org# 1A2B3C4", 42])
def test_contact_code_parse_errors(text):
    with pytest.raises(MalformedMessage):
        ContactCode.parse(text)
