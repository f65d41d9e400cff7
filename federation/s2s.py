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

**s2s-request** (synchronous key traffic: device lists, prekey claims) uses the same
frame ``{body, key_id, sig}`` under ``Purpose.S2S_REQUEST``.  A request body is
``{ctx: securechat/v1/s2s-request, origin, destination, ts_ms, request_id, op, args}``
with ``op`` in ``REQUEST_OPS``; the responder answers with a frame of the same shape
whose body is ``{ctx, origin: responder, destination: requester, ts_ms, request_id
(echoed), op: "response", result: map}`` or ``... error: {code, message}`` instead of
``result``.  Requests and responses share the purpose but never verify as each other:
``verify_request`` refuses ``op: "response"`` and ``verify_response`` refuses any other
op.  Both verifiers apply the transaction checks through the same private helpers and
raise the same error classes (so the same ``reason`` codes); a response from another
server than the one asked, or answering another request id, raises
``MismatchedResponse`` (a ``WrongDestination``).  Replays of a request are NOT detected
here: the responder remembers request ids (10 minutes > the 5-minute skew window).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, TypeVar

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from federation import codec, signing
from federation.addresses import DeviceAddress, UserAddress, parse_domain
from federation.errors import (
    AddressError, CodecError, ErrorCode, InvalidSignature, ProtocolError, RequestRejected, SecureChatError,
)
from federation.signing import Purpose
from federation.validate import field, non_negative, require_map

MAX_CLOCK_SKEW_MS = 5 * 60 * 1000       # |now - ts| allowed for a transaction
MAX_ENVELOPES = 1000                   # per transaction
MAX_RECIPIENTS = 10_000                # per envelope
MAX_TRANSACTION_BYTES = 1 << 20        # the signed body
ENVELOPE_ID_LEN = 16
TXN_ID_LEN = 16
REQUEST_ID_LEN = 16
KEY_ID_MAX_LEN = 64
MAX_OP_LEN = 64
MAX_ERROR_MESSAGE_LEN = 1024           # of a signed error answer (kept for our logs only)
RESPONSE_OP = "response"
REQUEST_OPS = frozenset({"get_device_list", "get_device_lists", "claim"})
_KEY_ID = re.compile(r"[A-Za-z0-9:._\-]{1,64}")
_CTX_PREFIX, _CTX_SUFFIX = "securechat/", "/s2s-txn"
_REQUEST_CTX_SUFFIX = "/s2s-request"

BODY_LIMITS = codec.Limits(max_bytes=MAX_TRANSACTION_BYTES, max_depth=8, max_items=1 << 18,
                           max_container=MAX_RECIPIENTS)
FRAME_LIMITS = codec.Limits(max_bytes=MAX_TRANSACTION_BYTES + 256, max_depth=2, max_items=8,
                            max_container=8)
# Request/response bodies nest deeper (a claim answer: result → bundles → device → bundle → prekey).
REQUEST_BODY_LIMITS = codec.Limits(max_bytes=MAX_TRANSACTION_BYTES, max_depth=10, max_items=1 << 18,
                                   max_container=MAX_RECIPIENTS)

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
    # Key traffic (device lists on demand, prekey claims) is not an envelope kind: it needs
    # an answer now, so it is the synchronous signed s2s-request below.


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
    REPLAYED = "replayed"


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


class ReplayedTransaction(TransactionRejected):
    """A transaction id already received: every attempt is signed afresh with a new id, so
    the same id twice is a replay, never a retry (its envelopes are not stored again)."""

    code = ErrorCode.CONFLICT
    reason = RejectReason.REPLAYED


class ForgedOrigin(TransactionRejected):
    """An envelope whose sender's domain is not the authenticated origin."""

    code = ErrorCode.FORBIDDEN
    reason = RejectReason.FORGED_ORIGIN


class MisaddressedEnvelope(TransactionRejected):
    """An envelope with a recipient outside the destination domain."""

    code = ErrorCode.BAD_REQUEST
    reason = RejectReason.MISADDRESSED


class MismatchedResponse(WrongDestination):
    """A signed s2s-request answer from another server than the one asked, or for another request.

    A ``WrongDestination`` (reason ``wrong_destination``): the answer belongs to another exchange.
    """


class RemoteRequestFailed(RequestRejected):
    """The responder answered an s2s-request with a signed error.

    The message is ours (``"example.net refused the request: not_found"``), never the
    remote's text, so it may reach a local client; ``details["remote_code"]`` keeps the
    remote's code when it is one of ours.  ``remote_message`` is for our logs only.
    """

    code = ErrorCode.REMOTE_ERROR

    def __init__(self, remote: str, remote_code: str, remote_message: str = "") -> None:
        known = remote_code in _ERROR_CODES
        super().__init__(f"{remote} refused the request: {remote_code if known else 'unknown error'}",
                         details={"remote_code": remote_code} if known else None)
        self.remote = remote
        self.remote_code = ErrorCode(remote_code) if known else None
        self.remote_message = remote_message


_ERROR_CODES = frozenset(c.value for c in ErrorCode)


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
    if not _KEY_ID.fullmatch(key_id):
        raise MalformedTransaction("key id must be 1-64 of A-Z a-z 0-9 : . _ -")
    sig = signing.sign_input(key, body)
    return codec.encode({"body": body, "key_id": key_id, "sig": sig}, FRAME_LIMITS)


def _check_ctx(obj: dict[str, Any], purpose: Purpose, suffix: str, noun: str) -> None:
    ctx = field(obj, "ctx", str)
    if ctx != purpose.value:
        if ctx.startswith(_CTX_PREFIX) and ctx.endswith(suffix):
            raise UnsupportedVersion(f"unsupported {noun} version")
        raise ProtocolError(f"not an {suffix[1:]} object")


def _parse_body(obj: Any) -> Transaction:
    obj = require_map(obj, "transaction")
    if set(obj) != _BODY_FIELDS:
        raise ProtocolError("transaction fields are not exactly the protocol's")
    _check_ctx(obj, Purpose.S2S_TXN, _CTX_SUFFIX, "transaction")
    raw = field(obj, "envelopes", list, max_length=MAX_ENVELOPES)
    envelopes = tuple(Envelope.from_wire(e) for e in raw)
    return Transaction(parse_domain(field(obj, "origin", str)), parse_domain(field(obj, "destination", str)),
                       non_negative(field(obj, "ts_ms", int), "ts_ms"),
                       field(obj, "txn_id", bytes, length=TXN_ID_LEN), envelopes)


_T = TypeVar("_T")


def _parse_signed(data: bytes, noun: str, body_limits: codec.Limits,
                  parse_body: Callable[[Any], _T]) -> tuple[_T, bytes, str, bytes]:
    """The shared frame parser: ``{body, key_id, sig}`` → (unverified parsed body, body, key_id, sig).

    Everything malformed becomes ``MalformedTransaction``; ``UnsupportedVersion`` passes through.
    """
    try:
        frame = require_map(codec.decode(data, FRAME_LIMITS), f"{noun} frame")
        if set(frame) != _FRAME_FIELDS:
            raise ProtocolError("frame fields are not exactly body, key_id, sig")
        body = field(frame, "body", bytes)
        key_id = field(frame, "key_id", str, max_length=KEY_ID_MAX_LEN)
        sig = field(frame, "sig", bytes, length=signing.SIGNATURE_LEN)
        parsed = parse_body(codec.decode(body, body_limits))
    except UnsupportedVersion:
        raise
    except (ProtocolError, AddressError, CodecError) as exc:
        raise MalformedTransaction(f"malformed {noun}: {exc.message}") from None
    if not _KEY_ID.fullmatch(key_id):
        raise MalformedTransaction(f"malformed {noun}: bad key id")
    return parsed, body, key_id, sig


def parse_frame(data: bytes) -> tuple[Transaction, bytes, str, bytes]:
    """Decode ``{body, key_id, sig}`` → (unverified transaction, body, key_id, sig)."""
    return _parse_signed(data, "transaction", BODY_LIMITS, _parse_body)


def _authenticate(noun: str, purpose: Purpose, *, origin: str, destination: str, ts_ms: int,
                  fields: Mapping[str, Any], key_id: str, sig: bytes, expected_destination: str,
                  now_ms: int, key_lookup: KeyLookup) -> None:
    """The shared checks after parsing, in the documented order: key, signature, key window,
    destination, clock skew.  The signature comes before destination and time so that those
    errors describe what the origin really signed."""
    try:
        public_key, valid_from_ms, valid_until_ms = key_lookup(origin, key_id)
    except UnknownServerKey:
        raise
    except LookupError:
        raise UnknownServerKey("the origin has no server key with this key id") from None
    try:
        signing.verify(public_key, purpose, fields, sig)
    except InvalidSignature:
        raise BadTransactionSignature(f"{noun} signature does not verify") from None
    if not (valid_from_ms <= ts_ms < valid_until_ms and valid_from_ms <= now_ms < valid_until_ms):
        raise ExpiredServerKey(f"server key is not valid at both the {noun} time and now")
    if destination != expected_destination:
        raise WrongDestination(f"{noun} is addressed to another server")
    if abs(now_ms - ts_ms) > MAX_CLOCK_SKEW_MS:
        raise StaleTransaction(f"{noun} timestamp is more than 5 minutes from now")


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
    _authenticate("transaction", Purpose.S2S_TXN, origin=txn.origin, destination=txn.destination,
                  ts_ms=txn.ts_ms, fields=txn.fields(), key_id=key_id, sig=sig,
                  expected_destination=expected_destination, now_ms=now_ms, key_lookup=key_lookup)
    for envelope in txn.envelopes:
        check_envelope_binding(envelope, txn.origin, txn.destination)
    return txn


# --- s2s-request: synchronous signed requests and their signed answers -------------------


@dataclass(frozen=True, slots=True)
class S2SRequest:
    """A verified request (only ``verify_request`` builds one from the wire)."""

    origin: str
    destination: str
    ts_ms: int
    request_id: bytes
    op: str
    args: dict[str, Any]

    def fields(self) -> dict[str, Any]:
        """The signed fields, without ``ctx``."""
        return {"origin": self.origin, "destination": self.destination, "ts_ms": self.ts_ms,
                "request_id": self.request_id, "op": self.op, "args": self.args}


@dataclass(frozen=True, slots=True)
class _S2SResponse:
    origin: str
    destination: str
    ts_ms: int
    request_id: bytes
    result: dict[str, Any] | None
    error: tuple[str, str] | None          # (code, message) as the responder signed them

    def fields(self) -> dict[str, Any]:
        out: dict[str, Any] = {"origin": self.origin, "destination": self.destination, "ts_ms": self.ts_ms,
                               "request_id": self.request_id, "op": RESPONSE_OP}
        if self.error is not None:
            out["error"] = {"code": self.error[0], "message": self.error[1]}
        else:
            out["result"] = self.result
        return out


_EXCHANGE_FIELDS = frozenset({"ctx", "origin", "destination", "ts_ms", "request_id", "op"})
_REQUEST_FIELDS = _EXCHANGE_FIELDS | {"args"}
_RESULT_FIELDS = _EXCHANGE_FIELDS | {"result"}
_ERROR_FIELDS = _EXCHANGE_FIELDS | {"error"}


def _exchange_header(obj: Any, noun: str) -> tuple[dict[str, Any], str, str, int, bytes, str]:
    obj = require_map(obj, noun)
    _check_ctx(obj, Purpose.S2S_REQUEST, _REQUEST_CTX_SUFFIX, noun)
    return (obj, parse_domain(field(obj, "origin", str)), parse_domain(field(obj, "destination", str)),
            non_negative(field(obj, "ts_ms", int), "ts_ms"),
            field(obj, "request_id", bytes, length=REQUEST_ID_LEN), field(obj, "op", str, max_length=MAX_OP_LEN))


def _parse_request_body(obj: Any) -> S2SRequest:
    obj, origin, destination, ts_ms, request_id, op = _exchange_header(obj, "request")
    if set(obj) != _REQUEST_FIELDS:
        raise ProtocolError("request fields are not exactly the protocol's")
    if op not in REQUEST_OPS:
        raise ProtocolError("unknown s2s-request op")
    return S2SRequest(origin, destination, ts_ms, request_id, op, require_map(obj["args"], "args"))


def _parse_response_body(obj: Any) -> _S2SResponse:
    obj, origin, destination, ts_ms, request_id, op = _exchange_header(obj, "response")
    if op != RESPONSE_OP:
        raise ProtocolError("not a response")
    if set(obj) == _RESULT_FIELDS:
        return _S2SResponse(origin, destination, ts_ms, request_id, require_map(obj["result"], "result"), None)
    if set(obj) != _ERROR_FIELDS:
        raise ProtocolError("response fields are not exactly the protocol's")
    error = require_map(obj["error"], "error")
    if set(error) != {"code", "message"}:
        raise ProtocolError("error fields are not exactly code, message")
    return _S2SResponse(origin, destination, ts_ms, request_id, None,
                        (field(error, "code", str, max_length=MAX_OP_LEN),
                         field(error, "message", str, max_length=MAX_ERROR_MESSAGE_LEN)))


def _sign_exchange(key: Ed25519PrivateKey, key_id: str, noun: str, fields: dict[str, Any],
                   parse_body: Callable[[Any], Any]) -> bytes:
    try:
        body = signing.signing_input(Purpose.S2S_REQUEST, fields)
        parse_body(codec.decode(body, REQUEST_BODY_LIMITS))   # refuse to sign what no receiver accepts
    except (ProtocolError, AddressError, CodecError) as exc:
        raise MalformedTransaction(f"refusing to sign a malformed {noun}: {exc.message}") from None
    if not _KEY_ID.fullmatch(key_id):
        raise MalformedTransaction("key id must be 1-64 of A-Z a-z 0-9 : . _ -")
    sig = signing.sign(key, Purpose.S2S_REQUEST, fields)
    return codec.encode({"body": body, "key_id": key_id, "sig": sig}, FRAME_LIMITS)


def sign_request(key: Ed25519PrivateKey, key_id: str, *, origin: str, destination: str, ts_ms: int,
                 request_id: bytes, op: str, args: Mapping[str, Any]) -> bytes:
    """The wire frame of one s2s-request (``request_id``: 16 fresh random bytes per request)."""
    fields = {"origin": origin, "destination": destination, "ts_ms": ts_ms, "request_id": request_id,
              "op": op, "args": dict(args)}
    return _sign_exchange(key, key_id, "request", fields, _parse_request_body)


def sign_response(key: Ed25519PrivateKey, key_id: str, *, origin: str, destination: str, ts_ms: int,
                  request_id: bytes, result: Mapping[str, Any] | None = None,
                  error: SecureChatError | Mapping[str, str] | None = None) -> bytes:
    """The signed answer to ``request_id``: exactly one of ``result`` (a map) or ``error``.

    ``origin`` is the responder, ``destination`` the requester.  An ``error`` is a
    ``SecureChatError`` (its code and our message are signed, not its details) or a
    ``{code, message}`` map.
    """
    if (result is None) == (error is None):
        raise ValueError("give exactly one of result or error")
    fields: dict[str, Any] = {"origin": origin, "destination": destination, "ts_ms": ts_ms,
                              "request_id": request_id, "op": RESPONSE_OP}
    if isinstance(error, SecureChatError):
        fields["error"] = {"code": error.code.value, "message": error.message[:MAX_ERROR_MESSAGE_LEN]}
    elif error is not None:
        fields["error"] = dict(error)
    else:
        fields["result"] = dict(result or {})
    return _sign_exchange(key, key_id, "response", fields, _parse_response_body)


def claimed_signer(data: bytes) -> tuple[str, str]:
    """(origin, key_id) that a transaction, request or response frame claims, UNVERIFIED.

    For the async layer, which resolves the key through discovery before calling a
    synchronous ``verify_*``.  Raises ``MalformedTransaction``.
    """
    def origin_of(obj: Any) -> str:
        return parse_domain(field(require_map(obj, "body"), "origin", str))

    origin, _body, key_id, _sig = _parse_signed(data, "frame", REQUEST_BODY_LIMITS, origin_of)
    return origin, key_id


def verify_request(data: bytes, *, expected_destination: str, now_ms: int,
                   key_lookup: KeyLookup) -> S2SRequest:
    """Verify one inbound s2s-request frame (not its replay: the caller remembers request ids)."""
    request, _body, key_id, sig = _parse_signed(data, "request", REQUEST_BODY_LIMITS, _parse_request_body)
    _authenticate("request", Purpose.S2S_REQUEST, origin=request.origin, destination=request.destination,
                  ts_ms=request.ts_ms, fields=request.fields(), key_id=key_id, sig=sig,
                  expected_destination=expected_destination, now_ms=now_ms, key_lookup=key_lookup)
    return request


def verify_response(data: bytes, *, expected_origin: str, expected_destination: str, request_id: bytes,
                    now_ms: int, key_lookup: KeyLookup) -> dict[str, Any]:
    """Verify the answer to our request ``request_id`` sent to ``expected_origin``; return its result.

    Order: malformed → answered by another server (``MismatchedResponse``, before any key
    lookup: we only ever look up the key of the server we asked) → unknown key → bad
    signature → expired key → wrong destination → stale → another request id
    (``MismatchedResponse``) → a signed error (``RemoteRequestFailed``).  The verification
    errors blame the remote; a caller serving a local client reports them as
    ``remote_error``, as it does ``RemoteRequestFailed``.
    """
    response, _body, key_id, sig = _parse_signed(data, "response", REQUEST_BODY_LIMITS, _parse_response_body)
    if response.origin != expected_origin:
        raise MismatchedResponse("response comes from another server than the one asked")
    _authenticate("response", Purpose.S2S_REQUEST, origin=response.origin, destination=response.destination,
                  ts_ms=response.ts_ms, fields=response.fields(), key_id=key_id, sig=sig,
                  expected_destination=expected_destination, now_ms=now_ms, key_lookup=key_lookup)
    if response.request_id != request_id:
        raise MismatchedResponse("response answers another request")
    if response.error is not None:
        raise RemoteRequestFailed(response.origin, *response.error)
    return response.result or {}


def new_id(rng: Callable[[int], bytes]) -> bytes:
    """A fresh 16-byte envelope or transaction id."""
    value = rng(ENVELOPE_ID_LEN)
    if len(value) != ENVELOPE_ID_LEN:
        raise ValueError("rng returned the wrong number of bytes")
    return value
