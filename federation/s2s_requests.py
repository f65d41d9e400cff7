"""s2s-request (DESIGN §5, normative): synchronous signed key traffic and its signed answers.

Device lists and prekey claims need an answer now, so they are not queued envelopes but
a request in the same frame ``{body, key_id, sig}`` as a transaction, signed under
``Purpose.S2S_REQUEST``.  A request body is ``{ctx: securechat/v1/s2s-request, origin,
destination, ts_ms, request_id, op, args}`` with ``op`` in ``REQUEST_OPS``; the responder
answers with a frame of the same shape whose body is ``{ctx, origin: responder,
destination: requester, ts_ms, request_id (echoed), op: "response", result: map}`` or
``... error: {code, message}`` instead of ``result``.  Requests and responses share the
purpose but never verify as each other: ``verify_request`` refuses ``op: "response"`` and
``verify_response`` refuses any other op.  Both apply the transaction checks through the
shared steps of ``federation.s2s_frame`` and raise the same error classes (so the same
``reason`` codes); a response from another server than the one asked, or answering
another request id, raises ``MismatchedResponse`` (a ``WrongDestination``).  Replays of a
request are NOT detected here: the responder remembers request ids (10 minutes > the
5-minute skew window).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from federation import codec, signing
from federation.addresses import parse_domain
from federation.errors import AddressError, CodecError, ErrorCode, ProtocolError, RequestRejected, SecureChatError
from federation.s2s_frame import (
    MAX_RECIPIENTS, MAX_TRANSACTION_BYTES, KeyLookup, MalformedTransaction, WrongDestination, authenticate,
    check_ctx, parse_signed, seal_frame,
)
from federation.signing import Purpose
from federation.validate import field, non_negative, require_map

REQUEST_ID_LEN = 16
MAX_OP_LEN = 64
MAX_ERROR_MESSAGE_LEN = 1024           # of a signed error answer (kept for our logs only)
RESPONSE_OP = "response"
REQUEST_OPS = frozenset({"get_device_list", "get_device_lists", "claim"})
_REQUEST_CTX_SUFFIX = "/s2s-request"

# Request/response bodies nest deeper (a claim answer: result → bundles → device → bundle → prekey).
REQUEST_BODY_LIMITS = codec.Limits(max_bytes=MAX_TRANSACTION_BYTES, max_depth=10, max_items=1 << 18,
                                   max_container=MAX_RECIPIENTS)


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
_Exchange = TypeVar("_Exchange", S2SRequest, _S2SResponse)


def _exchange_header(obj: Any, noun: str) -> tuple[dict[str, Any], str, str, int, bytes, str]:
    obj = require_map(obj, noun)
    check_ctx(obj, Purpose.S2S_REQUEST, _REQUEST_CTX_SUFFIX, noun)
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
    return seal_frame(key, key_id, body)


def sign_request(key: Ed25519PrivateKey, key_id: str, *, origin: str, destination: str, ts_ms: int,
                 request_id: bytes, op: str, args: Mapping[str, Any]) -> bytes:
    """The wire frame of one s2s-request (``request_id``: 16 fresh random bytes per request)."""
    request = S2SRequest(origin, destination, ts_ms, request_id, op, dict(args))
    return _sign_exchange(key, key_id, "request", request.fields(), _parse_request_body)


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

    origin, _body, key_id, _sig = parse_signed(data, "frame", REQUEST_BODY_LIMITS, origin_of)
    return origin, key_id


def _verify_exchange(data: bytes, noun: str, parse_body: Callable[[Any], _Exchange], *,
                     expected_origin: str | None, expected_destination: str, now_ms: int,
                     key_lookup: KeyLookup) -> _Exchange:
    """Parse, then authenticate; ``expected_origin`` (responses) is checked before any key lookup."""
    exchange, _body, key_id, sig = parse_signed(data, noun, REQUEST_BODY_LIMITS, parse_body)
    if expected_origin is not None and exchange.origin != expected_origin:
        raise MismatchedResponse("response comes from another server than the one asked")
    authenticate(noun, Purpose.S2S_REQUEST, origin=exchange.origin, destination=exchange.destination,
                 ts_ms=exchange.ts_ms, fields=exchange.fields(), key_id=key_id, sig=sig,
                 expected_destination=expected_destination, now_ms=now_ms, key_lookup=key_lookup)
    return exchange


def verify_request(data: bytes, *, expected_destination: str, now_ms: int,
                   key_lookup: KeyLookup) -> S2SRequest:
    """Verify one inbound s2s-request frame (not its replay: the caller remembers request ids)."""
    return _verify_exchange(data, "request", _parse_request_body, expected_origin=None,
                            expected_destination=expected_destination, now_ms=now_ms, key_lookup=key_lookup)


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
    response = _verify_exchange(data, "response", _parse_response_body, expected_origin=expected_origin,
                                expected_destination=expected_destination, now_ms=now_ms, key_lookup=key_lookup)
    if response.request_id != request_id:
        raise MismatchedResponse("response answers another request")
    if response.error is not None:
        raise RemoteRequestFailed(response.origin, *response.error)
    return response.result or {}
