"""Own devices: listing them, revoking one, and linking codes that pin a new device's key.

Why the signed list decides: the server's ``devices`` op says what the server
*thinks* (pending, active, revoked), but only the list signed by the master key
makes a device current — messages are encrypted for listed devices only.  So a
server that marks a revoked device active again, or serves an older list that
still names it, reaches nobody: clients refuse older lists (version rule), reject
lists not signed by the master key, and the master device remembers what it
revoked and never signs such a device in again.

Linking codes: the new device shows ``DEVICEID-ABCD-EFGH-IJKL-MNOP`` (its device id
and 80 bits of a hash of user, device id and identity key) or a QR payload with
the full key; the master device compares them with what the server reports for
the pending device before signing it into the list, so a server cannot slip its
own key in.  Approving shares the master device's history with the new device
(``clientsdk.history``) unless ``share_history=False``.

Which device is the master device: the one a list signed by the master key names
*first*.  The signer decides the order, and the master device always lists itself
first when it signs (``master_first``), so a linked device cannot claim the role
without the master key (a new device accepts a history bundle only from it).
"""

from __future__ import annotations

import base64
import hashlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import trio

from clientsdk.client_parts import ClientParts
from clientsdk.crypto.errors import MalformedMessage, UnsupportedVersion
from clientsdk.crypto.identity import MasterKey, VerifiedDeviceList, remove_device
from clientsdk.crypto.primitives import ct_equal
from clientsdk.errors import NotMasterDevice, SdkError, StoreVersionUnsupported
from clientsdk.store import Batch
from federation import codec
from federation.addresses import UserAddress, check_device_id
from federation.errors import ProtocolError
from federation.keys import DeviceList, SignedDeviceList
from federation.validate import field as wire_field
from federation.validate import require_map

LINK_TAG_BYTES = 10                    # 80 bits: a server would need ~2^80 keys to match a shown code
LINK_QR_VERSION = 1
REVOKED_KV = "revoked_devices"
REVOKED_VERSION = 1
IDENTITY_KEY_SIZE = 32
_LINK_QR_LIMITS = codec.Limits(max_bytes=512, max_depth=1, max_items=8, max_container=8)


class DeviceError(SdkError):
    """A device operation was refused locally (unknown device, revoked before, code mismatch)."""

    code = "device_error"

    def __init__(self, message: str, *, code: str = "device_error") -> None:
        super().__init__(message)
        self.code = code


# --- linking codes (sans-I/O) ---------------------------------------------------------------

def link_tag(user: str, device_id: str, identity_key: bytes) -> str:
    """16 base32 characters binding a device id and identity key to a user."""
    if not isinstance(identity_key, bytes) or len(identity_key) != IDENTITY_KEY_SIZE:
        raise MalformedMessage("identity key must be 32 bytes")
    digest = hashlib.sha256(b"SecureChat_LinkingCode_v1\x00" + user.encode() + b"\x00" + device_id.encode()
                            + b"\x00" + identity_key).digest()
    return base64.b32encode(digest[:LINK_TAG_BYTES]).decode()


@dataclass(frozen=True, slots=True)
class LinkingCode:
    """What a pending device shows so its user can approve exactly it from the master device."""

    device_id: str
    tag: str                              # 16 base32 characters, or "" when only the QR key pins it
    identity_key: bytes | None = None     # the full key (QR payloads only)

    @classmethod
    def for_device(cls, user: str, device_id: str, identity_key: bytes) -> LinkingCode:
        return cls(device_id, link_tag(user, device_id, identity_key), identity_key)

    def __str__(self) -> str:
        groups = "-".join(self.tag[i:i + 4] for i in range(0, len(self.tag), 4))
        return f"{self.device_id}-{groups}"

    @classmethod
    def parse(cls, text: str) -> LinkingCode:
        """``DEVICEID-ABCD-EFGH-IJKL-MNOP`` (spaces, dashes and case do not matter)."""
        if not isinstance(text, str):
            raise MalformedMessage("a linking code is text")
        compact = "".join(ch for ch in text.upper() if ch not in " -")
        if len(compact) != 10 + 16:
            raise MalformedMessage("a linking code is a device id and 16 characters")
        try:
            device_id = check_device_id(compact[:10])
            base64.b32decode(compact[10:])
        except (ProtocolError, ValueError):
            raise MalformedMessage("a linking code uses only the letters A-Z and digits 2-7") from None
        return cls(device_id, compact[10:])

    def qr_payload(self, user: str) -> bytes:
        if self.identity_key is None:
            raise MalformedMessage("a QR payload needs the full identity key")
        return codec.encode({"v": LINK_QR_VERSION, "user": user, "device_id": self.device_id,
                             "identity_key": self.identity_key}, _LINK_QR_LIMITS)

    @classmethod
    def from_qr(cls, payload: bytes, user: str) -> LinkingCode:
        """Parse a scanned linking QR payload; it must be for ``user``."""
        try:
            obj = require_map(codec.decode(payload, _LINK_QR_LIMITS), "linking QR payload")
            version = wire_field(obj, "v", int)
            if version != LINK_QR_VERSION:
                raise UnsupportedVersion(f"linking code version {version} is not supported")
            if set(obj) != {"v", "user", "device_id", "identity_key"}:
                raise MalformedMessage("linking QR payload has missing or unknown fields")
            shown_user = str(UserAddress.parse(wire_field(obj, "user", str)))
            device_id = check_device_id(wire_field(obj, "device_id", str))
            key = wire_field(obj, "identity_key", bytes, length=IDENTITY_KEY_SIZE)
        except ProtocolError:
            raise MalformedMessage("not a SecureChat linking code") from None
        if shown_user != user:
            raise DeviceError("this linking code is for another account", code="wrong_account")
        return cls.for_device(user, device_id, key)

    def matches(self, user: str, identity_key: bytes) -> bool:
        """Does the key the server reports for this device fit the code (constant time)?"""
        if self.identity_key is not None:
            return ct_equal(identity_key, self.identity_key)
        return ct_equal(link_tag(user, self.device_id, identity_key).encode(), self.tag.encode())


# --- which device holds the master key ----------------------------------------------------------

def master_device_id(device_list: DeviceList) -> str | None:
    """The master device of a verified list: the device it names first (see the module docstring)."""
    return device_list.devices[0].id if device_list.devices else None


def master_first(master: MasterKey, signed: SignedDeviceList, device_id: str) -> SignedDeviceList:
    """``signed`` with the master device ``device_id`` moved to the front (re-signed, same version and times).

    Called on every list the master device is about to publish, so the first entry of
    a list always names a device that holds the master key.
    """
    current = signed.open(master.public_key)
    if master_device_id(current) == device_id or current.identity_key_of(device_id) is None:
        return signed
    devices = tuple(sorted(current.devices, key=lambda d: d.id != device_id))
    return DeviceList(current.user, current.version, current.issued_ms, current.expires_ms,
                      devices).sign(master.signing_key)


# --- the device list the user sees -------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class DeviceInfo:
    """One device of my user.

    ``state``: ``current`` (in the signed list: it receives messages), ``pending``
    (logged in, waiting for approval), ``revoked``, or ``unlisted`` (the server says
    active but the signed list does not name it: it receives nothing — a server
    misbehaving or a list not yet propagated).  ``server_state`` is what the server
    reported (None if it does not know the device).
    """

    device_id: str
    address: str
    identity_key: bytes
    state: str
    server_state: str | None
    this_device: bool
    added_ms: int | None               # when the master device listed it

    @property
    def linking_code(self) -> str:
        """The short code of this device (what its screen showed when it was linked)."""
        return str(LinkingCode.for_device(self.address.partition("/")[0], self.device_id, self.identity_key))


def merge_devices(user: str, me: str, signed: VerifiedDeviceList, server: list[dict[str, Any]],
                  revoked: set[str]) -> list[DeviceInfo]:
    """The signed list's devices first (in list order), then the rest by device id."""
    reported = {str(d.get("id")): d for d in server if isinstance(d, dict)}
    out: list[DeviceInfo] = []
    listed = set()
    for entry in signed.device_list.devices:
        listed.add(entry.id)
        server_state = reported.get(entry.id, {}).get("state")
        out.append(DeviceInfo(entry.id, f"{user}/{entry.id}", entry.identity_key, "current",
                              server_state if isinstance(server_state, str) else None, entry.id == me,
                              entry.added_ms))
    for device_id in sorted(set(reported) - listed):
        raw = reported[device_id]
        key = raw.get("identity_key")
        server_state = raw.get("state") if isinstance(raw.get("state"), str) else None
        if not isinstance(key, bytes) or len(key) != IDENTITY_KEY_SIZE:
            continue
        if device_id in revoked or server_state == "revoked":
            state = "revoked"
        elif server_state == "pending":
            state = "pending"
        else:
            state = "unlisted"
        out.append(DeviceInfo(device_id, f"{user}/{device_id}", key, state, server_state, device_id == me, None))
    return out


class DevicesMixin(ClientParts):
    if TYPE_CHECKING:   # provided by Client (a stub here would shadow it in the MRO)
        async def approve_device(self, device_id: str, identity_key: bytes | None = None, *,
                                 share_history: bool = True) -> int: ...

    def linking_code(self) -> str:
        """The short code this (new) device shows; the master device approves it with ``approve_link``."""
        return str(LinkingCode.for_device(self.user, self.device_id, self.identity_key))

    def linking_qr(self) -> bytes:
        """The same as a QR payload (with the full identity key)."""
        return LinkingCode.for_device(self.user, self.device_id, self.identity_key).qr_payload(self.user)

    async def devices(self) -> list[DeviceInfo]:
        """Every device of my user: the signed list's (current) and the server's others (pending, revoked)."""
        rpc = await self._wait_rpc()
        signed = await self._device_list(rpc, self.user, force=True)
        answer = await rpc.request("devices")
        server = answer.get("devices")
        return merge_devices(self.user, self.device_id, signed, server if isinstance(server, list) else [],
                             await self._revoked_ids())

    async def approve_link(self, code: str | bytes, *, share_history: bool = True) -> int:
        """Approve the pending device a linking code (text) or linking QR payload (bytes) names.

        Refuses a device this master device revoked before, and one whose key the
        server reports differently from the code.  With ``share_history`` (the default)
        the new device first gets an end-to-end encrypted history bundle: contacts with
        their trust and recent messages of every conversation (``clientsdk.history``).
        Returns the new list version.
        """
        if self._master is None:
            raise NotMasterDevice("only the master device can approve devices")
        link = LinkingCode.from_qr(code, self.user) if isinstance(code, bytes) else LinkingCode.parse(code)
        if link.device_id in await self._revoked_ids():
            raise DeviceError("this device was revoked; it cannot be linked again", code="device_revoked")
        rpc = await self._wait_rpc()
        reported = {d.get("id"): d for d in (await rpc.request("devices")).get("devices", []) if isinstance(d, dict)}
        device = reported.get(link.device_id)
        key = device.get("identity_key") if device is not None else None
        if device is None or device.get("state") != "pending" or not isinstance(key, bytes):
            raise DeviceError("no such pending device", code="not_found")
        if len(key) != IDENTITY_KEY_SIZE or not link.matches(self.user, key):
            raise DeviceError("the server reports another key for this device than its linking code shows",
                              code="key_mismatch")
        return await self.approve_device(link.device_id, key, share_history=share_history)

    async def revoke_device(self, device_id: str) -> int | None:
        """Revoke one of my user's devices (master device only); returns the new list version.

        A listed device is removed by signing the next list without it (the server
        then revokes it and closes its connection); a pending one is revoked at the
        server (None: the list does not change).  Either way this device remembers
        it and never approves it again.
        """
        if self._master is None:
            raise NotMasterDevice("only the master device can revoke devices")
        device_id = check_device_id(device_id)
        if device_id == self.device_id:
            raise DeviceError("the master device cannot revoke itself", code="revoke_self")
        await self._remember_revoked(device_id)
        rpc = await self._wait_rpc()
        current = await self._device_list(rpc, self.user, force=True)
        if current.device_list.identity_key_of(device_id) is not None:
            signed = remove_device(self._master, current.device_list, device_id, self._clock())
            await self._publish_own_list(rpc, signed)
            return current.device_list.version + 1
        known = {d.get("id"): d for d in (await rpc.request("devices")).get("devices", []) if isinstance(d, dict)}
        if device_id not in known:
            raise DeviceError("no such device", code="not_found")
        if known[device_id].get("state") != "revoked":
            await rpc.request("revoke_device", device_id=device_id)
        return None

    async def _revoked_ids(self) -> set[str]:
        snapshot = await trio.to_thread.run_sync(self._store.load, limiter=self._store_limiter)
        raw = snapshot.kv.get(REVOKED_KV)
        if raw is None:
            return set()
        record = codec.decode(raw)
        if not isinstance(record, dict) or record.get("v") != REVOKED_VERSION:
            raise StoreVersionUnsupported("the revoked-devices record has an unknown version")
        ids = record.get("ids")
        return {i for i in ids if isinstance(i, str)} if isinstance(ids, list) else set()

    async def _remember_revoked(self, device_id: str) -> None:
        async with self._lock:
            ids = await self._revoked_ids()
            ids.add(device_id)
            await self._persist(Batch(kv={REVOKED_KV: codec.encode({"v": REVOKED_VERSION, "ids": sorted(ids)})}))
