
import pytest
from cryptography.hazmat.primitives.asymmetric.mlkem import MLKEM1024PrivateKey

from clientsdk.crypto import primitives
from clientsdk.crypto.errors import InvalidKey, MalformedMessage, UnknownPrekey, UnsupportedVersion
from clientsdk.crypto.identity import (
    DAY_MS, DeviceIdentity, MasterKey, PrekeyStore, VerifiedDeviceList, accept_device_list, add_device,
    identity_dh_public, needs_resign, new_device_list, remove_device, replay_hash, resign_device_list,
)
from federation import codec, signing
from federation.keys import (
    BadDeviceList, DeviceEntry, DeviceList, DeviceListEquivocation, DeviceListExpired, DeviceListRollback,
)
from federation.signing import Purpose
from conformance.rng import counter_rng


MASTER = MasterKey.generate(counter_rng(b"master"))
PHONE = DeviceIdentity.generate(counter_rng(b"phone"))
LAPTOP = DeviceIdentity.generate(counter_rng(b"laptop"))
USER = "alice@example.org"
T0 = 1_700_000_000_000
# Ed25519 small-order point (order 1: the identity) and a non-canonical encoding.
SMALL_ORDER = bytes.fromhex("0100000000000000000000000000000000000000000000000000000000000000")


def first_list(now=T0):
    return new_device_list(MASTER, USER, [DeviceEntry("PHONEPHONE", PHONE.public_key, now)], now)


def test_identity_keys_round_trip_and_x25519_form():
    again = DeviceIdentity.from_private_bytes(PHONE.private_bytes())
    assert again.public_key == PHONE.public_key
    assert again.dh_public == identity_dh_public(PHONE.public_key)
    assert primitives.x25519_public_bytes(again.dh_private) == again.dh_public
    # DH agrees across the converted keys
    assert primitives.x25519(PHONE.dh_private, LAPTOP.dh_public) == primitives.x25519(LAPTOP.dh_private,
                                                                                     PHONE.dh_public)
    assert MasterKey.from_private_bytes(MASTER.private_bytes()).public_key == MASTER.public_key
    assert "private" not in repr(PHONE) and PHONE.private_bytes().hex() not in repr(PHONE)


@pytest.mark.parametrize("bad", [b"", b"x" * 31, b"x" * 33])
def test_private_key_wrong_length(bad):
    with pytest.raises(InvalidKey):
        DeviceIdentity.from_private_bytes(bad)
    with pytest.raises(InvalidKey):
        MasterKey.from_private_bytes(bad)


@pytest.mark.parametrize("bad", [SMALL_ORDER, b"\x00" * 32, b"x" * 31])
def test_small_order_or_bad_identity_key(bad):
    with pytest.raises(InvalidKey):
        identity_dh_public(bad)


def test_create_and_accept_first_list():
    signed = first_list()
    update = accept_device_list(MASTER.public_key, None, signed, T0 + 1)
    assert update.changed and update.expired is None
    assert update.current.device_list.device_ids() == {"PHONEPHONE"}
    assert update.current.device_list.expires_ms == T0 + 30 * DAY_MS
    assert codec.decode(signed.body)["ctx"] == Purpose.DEVICE_LIST.value
    update.check_sendable(contact_verified=True)


def test_add_remove_resign_versions():
    v1 = VerifiedDeviceList.open(MASTER.public_key, first_list())
    v2_signed = add_device(MASTER, v1.device_list, "LAPTOPLAPT", LAPTOP.public_key, T0 + 10)
    up = accept_device_list(MASTER.public_key, v1, v2_signed, T0 + 11)
    assert up.changed and up.current.device_list.version == 2
    assert up.current.device_list.identity_key_of("LAPTOPLAPT") == LAPTOP.public_key
    v3_signed = remove_device(MASTER, up.current.device_list, "PHONEPHONE", T0 + 20)
    up3 = accept_device_list(MASTER.public_key, up.current, v3_signed, T0 + 21)
    assert up3.current.device_list.device_ids() == {"LAPTOPLAPT"}
    with pytest.raises(BadDeviceList):
        add_device(MASTER, up3.current.device_list, "LAPTOPLAPT", LAPTOP.public_key, T0)
    with pytest.raises(BadDeviceList):
        remove_device(MASTER, up3.current.device_list, "PHONEPHONE", T0)
    with pytest.raises(InvalidKey):
        add_device(MASTER, up3.current.device_list, "NEWDEVICE2", SMALL_ORDER, T0)


def test_weekly_resign():
    v1 = first_list().open(MASTER.public_key)
    assert not needs_resign(v1, T0 + 7 * DAY_MS - 1)
    assert needs_resign(v1, T0 + 7 * DAY_MS)
    v2 = resign_device_list(MASTER, v1, T0 + 7 * DAY_MS).open(MASTER.public_key)
    assert v2.version == 2 and v2.devices == v1.devices and v2.issued_ms == T0 + 7 * DAY_MS
    with pytest.raises(BadDeviceList):   # lifetime over 30 days refused at signing time
        resign_device_list(MASTER, v1, T0, lifetime_ms=31 * DAY_MS)


def test_same_list_again_is_not_a_change():
    v1 = VerifiedDeviceList.open(MASTER.public_key, first_list())
    update = accept_device_list(MASTER.public_key, v1, first_list(), T0 + 5)
    assert not update.changed and update.current is v1


def test_equivocation_and_rollback():
    v1 = VerifiedDeviceList.open(MASTER.public_key, first_list())
    other_v1 = new_device_list(MASTER, USER, [DeviceEntry("LAPTOPLAPT", LAPTOP.public_key, T0)], T0)
    with pytest.raises(DeviceListEquivocation):
        accept_device_list(MASTER.public_key, v1, other_v1, T0 + 1)
    v2 = VerifiedDeviceList.open(MASTER.public_key, resign_device_list(MASTER, v1.device_list, T0 + 5))
    with pytest.raises(DeviceListRollback):
        accept_device_list(MASTER.public_key, v2, v1.signed, T0 + 6)


def test_wrong_master_or_wrong_purpose_or_other_user():
    other = MasterKey.generate(counter_rng(b"mallory"))
    with pytest.raises(BadDeviceList):
        accept_device_list(other.public_key, None, first_list(), T0)
    # a device-list body signed under another purpose does not verify
    dl = first_list().open(MASTER.public_key)
    forged_sig = signing.sign(MASTER.signing_key, Purpose.GROUP_CONTROL, dl.fields())
    from federation.keys import SignedDeviceList
    with pytest.raises(BadDeviceList):
        accept_device_list(MASTER.public_key, None, SignedDeviceList(first_list().body, forged_sig), T0)
    v1 = VerifiedDeviceList.open(MASTER.public_key, first_list())
    bob = new_device_list(MASTER, "bob@example.org", [DeviceEntry("PHONEPHONE", PHONE.public_key, T0)], T0,
                          version=5)
    with pytest.raises(BadDeviceList):
        accept_device_list(MASTER.public_key, v1, bob, T0)


def test_expired_list_is_reported_not_raised():
    signed = first_list()
    update = accept_device_list(MASTER.public_key, None, signed, T0 + 30 * DAY_MS)
    assert isinstance(update.expired, DeviceListExpired)
    update.check_sendable(contact_verified=False)      # sending continues for unverified contacts
    with pytest.raises(DeviceListExpired):
        update.check_sendable(contact_verified=True)


def test_device_list_fields_are_the_normative_ones():
    dl = first_list().open(MASTER.public_key)
    assert set(codec.decode(first_list().body)) == {"ctx", "user", "version", "issued_ms", "expires_ms",
                                                    "devices"}
    assert isinstance(dl, DeviceList)


# --- prekey store ---------------------------------------------------------------------


def test_uploads_verify_and_private_halves_match():
    store = PrekeyStore()
    rng = counter_rng(b"uploads")
    up = store.build_uploads(PHONE, T0, one_time_count=5, pq_one_time_count=2, rng=rng)
    up.signed_prekey.verify(PHONE.public_key)
    up.pq_last_resort.verify(PHONE.public_key)
    assert up.pq_last_resort.last_resort and not any(p.last_resort for p in up.pq_one_time_prekeys)
    for p in up.pq_one_time_prekeys:
        p.verify(PHONE.public_key)
    spk = store.signed_prekey(up.signed_prekey.key_id)
    assert primitives.x25519_public_bytes(primitives.x25519_from_seed(spk.private)) == up.signed_prekey.public_key
    for otk in up.one_time_prekeys:
        assert primitives.x25519_public_bytes(store.one_time_prekey(otk.key_id)) == otk.public_key
    kem = store.pq_prekey(up.pq_last_resort.key_id)
    assert isinstance(kem, MLKEM1024PrivateKey)
    assert kem.public_key().public_bytes_raw() == up.pq_last_resort.public_key
    ids = [up.signed_prekey.key_id, up.pq_last_resort.key_id, *(o.key_id for o in up.one_time_prekeys),
           *(p.key_id for p in up.pq_one_time_prekeys)]
    assert len(set(ids)) == len(ids)


def test_store_serialises_and_commits():
    store = PrekeyStore()
    up = store.build_uploads(PHONE, T0, one_time_count=3, pq_one_time_count=1, rng=counter_rng(b"s"))
    spk_id = up.signed_prekey.key_id
    h = replay_hash(b"a" * 32, b"b" * 32, b"c" * 1568)
    assert not store.has_seen(spk_id, h)
    store.commit_initial(spk_id, h, up.one_time_prekeys[0].key_id, up.pq_one_time_prekeys[0].key_id)
    store.commit_initial(spk_id, replay_hash(b"x" * 32, b"b" * 32, b"c" * 1568), None,
                         up.pq_last_resort.key_id)
    assert store.has_seen(spk_id, h)
    with pytest.raises(UnknownPrekey):
        store.one_time_prekey(up.one_time_prekeys[0].key_id)
    with pytest.raises(UnknownPrekey):
        store.pq_prekey(up.pq_one_time_prekeys[0].key_id)
    store.pq_prekey(up.pq_last_resort.key_id)     # last resort stays
    again = PrekeyStore.from_bytes(store.to_bytes())
    assert again.to_bytes() == store.to_bytes()
    assert again.has_seen(spk_id, h) and len(again.one_time) == 2
    store.delete_signed_prekey(spk_id)
    assert not store.has_seen(spk_id, h)
    with pytest.raises(UnknownPrekey):
        store.signed_prekey(spk_id)
    assert repr(store).startswith("PrekeyStore(")


def test_prune_keeps_newest_signed_prekey():
    store = PrekeyStore()
    old = store.new_signed_prekey(PHONE, T0, counter_rng(b"1"))
    new = store.new_signed_prekey(PHONE, T0 + 8 * DAY_MS, counter_rng(b"2"))
    assert store.prune_signed_prekeys(T0 + 40 * DAY_MS, 30 * DAY_MS) == [old.key_id]
    assert set(store.signed) == {new.key_id}


def test_store_bad_bytes():
    with pytest.raises(MalformedMessage):
        PrekeyStore.from_bytes(b"\x00garbage")
    with pytest.raises(UnsupportedVersion):
        PrekeyStore.from_bytes(codec.encode({"v": 99}))
    good = codec.decode(PrekeyStore().to_bytes())
    good["one_time"] = [[1, b"short"]]
    with pytest.raises(MalformedMessage):
        PrekeyStore.from_bytes(codec.encode(good))
