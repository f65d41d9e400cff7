"""Verification (DESIGN §4): safety numbers, QR payloads and contact codes.

**Safety numbers** follow Signal's NumericFingerprint v0 (libsignal ``fingerprint.rs``)
with our inputs: key = the user's 32-byte Ed25519 master public key, stable id = the
UTF-8 user address.  Per party::

    hash_1     = SHA-512(0x0000 (u16 version) ‖ key ‖ stable id ‖ key)
    hash_{i+1} = SHA-512(hash_i ‖ key)            up to hash_5200 (5,200 hashes in all)

The first 30 bytes of hash_5200, as six 5-byte big-endian integers each mod 100,000,
printed as 5 digits, give a 30-digit half; the two halves are joined lower first, so
both sides show the same 60 digits.  (Signal's own test vector is checked in
``tests/crypto/test_verification.py``.)

**QR payload**: canonical msgpack ``{v: 1, shown_by: {address, fingerprint},
shown_to: {address, fingerprint}}`` with the FULL 64-byte fingerprints.  It is
directional, as Signal's is, so scanning one's own screen is reported
(``OWN_CODE``) rather than "verified".  Scanning compares against locally computed
fingerprints in constant time and returns a ``ScanVerdict``; marking the contact
verified on ``MATCH`` is the caller's decision.

**Contact codes** ``alice@example.org#1A2B3C4D`` (the first 4 bytes of
SHA-256("SecureChat_ContactCode_v1" ‖ master key), upper-case hex) help find the
right account.  32 bits can be brute-forced, so ``ContactCode.matches`` returns a
``LookupHint`` — never a trust state — and no hint ever verifies a contact.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from clientsdk.crypto.errors import InvalidKey, MalformedMessage, UnsupportedVersion
from clientsdk.crypto.primitives import ct_equal
from federation import codec
from federation.addresses import UserAddress
from federation.errors import ProtocolError
from federation.validate import field as wire_field
from federation.validate import require_map

FINGERPRINT_VERSION = 0
ITERATIONS = 5200
FINGERPRINT_SIZE = 64
DISPLAY_BYTES = 30
QR_VERSION = 1
CONTACT_TAG_BYTES = 4
MASTER_KEY_SIZE = 32

_QR_LIMITS = codec.Limits(max_bytes=1024, max_depth=2, max_items=16, max_container=8)
_TAG = re.compile(r"[0-9A-F]{8}")


def numeric_fingerprint_hash(key: bytes, stable_id: bytes, iterations: int = ITERATIONS) -> bytes:
    """Signal's NumericFingerprint iteration over raw ``key`` and ``stable_id`` bytes (64 bytes out)."""
    if iterations < 2:
        raise ValueError("at least 2 iterations")
    digest = hashlib.sha512(FINGERPRINT_VERSION.to_bytes(2, "big") + key + stable_id + key).digest()
    for _ in range(iterations - 1):
        digest = hashlib.sha512(digest + key).digest()
    return digest


def displayable(fingerprint_hash: bytes) -> str:
    """The 30-digit half: six 5-byte big-endian chunks, each mod 100,000, as 5 digits."""
    if len(fingerprint_hash) < DISPLAY_BYTES:
        raise ValueError("fingerprint too short")
    return "".join(f"{int.from_bytes(fingerprint_hash[i:i + 5], 'big') % 100_000:05d}"
                   for i in range(0, DISPLAY_BYTES, 5))


@dataclass(frozen=True, slots=True)
class Party:
    """One side of a verification: a user address and the master public key we hold for it."""

    address: UserAddress
    master_public_key: bytes

    def __post_init__(self) -> None:
        if not isinstance(self.address, UserAddress):
            raise TypeError("address must be a UserAddress")
        if not isinstance(self.master_public_key, bytes) or len(self.master_public_key) != MASTER_KEY_SIZE:
            raise InvalidKey("master public key must be 32 bytes")

    @classmethod
    def of(cls, address: str, master_public_key: bytes) -> Party:
        return cls(UserAddress.parse(address), master_public_key)


def fingerprint(party: Party) -> bytes:
    """The full 64-byte fingerprint of ``party`` (key = master key, stable id = UTF-8 address)."""
    return numeric_fingerprint_hash(party.master_public_key, str(party.address).encode("utf-8"))


@dataclass(frozen=True, slots=True)
class SafetyNumber:
    """60 digits, identical on both sides; shown as 12 groups of 5."""

    digits: str

    def __post_init__(self) -> None:
        if not isinstance(self.digits, str) or len(self.digits) != 60 or not self.digits.isdigit():
            raise ValueError("a safety number is 60 digits")

    def groups(self) -> tuple[str, ...]:
        return tuple(self.digits[i:i + 5] for i in range(0, 60, 5))

    def __str__(self) -> str:
        return " ".join(self.groups())


def _distinct(me: Party, them: Party) -> None:
    if me.address == them.address:
        raise ValueError("a safety number needs two different users")


def safety_number(me: Party, them: Party) -> SafetyNumber:
    """The safety number of a conversation: the same digits whichever side computes it."""
    _distinct(me, them)
    halves = sorted((displayable(fingerprint(me)), displayable(fingerprint(them))))
    return SafetyNumber(halves[0] + halves[1])


# --- QR payload -----------------------------------------------------------------------

class ScanVerdict(StrEnum):
    MATCH = "match"                    # both fingerprints agree: the caller may mark the contact verified
    KEY_MISMATCH = "key_mismatch"      # same people, different keys: possible interception or a key change
    WRONG_CONTACT = "wrong_contact"    # the code is about other people than this conversation
    OWN_CODE = "own_code"              # the code shown by this very user (e.g. own screen scanned)


def qr_payload(me: Party, them: Party) -> bytes:
    """What ``me`` shows to ``them`` as a QR code."""
    _distinct(me, them)
    return codec.encode({
        "v": QR_VERSION,
        "shown_by": {"address": str(me.address), "fingerprint": fingerprint(me)},
        "shown_to": {"address": str(them.address), "fingerprint": fingerprint(them)},
    }, _QR_LIMITS)


def _qr_party(obj: dict[str, Any], name: str) -> tuple[UserAddress, bytes]:
    entry = require_map(wire_field(obj, name, dict), name)
    if set(entry) != {"address", "fingerprint"}:
        raise MalformedMessage("QR payload party has missing or unknown fields")
    address = UserAddress.parse(wire_field(entry, "address", str))
    return address, wire_field(entry, "fingerprint", bytes, length=FINGERPRINT_SIZE)


def compare_scanned(payload: bytes, me: Party, them: Party) -> ScanVerdict:
    """Compare a scanned QR payload (shown by ``them``) with what this device holds.

    ``MalformedMessage`` for anything that is not a SecureChat verification code,
    ``UnsupportedVersion`` for a newer one.
    """
    _distinct(me, them)
    try:
        obj = require_map(codec.decode(payload, _QR_LIMITS), "QR payload")
        version = wire_field(obj, "v", int)
        if version != QR_VERSION:
            raise UnsupportedVersion(f"verification code version {version} is not supported")
        if set(obj) != {"v", "shown_by", "shown_to"}:
            raise MalformedMessage("QR payload has missing or unknown fields")
        shown_by, shown_by_fp = _qr_party(obj, "shown_by")
        shown_to, shown_to_fp = _qr_party(obj, "shown_to")
    except ProtocolError:
        raise MalformedMessage("not a SecureChat verification code") from None
    if shown_by == me.address and shown_to == them.address:
        return ScanVerdict.OWN_CODE
    if shown_by != them.address or shown_to != me.address:
        return ScanVerdict.WRONG_CONTACT
    same_them = ct_equal(shown_by_fp, fingerprint(them))
    same_me = ct_equal(shown_to_fp, fingerprint(me))
    return ScanVerdict.MATCH if same_them & same_me else ScanVerdict.KEY_MISMATCH


# --- contact codes --------------------------------------------------------------------

class LookupHint(StrEnum):
    """What a contact code says about a key found for it.  A hint, never a trust state."""

    CONSISTENT = "consistent"      # the key fits the code (still unverified: compare safety numbers)
    KEY_DIFFERS = "key_differs"    # the key does not fit: likely the wrong account or a changed key
    OTHER_USER = "other_user"      # the code names another user

    @property
    def verifies_contact(self) -> bool:
        """Always False: only a safety-number comparison verifies a contact."""
        return False


def contact_tag(master_public_key: bytes) -> str:
    if not isinstance(master_public_key, bytes) or len(master_public_key) != MASTER_KEY_SIZE:
        raise InvalidKey("master public key must be 32 bytes")
    digest = hashlib.sha256(b"SecureChat_ContactCode_v1" + master_public_key).digest()
    return digest[:CONTACT_TAG_BYTES].hex().upper()


@dataclass(frozen=True, slots=True)
class ContactCode:
    """``alice@example.org#1A2B3C4D``: an address plus a short tag of its master key."""

    address: UserAddress
    tag: str

    def __post_init__(self) -> None:
        if not isinstance(self.address, UserAddress) or not isinstance(self.tag, str) or not _TAG.fullmatch(self.tag):
            raise ValueError("a contact code is a user address and 8 upper-case hex characters")

    @classmethod
    def for_key(cls, address: UserAddress, master_public_key: bytes) -> ContactCode:
        return cls(address, contact_tag(master_public_key))

    @classmethod
    def parse(cls, text: str) -> ContactCode:
        if not isinstance(text, str) or text.count("#") != 1:
            raise MalformedMessage("a contact code looks like alice@example.org#1A2B3C4D")
        address_text, tag = text.split("#")
        tag = tag.upper()
        if not _TAG.fullmatch(tag):
            raise MalformedMessage("a contact code ends in # and 8 hex characters")
        try:
            address = UserAddress.parse(address_text)
        except ProtocolError as exc:
            raise MalformedMessage(f"contact code: {exc.message}") from None
        return cls(address, tag)

    def matches(self, address: UserAddress, master_public_key: bytes) -> LookupHint:
        """Whether a key found for ``address`` fits this code: a lookup hint only."""
        if address != self.address:
            return LookupHint.OTHER_USER
        if ct_equal(contact_tag(master_public_key).encode(), self.tag.encode()):
            return LookupHint.CONSISTENT
        return LookupHint.KEY_DIFFERS

    def __str__(self) -> str:
        return f"{self.address}#{self.tag}"
