"""The signed frame every s2s message travels in, and what transactions and requests share.

Transactions (``federation.s2s``) and s2s-requests/responses (``federation.s2s_requests``)
all travel as the canonical msgpack frame ``{body, key_id, sig}``.  This module holds
what they share: the size bounds, the rejection errors (one per stable ``reason``), and
the steps ``parse_signed`` → ``authenticate`` (verifying) and ``seal_frame`` (signing),
so that every kind of frame is checked in the same order and fails with the same errors.
``federation.s2s`` re-exports the public names; import them from there or from here.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from enum import StrEnum
from typing import Any, TypeVar

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from federation import codec, signing
from federation.errors import AddressError, CodecError, ErrorCode, InvalidSignature, ProtocolError, SecureChatError
from federation.signing import Purpose
from federation.validate import field, require_map

MAX_CLOCK_SKEW_MS = 5 * 60 * 1000       # |now - ts| allowed for a transaction
MAX_RECIPIENTS = 10_000                # per envelope (and the widest container of any body)
MAX_TRANSACTION_BYTES = 1 << 20        # the signed body
KEY_ID_MAX_LEN = 64
_KEY_ID = re.compile(r"[A-Za-z0-9:._\-]{1,64}")
_CTX_PREFIX = "securechat/"
_FRAME_FIELDS = frozenset({"body", "key_id", "sig"})

FRAME_LIMITS = codec.Limits(max_bytes=MAX_TRANSACTION_BYTES + 256, max_depth=2, max_items=8,
                            max_container=8)

# (public_key, valid_from_ms, valid_until_ms) of the origin's key ``key_id``; raises
# ``UnknownServerKey`` (or any ``LookupError``) if there is none.  Other exceptions (a
# transient discovery failure) propagate unchanged: they are not a verdict on the peer.
KeyLookup = Callable[[str, str], tuple[bytes, int, int]]


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


class UnsupportedVersion(SecureChatError):
    """Serialised state (or a ``ctx``) of a version this code does not read."""

    code = ErrorCode.BAD_REQUEST


# --- the shared steps ----------------------------------------------------------------


def check_ctx(obj: dict[str, Any], purpose: Purpose, suffix: str, noun: str) -> None:
    """``ctx`` must be ``purpose``; another version of the same kind is ``UnsupportedVersion``."""
    ctx = field(obj, "ctx", str)
    if ctx != purpose.value:
        if ctx.startswith(_CTX_PREFIX) and ctx.endswith(suffix):
            raise UnsupportedVersion(f"unsupported {noun} version")
        raise ProtocolError(f"not an {suffix[1:]} object")


def seal_frame(key: Ed25519PrivateKey, key_id: str, body: bytes) -> bytes:
    """Sign ``body`` (from ``signing.signing_input``, already checked) into ``{body, key_id, sig}``."""
    if not _KEY_ID.fullmatch(key_id):
        raise MalformedTransaction("key id must be 1-64 of A-Z a-z 0-9 : . _ -")
    sig = signing.sign_input(key, body)
    return codec.encode({"body": body, "key_id": key_id, "sig": sig}, FRAME_LIMITS)


_T = TypeVar("_T")


def parse_signed(data: bytes, noun: str, body_limits: codec.Limits,
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


def authenticate(noun: str, purpose: Purpose, *, origin: str, destination: str, ts_ms: int,
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
