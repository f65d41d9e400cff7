"""A device's persistent account data and the client's options.

Why separate: what a device *is* (user, device id, identity key, master key if it
is the first device, prekey private halves) is written once at enrolment and read
back on every open; keeping its encoding here, versioned, keeps the client about
behaviour rather than bytes.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

from clientsdk.connection import Backoff
from clientsdk.crypto.errors import CryptoError
from clientsdk.crypto.identity import DeviceIdentity, MasterKey, PrekeyStore
from clientsdk.errors import StoreCorrupted, StoreVersionUnsupported
from clientsdk.store import KdfParams
from federation import codec
from federation.addresses import UserAddress, check_device_id
from federation.errors import ProtocolError

ACCOUNT_VERSION = 1
Clock = Callable[[], int]


def wall_clock_ms() -> int:
    return time.time_ns() // 1_000_000


@dataclass(frozen=True, slots=True)
class ClientOptions:
    """Tunables in one frozen object: time source (tests pass a MockClock-based one), prekey stock, backoff, KDF."""

    clock: Clock = wall_clock_ms
    one_time_prekeys: int = 100          # one-time prekeys kept on the server (topped up below half)
    backoff: Backoff = field(default_factory=Backoff)
    kdf: KdfParams = field(default_factory=KdfParams)   # only for new passphrase-protected stores
    session_reset_interval_ms: int = 3_600_000          # at most one automatic reset per remote device per hour
    delivery_receipts: bool = True                      # send a delivery receipt for every stored message


@dataclass(frozen=True, slots=True, repr=False)
class Account:
    user: str
    device_id: str
    identity: DeviceIdentity
    master: MasterKey | None

    def __repr__(self) -> str:
        return f"Account({self.user}/{self.device_id}, master={self.master is not None})"

    def to_kv(self, prekeys: PrekeyStore) -> dict[str, bytes]:
        kv = {"account": codec.encode({"v": ACCOUNT_VERSION, "user": self.user, "device_id": self.device_id}),
              "identity": self.identity.private_bytes(), "prekeys": prekeys.to_bytes()}
        if self.master is not None:
            kv["master"] = self.master.private_bytes()
        return kv

    @classmethod
    def from_kv(cls, kv: dict[str, bytes]) -> tuple[Account, PrekeyStore]:
        """Parse what ``to_kv`` wrote; ``StoreCorrupted`` / ``StoreVersionUnsupported`` otherwise."""
        try:
            record = codec.decode(kv["account"])
            if not isinstance(record, dict):
                raise StoreCorrupted("the store's account record does not parse")
            if record.get("v") != ACCOUNT_VERSION:
                raise StoreVersionUnsupported("the store's account record has an unknown version")
            user = str(UserAddress.parse(record["user"]))
            device_id = check_device_id(record["device_id"])
            identity = DeviceIdentity.from_private_bytes(kv["identity"])
            master = MasterKey.from_private_bytes(kv["master"]) if "master" in kv else None
            prekeys = PrekeyStore.from_bytes(kv["prekeys"])
        except (KeyError, TypeError, CryptoError, ProtocolError):
            raise StoreCorrupted("the store's account data does not parse") from None
        return cls(user, device_id, identity, master), prekeys
