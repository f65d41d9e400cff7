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

The frame, its bounds and the rejection errors, shared with requests, are in
``federation.s2s_frame``; the synchronous **s2s-request** and its signed response are in
``federation.s2s_requests``.  This module re-exports their public names, so
``federation.s2s`` stays the one import point of the s2s protocol.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from federation import codec, signing
from federation.addresses import DeviceAddress, UserAddress, parse_domain
from federation.errors import AddressError, CodecError, ProtocolError
# ``X as X``: re-exported public names (see the module docstring).
from federation.s2s_frame import (
    FRAME_LIMITS as FRAME_LIMITS, KEY_ID_MAX_LEN as KEY_ID_MAX_LEN, MAX_CLOCK_SKEW_MS as MAX_CLOCK_SKEW_MS,
    MAX_RECIPIENTS as MAX_RECIPIENTS, MAX_TRANSACTION_BYTES as MAX_TRANSACTION_BYTES,
    BadTransactionSignature as BadTransactionSignature, ExpiredServerKey as ExpiredServerKey,
    ForgedOrigin as ForgedOrigin, KeyLookup as KeyLookup, MalformedTransaction as MalformedTransaction,
    MisaddressedEnvelope as MisaddressedEnvelope, RejectReason as RejectReason,
    ReplayedTransaction as ReplayedTransaction, StaleTransaction as StaleTransaction,
    TransactionRejected as TransactionRejected, UnknownServerKey as UnknownServerKey,
    UnsupportedVersion as UnsupportedVersion, WrongDestination as WrongDestination,
    authenticate, check_ctx, parse_signed, seal_frame,
)
from federation.s2s_requests import (
    MAX_ERROR_MESSAGE_LEN as MAX_ERROR_MESSAGE_LEN, MAX_OP_LEN as MAX_OP_LEN,
    REQUEST_BODY_LIMITS as REQUEST_BODY_LIMITS, REQUEST_ID_LEN as REQUEST_ID_LEN,
    REQUEST_OPS as REQUEST_OPS, RESPONSE_OP as RESPONSE_OP, MismatchedResponse as MismatchedResponse,
    RemoteRequestFailed as RemoteRequestFailed, S2SRequest as S2SRequest, claimed_signer as claimed_signer,
    sign_request as sign_request, sign_response as sign_response, verify_request as verify_request,
    verify_response as verify_response,
)
from federation.signing import Purpose
from federation.validate import field, non_negative, require_map

MAX_ENVELOPES = 1000                   # per transaction
ENVELOPE_ID_LEN = 16
TXN_ID_LEN = 16
_CTX_SUFFIX = "/s2s-txn"

BODY_LIMITS = codec.Limits(max_bytes=MAX_TRANSACTION_BYTES, max_depth=8, max_items=1 << 18,
                           max_container=MAX_RECIPIENTS)


class EnvelopeKind(StrEnum):
    """Every kind of envelope that crosses domains."""

    MESSAGE = "message"                      # a `send` for remote devices (ciphertexts)
    DEVICE_LIST = "device_list"              # a user's new signed device list
    DEVICE_LIST_DIGESTS = "device_list_digests"  # periodic per-user version/digest comparison
    DELIVERY_REPORT = "delivery_report"      # signed coverage mismatch back to the sender
    # Key traffic (device lists on demand, prekey claims) is not an envelope kind: it needs
    # an answer now, so it is the synchronous signed s2s-request (``federation.s2s_requests``).


class EnvelopeClass(StrEnum):
    """Ordering classes: seqs are consecutive per (origin, destination, class)."""

    CONTROL = "control"
    MESSAGE = "message"


DEFAULT_CLASS: dict[EnvelopeKind, EnvelopeClass] = {
    kind: EnvelopeClass.MESSAGE if kind is EnvelopeKind.MESSAGE else EnvelopeClass.CONTROL
    for kind in EnvelopeKind
}


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
                     ts_ms: int, txn_id: bytes, envelopes: Sequence[Envelope],
                     envelopes_checked: bool = False) -> bytes:
    """The wire frame of one attempt; every attempt is signed afresh (new ts_ms, new txn_id).

    ``envelopes_checked``: the caller validated every envelope when it was queued (the
    homeserver's storage does), so only the frame-level bounds are checked again here.
    """
    txn = Transaction(origin, destination, ts_ms, txn_id, tuple(envelopes))
    body = signing.signing_input(Purpose.S2S_TXN, txn.fields())
    if not envelopes_checked:
        try:
            _parse_body(codec.decode(body, BODY_LIMITS))   # refuse to sign what no receiver accepts
        except (ProtocolError, AddressError, CodecError) as exc:
            raise MalformedTransaction(f"refusing to sign a malformed transaction: {exc.message}") from None
    elif len(body) > MAX_TRANSACTION_BYTES or not 0 < len(envelopes) <= MAX_ENVELOPES:
        raise MalformedTransaction("refusing to sign a transaction over the size bounds")
    return seal_frame(key, key_id, body)


def _parse_body(obj: Any) -> Transaction:
    obj = require_map(obj, "transaction")
    if set(obj) != _BODY_FIELDS:
        raise ProtocolError("transaction fields are not exactly the protocol's")
    check_ctx(obj, Purpose.S2S_TXN, _CTX_SUFFIX, "transaction")
    raw = field(obj, "envelopes", list, max_length=MAX_ENVELOPES)
    envelopes = tuple(Envelope.from_wire(e) for e in raw)
    return Transaction(parse_domain(field(obj, "origin", str)), parse_domain(field(obj, "destination", str)),
                       non_negative(field(obj, "ts_ms", int), "ts_ms"),
                       field(obj, "txn_id", bytes, length=TXN_ID_LEN), envelopes)


def parse_frame(data: bytes) -> tuple[Transaction, bytes, str, bytes]:
    """Decode ``{body, key_id, sig}`` → (unverified transaction, body, key_id, sig)."""
    return parse_signed(data, "transaction", BODY_LIMITS, _parse_body)


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
    authenticate("transaction", Purpose.S2S_TXN, origin=txn.origin, destination=txn.destination,
                 ts_ms=txn.ts_ms, fields=txn.fields(), key_id=key_id, sig=sig,
                 expected_destination=expected_destination, now_ms=now_ms, key_lookup=key_lookup)
    for envelope in txn.envelopes:
        check_envelope_binding(envelope, txn.origin, txn.destination)
    return txn


def new_id(rng: Callable[[int], bytes]) -> bytes:
    """A fresh 16-byte envelope or transaction id."""
    value = rng(ENVELOPE_ID_LEN)
    if len(value) != ENVELOPE_ID_LEN:
        raise ValueError("rng returned the wrong number of bytes")
    return value
