"""Public key objects that cross boundaries, with their canonical (signed) forms.

* ``DeviceList`` / ``SignedDeviceList`` — DESIGN §3 (normative fields): signed by the
  user's master key under ``device-list``; carried as its signed bytes so every
  party hashes and compares exactly the same bytes.
* ``SignedPrekey`` (X25519, purpose ``signed-prekey``), ``PqPrekey`` (ML-KEM-1024,
  purpose ``pq-prekey``), ``OneTimePrekey`` and ``PrekeyBundle`` — DESIGN §3/§4;
  prekey signatures are made by the device identity key (Ed25519).

The version rule of device lists lives here, once, for server and client alike.
"""

from __future__ import annotations

import hashlib
import hmac
from dataclasses import dataclass
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from federation import signing
from federation.addresses import DeviceAddress, UserAddress, check_device_id
from federation.errors import AddressError, ErrorCode, ProtocolError
from federation.signing import Purpose
from federation.validate import field, non_negative, require_map

X25519_KEY_LEN = 32
ED25519_KEY_LEN = 32
MLKEM1024_PUBLIC_KEY_LEN = 1568
MAX_DEVICES = 100
MAX_LIST_LIFETIME_MS = 30 * 24 * 3600 * 1000


class BadDeviceList(ProtocolError):
    """A device list that is malformed or does not verify under the master key."""

    code = ErrorCode.BAD_DEVICE_LIST


class DeviceListRollback(BadDeviceList):
    """A list with a lower version than one already seen."""


class DeviceListEquivocation(BadDeviceList):
    """Two different lists signed with the same version: the security event of DESIGN §3."""


class DeviceListExpired(BadDeviceList):
    """A list whose ``expires_ms`` has passed."""


class BadBundle(ProtocolError):
    """A prekey bundle or key upload that is malformed or whose signatures do not verify."""

    code = ErrorCode.BAD_BUNDLE


# --- device lists -----------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class DeviceEntry:
    id: str
    identity_key: bytes
    added_ms: int

    def to_wire(self) -> dict[str, Any]:
        return {"id": self.id, "identity_key": self.identity_key, "added_ms": self.added_ms}


@dataclass(frozen=True, slots=True)
class DeviceList:
    user: str
    version: int
    issued_ms: int
    expires_ms: int
    devices: tuple[DeviceEntry, ...]

    def fields(self) -> dict[str, Any]:
        return {
            "user": self.user,
            "version": self.version,
            "issued_ms": self.issued_ms,
            "expires_ms": self.expires_ms,
            "devices": [d.to_wire() for d in self.devices],
        }

    @classmethod
    def from_fields(cls, obj: dict[str, Any]) -> DeviceList:
        try:
            user = str(UserAddress.parse(field(obj, "user", str)))
            version = non_negative(field(obj, "version", int), "version")
            issued = non_negative(field(obj, "issued_ms", int), "issued_ms")
            expires = field(obj, "expires_ms", int)
            raw = field(obj, "devices", list)
            if set(obj) - {"user", "version", "issued_ms", "expires_ms", "devices"}:
                raise ProtocolError("unknown field in device list")
            if len(raw) > MAX_DEVICES:
                raise ProtocolError(f"more than {MAX_DEVICES} devices")
            devices = []
            for entry in raw:
                entry = require_map(entry, "device entry")
                devices.append(DeviceEntry(
                    check_device_id(field(entry, "id", str)),
                    field(entry, "identity_key", bytes, length=ED25519_KEY_LEN),
                    non_negative(field(entry, "added_ms", int), "added_ms"),
                ))
        except (ProtocolError, AddressError) as exc:
            raise BadDeviceList(f"malformed device list: {exc.message}") from None
        if len({d.id for d in devices}) != len(devices):
            raise BadDeviceList("device list names a device twice")
        if not issued < expires <= issued + MAX_LIST_LIFETIME_MS:
            raise BadDeviceList("device list expiry must be within 30 days after issue")
        return cls(user, version, issued, expires, tuple(devices))

    def sign(self, master_key: Ed25519PrivateKey) -> SignedDeviceList:
        fields = self.fields()
        DeviceList.from_fields(fields)  # refuse to sign what nobody would accept
        body = signing.signing_input(Purpose.DEVICE_LIST, fields)
        return SignedDeviceList(body, master_key.sign(body))

    def device_ids(self) -> frozenset[str]:
        return frozenset(d.id for d in self.devices)

    def identity_key_of(self, device_id: str) -> bytes | None:
        for d in self.devices:
            if d.id == device_id:
                return d.identity_key
        return None


@dataclass(frozen=True, slots=True)
class SignedDeviceList:
    """A device list as the exact bytes the master key signed."""

    body: bytes
    signature: bytes

    @property
    def digest(self) -> bytes:
        """SHA-256 of the signed bytes: what messages carry next to the version."""
        return hashlib.sha256(self.body).digest()

    def open(self, master_public_key: bytes) -> DeviceList:
        """Verify under ``master_public_key`` and parse; raises ``BadDeviceList``."""
        try:
            fields = signing.open_signed(master_public_key, Purpose.DEVICE_LIST, self.body, self.signature)
        except ProtocolError as exc:
            raise BadDeviceList(f"device list does not verify: {exc.message}") from None
        return DeviceList.from_fields(fields)

    def to_wire(self) -> dict[str, Any]:
        return {"body": self.body, "sig": self.signature}

    @classmethod
    def from_wire(cls, obj: Any) -> SignedDeviceList:
        obj = require_map(obj, "device list")
        return cls(field(obj, "body", bytes, max_length=64 * 1024),
                   field(obj, "sig", bytes, length=signing.SIGNATURE_LEN))


def check_successor(previous: SignedDeviceList | None, previous_version: int | None,
                    new: SignedDeviceList, new_version: int) -> bool:
    """Apply the version rule; return True if ``new`` replaces ``previous``.

    Higher version: accepted.  Equal version with identical bytes: the same list
    (returns False).  Equal version with other bytes: ``DeviceListEquivocation``.
    Lower version: ``DeviceListRollback``.
    """
    if previous is None or previous_version is None:
        return True
    if new_version > previous_version:
        return True
    if new_version == previous_version:
        if hmac.compare_digest(new.body, previous.body):
            return False
        raise DeviceListEquivocation(f"two different device lists with version {new_version}")
    raise DeviceListRollback(f"device list version {new_version} is older than {previous_version}")


def check_not_expired(device_list: DeviceList, now_ms: int) -> None:
    if now_ms >= device_list.expires_ms:
        raise DeviceListExpired(f"device list of {device_list.user} expired")


# --- prekeys ----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class SignedPrekey:
    key_id: int
    public_key: bytes
    created_ms: int
    signature: bytes

    def fields(self) -> dict[str, Any]:
        return {"id": self.key_id, "key": self.public_key, "created_ms": self.created_ms}

    @classmethod
    def create(cls, identity_key: Ed25519PrivateKey, key_id: int, public_key: bytes,
               created_ms: int) -> SignedPrekey:
        unsigned = cls(key_id, public_key, created_ms, b"")
        return cls(key_id, public_key, created_ms,
                   signing.sign(identity_key, Purpose.SIGNED_PREKEY, unsigned.fields()))

    def verify(self, identity_public_key: bytes) -> None:
        try:
            signing.verify(identity_public_key, Purpose.SIGNED_PREKEY, self.fields(), self.signature)
        except ProtocolError:
            raise BadBundle("signed prekey signature does not verify") from None

    def to_wire(self) -> dict[str, Any]:
        return {**self.fields(), "sig": self.signature}

    @classmethod
    def from_wire(cls, obj: Any) -> SignedPrekey:
        obj = _bundle_map(obj, "signed prekey")
        try:
            return cls(non_negative(field(obj, "id", int), "id"),
                       field(obj, "key", bytes, length=X25519_KEY_LEN),
                       non_negative(field(obj, "created_ms", int), "created_ms"),
                       field(obj, "sig", bytes, length=signing.SIGNATURE_LEN))
        except ProtocolError as exc:
            raise BadBundle(exc.message) from None


@dataclass(frozen=True, slots=True)
class PqPrekey:
    key_id: int
    public_key: bytes          # raw ML-KEM-1024 encapsulation key, 1,568 bytes
    last_resort: bool
    created_ms: int
    signature: bytes

    def fields(self) -> dict[str, Any]:
        return {"id": self.key_id, "key": self.public_key, "last_resort": self.last_resort,
                "created_ms": self.created_ms}

    @classmethod
    def create(cls, identity_key: Ed25519PrivateKey, key_id: int, public_key: bytes,
               last_resort: bool, created_ms: int) -> PqPrekey:
        unsigned = cls(key_id, public_key, last_resort, created_ms, b"")
        return cls(key_id, public_key, last_resort, created_ms,
                   signing.sign(identity_key, Purpose.PQ_PREKEY, unsigned.fields()))

    def verify(self, identity_public_key: bytes) -> None:
        try:
            signing.verify(identity_public_key, Purpose.PQ_PREKEY, self.fields(), self.signature)
        except ProtocolError:
            raise BadBundle("PQ prekey signature does not verify") from None

    def to_wire(self) -> dict[str, Any]:
        return {**self.fields(), "sig": self.signature}

    @classmethod
    def from_wire(cls, obj: Any) -> PqPrekey:
        obj = _bundle_map(obj, "PQ prekey")
        try:
            return cls(non_negative(field(obj, "id", int), "id"),
                       field(obj, "key", bytes, length=MLKEM1024_PUBLIC_KEY_LEN),
                       field(obj, "last_resort", bool),
                       non_negative(field(obj, "created_ms", int), "created_ms"),
                       field(obj, "sig", bytes, length=signing.SIGNATURE_LEN))
        except ProtocolError as exc:
            raise BadBundle(exc.message) from None


@dataclass(frozen=True, slots=True)
class OneTimePrekey:
    key_id: int
    public_key: bytes

    def to_wire(self) -> dict[str, Any]:
        return {"id": self.key_id, "key": self.public_key}

    @classmethod
    def from_wire(cls, obj: Any) -> OneTimePrekey:
        obj = _bundle_map(obj, "one-time prekey")
        try:
            return cls(non_negative(field(obj, "id", int), "id"),
                       field(obj, "key", bytes, length=X25519_KEY_LEN))
        except ProtocolError as exc:
            raise BadBundle(exc.message) from None


@dataclass(frozen=True, slots=True)
class PrekeyBundle:
    """What a claim returns for one device: everything PQXDH needs to start a session."""

    device: str                         # device address
    identity_key: bytes                 # Ed25519 public key
    signed_prekey: SignedPrekey
    pq_prekey: PqPrekey
    one_time_prekey: OneTimePrekey | None

    def verify(self) -> None:
        """Raise ``BadBundle`` unless both prekey signatures verify under the identity key.

        A bundle without a valid signed ML-KEM-1024 prekey is refused: there is no
        X3DH fallback a server could downgrade to (DESIGN §4).
        """
        if len(self.identity_key) != ED25519_KEY_LEN:
            raise BadBundle("identity key must be 32 bytes")
        self.signed_prekey.verify(self.identity_key)
        self.pq_prekey.verify(self.identity_key)

    def to_wire(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "device": self.device,
            "identity_key": self.identity_key,
            "signed_prekey": self.signed_prekey.to_wire(),
            "pq_prekey": self.pq_prekey.to_wire(),
        }
        if self.one_time_prekey is not None:
            out["one_time_prekey"] = self.one_time_prekey.to_wire()
        return out

    @classmethod
    def from_wire(cls, obj: Any) -> PrekeyBundle:
        obj = _bundle_map(obj, "bundle")
        try:
            device = str(DeviceAddress.parse(field(obj, "device", str)))
            identity_key = field(obj, "identity_key", bytes, length=ED25519_KEY_LEN)
        except ProtocolError as exc:
            raise BadBundle(exc.message) from None
        if "pq_prekey" not in obj:
            raise BadBundle("bundle has no signed ML-KEM-1024 prekey")
        otk = obj.get("one_time_prekey")
        return cls(device, identity_key, SignedPrekey.from_wire(obj.get("signed_prekey")),
                   PqPrekey.from_wire(obj["pq_prekey"]),
                   None if otk is None else OneTimePrekey.from_wire(otk))


def _bundle_map(obj: Any, what: str) -> dict[str, Any]:
    if not isinstance(obj, dict):
        raise BadBundle(f"{what} must be a map")
    return obj
