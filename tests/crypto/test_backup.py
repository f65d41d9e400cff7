"""Backups (DESIGN §4): recovery-key sealing for the server, Argon2id passphrase for local files."""

import dataclasses

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import given, settings
from hypothesis import strategies as st

from clientsdk.crypto import backup
from clientsdk.crypto.backup import (
    MIN_MEMLIMIT, MIN_OPSLIMIT, BackupContact, BackupContents, BackupGroup, BackupMessage, RecoveryKey,
    TrustState, export_local_file, open_local_file, open_server_backup, read_header, seal_for_server,
)
from clientsdk.crypto.errors import BackupInvalid, RecoveryKeyMistyped, UnsupportedVersion
from federation import codec
from conformance.rng import counter_rng


MASTER = Ed25519PrivateKey.from_private_bytes(bytes(range(32)))
MASTER_PUB = MASTER.public_key().public_bytes_raw()
BOB_PUB = Ed25519PrivateKey.from_private_bytes(b"\x07" * 32).public_key().public_bytes_raw()


def sample_contents(with_master: bool = True) -> BackupContents:
    return BackupContents(
        user="alice@example.org",
        master_public_key=MASTER_PUB,
        master_private_key=MASTER.private_bytes_raw() if with_master else None,
        created_ms=1_700_000_000_000,
        contacts=(BackupContact("bob@example.net", BOB_PUB, TrustState.VERIFIED, "Bob"),
                  BackupContact("carol@example.org", MASTER_PUB, TrustState.UNVERIFIED)),
        groups=(BackupGroup(b"\x11" * 16, "Hiking", 3, b"\x22" * 32, ("alice@example.org", "bob@example.net"),
                            ("alice@example.org",)),),
        history=(BackupMessage("bob@example.net", "bob@example.net", 1_700_000_000_001, b"hello alice"),
                 BackupMessage("group:" + "11" * 16, "alice@example.org", 1_700_000_000_002, b"see you")),
    )


PASSPHRASE = "correct horse battery staple"


def reframe(header_map: dict, ciphertext: bytes) -> bytes:
    """A blob with a forged header (the documented layout: magic, u16 length, header, ciphertext)."""
    header = codec.encode(header_map)
    return backup.MAGIC + len(header).to_bytes(2, "big") + header + ciphertext


# --- contents: explicit fields only -------------------------------------------------

def test_contents_round_trip_with_and_without_master_key():
    for with_master in (True, False):
        contents = sample_contents(with_master)
        assert BackupContents.decode(contents.encode()) == contents
    assert sample_contents().master_key().public_key().public_bytes_raw() == MASTER_PUB
    assert sample_contents(False).master_key() is None


def test_contents_type_cannot_hold_session_state():
    names = {f.name for f in dataclasses.fields(BackupContents)}
    assert names == {"user", "master_public_key", "master_private_key", "created_ms", "contacts", "groups",
                     "history"}
    for forbidden in ("ratchet", "sessions", "sender_keys", "identity_key", "device_identity_key"):
        assert not any(forbidden in name for name in names)
        with pytest.raises((TypeError, AttributeError)):
            dataclasses.replace(sample_contents(), **{forbidden: b"x"})
    # nor can the wire form smuggle them in: unknown fields are refused
    good = codec.decode(sample_contents().encode())
    for extra in ("ratchet_state", "sender_keys", "identity_key"):
        with pytest.raises(BackupInvalid):
            BackupContents.decode(codec.encode({**good, extra: b"\x00" * 32}))
    group = codec.decode(sample_contents().encode())["groups"][0]
    with pytest.raises(BackupInvalid):
        BackupContents.decode(codec.encode({**good, "groups": [{**group, "sender_key": b"k" * 32}]}))


def test_contents_validation():
    with pytest.raises(ValueError):
        dataclasses.replace(sample_contents(), master_private_key=b"\x01" * 32)  # does not match the public key
    with pytest.raises(ValueError):
        dataclasses.replace(sample_contents(), user="not an address")
    with pytest.raises(ValueError):
        BackupContact("bob@example.net", b"short", TrustState.VERIFIED)
    with pytest.raises(ValueError):
        BackupGroup(b"\x11" * 16, "g", -1, b"\x22" * 32, (), ())
    good = codec.decode(sample_contents().encode())
    with pytest.raises(UnsupportedVersion):
        BackupContents.decode(codec.encode({**good, "v": 3}))
    with pytest.raises(BackupInvalid):
        BackupContents.decode(codec.encode({**good, "created_ms": "yesterday"}))
    with pytest.raises(BackupInvalid):
        BackupContents.decode(b"\xc1")


def test_secrets_not_in_repr():
    contents = sample_contents()
    text = repr(contents)
    assert MASTER.private_bytes_raw().hex() not in text and repr(MASTER.private_bytes_raw()) not in text
    assert "hello alice" not in text
    key = RecoveryKey.generate(counter_rng(b"r"))
    assert key.display() not in repr(key) and key.key.hex() not in repr(key)


# --- recovery key format ------------------------------------------------------------

def test_recovery_key_display_and_parse():
    key = RecoveryKey.generate(counter_rng(b"r"))
    text = key.display()
    groups = text.split("-")
    assert len(groups) == 14 and all(len(g) == 4 for g in groups)
    assert RecoveryKey.parse(text) == key
    # forgiving input: case, spaces instead of dashes, O/I/L look-alikes of Crockford base32
    assert RecoveryKey.parse(" " + text.lower().replace("-", " ") + "\n") == key
    assert RecoveryKey.parse(text.replace("0", "O").replace("1", "I")) == key
    assert RecoveryKey.parse(text.replace("1", "l")) == key


@given(st.binary(min_size=32, max_size=32), st.data())
@settings(max_examples=60, deadline=None)
def test_any_single_typo_is_caught_before_decryption(raw, data):
    text = RecoveryKey(raw).display().replace("-", "")
    position = data.draw(st.integers(0, len(text) - 1))
    alphabet = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"
    replacement = data.draw(st.sampled_from([c for c in alphabet if c != text[position]]))
    typo = text[:position] + replacement + text[position + 1:]
    with pytest.raises(RecoveryKeyMistyped):
        RecoveryKey.parse(typo)
    # swapped neighbours too
    if position + 1 < len(text) and text[position] != text[position + 1]:
        swapped = text[:position] + text[position + 1] + text[position] + text[position + 2:]
        with pytest.raises(RecoveryKeyMistyped):
            RecoveryKey.parse(swapped)


def test_recovery_key_bad_shapes():
    text = RecoveryKey.generate(counter_rng(b"r")).display()
    for bad in ("", text[:-1], text + "A", text[:-1] + "U", text[:-1] + "!"):
        with pytest.raises(RecoveryKeyMistyped) as info:
            RecoveryKey.parse(bad)
        assert text.replace("-", "")[:20] not in str(info.value)
    with pytest.raises(ValueError):
        RecoveryKey(b"\x00" * 31)


# --- server backups (recovery key) --------------------------------------------------

def test_server_backup_round_trip_and_header():
    key = RecoveryKey.generate(counter_rng(b"k"))
    blob = seal_for_server(sample_contents(), key, counter_rng(b"n"))
    assert open_server_backup(blob, key) == sample_contents()
    header = read_header(blob)
    assert header.kind == "recovery-key" and header.version == 1 and header.kdf is None
    assert b"hello alice" not in blob and MASTER.private_bytes_raw() not in blob


def test_server_backup_wrong_key():
    blob = seal_for_server(sample_contents(), RecoveryKey.generate(counter_rng(b"k")), counter_rng(b"n"))
    with pytest.raises(BackupInvalid):
        open_server_backup(blob, RecoveryKey.generate(counter_rng(b"other")))


@pytest.fixture(scope="module")
def server_blob():
    key = RecoveryKey.generate(counter_rng(b"k"))
    return key, seal_for_server(sample_contents(), key, counter_rng(b"n"))


@given(st.data())
@settings(max_examples=60, deadline=None)
def test_server_backup_any_flipped_byte(server_blob, data):
    key, blob = server_blob
    offset = data.draw(st.integers(0, len(blob) - 1))
    tampered = bytearray(blob)
    tampered[offset] ^= data.draw(st.integers(1, 255))
    with pytest.raises((BackupInvalid, UnsupportedVersion)):
        open_server_backup(bytes(tampered), key)


def test_server_backup_every_header_byte_and_truncation(server_blob):
    key, blob = server_blob
    header_end = len(blob) - len(sample_contents().encode()) - 16
    for offset in range(header_end):
        tampered = bytearray(blob)
        tampered[offset] ^= 0x01
        with pytest.raises((BackupInvalid, UnsupportedVersion)):
            open_server_backup(bytes(tampered), key)
    for cut in (0, 3, 6, header_end, len(blob) - 1):
        with pytest.raises(BackupInvalid):
            open_server_backup(blob[:cut], key)
    with pytest.raises(BackupInvalid):
        open_server_backup(blob + b"\x00", key)


def test_header_version_is_refused_as_unsupported(server_blob):
    key, blob = server_blob
    header = read_header(blob)
    reencoded = reframe({**header.to_map(), "v": 2}, blob[len(header.raw):])
    with pytest.raises(UnsupportedVersion):
        open_server_backup(reencoded, key)


def test_server_api_refuses_a_local_file_and_vice_versa(server_blob):
    key, blob = server_blob
    with pytest.raises(BackupInvalid):
        open_local_file(blob, PASSPHRASE)


# --- local export files (Argon2id passphrase); each KDF call costs ~0.6 s -------------

@pytest.fixture(scope="module")
def local_blob():
    return export_local_file(sample_contents(), PASSPHRASE, counter_rng(b"salt"))


def test_local_file_round_trip_and_header(local_blob):
    header = read_header(local_blob)
    assert header.kind == "passphrase" and header.kdf == "argon2id13"
    assert header.opslimit == MIN_OPSLIMIT == 3 and header.memlimit == MIN_MEMLIMIT == 256 * 1024 * 1024
    assert len(header.salt) == 16
    # NFKC: the same passphrase typed with a compatibility character still opens it
    assert open_local_file(local_blob, PASSPHRASE.replace("o", "\uff4f")) == sample_contents()


def test_local_file_wrong_passphrase(local_blob):
    with pytest.raises(BackupInvalid):
        open_local_file(local_blob, "correct horse battery stapler")


def test_local_file_tampered_salt(local_blob):
    header = read_header(local_blob)
    raw = bytearray(local_blob)
    index = bytes(raw).index(header.salt)
    raw[index] ^= 1
    with pytest.raises(BackupInvalid):
        open_local_file(bytes(raw), PASSPHRASE)


@pytest.mark.parametrize("change", [{"opslimit": 2}, {"memlimit": 64 * 1024 * 1024}, {"opslimit": 1, "memlimit": 8192},
                                    {"kdf": "argon2i13"}, {"opslimit": 10**9}, {"memlimit": 1 << 40}])
def test_local_file_downgraded_or_absurd_kdf_parameters_refused_before_any_kdf(local_blob, change):
    header = read_header(local_blob)
    forged = reframe({**header.to_map(), **change}, local_blob[len(header.raw):])
    with pytest.raises(BackupInvalid) as info:
        open_local_file(forged, PASSPHRASE)
    assert "accepted range" in str(info.value) or "unknown key derivation" in str(info.value)
    with pytest.raises(BackupInvalid):
        read_header(forged)  # refused while reading the header: no KDF ran


def test_local_export_refuses_weak_parameters_and_short_passphrases():
    with pytest.raises(ValueError):
        export_local_file(sample_contents(), PASSPHRASE, opslimit=2)
    with pytest.raises(ValueError):
        export_local_file(sample_contents(), PASSPHRASE, memlimit=MIN_MEMLIMIT // 2)
    with pytest.raises(ValueError):
        export_local_file(sample_contents(), "short")


def test_local_file_is_not_accepted_by_the_server_api(local_blob):
    with pytest.raises(BackupInvalid):
        open_server_backup(local_blob, RecoveryKey.generate(counter_rng(b"k")))
