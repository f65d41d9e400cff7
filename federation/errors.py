"""The closed set of protocol error codes, and the exceptions that carry them.

Every error a peer can see is one of ``ErrorCode``; nothing else is ever put on
the wire.  The exception tree::

    SecureChatError(code, message)         base; ``code`` is what a peer sees
    ├── ProtocolError                      the *peer* sent something wrong (remote blame)
    │   ├── CodecError                     bytes that are not canonical msgpack / too big
    │   ├── AddressError                   malformed user / device address
    │   └── InvalidSignature               a signature that does not verify for its purpose
    └── RequestRejected                    a well-formed request the server refuses
                                           (rate_limited, stale_devices, conflict, ...)

Messages never contain secrets, plaintext or payload bytes: they are safe to log
and safe to send.  A remote server's error is never relayed to a local client
verbatim (synapse's lesson): map it to ``remote_error``.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Any


class ErrorCode(StrEnum):
    """Stable error codes, documented in conformance/PROTOCOL.md."""

    BAD_REQUEST = "bad_request"            # malformed frame, wrong field type, non-canonical bytes
    UNAUTHORIZED = "unauthorized"          # not authenticated, bad credentials, bad auth signature
    FORBIDDEN = "forbidden"                # authenticated but not allowed (disabled user, pending device)
    NOT_FOUND = "not_found"                # unknown user, device or object
    RATE_LIMITED = "rate_limited"          # a token bucket is empty; retry later
    TOO_LARGE = "too_large"                # frame, field or batch over its limit
    STALE_DEVICES = "stale_devices"        # a send does not cover exactly the recipients' devices
    CONFLICT = "conflict"                  # same id, different bytes; user name taken
    BAD_BUNDLE = "bad_bundle"              # prekey bundle or key upload that does not verify
    BAD_DEVICE_LIST = "bad_device_list"    # device list that does not verify, or rolls back
    UNKNOWN_OP = "unknown_op"              # op name not in the protocol
    UNKNOWN_DOMAIN = "unknown_domain"      # a domain this server does not serve or reach
    SHUTTING_DOWN = "shutting_down"        # server is draining; reconnect elsewhere / later
    REMOTE_ERROR = "remote_error"          # a remote server failed; details only in our logs
    INTERNAL = "internal"                  # our bug; details only in our logs


class SecureChatError(Exception):
    """Base for every error that maps to a protocol error code."""

    code: ErrorCode = ErrorCode.INTERNAL

    def __init__(self, message: str, *, code: ErrorCode | None = None,
                 details: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        if code is not None:
            self.code = code
        self.message = message
        self.details = details

    def to_wire(self) -> dict[str, Any]:
        """The ``error`` map of a response frame."""
        out: dict[str, Any] = {"code": self.code.value, "message": self.message}
        if self.details is not None:
            out["details"] = self.details
        return out


class ProtocolError(SecureChatError):
    """The peer sent bytes or values that break the protocol."""

    code = ErrorCode.BAD_REQUEST


class CodecError(ProtocolError):
    """Bytes that are not canonical msgpack, or exceed a hard limit."""


class AddressError(ProtocolError):
    """A user, device or domain address that does not parse."""


class InvalidSignature(ProtocolError):
    """A signature that does not verify under the expected key and purpose."""

    code = ErrorCode.UNAUTHORIZED


class RequestRejected(SecureChatError):
    """A well-formed request that the server refuses; ``code`` says why."""
