"""Client-server frames (DESIGN §5): requests, responses and pushes as frozen dataclasses.

Wire shapes (canonical msgpack maps):

* request   ``{id: uint, op: str, ...params}``
* response  ``{id, ok: {...}}`` or ``{id, error: {code, message[, details]}}`` — exactly one per request
* push      ``{push: kind, ...fields}`` — server-initiated

Op-specific parameters are validated by the handler of each op with
``federation.validate``; this module only fixes the envelope of every frame.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from federation import codec
from federation.errors import ErrorCode, ProtocolError, SecureChatError
from federation.validate import field as get_field
from federation.validate import require_map

MAX_REQUEST_ID = 2**53


class Op(StrEnum):
    """Every client-server operation; anything else is ``unknown_op``."""

    REGISTER = "register"            # create account + first (master) device
    LOGIN = "login"                  # password login: creates a pending device
    CHALLENGE = "challenge"          # get a single-use auth nonce
    AUTH = "auth"                    # signed c2s-auth: binds the connection to a device
    PING = "ping"
    UPLOAD_KEYS = "upload_keys"      # signed prekey, ML-KEM prekeys, one-time prekeys
    PUT_DEVICE_LIST = "put_device_list"
    GET_DEVICE_LIST = "get_device_list"
    CLAIM = "claim"                  # prekey bundles for a user's devices
    KEY_COUNT = "key_count"
    SEND = "send"
    ACK = "ack"
    DEVICES = "devices"              # this user's devices and their states
    REVOKE_DEVICE = "revoke_device"


class PushKind(StrEnum):
    ENVELOPE = "envelope"
    DEVICE_LIST_CHANGED = "device_list_changed"
    PREKEYS_LOW = "prekeys_low"
    DEVICE_REVOKED = "device_revoked"
    BACKLOG_DONE = "backlog_done"          # the mailbox backlog present at connect time was pushed
    DELIVERY_REPORT = "delivery_report"    # a remote server's signed coverage report on our send


@dataclass(frozen=True, slots=True)
class Request:
    id: int
    op: str
    params: dict[str, Any] = field(default_factory=dict)

    def to_wire(self) -> dict[str, Any]:
        return {**self.params, "id": self.id, "op": self.op}


@dataclass(frozen=True, slots=True)
class ErrorInfo:
    code: str
    message: str
    details: Any = None

    def to_wire(self) -> dict[str, Any]:
        out: dict[str, Any] = {"code": self.code, "message": self.message}
        if self.details is not None:
            out["details"] = self.details
        return out


@dataclass(frozen=True, slots=True)
class Response:
    id: int
    ok: dict[str, Any] | None = None
    error: ErrorInfo | None = None

    def to_wire(self) -> dict[str, Any]:
        if self.error is not None:
            return {"id": self.id, "error": self.error.to_wire()}
        return {"id": self.id, "ok": self.ok if self.ok is not None else {}}

    @classmethod
    def failure(cls, request_id: int, exc: SecureChatError) -> Response:
        return cls(request_id, error=ErrorInfo(exc.code.value, exc.message, exc.details))


@dataclass(frozen=True, slots=True)
class Push:
    kind: str
    fields: dict[str, Any] = field(default_factory=dict)

    def to_wire(self) -> dict[str, Any]:
        return {**self.fields, "push": self.kind}


Frame = Request | Response | Push


def encode_frame(frame: Frame, limits: codec.Limits = codec.DEFAULT_LIMITS) -> bytes:
    return codec.encode(frame.to_wire(), limits)


def parse_request(obj: Any) -> Request:
    """A decoded map as a request; the op name is checked by the dispatcher."""
    obj = require_map(obj, "request")
    request_id = get_field(obj, "id", int)
    if not 0 <= request_id < MAX_REQUEST_ID:
        raise ProtocolError("request id out of range")
    op = get_field(obj, "op", str, max_length=64)
    return Request(request_id, op, {k: v for k, v in obj.items() if k not in ("id", "op")})


def parse_server_frame(obj: Any) -> Response | Push:
    """A decoded map from a server: a response (has ``id``) or a push (has ``push``)."""
    obj = require_map(obj, "frame")
    if "push" in obj:
        kind = get_field(obj, "push", str)
        return Push(kind, {k: v for k, v in obj.items() if k != "push"})
    request_id = get_field(obj, "id", int)
    if "error" in obj:
        err = require_map(obj["error"], "error")
        return Response(request_id, error=ErrorInfo(get_field(err, "code", str), get_field(err, "message", str),
                                                     err.get("details")))
    return Response(request_id, ok=require_map(obj.get("ok", {}), "ok"))


def decode_request(data: bytes, limits: codec.Limits = codec.DEFAULT_LIMITS) -> Request:
    return parse_request(codec.decode(data, limits))


def request_id_of(data: bytes) -> int | None:
    """Best-effort request id of a frame that failed validation, so the error can be correlated."""
    try:
        obj = codec.decode(data)
    except ProtocolError:
        return None
    if isinstance(obj, dict):
        rid = obj.get("id")
        if isinstance(rid, int) and not isinstance(rid, bool) and 0 <= rid < MAX_REQUEST_ID:
            return rid
    return None


__all__ = [
    "ErrorCode", "ErrorInfo", "Frame", "Op", "Push", "PushKind", "Request", "Response",
    "decode_request", "encode_frame", "parse_request", "parse_server_frame", "request_id_of",
]
