"""The one parser of user, device and domain addresses (DESIGN §3).

* domain: lower-case DNS name, optionally ``:port`` (tests and private networks)
* user:   ``local@domain`` with ``local`` of ``[a-z0-9._=-]``, 1..64 characters
* device: ``local@domain/DEVICEID`` with DEVICEID 10 base32 characters ``[A-Z2-7]``
"""

from __future__ import annotations

import re
import secrets
from dataclasses import dataclass, field
from functools import lru_cache

from federation.errors import AddressError

DEVICE_ID_LEN = 10
_B32 = "ABCDEFGHIJKLMNOPQRSTUVWXYZ234567"
_LOCAL = re.compile(r"[a-z0-9._=\-]{1,64}")
_LABEL = re.compile(r"[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?")
_DEVICE = re.compile(rf"[A-Z2-7]{{{DEVICE_ID_LEN}}}")


def parse_domain(text: str) -> str:
    """Validate ``host[:port]``; returns it unchanged (domains are case-sensitive lower-case)."""
    if not isinstance(text, str) or not text or len(text) > 255:
        raise AddressError("domain must be a non-empty string of at most 255 characters")
    host, sep, port = text.partition(":")
    if sep:
        if not port.isdigit() or not port.isascii() or not 0 < int(port) < 65536 or port.startswith("0"):
            raise AddressError(f"invalid port in domain {text!r}")
    labels = host.split(".")
    if not all(_LABEL.fullmatch(label) for label in labels):
        raise AddressError(f"invalid domain {text!r}: use lower-case letters, digits, '-' and '.'")
    return text


# Addresses are parsed and printed several times per message (frames, sessions, rows):
# the text is kept with the value, and recent parses are remembered (valid ones only:
# an error is raised again each time).
_PARSED_CACHE = 4096


@dataclass(frozen=True, slots=True, order=True)
class UserAddress:
    local: str
    domain: str
    _text: str = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_text", f"{self.local}@{self.domain}")

    @classmethod
    def parse(cls, text: str) -> UserAddress:
        if not isinstance(text, str) or text.count("@") != 1:
            raise AddressError(f"invalid user address {text!r}: expected local@domain")
        return _parse_user(text)

    def device(self, device_id: str) -> DeviceAddress:
        return DeviceAddress(self, check_device_id(device_id))

    def __str__(self) -> str:
        return self._text


@lru_cache(maxsize=_PARSED_CACHE)
def _parse_user(text: str) -> UserAddress:
    local, domain = text.split("@")
    if not _LOCAL.fullmatch(local):
        raise AddressError(f"invalid user name {local!r}: 1-64 of a-z 0-9 . _ = -")
    return UserAddress(local, parse_domain(domain))


@dataclass(frozen=True, slots=True, order=True)
class DeviceAddress:
    user: UserAddress
    device_id: str
    _text: str = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_text", f"{self.user}/{self.device_id}")

    @classmethod
    def parse(cls, text: str) -> DeviceAddress:
        if not isinstance(text, str) or text.count("/") != 1:
            raise AddressError(f"invalid device address {text!r}: expected local@domain/DEVICEID")
        return _parse_device(text)

    @property
    def domain(self) -> str:
        return self.user.domain

    def __str__(self) -> str:
        return self._text


@lru_cache(maxsize=_PARSED_CACHE)
def _parse_device(text: str) -> DeviceAddress:
    user, device_id = text.split("/")
    return DeviceAddress(UserAddress.parse(user), check_device_id(device_id))


def check_device_id(device_id: str) -> str:
    if not isinstance(device_id, str) or not _DEVICE.fullmatch(device_id):
        raise AddressError(f"invalid device id {device_id!r}: 10 characters of A-Z and 2-7")
    return device_id


def new_device_id() -> str:
    """A fresh random device id (50 bits)."""
    return "".join(secrets.choice(_B32) for _ in range(DEVICE_ID_LEN))
