"""Identities, signed device lists and a device's prekey uploads (DESIGN §3).

* ``MasterKey`` — the user's Ed25519 master key; it signs the device list and lives
  only on the first device and in recovery backups.
* ``DeviceIdentity`` — a device's Ed25519 identity key and its X25519 form
  (libsodium's birational map) used for PQXDH.
* Device lists: ``new_device_list`` / ``resign_device_list`` on the master device,
  ``accept_device_list`` on every client.  The version rule and expiry check are
  ``federation.keys``' own (one implementation for server and client); this module
  only adds the client's view: what to keep, and the expiry security event.
* ``PrekeyStore`` — the private halves of the prekeys this device uploaded, kept
  as versioned bytes, with the replay hashes PQXDH records per signed prekey.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from dataclasses import dataclass, field

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.asymmetric.mlkem import MLKEM1024PrivateKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from clientsdk.crypto import primitives
from clientsdk.crypto.errors import InvalidKey, MalformedMessage, UnknownPrekey, UnsupportedVersion
from clientsdk.crypto.primitives import Rng, system_rng
from federation import codec, signing
from federation.errors import CodecError, ProtocolError
from federation.keys import (
    MAX_LIST_LIFETIME_MS, BadDeviceList, DeviceEntry, DeviceList, DeviceListExpired, OneTimePrekey,
    PqPrekey, SignedDeviceList, SignedPrekey, check_not_expired, check_successor,
)
from federation.validate import field as wire_field
from federation.validate import non_negative, require_map

DAY_MS = 24 * 3600 * 1000
RESIGN_INTERVAL_MS = 7 * DAY_MS            # the master device re-signs at least weekly
DEFAULT_LIST_LIFETIME_MS = MAX_LIST_LIFETIME_MS   # 30 days: slack for an offline master device
MLKEM_SEED_LEN = 64
REPLAY_HASH_LEN = 32
PREKEY_STORE_VERSION = 1
# The prekey store may hold many replay hashes and one-time keys; it is local state.
_STORE_LIMITS = codec.Limits(max_bytes=64 << 20, max_items=1_000_000, max_container=200_000)


# --- identities -------------------------------------------------------------------


def _ed25519_from_seed(seed: bytes) -> Ed25519PrivateKey:
    if not isinstance(seed, bytes) or len(seed) != 32:
        raise InvalidKey("Ed25519 private key must be 32 bytes")
    return Ed25519PrivateKey.from_private_bytes(seed)


@dataclass(frozen=True, slots=True, repr=False, eq=False)
class MasterKey:
    """A user's Ed25519 master key (private half present: this is the master device)."""

    signing_key: Ed25519PrivateKey
    public_key: bytes

    @classmethod
    def from_private_bytes(cls, seed: bytes) -> MasterKey:
        key = _ed25519_from_seed(seed)
        return cls(key, signing.public_bytes(key))

    @classmethod
    def generate(cls, rng: Rng = system_rng) -> MasterKey:
        return cls.from_private_bytes(rng(32))

    def private_bytes(self) -> bytes:
        return self.signing_key.private_bytes_raw()

    def __repr__(self) -> str:
        return f"MasterKey(public_key={self.public_key.hex()})"


@dataclass(frozen=True, slots=True, repr=False, eq=False)
class DeviceIdentity:
    """A device's Ed25519 identity key with its X25519 form, computed once."""

    signing_key: Ed25519PrivateKey
    public_key: bytes                 # Encode(IK): the 32-byte Ed25519 public key
    dh_private: X25519PrivateKey
    dh_public: bytes

    @classmethod
    def from_private_bytes(cls, seed: bytes) -> DeviceIdentity:
        key = _ed25519_from_seed(seed)
        public = signing.public_bytes(key)
        dh_public = identity_dh_public(public)   # refuses a key whose X25519 form is unusable
        return cls(key, public, primitives.ed25519_private_to_x25519(key), dh_public)

    @classmethod
    def generate(cls, rng: Rng = system_rng) -> DeviceIdentity:
        return cls.from_private_bytes(rng(32))

    def private_bytes(self) -> bytes:
        return self.signing_key.private_bytes_raw()

    def __repr__(self) -> str:
        return f"DeviceIdentity(public_key={self.public_key.hex()})"


def identity_dh_public(identity_key: bytes) -> bytes:
    """X25519 form of a peer's Ed25519 identity key; small-order/invalid points raise ``InvalidKey``."""
    return primitives.ed25519_public_to_x25519(identity_key)


# --- device lists -----------------------------------------------------------------


def new_device_list(master: MasterKey, user: str, devices: Iterable[DeviceEntry], now_ms: int, *,
                    version: int = 1, lifetime_ms: int = DEFAULT_LIST_LIFETIME_MS) -> SignedDeviceList:
    """Sign a device list issued now; ``federation.keys`` refuses lifetimes over 30 days."""
    return DeviceList(user, version, now_ms, now_ms + lifetime_ms, tuple(devices)).sign(master.signing_key)


def resign_device_list(master: MasterKey, current: DeviceList, now_ms: int, *,
                       devices: Iterable[DeviceEntry] | None = None,
                       lifetime_ms: int = DEFAULT_LIST_LIFETIME_MS) -> SignedDeviceList:
    """The successor of ``current`` (next version), with the same or new devices, issued now."""
    entries = current.devices if devices is None else tuple(devices)
    return new_device_list(master, current.user, entries, now_ms,
                           version=current.version + 1, lifetime_ms=lifetime_ms)


def add_device(master: MasterKey, current: DeviceList, device_id: str, identity_key: bytes,
               now_ms: int) -> SignedDeviceList:
    """Link a device: the next version lists it too."""
    if current.identity_key_of(device_id) is not None:
        raise BadDeviceList("device is already listed")
    identity_dh_public(identity_key)   # never list a key nobody could run PQXDH with
    return resign_device_list(master, current, now_ms,
                              devices=(*current.devices, DeviceEntry(device_id, identity_key, now_ms)))


def remove_device(master: MasterKey, current: DeviceList, device_id: str, now_ms: int) -> SignedDeviceList:
    """Revoke a device: the next version omits it."""
    if current.identity_key_of(device_id) is None:
        raise BadDeviceList("device is not listed")
    return resign_device_list(master, current, now_ms,
                              devices=[d for d in current.devices if d.id != device_id])


def needs_resign(current: DeviceList, now_ms: int) -> bool:
    """True once the list is a week old: re-signing weekly keeps it far from expiry."""
    return now_ms - current.issued_ms >= RESIGN_INTERVAL_MS


@dataclass(frozen=True, slots=True)
class VerifiedDeviceList:
    """A device list that verified under the trusted master key, with its signed bytes."""

    signed: SignedDeviceList
    device_list: DeviceList

    @classmethod
    def open(cls, trusted_master_public: bytes, signed: SignedDeviceList) -> VerifiedDeviceList:
        return cls(signed, signed.open(trusted_master_public))


@dataclass(frozen=True, slots=True)
class DeviceListUpdate:
    """Outcome of ``accept_device_list``.

    ``expired`` is the ``device_list_expired`` security event (or None): the list is
    still the best we have, so sending may continue — unless the contact is
    verified, which ``check_sendable`` enforces.
    """

    current: VerifiedDeviceList
    changed: bool
    expired: DeviceListExpired | None

    def check_sendable(self, contact_verified: bool) -> None:
        if contact_verified and self.expired is not None:
            raise self.expired


def accept_device_list(trusted_master_public: bytes, previous: VerifiedDeviceList | None,
                       new: SignedDeviceList, now_ms: int) -> DeviceListUpdate:
    """Verify ``new`` under the trusted master key and apply the version rule.

    Raises ``BadDeviceList`` (bad signature, malformed, other user),
    ``DeviceListEquivocation`` (same version, other bytes: a security event) or
    ``DeviceListRollback`` (lower version).  Expiry is reported, not raised.
    """
    opened = new.open(trusted_master_public)
    if previous is not None and opened.user != previous.device_list.user:
        raise BadDeviceList("device list is for another user")
    changed = check_successor(previous.signed if previous else None,
                              previous.device_list.version if previous else None, new, opened.version)
    current = VerifiedDeviceList(new, opened) if changed or previous is None else previous
    expired: DeviceListExpired | None = None
    try:
        check_not_expired(current.device_list, now_ms)
    except DeviceListExpired as event:
        expired = event
    return DeviceListUpdate(current, changed, expired)


# --- prekeys ------------------------------------------------------------------------


@dataclass(slots=True, repr=False)
class SignedPrekeySecret:
    key_id: int
    private: bytes               # X25519 private key
    public: bytes
    created_ms: int
    seen: set[bytes] = field(default_factory=set)   # PQXDH replay hashes, dropped with the key


@dataclass(frozen=True, slots=True, repr=False)
class PqPrekeySecret:
    key_id: int
    seed: bytes                  # 64-byte ML-KEM-1024 seed (d ‖ z)
    last_resort: bool
    created_ms: int


@dataclass(frozen=True, slots=True)
class DeviceUploads:
    """What a device publishes to its homeserver; the private halves stay in its ``PrekeyStore``."""

    signed_prekey: SignedPrekey
    pq_last_resort: PqPrekey
    one_time_prekeys: tuple[OneTimePrekey, ...]
    pq_one_time_prekeys: tuple[PqPrekey, ...]


class PrekeyStore:
    """Private halves of this device's prekeys (local state, serialised to versioned bytes).

    PQXDH's responder only *reads* it; ``commit_initial`` records the replay hash and
    deletes the used one-time keys once the first message has decrypted.
    """

    __slots__ = ("signed", "one_time", "pq", "next_key_id")

    def __init__(self) -> None:
        self.signed: dict[int, SignedPrekeySecret] = {}
        self.one_time: dict[int, bytes] = {}
        self.pq: dict[int, PqPrekeySecret] = {}
        self.next_key_id = 1

    def __repr__(self) -> str:
        return (f"PrekeyStore(signed={sorted(self.signed)}, one_time={len(self.one_time)}, "
                f"pq={sorted(self.pq)})")

    def _take_id(self) -> int:
        key_id = self.next_key_id
        self.next_key_id += 1
        return key_id

    # -- generation (the device's uploads) --

    def new_signed_prekey(self, identity: DeviceIdentity, now_ms: int, rng: Rng = system_rng) -> SignedPrekey:
        private = primitives.x25519_from_seed(rng(32))
        public = primitives.x25519_public_bytes(private)
        key_id = self._take_id()
        self.signed[key_id] = SignedPrekeySecret(key_id, private.private_bytes_raw(), public, now_ms)
        return SignedPrekey.create(identity.signing_key, key_id, public, now_ms)

    def new_one_time_prekeys(self, count: int, rng: Rng = system_rng) -> tuple[OneTimePrekey, ...]:
        out = []
        for _ in range(count):
            private = primitives.x25519_from_seed(rng(32))
            key_id = self._take_id()
            self.one_time[key_id] = private.private_bytes_raw()
            out.append(OneTimePrekey(key_id, primitives.x25519_public_bytes(private)))
        return tuple(out)

    def new_pq_prekey(self, identity: DeviceIdentity, now_ms: int, *, last_resort: bool,
                      rng: Rng = system_rng) -> PqPrekey:
        seed = rng(MLKEM_SEED_LEN)
        public = MLKEM1024PrivateKey.from_seed_bytes(seed).public_key().public_bytes_raw()
        key_id = self._take_id()
        self.pq[key_id] = PqPrekeySecret(key_id, seed, last_resort, now_ms)
        return PqPrekey.create(identity.signing_key, key_id, public, last_resort, now_ms)

    def build_uploads(self, identity: DeviceIdentity, now_ms: int, *, one_time_count: int = 100,
                      pq_one_time_count: int = 0, rng: Rng = system_rng) -> DeviceUploads:
        """A fresh signed prekey, a last-resort PQ prekey and one-time keys, all in this store."""
        return DeviceUploads(
            self.new_signed_prekey(identity, now_ms, rng),
            self.new_pq_prekey(identity, now_ms, last_resort=True, rng=rng),
            self.new_one_time_prekeys(one_time_count, rng),
            tuple(self.new_pq_prekey(identity, now_ms, last_resort=False, rng=rng)
                  for _ in range(pq_one_time_count)),
        )

    # -- lookups for the PQXDH responder (read only) --

    def signed_prekey(self, key_id: int) -> SignedPrekeySecret:
        secret = self.signed.get(key_id)
        if secret is None:
            raise UnknownPrekey("message names a signed prekey this device does not hold")
        return secret

    def one_time_prekey(self, key_id: int) -> X25519PrivateKey:
        private = self.one_time.get(key_id)
        if private is None:
            raise UnknownPrekey("message names a one-time prekey this device does not hold")
        return primitives.x25519_from_seed(private)

    def pq_prekey(self, key_id: int) -> MLKEM1024PrivateKey:
        secret = self.pq.get(key_id)
        if secret is None:
            raise UnknownPrekey("message names a PQ prekey this device does not hold")
        return MLKEM1024PrivateKey.from_seed_bytes(secret.seed)

    def has_seen(self, signed_prekey_id: int, replay_hash: bytes) -> bool:
        secret = self.signed.get(signed_prekey_id)
        return secret is not None and replay_hash in secret.seen

    # -- commits --

    def commit_initial(self, signed_prekey_id: int, replay_hash: bytes, one_time_prekey_id: int | None,
                       pq_prekey_id: int) -> None:
        """After the first message decrypted: remember it, delete the one-time keys it used."""
        self.signed_prekey(signed_prekey_id).seen.add(replay_hash)
        if one_time_prekey_id is not None:
            self.one_time.pop(one_time_prekey_id, None)
        pq = self.pq.get(pq_prekey_id)
        if pq is not None and not pq.last_resort:
            del self.pq[pq_prekey_id]

    def delete_signed_prekey(self, key_id: int) -> None:
        """Forget a rotated-out signed prekey and, with it, its replay hashes."""
        self.signed.pop(key_id, None)

    def prune_signed_prekeys(self, now_ms: int, keep_ms: int) -> list[int]:
        """Delete signed prekeys older than ``keep_ms`` except the newest; returns their ids."""
        if not self.signed:
            return []
        newest = max(self.signed)
        old = [k for k, s in self.signed.items() if k != newest and now_ms - s.created_ms > keep_ms]
        for key_id in old:
            del self.signed[key_id]
        return old

    # -- serialisation --

    def to_bytes(self) -> bytes:
        return codec.encode({
            "v": PREKEY_STORE_VERSION,
            "next_id": self.next_key_id,
            "signed": [{"id": s.key_id, "priv": s.private, "pub": s.public, "created_ms": s.created_ms,
                        "seen": b"".join(sorted(s.seen))} for s in self.signed.values()],
            "one_time": [[key_id, private] for key_id, private in self.one_time.items()],
            "pq": [{"id": p.key_id, "seed": p.seed, "last_resort": p.last_resort, "created_ms": p.created_ms}
                   for p in self.pq.values()],
        }, _STORE_LIMITS)

    @classmethod
    def from_bytes(cls, data: bytes) -> PrekeyStore:
        try:
            obj = require_map(codec.decode(data, _STORE_LIMITS), "prekey store")
            if wire_field(obj, "v", int) != PREKEY_STORE_VERSION:
                raise UnsupportedVersion("unknown prekey store version")
            store = cls()
            store.next_key_id = non_negative(wire_field(obj, "next_id", int), "next_id")
            for raw in wire_field(obj, "signed", list):
                raw = require_map(raw, "signed prekey")
                seen = wire_field(raw, "seen", bytes)
                if len(seen) % REPLAY_HASH_LEN:
                    raise MalformedMessage("malformed prekey store")
                secret = SignedPrekeySecret(
                    non_negative(wire_field(raw, "id", int), "id"),
                    wire_field(raw, "priv", bytes, length=32), wire_field(raw, "pub", bytes, length=32),
                    wire_field(raw, "created_ms", int),
                    {seen[i:i + REPLAY_HASH_LEN] for i in range(0, len(seen), REPLAY_HASH_LEN)})
                store.signed[secret.key_id] = secret
            for pair in wire_field(obj, "one_time", list):
                if not isinstance(pair, list) or len(pair) != 2 or not isinstance(pair[0], int) \
                        or not isinstance(pair[1], bytes) or len(pair[1]) != 32:
                    raise MalformedMessage("malformed prekey store")
                store.one_time[pair[0]] = pair[1]
            for raw in wire_field(obj, "pq", list):
                raw = require_map(raw, "PQ prekey")
                pq = PqPrekeySecret(non_negative(wire_field(raw, "id", int), "id"),
                                    wire_field(raw, "seed", bytes, length=MLKEM_SEED_LEN),
                                    wire_field(raw, "last_resort", bool), wire_field(raw, "created_ms", int))
                store.pq[pq.key_id] = pq
        except (CodecError, ProtocolError) as exc:
            raise MalformedMessage(f"malformed prekey store: {exc.message}") from None
        return store


def replay_hash(identity_key: bytes, ephemeral_key: bytes, kem_ciphertext: bytes) -> bytes:
    """SHA-256(IK_A ‖ EK_A ‖ KEM ciphertext): what the responder remembers per signed prekey."""
    return hashlib.sha256(identity_key + ephemeral_key + kem_ciphertext).digest()
