"""Server-to-server transactions (DESIGN §5, normative): wire types, signing, ONE verifier.

A transaction travels as the canonical msgpack frame ``{body, key_id, sig}``:

* ``body`` — the exact signed bytes, canonical ``{ctx: securechat/v1/s2s-txn, origin,
  destination, ts_ms, txn_id, envelopes}`` (the "v1" of ``ctx`` is the format version);
* ``key_id`` — which of the origin's server keys signed (published by discovery);
* ``sig`` — Ed25519 over ``body`` under ``Purpose.S2S_TXN`` (made by ``federation.signing``).

Each envelope is the map ``{id, kind, class, seq, sender, recipients, payload, ts_ms,
expires_ms}``.  Carrying the body as bytes (like device lists) means every party hashes
and verifies exactly the bytes that were signed.

``verify_transaction`` is the only entry point for inbound transactions.  It checks, in
this order, and raises one distinct error per failure (each with a stable ``reason``):
malformed → unknown key → bad signature → expired key → wrong destination → stale
timestamp → envelope binding (``check_envelope_binding``: sender's domain == origin,
recipients in our domain, for EVERY kind — LESSONS #5).  Any failure rejects the whole
transaction; nothing in it is stored.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from federation import codec, signing
from federation.addresses import DeviceAddress, UserAddress, parse_domain
from federation.errors import (
    AddressError, CodecError, ErrorCode, InvalidSignature, ProtocolError, SecureChatError,
)
from federation.signing import Purpose
from federation.validate import field, non_negative, require_map

MAX_CLOCK_SKEW_MS = 5 * 60 * 1000       # |now - ts| allowed for a transaction
MAX_ENVELOPES = 1000                   # per transaction
MAX_RECIPIENTS = 10_000                # per envelope
MAX_TRANSACTION_BYTES = 1 << 20        # the signed body
ENVELOPE_ID_LEN = 16
TXN_ID_LEN = 16
KEY_ID_MAX_LEN = 64
_KEY_ID = re.compile(r"[A-Za-z0-9:._\-]{1,64}")
_CTX_PREFIX, _CTX_SUFFIX = "securechat/", "/s2s-txn"

BODY_LIMITS = codec.Limits(max_bytes=MAX_TRANSACTION_BYTES, max_depth=8, max_items=1 << 18,
                           max_container=MAX_RECIPIENTS)
FRAME_LIMITS = codec.Limits(max_bytes=MAX_TRANSACTION_BYTES + 256, max_depth=2, max_items=8,
                            max_container=8)

# (public_key, valid_from_ms, valid_until_ms) of the origin's key ``key_id``; raises
# ``UnknownServerKey`` (or any ``LookupError``) if there is none.  Other exceptions (a
# transient discovery failure) propagate unchanged: they are not a verdict on the peer.
KeyLookup = Callable[[str, str], tuple[bytes, int, int]]


class EnvelopeKind(StrEnum):
    """Every kind of envelope that crosses domains."""

    MESSAGE = "message"                      # a `send` for remote devices (ciphertexts)
    DEVICE_LIST = "device_list"              # a user's new signed device list
    DEVICE_LIST_DIGESTS = "device_list_digests"  # periodic per-user version/digest comparison
    DELIVERY_REPORT = "delivery_report"      # signed coverage mismatch back to the sender
    KEY_REQUEST = "key_request"              # remote device list / bundle / prekey claim
    KEY_RESPONSE = "key_response"            # the answer to a key_request


class EnvelopeClass(StrEnum):
    """Ordering classes: seqs are consecutive per (origin, destination, class)."""

    CONTROL = "control"
    MESSAGE = "message"


DEFAULT_CLASS: dict[EnvelopeKind, EnvelopeClass] = {
    kind: EnvelopeClass.MESSAGE if kind is EnvelopeKind.MESSAGE else EnvelopeClass.CONTROL
    for kind in EnvelopeKind
}


# --- errors ------------------------------------------------------------------------


class RejectReason(StrEnum):
    """Stable reason codes of a rejected transaction (sent in ``details.reason``)."""

    MALFORMED = "malformed"
    UNKNOWN_KEY = "unknown_key"
    BAD_SIGNATURE = "bad_signature"
    EXPIRED_KEY = "expired_key"
    WRONG_DESTINATION = "wrong_destination"
    STALE_TIMESTAMP = "stale_timestamp"
    FORGED_ORIGIN = "forged_origin"
    MISADDRESSED = "misaddressed"


class TransactionRejected(ProtocolError):
    """The whole transaction is refused; ``reason`` says why (remote blame)."""

    reason: RejectReason = RejectReason.MALFORMED

    def __init__(self, message: str) -> None:
        super().__init__(message, details={"reason": self.reason.value})


class MalformedTransaction(TransactionRejected):
    """Not canonical, wrong types, unknown fields or kinds, over a limit."""

    code = ErrorCode.BAD_REQUEST
    reason = RejectReason.MALFORMED


class UnknownServerKey(TransactionRejected):
    """The origin has no key with this key id (after discovery had its chance)."""

    code = ErrorCode.UNAUTHORIZED
    reason = RejectReason.UNKNOWN_KEY


class BadTransactionSignature(TransactionRejected):
    """The signature does not verify under the named key for ``s2s-txn``."""

    code = ErrorCode.UNAUTHORIZED
    reason = RejectReason.BAD_SIGNATURE


class ExpiredServerKey(TransactionRejected):
    """The key is not valid at the transaction's ts, or not valid now."""

    code = ErrorCode.UNAUTHORIZED
    reason = RejectReason.EXPIRED_KEY


class WrongDestination(TransactionRejected):
    """Signed for another server: a replay to a third server."""

    code = ErrorCode.FORBIDDEN
    reason = RejectReason.WRONG_DESTINATION


class StaleTransaction(TransactionRejected):
    """``|now - ts_ms|`` exceeds 5 minutes: a late replay or a badly skewed clock."""

    code = ErrorCode.UNAUTHORIZED
    reason = RejectReason.STALE_TIMESTAMP


class ForgedOrigin(TransactionRejected):
    """An envelope whose sender's domain is not the authenticated origin."""

    code = ErrorCode.FORBIDDEN
    reason = RejectReason.FORGED_ORIGIN


class MisaddressedEnvelope(TransactionRejected):
    """An envelope with a recipient outside the destination domain."""

    code = ErrorCode.BAD_REQUEST
    reason = RejectReason.MISADDRESSED


class UnsupportedVersion(SecureChatError):
    """Serialised state (or a ``ctx``) of a version this code does not read."""

    code = ErrorCode.BAD_REQUEST


# --- wire types --------------------------------------------------------------------


def address_domain(address: str) -> str:
    """Domain of a user (``local@domain``) or device (``local@domain/ID``) address."""
    if "/" in address:
        return DeviceAddress.parse(address).domain
    return UserAddress.parse(address).domain


@dataclass(frozen=True, slots=True)
class Envelope:
    """One unit of cross-domain traffic; ``payload`` is opaque (ciphertext or signed bytes)."""

    id: bytes
    kind: EnvelopeKind
    cls: EnvelopeClass
    seq: int
    sender: str
    recipients: tuple[str, ...]
    payload: bytes
    ts_ms: int
    expires_ms: int

    def to_wire(self) -> dict[str, Any]:
        return {"id": self.id, "kind": self.kind.value, "class": self.cls.value, "seq": self.seq,
                "sender": self.sender, "recipients": list(self.recipients), "payload": self.payload,
                "ts_ms": self.ts_ms, "expires_ms": self.expires_ms}

    @classmethod
    def from_wire(cls, obj: Any) -> Envelope:
        """Parse an envelope map; raises ``ProtocolError``/``AddressError`` on bad input."""
        obj = require_map(obj, "envelope")
        if set(obj) != _ENVELOPE_FIELDS:
            raise ProtocolError("envelope fields are not exactly the protocol's")
        kind_text = field(obj, "kind", str)
        class_text = field(obj, "class", str)
        if kind_text not in _KINDS or class_text not in _CLASSES:
            raise ProtocolError("unknown envelope kind or class")
        recipients = field(obj, "recipients", list, max_length=MAX_RECIPIENTS)
        if not recipients or not all(isinstance(r, str) for r in recipients):
            raise ProtocolError("recipients must be a non-empty list of addresses")
        sender = field(obj, "sender", str, max_length=200)
        address_domain(sender)
        for recipient in recipients:
            address_domain(recipient)
        ts_ms = non_negative(field(obj, "ts_ms", int), "ts_ms")
        expires_ms = field(obj, "expires_ms", int)
        if expires_ms <= ts_ms:
            raise ProtocolError("envelope expires before it was queued")
        seq = field(obj, "seq", int)
        if seq < 1:
            raise ProtocolError("seq starts at 1")
        return cls(field(obj, "id", bytes, length=ENVELOPE_ID_LEN), EnvelopeKind(kind_text),
                   EnvelopeClass(class_text), seq, sender, tuple(recipients),
                   field(obj, "payload", bytes), ts_ms, expires_ms)


_ENVELOPE_FIELDS = frozenset({"id", "kind", "class", "seq", "sender", "recipients", "payload",
                              "ts_ms", "expires_ms"})
_KINDS = frozenset(k.value for k in EnvelopeKind)
_CLASSES = frozenset(c.value for c in EnvelopeClass)
_BODY_FIELDS = frozenset({"ctx", "origin", "destination", "ts_ms", "txn_id", "envelopes"})
_FRAME_FIELDS = frozenset({"body", "key_id", "sig"})


@dataclass(frozen=True, slots=True)
class Transaction:
    """A verified transaction (only ``verify_transaction`` builds one from the wire)."""

    origin: str
    destination: str
    ts_ms: int
    txn_id: bytes
    envelopes: tuple[Envelope, ...]

    def fields(self) -> dict[str, Any]:
        """The signed fields, without ``ctx`` (the purpose supplies it)."""
        return {"origin": self.origin, "destination": self.destination, "ts_ms": self.ts_ms,
                "txn_id": self.txn_id, "envelopes": [e.to_wire() for e in self.envelopes]}


def sign_transaction(key: Ed25519PrivateKey, key_id: str, *, origin: str, destination: str,
                     ts_ms: int, txn_id: bytes, envelopes: Sequence[Envelope]) -> bytes:
    """The wire frame of one attempt; every attempt is signed afresh (new ts_ms, new txn_id)."""
    txn = Transaction(origin, destination, ts_ms, txn_id, tuple(envelopes))
    body = signing.signing_input(Purpose.S2S_TXN, txn.fields())
    try:
        _parse_body(codec.decode(body, BODY_LIMITS))   # refuse to sign what no receiver accepts
    except (ProtocolError, AddressError, CodecError) as exc:
        raise MalformedTransaction(f"refusing to sign a malformed transaction: {exc.message}") from None
    if not _KEY_ID.fullmatch(key_id):
        raise MalformedTransaction("key id must be 1-64 of A-Z a-z 0-9 : . _ -")
    sig = signing.sign(key, Purpose.S2S_TXN, txn.fields())
    return codec.encode({"body": body, "key_id": key_id, "sig": sig}, FRAME_LIMITS)


def _parse_body(obj: Any) -> Transaction:
    obj = require_map(obj, "transaction")
    if set(obj) != _BODY_FIELDS:
        raise ProtocolError("transaction fields are not exactly the protocol's")
    ctx = field(obj, "ctx", str)
    if ctx != Purpose.S2S_TXN.value:
        if ctx.startswith(_CTX_PREFIX) and ctx.endswith(_CTX_SUFFIX):
            raise UnsupportedVersion("unsupported transaction version")
        raise ProtocolError("not an s2s-txn object")
    raw = field(obj, "envelopes", list, max_length=MAX_ENVELOPES)
    envelopes = tuple(Envelope.from_wire(e) for e in raw)
    return Transaction(parse_domain(field(obj, "origin", str)), parse_domain(field(obj, "destination", str)),
                       non_negative(field(obj, "ts_ms", int), "ts_ms"),
                       field(obj, "txn_id", bytes, length=TXN_ID_LEN), envelopes)


def parse_frame(data: bytes) -> tuple[Transaction, bytes, str, bytes]:
    """Decode ``{body, key_id, sig}`` → (unverified transaction, body, key_id, sig)."""
    try:
        frame = require_map(codec.decode(data, FRAME_LIMITS), "transaction frame")
        if set(frame) != _FRAME_FIELDS:
            raise ProtocolError("frame fields are not exactly body, key_id, sig")
        body = field(frame, "body", bytes)
        key_id = field(frame, "key_id", str, max_length=KEY_ID_MAX_LEN)
        sig = field(frame, "sig", bytes, length=signing.SIGNATURE_LEN)
        txn = _parse_body(codec.decode(body, BODY_LIMITS))
    except UnsupportedVersion:
        raise
    except (ProtocolError, AddressError, CodecError) as exc:
        raise MalformedTransaction(f"malformed transaction: {exc.message}") from None
    if not _KEY_ID.fullmatch(key_id):
        raise MalformedTransaction("malformed transaction: bad key id")
    return txn, body, key_id, sig


def check_envelope_binding(envelope: Envelope, origin: str, destination: str) -> None:
    """THE origin check, for every envelope kind: sender's domain == authenticated origin.

    Also refuses recipients outside the destination domain.  Raises ``ForgedOrigin`` /
    ``MisaddressedEnvelope``; the caller rejects the whole transaction.
    """
    if address_domain(envelope.sender) != origin:
        raise ForgedOrigin(f"{envelope.kind.value} envelope sender is not of the origin domain")
    for recipient in envelope.recipients:
        if address_domain(recipient) != destination:
            raise MisaddressedEnvelope(f"{envelope.kind.value} envelope names a recipient of another domain")


def verify_transaction(data: bytes, *, expected_destination: str, now_ms: int,
                       key_lookup: KeyLookup) -> Transaction:
    """Verify one inbound transaction frame completely, or raise a ``TransactionRejected``."""
    txn, _body, key_id, sig = parse_frame(data)
    try:
        public_key, valid_from_ms, valid_until_ms = key_lookup(txn.origin, key_id)
    except UnknownServerKey:
        raise
    except LookupError:
        raise UnknownServerKey("the origin has no server key with this key id") from None
    try:
        signing.verify(public_key, Purpose.S2S_TXN, txn.fields(), sig)
    except InvalidSignature:
        raise BadTransactionSignature("transaction signature does not verify") from None
    if not (valid_from_ms <= txn.ts_ms < valid_until_ms and valid_from_ms <= now_ms < valid_until_ms):
        raise ExpiredServerKey("server key is not valid at both the transaction time and now")
    if txn.destination != expected_destination:
        raise WrongDestination("transaction is addressed to another server")
    if abs(now_ms - txn.ts_ms) > MAX_CLOCK_SKEW_MS:
        raise StaleTransaction("transaction timestamp is more than 5 minutes from now")
    for envelope in txn.envelopes:
        check_envelope_binding(envelope, txn.origin, txn.destination)
    return txn


def new_id(rng: Callable[[int], bytes]) -> bytes:
    """A fresh 16-byte envelope or transaction id."""
    value = rng(ENVELOPE_ID_LEN)
    if len(value) != ENVELOPE_ID_LEN:
        raise ValueError("rng returned the wrong number of bytes")
    return value
