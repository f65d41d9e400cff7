import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from federation import codec, signing
from federation.errors import CodecError, InvalidSignature
from federation.signing import Purpose

KEY = Ed25519PrivateKey.from_private_bytes(bytes(range(32)))
PUB = signing.public_bytes(KEY)
FIELDS = {"user": "alice@example.org", "n": 1}


def test_sign_verify_round_trip():
    sig = signing.sign(KEY, Purpose.C2S_AUTH, FIELDS)
    signing.verify(PUB, Purpose.C2S_AUTH, FIELDS, sig)


@pytest.mark.parametrize("signed_for", list(Purpose))
def test_signature_for_one_purpose_fails_under_every_other(signed_for):
    sig = signing.sign(KEY, signed_for, FIELDS)
    for other in Purpose:
        if other is signed_for:
            continue
        with pytest.raises(InvalidSignature):
            signing.verify(PUB, other, FIELDS, sig)


def test_tampered_fields_or_signature_or_key_fail():
    sig = signing.sign(KEY, Purpose.S2S_TXN, FIELDS)
    with pytest.raises(InvalidSignature):
        signing.verify(PUB, Purpose.S2S_TXN, {**FIELDS, "n": 2}, sig)
    with pytest.raises(InvalidSignature):
        signing.verify(PUB, Purpose.S2S_TXN, FIELDS, bytes([sig[0] ^ 1]) + sig[1:])
    other = signing.public_bytes(Ed25519PrivateKey.generate())
    with pytest.raises(InvalidSignature):
        signing.verify(other, Purpose.S2S_TXN, FIELDS, sig)
    with pytest.raises(InvalidSignature):
        signing.verify(PUB[:31], Purpose.S2S_TXN, FIELDS, sig)
    with pytest.raises(InvalidSignature):
        signing.verify(PUB, Purpose.S2S_TXN, FIELDS, sig[:63])


def test_fields_may_not_carry_ctx():
    with pytest.raises(CodecError):
        signing.sign(KEY, Purpose.C2S_AUTH, {"ctx": "securechat/v1/s2s-txn"})


def test_open_signed_checks_purpose_and_canonical_bytes():
    body = signing.signing_input(Purpose.DEVICE_LIST, FIELDS)
    sig = KEY.sign(body)
    assert signing.open_signed(PUB, Purpose.DEVICE_LIST, body, sig) == FIELDS
    with pytest.raises(InvalidSignature):
        signing.open_signed(PUB, Purpose.GROUP_CONTROL, body, sig)
    non_canonical = b"\x83" + body[1:].replace(b"\x01", b"\xcc\x01", 1)
    with pytest.raises(CodecError):
        signing.open_signed(PUB, Purpose.DEVICE_LIST, non_canonical, sig)


def test_signing_input_is_canonical_map_with_ctx():
    data = signing.signing_input(Purpose.SENDER_KEY, {"a": b"x"})
    assert codec.decode(data) == {"a": b"x", "ctx": "securechat/v1/sender-key"}
