"""What the client knows about a user (a contact, or my own user): trusted master key and device list.

Trust on first use (DESIGN §4): the first master key a server reports for a user
is trusted; a different one later is a security event and sending stops until the
user accepts it.  The device list is kept as its signed bytes and re-verified on
load, so a tampered store cannot inject devices.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from clientsdk.crypto.identity import VerifiedDeviceList
from clientsdk.errors import StoreCorrupted
from federation.errors import ProtocolError
from federation.keys import SignedDeviceList

TOFU = "tofu"
VERIFIED = "verified"
SELF = "self"


@dataclass(slots=True)
class Contact:
    user: str
    master_key: bytes
    trust: str = TOFU
    current: VerifiedDeviceList | None = None
    stale: bool = False            # a push or a peer's message says a newer list exists
    min_version: int = 0           # highest list version a peer's message claimed
    expired_reported: bool = False

    @property
    def verified(self) -> bool:
        return self.trust == VERIFIED

    def to_record(self) -> dict[str, Any]:
        record: dict[str, Any] = {"v": 1, "master_key": self.master_key, "trust": self.trust,
                                  "min_version": self.min_version}
        if self.current is not None:
            record["list"] = self.current.signed.to_wire()
        return record

    @classmethod
    def from_record(cls, user: str, record: dict[str, Any]) -> Contact:
        try:
            master = record["master_key"]
            trust = record["trust"]
            min_version = record.get("min_version", 0)
            if record.get("v") != 1 or not isinstance(master, bytes) or not isinstance(trust, str) \
                    or not isinstance(min_version, int):
                raise StoreCorrupted("a contact record does not parse")
            current = None
            if "list" in record:
                current = VerifiedDeviceList.open(master, SignedDeviceList.from_wire(record["list"]))
        except (KeyError, ProtocolError):
            raise StoreCorrupted("a contact record does not parse") from None
        return cls(user, master, trust, current, min_version=min_version)
