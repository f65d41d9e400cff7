import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.asymmetric.mlkem import MLKEM1024PrivateKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from federation import codec, signing
from federation.keys import (
    BadBundle, BadDeviceList, DeviceEntry, DeviceList, DeviceListEquivocation, DeviceListExpired,
    DeviceListRollback, OneTimePrekey, PqPrekey, PrekeyBundle, SignedDeviceList, SignedPrekey,
    check_not_expired, check_successor,
)

MASTER = Ed25519PrivateKey.generate()
MASTER_PUB = signing.public_bytes(MASTER)
IDENTITY = Ed25519PrivateKey.generate()
DAY = 86_400_000


def make_list(version=1, issued=1_000, expires=1_000 + 7 * DAY, ids=("AAAAAAAAAA",)):
    devices = tuple(DeviceEntry(i, signing.public_bytes(IDENTITY), issued) for i in ids)
    return DeviceList("alice@example.org", version, issued, expires, devices)


def test_device_list_sign_open_round_trip():
    dl = make_list()
    signed = dl.sign(MASTER)
    assert signed.open(MASTER_PUB) == dl
    assert codec.decode(signed.body)["ctx"] == "securechat/v1/device-list"
    assert SignedDeviceList.from_wire(codec.decode(codec.encode(signed.to_wire()))) == signed


def test_device_list_wrong_key_or_tampered():
    signed = make_list().sign(MASTER)
    with pytest.raises(BadDeviceList):
        signed.open(signing.public_bytes(Ed25519PrivateKey.generate()))
    body = bytearray(signed.body)
    body[-1] ^= 1
    with pytest.raises(BadDeviceList):
        SignedDeviceList(bytes(body), signed.signature).open(MASTER_PUB)


def test_device_list_expiry_window_and_duplicates():
    with pytest.raises(BadDeviceList):
        make_list(expires=1_000 + 31 * DAY).sign(MASTER)
    with pytest.raises(BadDeviceList):
        make_list(ids=("AAAAAAAAAA", "AAAAAAAAAA")).sign(MASTER)
    with pytest.raises(DeviceListExpired):
        check_not_expired(make_list(), 1_000 + 7 * DAY)
    check_not_expired(make_list(), 1_000 + 7 * DAY - 1)


def test_version_rule():
    v1, v2 = make_list(1).sign(MASTER), make_list(2).sign(MASTER)
    assert check_successor(None, None, v1, 1)
    assert check_successor(v1, 1, v2, 2)
    assert not check_successor(v2, 2, v2, 2)
    with pytest.raises(DeviceListRollback):
        check_successor(v2, 2, v1, 1)
    other_v2 = make_list(2, ids=("BBBBBBBBBB",)).sign(MASTER)
    with pytest.raises(DeviceListEquivocation):
        check_successor(v2, 2, other_v2, 2)


def make_bundle(with_otk=True):
    spk = SignedPrekey.create(IDENTITY, 7, X25519PrivateKey.generate().public_key().public_bytes_raw(), 5)
    pq = PqPrekey.create(IDENTITY, 9, MLKEM1024PrivateKey.generate().public_key().public_bytes_raw(), True, 5)
    otk = OneTimePrekey(3, X25519PrivateKey.generate().public_key().public_bytes_raw()) if with_otk else None
    return PrekeyBundle("alice@example.org/AAAAAAAAAA", signing.public_bytes(IDENTITY), spk, pq, otk)


@pytest.mark.parametrize("with_otk", [True, False])
def test_bundle_round_trip_and_verify(with_otk):
    bundle = make_bundle(with_otk)
    bundle.verify()
    again = PrekeyBundle.from_wire(codec.decode(codec.encode(bundle.to_wire())))
    assert again == bundle


def test_bundle_without_pq_prekey_refused():
    wire = make_bundle().to_wire()
    del wire["pq_prekey"]
    with pytest.raises(BadBundle):
        PrekeyBundle.from_wire(wire)


def test_bundle_signatures_are_purpose_bound():
    bundle = make_bundle()
    # A signed-prekey signature moved onto the PQ prekey fields must not verify.
    swapped = PqPrekey(bundle.pq_prekey.key_id, bundle.pq_prekey.public_key, True, 5,
                       bundle.signed_prekey.signature)
    with pytest.raises(BadBundle):
        PrekeyBundle(bundle.device, bundle.identity_key, bundle.signed_prekey, swapped, None).verify()
    other_identity = signing.public_bytes(Ed25519PrivateKey.generate())
    with pytest.raises(BadBundle):
        PrekeyBundle(bundle.device, other_identity, bundle.signed_prekey, bundle.pq_prekey, None).verify()


def test_bundle_wrong_lengths():
    wire = make_bundle().to_wire()
    wire["pq_prekey"]["key"] = wire["pq_prekey"]["key"][:-1]
    with pytest.raises(BadBundle):
        PrekeyBundle.from_wire(wire)
    wire = make_bundle().to_wire()
    wire["signed_prekey"]["key"] = b"\x00" * 31
    with pytest.raises(BadBundle):
        PrekeyBundle.from_wire(wire)
