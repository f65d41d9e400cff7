"""Backups (DESIGN §4): what a restore needs, and nothing a restore must not bring back.

Contents (``BackupContents``, explicit fields only): the master key pair (the private
half only if this device holds it), contacts with their trust state, group states and
message history.  Contents version 2 adds to every group its epoch chain (``chain``:
``GroupReplica`` bytes — states and admin-signed changes, no keys), so a restored
device can settle later changes; an encoder writes version 1 when no group carries a
chain (backups without groups stay readable by older clients), and both are read.  There is deliberately no field for ratchet sessions, sender-key
chains or the device identity key: a restore creates a *new device*, signed into the
device list by the restored master key, which opens fresh sessions (LESSONS #8:
rolled-back ratchet state is what breaks restored Signal sessions).  Decoding refuses
unknown fields, so such state cannot be smuggled in either.

Two protections, chosen by the API name so a caller cannot mix them up:

* ``seal_for_server`` / ``open_server_backup``: a random 256-bit ``RecoveryKey`` shown
  to the user as 14 groups of 4 Crockford-base32 characters (the last bits are a
  24-bit checksum, so typos are caught before any decryption).  The only protection
  allowed for anything stored on a server: the server cannot brute-force 256 bits.
  AEAD key = HKDF-SHA-256(IKM recovery key, salt 32 zero bytes,
  info ``SecureChat_Backup_RecoveryKey_v1``, 32 bytes).
* ``export_local_file`` / ``open_local_file``: a passphrase through Argon2id
  (libsodium ARGON2ID13, opslimit >= 3, memlimit >= 256 MiB), for LOCAL export files
  only: a passphrase is guessable, so it never protects server-held data.  The
  passphrase is NFKC-normalised and UTF-8 encoded; the 32-byte output is the AEAD key.

Blob layout::

    "SCBK" ‖ header length (u16 BE) ‖ header (canonical msgpack map) ‖ XChaCha20-Poly1305 ciphertext

with everything before the ciphertext as associated data.  Header fields: ``v`` (1),
``kind`` (``recovery-key`` | ``passphrase``), ``aead`` (``xchacha20poly1305``),
``nonce`` (24 bytes) and, for ``passphrase`` only, ``kdf`` (``argon2id13``),
``opslimit``, ``memlimit`` and ``salt`` (16 bytes).  Readers refuse KDF parameters below
the minimum (a downgraded header) or absurdly above it, before running the KDF.

A wrong key, a wrong passphrase and any tampering all give ``BackupInvalid``; an
unknown header or contents version gives ``UnsupportedVersion``; a mistyped recovery
key gives ``RecoveryKeyMistyped`` before anything is decrypted.
"""

from __future__ import annotations

import hashlib
import unicodedata
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

import nacl.bindings
import nacl.exceptions
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from clientsdk.crypto.errors import BackupInvalid, CryptoError, RecoveryKeyMistyped, UnsupportedVersion
from clientsdk.crypto.group_state import GroupReplica
from clientsdk.crypto.primitives import ZERO_SALT, Rng, ct_equal, hkdf_sha256, system_rng
from federation import codec
from federation.addresses import UserAddress
from federation.errors import ProtocolError
from federation.validate import field as wire_field
from federation.validate import non_negative, require_map

HEADER_VERSION = 1
CONTENTS_VERSION = 2          # v1: groups without their epoch chain (still read)
MAX_GROUP_CHAIN = 4 << 20
MAGIC = b"SCBK"
KIND_RECOVERY_KEY = "recovery-key"
KIND_PASSPHRASE = "passphrase"
AEAD_NAME = "xchacha20poly1305"
KDF_NAME = "argon2id13"
KEY_SIZE = 32
NONCE_SIZE = 24
SALT_SIZE = 16
MIN_OPSLIMIT = 3
MAX_OPSLIMIT = 20
MIN_MEMLIMIT = 256 * 1024 * 1024
MAX_MEMLIMIT = 1024 * 1024 * 1024
MIN_PASSPHRASE_CHARS = 8
RECOVERY_INFO = b"SecureChat_Backup_RecoveryKey_v1"

HEADER_LIMITS = codec.Limits(max_bytes=512, max_depth=1, max_items=16, max_container=16)
CONTENTS_LIMITS = codec.Limits(max_bytes=256 << 20, max_depth=6, max_items=4_000_000, max_container=2_000_000)

_COMMON_HEADER_FIELDS = frozenset({"v", "kind", "aead", "nonce"})
_PASSPHRASE_HEADER_FIELDS = _COMMON_HEADER_FIELDS | {"kdf", "opslimit", "memlimit", "salt"}


def _invalid(reason: str = "wrong key or tampered data") -> BackupInvalid:
    return BackupInvalid(f"backup invalid: {reason}")


# --- recovery key -------------------------------------------------------------------

_CROCKFORD = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"
_CROCKFORD_DECODE = {c: i for i, c in enumerate(_CROCKFORD)} | {"O": 0, "I": 1, "L": 1}
_CHECKSUM_SIZE = 3
_RECOVERY_CHARS = (KEY_SIZE + _CHECKSUM_SIZE) * 8 // 5  # 56: 280 bits, no padding
_GROUP = 4


def _checksum(key: bytes) -> bytes:
    return hashlib.sha256(b"SecureChat_RecoveryKey_v1" + key).digest()[:_CHECKSUM_SIZE]


@dataclass(frozen=True, slots=True, eq=False)
class RecoveryKey:
    """A random 256-bit key; its text form is what the user writes down."""

    key: bytes = field(repr=False)

    def __post_init__(self) -> None:
        if not isinstance(self.key, bytes) or len(self.key) != KEY_SIZE:
            raise ValueError("a recovery key is 32 bytes")

    @classmethod
    def generate(cls, rng: Rng = system_rng) -> RecoveryKey:
        return cls(rng(KEY_SIZE))

    def display(self) -> str:
        """``XXXX-XXXX-…`` (14 groups of 4 Crockford base32 characters, checksum at the end)."""
        number = int.from_bytes(self.key + _checksum(self.key), "big")
        chars = [_CROCKFORD[(number >> (5 * (_RECOVERY_CHARS - 1 - i))) & 31] for i in range(_RECOVERY_CHARS)]
        return "-".join("".join(chars[i:i + _GROUP]) for i in range(0, _RECOVERY_CHARS, _GROUP))

    @classmethod
    def parse(cls, text: str) -> RecoveryKey:
        """Parse what the user typed: case, spaces, dashes and O/I/L look-alikes are forgiven."""
        if not isinstance(text, str):
            raise RecoveryKeyMistyped("a recovery key is text")
        cleaned = "".join(text.split()).replace("-", "").upper()
        if len(cleaned) != _RECOVERY_CHARS:
            raise RecoveryKeyMistyped(
                f"a recovery key has {_RECOVERY_CHARS} characters (14 groups of 4); this has {len(cleaned)}")
        number = 0
        for position, char in enumerate(cleaned, start=1):
            value = _CROCKFORD_DECODE.get(char)
            if value is None:
                raise RecoveryKeyMistyped(f"character {position} is not used in recovery keys")
            number = number << 5 | value
        data = number.to_bytes(KEY_SIZE + _CHECKSUM_SIZE, "big")
        key = data[:KEY_SIZE]
        if not ct_equal(data[KEY_SIZE:], _checksum(key)):
            raise RecoveryKeyMistyped("the recovery key has a typo: check every group again")
        return cls(key)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, RecoveryKey):
            return NotImplemented
        return ct_equal(self.key, other.key)

    __hash__ = None  # type: ignore[assignment]


# --- contents -----------------------------------------------------------------------

class TrustState(StrEnum):
    UNVERIFIED = "unverified"        # trust on first use
    VERIFIED = "verified"            # safety number compared
    KEY_CHANGED = "key_changed"      # master key changed; awaiting the user's acceptance


def _check_user(value: object, what: str) -> str:
    try:
        return str(UserAddress.parse(value))  # type: ignore[arg-type]
    except ProtocolError:
        raise ValueError(f"{what} must be a user address") from None


def _check_bytes(value: object, what: str, length: int | None = None, *, min_len: int = 0,
                 max_len: int = 1 << 40) -> None:
    if not isinstance(value, bytes):
        raise ValueError(f"{what} must be bytes")
    if length is not None and len(value) != length:
        raise ValueError(f"{what} must be {length} bytes")
    if not min_len <= len(value) <= max_len:
        raise ValueError(f"{what} must be {min_len}..{max_len} bytes")


def _check_text(value: object, what: str, max_len: int) -> None:
    if not isinstance(value, str) or len(value) > max_len:
        raise ValueError(f"{what} must be text of at most {max_len} characters")


def _check_int(value: object, what: str) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise ValueError(f"{what} must be a non-negative integer")


@dataclass(frozen=True, slots=True)
class BackupContact:
    address: str
    master_public_key: bytes
    trust: TrustState
    display_name: str = ""

    def __post_init__(self) -> None:
        _check_user(self.address, "contact address")
        _check_bytes(self.master_public_key, "contact master key", 32)
        TrustState(self.trust)
        _check_text(self.display_name, "display name", 256)

    def to_map(self) -> dict[str, Any]:
        return {"address": self.address, "master_public_key": self.master_public_key,
                "trust": str(self.trust), "display_name": self.display_name}


@dataclass(frozen=True, slots=True)
class BackupGroup:
    """The client-held group state of DESIGN §4; sender-key chains have no place here.

    ``chain`` (contents v2) is the group's ``GroupReplica`` bytes: its current state,
    the last states with the admin-signed changes between them and pending changes.
    It must describe the same state as the other fields.
    """

    group_id: bytes
    name: str
    epoch: int
    previous_hash: bytes
    members: tuple[str, ...]
    admins: tuple[str, ...]
    chain: bytes | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        _check_bytes(self.group_id, "group id", min_len=16, max_len=64)
        _check_text(self.name, "group name", 256)
        _check_int(self.epoch, "epoch")
        _check_bytes(self.previous_hash, "previous state hash", 32)
        for member in (*self.members, *self.admins):
            _check_user(member, "group member")
        if self.chain is not None:
            _check_bytes(self.chain, "group chain", max_len=MAX_GROUP_CHAIN)
            try:
                state = GroupReplica.from_bytes(self.chain).state
            except CryptoError:
                raise ValueError("group chain does not parse") from None
            if (state.group_id, state.name, state.epoch, state.prev_hash, tuple(str(u) for u in state.members),
                    tuple(str(u) for u in state.admins)) != (self.group_id, self.name, self.epoch,
                                                            self.previous_hash, self.members, self.admins):
                raise ValueError("group chain describes another state")

    def to_map(self) -> dict[str, Any]:
        out = {"group_id": self.group_id, "name": self.name, "epoch": self.epoch,
               "previous_hash": self.previous_hash, "members": list(self.members), "admins": list(self.admins)}
        if self.chain is not None:
            out["chain"] = self.chain
        return out


@dataclass(frozen=True, slots=True)
class BackupMessage:
    """One history entry.  ``conversation`` is the peer's user address, or ``group:`` + hex group id."""

    conversation: str
    sender: str
    sent_ms: int
    body: bytes = field(repr=False)

    def __post_init__(self) -> None:
        if isinstance(self.conversation, str) and self.conversation.startswith("group:"):
            try:
                group_id = bytes.fromhex(self.conversation[6:])
            except ValueError:
                raise ValueError("group conversation must be 'group:' + hex group id") from None
            _check_bytes(group_id, "group id", min_len=16, max_len=64)
        else:
            _check_user(self.conversation, "conversation")
        _check_user(self.sender, "sender")
        _check_int(self.sent_ms, "sent_ms")
        _check_bytes(self.body, "message body")

    def to_map(self) -> dict[str, Any]:
        return {"conversation": self.conversation, "sender": self.sender, "sent_ms": self.sent_ms,
                "body": self.body}


@dataclass(frozen=True, slots=True)
class BackupContents:
    """Everything a backup may hold; ``ValueError`` on inconsistent local construction."""

    user: str
    master_public_key: bytes
    created_ms: int
    master_private_key: bytes | None = field(default=None, repr=False)
    contacts: tuple[BackupContact, ...] = ()
    groups: tuple[BackupGroup, ...] = ()
    history: tuple[BackupMessage, ...] = field(default=(), repr=False)

    def __post_init__(self) -> None:
        _check_user(self.user, "user")
        _check_bytes(self.master_public_key, "master public key", 32)
        _check_int(self.created_ms, "created_ms")
        if self.master_private_key is not None:
            _check_bytes(self.master_private_key, "master private key", 32)
            derived = Ed25519PrivateKey.from_private_bytes(self.master_private_key).public_key()
            if not ct_equal(derived.public_bytes_raw(), self.master_public_key):
                raise ValueError("master private key does not match the master public key")
        for items, kind in ((self.contacts, BackupContact), (self.groups, BackupGroup),
                            (self.history, BackupMessage)):
            if not isinstance(items, tuple) or not all(isinstance(item, kind) for item in items):
                raise ValueError(f"backup {kind.__name__} entries must be a tuple of {kind.__name__}")
        if len({g.chain is None for g in self.groups}) > 1:
            raise ValueError("either every backup group carries its chain or none does")

    @property
    def version(self) -> int:
        """The contents version this backup is written in: 2 only when groups carry their chain."""
        return CONTENTS_VERSION if any(g.chain is not None for g in self.groups) else 1

    def master_key(self) -> Ed25519PrivateKey | None:
        """The restored master signing key, if this backup holds it."""
        if self.master_private_key is None:
            return None
        return Ed25519PrivateKey.from_private_bytes(self.master_private_key)

    def to_map(self) -> dict[str, Any]:
        return {"v": self.version, "user": self.user, "master_public_key": self.master_public_key,
                "master_private_key": self.master_private_key, "created_ms": self.created_ms,
                "contacts": [c.to_map() for c in self.contacts], "groups": [g.to_map() for g in self.groups],
                "history": [m.to_map() for m in self.history]}

    def encode(self) -> bytes:
        return codec.encode(self.to_map(), CONTENTS_LIMITS)

    @classmethod
    def decode(cls, data: bytes) -> BackupContents:
        """Strict decoding: unknown fields anywhere are refused (``BackupInvalid``)."""
        try:
            obj = require_map(codec.decode(data, CONTENTS_LIMITS), "backup contents")
            version = wire_field(obj, "v", int)
            if version not in (1, CONTENTS_VERSION):
                raise UnsupportedVersion(f"backup contents version {version} is not supported")
            return _contents_from_map(obj, version)
        except (ProtocolError, ValueError):
            raise _invalid("contents do not parse") from None


def _exact(obj: Any, names: set[str], what: str) -> dict[str, Any]:
    checked = require_map(obj, what)
    if set(checked) != names:
        raise ValueError(f"{what} has missing or unknown fields")
    return checked


def _list(obj: dict[str, Any], name: str) -> list[Any]:
    return wire_field(obj, name, list)


def _contents_from_map(obj: dict[str, Any], version: int) -> BackupContents:
    _exact(obj, {"v", "user", "master_public_key", "master_private_key", "created_ms", "contacts", "groups",
                 "history"}, "backup contents")
    private = obj["master_private_key"]
    if private is not None and not isinstance(private, bytes):
        raise ValueError("master private key must be bytes or nil")
    contacts = []
    for item in _list(obj, "contacts"):
        c = _exact(item, {"address", "master_public_key", "trust", "display_name"}, "contact")
        contacts.append(BackupContact(wire_field(c, "address", str), wire_field(c, "master_public_key", bytes),
                                      TrustState(wire_field(c, "trust", str)), wire_field(c, "display_name", str)))
    groups = []
    for item in _list(obj, "groups"):
        names = {"group_id", "name", "epoch", "previous_hash", "members", "admins"}
        g = _exact(item, names | {"chain"} if version >= 2 else names, "group")
        members = tuple(_list(g, "members"))
        admins = tuple(_list(g, "admins"))
        if not all(isinstance(m, str) for m in (*members, *admins)):
            raise ValueError("group members must be text")
        groups.append(BackupGroup(wire_field(g, "group_id", bytes), wire_field(g, "name", str),
                                  non_negative(wire_field(g, "epoch", int), "epoch"),
                                  wire_field(g, "previous_hash", bytes), members, admins,
                                  wire_field(g, "chain", bytes) if version >= 2 else None))
    history = []
    for item in _list(obj, "history"):
        m = _exact(item, {"conversation", "sender", "sent_ms", "body"}, "history entry")
        history.append(BackupMessage(wire_field(m, "conversation", str), wire_field(m, "sender", str),
                                     non_negative(wire_field(m, "sent_ms", int), "sent_ms"),
                                     wire_field(m, "body", bytes)))
    return BackupContents(wire_field(obj, "user", str), wire_field(obj, "master_public_key", bytes),
                          non_negative(wire_field(obj, "created_ms", int), "created_ms"), private,
                          tuple(contacts), tuple(groups), tuple(history))


# --- header and framing -------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class BackupHeader:
    """The parsed, already range-checked header of a backup blob (``raw`` = the AD prefix)."""

    version: int
    kind: str
    aead: str
    nonce: bytes
    kdf: str | None = None
    opslimit: int | None = None
    memlimit: int | None = None
    salt: bytes | None = None
    raw: bytes = field(default=b"", repr=False)

    def to_map(self) -> dict[str, Any]:
        out: dict[str, Any] = {"v": self.version, "kind": self.kind, "aead": self.aead, "nonce": self.nonce}
        if self.kind == KIND_PASSPHRASE:
            out.update(kdf=self.kdf, opslimit=self.opslimit, memlimit=self.memlimit, salt=self.salt)
        return out


def _frame(header_map: dict[str, Any]) -> bytes:
    header = codec.encode(header_map, HEADER_LIMITS)
    return MAGIC + len(header).to_bytes(2, "big") + header


def read_header(blob: bytes) -> BackupHeader:
    """Parse and check a blob's header without decrypting anything."""
    if not isinstance(blob, bytes) or len(blob) < len(MAGIC) + 2 or not blob.startswith(MAGIC):
        raise _invalid("not a SecureChat backup")
    start = len(MAGIC) + 2
    end = start + int.from_bytes(blob[len(MAGIC):start], "big")
    if len(blob) < end:
        raise _invalid("truncated header")
    try:
        obj = require_map(codec.decode(blob[start:end], HEADER_LIMITS), "backup header")
        version = wire_field(obj, "v", int)
        if version != HEADER_VERSION:
            raise UnsupportedVersion(f"backup format version {version} is not supported")
        kind = wire_field(obj, "kind", str)
        expected = {KIND_RECOVERY_KEY: _COMMON_HEADER_FIELDS, KIND_PASSPHRASE: _PASSPHRASE_HEADER_FIELDS}.get(kind)
        if expected is None or set(obj) != expected or wire_field(obj, "aead", str) != AEAD_NAME:
            raise _invalid("unknown header layout")
        header = BackupHeader(version, kind, AEAD_NAME, wire_field(obj, "nonce", bytes, length=NONCE_SIZE),
                              raw=blob[:end])
        if kind == KIND_PASSPHRASE:
            header = _passphrase_header(obj, header)
    except ProtocolError:
        raise _invalid("header does not parse") from None
    return header


def _passphrase_header(obj: dict[str, Any], header: BackupHeader) -> BackupHeader:
    opslimit = wire_field(obj, "opslimit", int)
    memlimit = wire_field(obj, "memlimit", int)
    if wire_field(obj, "kdf", str) != KDF_NAME:
        raise _invalid("unknown key derivation")
    if not (MIN_OPSLIMIT <= opslimit <= MAX_OPSLIMIT and MIN_MEMLIMIT <= memlimit <= MAX_MEMLIMIT):
        raise _invalid("passphrase parameters outside the accepted range (downgraded header?)")
    return BackupHeader(header.version, header.kind, header.aead, header.nonce, KDF_NAME, opslimit, memlimit,
                        wire_field(obj, "salt", bytes, length=SALT_SIZE), header.raw)


def _seal(header_map: dict[str, Any], key: bytes, contents: BackupContents) -> bytes:
    associated = _frame(header_map)
    ciphertext = nacl.bindings.crypto_aead_xchacha20poly1305_ietf_encrypt(
        contents.encode(), associated, header_map["nonce"], key)
    return associated + ciphertext


def _open(blob: bytes, header: BackupHeader, key: bytes) -> BackupContents:
    try:
        plaintext = nacl.bindings.crypto_aead_xchacha20poly1305_ietf_decrypt(
            blob[len(header.raw):], header.raw, header.nonce, key)
    except (nacl.exceptions.CryptoError, ValueError, TypeError):
        raise _invalid() from None
    return BackupContents.decode(plaintext)


# --- the two protections ------------------------------------------------------------

def _recovery_aead_key(recovery_key: RecoveryKey) -> bytes:
    return hkdf_sha256(recovery_key.key, ZERO_SALT, RECOVERY_INFO, KEY_SIZE)


def seal_for_server(contents: BackupContents, recovery_key: RecoveryKey, rng: Rng = system_rng) -> bytes:
    """Encrypt a backup that may be stored on the homeserver: recovery key only, never a passphrase."""
    header = {"v": HEADER_VERSION, "kind": KIND_RECOVERY_KEY, "aead": AEAD_NAME, "nonce": rng(NONCE_SIZE)}
    return _seal(header, _recovery_aead_key(recovery_key), contents)


def open_server_backup(blob: bytes, recovery_key: RecoveryKey) -> BackupContents:
    """Decrypt a server-held backup; ``BackupInvalid`` for a wrong key or any tampering."""
    header = read_header(blob)
    if header.kind != KIND_RECOVERY_KEY:
        raise _invalid("not a recovery-key backup")
    return _open(blob, header, _recovery_aead_key(recovery_key))


def _passphrase_key(passphrase: str, salt: bytes, opslimit: int, memlimit: int) -> bytes:
    if not isinstance(passphrase, str):
        raise TypeError("passphrase must be text")
    secret = unicodedata.normalize("NFKC", passphrase).encode("utf-8")
    return nacl.bindings.crypto_pwhash_alg(KEY_SIZE, secret, salt, opslimit, memlimit,
                                           nacl.bindings.crypto_pwhash_ALG_ARGON2ID13)


def export_local_file(contents: BackupContents, passphrase: str, rng: Rng = system_rng, *,
                      opslimit: int = MIN_OPSLIMIT, memlimit: int = MIN_MEMLIMIT) -> bytes:
    """Encrypt a backup for a LOCAL export file under a passphrase (Argon2id); never upload the result.

    Draws the salt (16 bytes) then the nonce (24 bytes) from ``rng``.
    """
    if not MIN_OPSLIMIT <= opslimit <= MAX_OPSLIMIT or not MIN_MEMLIMIT <= memlimit <= MAX_MEMLIMIT:
        raise ValueError("Argon2id parameters below the minimum (opslimit >= 3, memlimit >= 256 MiB) or too large")
    if not isinstance(passphrase, str) or len(passphrase) < MIN_PASSPHRASE_CHARS:
        raise ValueError(f"a passphrase needs at least {MIN_PASSPHRASE_CHARS} characters")
    salt = rng(SALT_SIZE)
    header = {"v": HEADER_VERSION, "kind": KIND_PASSPHRASE, "aead": AEAD_NAME, "nonce": rng(NONCE_SIZE),
              "kdf": KDF_NAME, "opslimit": opslimit, "memlimit": memlimit, "salt": salt}
    return _seal(header, _passphrase_key(passphrase, salt, opslimit, memlimit), contents)


def open_local_file(blob: bytes, passphrase: str) -> BackupContents:
    """Decrypt a local export file; ``BackupInvalid`` for a wrong passphrase, tampering or weak parameters."""
    header = read_header(blob)
    if header.kind != KIND_PASSPHRASE or header.salt is None or header.opslimit is None or header.memlimit is None:
        raise _invalid("not a passphrase-protected export file")
    return _open(blob, header, _passphrase_key(passphrase, header.salt, header.opslimit, header.memlimit))
