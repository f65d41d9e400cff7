"""The project's only signing and verification: purpose-bound Ed25519 (DESIGN §2).

Every signature covers the canonical msgpack of ``{ctx: PURPOSE, **fields}``.
``verify`` takes the *expected* purpose, so a signature made for one purpose
never verifies for another: no component can be turned into a signing oracle.
"""

from __future__ import annotations

from collections.abc import Mapping
from enum import StrEnum
from typing import Any

from cryptography.exceptions import InvalidSignature as _CryptoInvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from federation import codec
from federation.errors import CodecError, InvalidSignature

PUBLIC_KEY_LEN = 32
SIGNATURE_LEN = 64


class Purpose(StrEnum):
    DEVICE_LIST = "securechat/v1/device-list"
    SIGNED_PREKEY = "securechat/v1/signed-prekey"
    PQ_PREKEY = "securechat/v1/pq-prekey"
    C2S_AUTH = "securechat/v1/c2s-auth"
    S2S_TXN = "securechat/v1/s2s-txn"
    S2S_REQUEST = "securechat/v1/s2s-request"
    SENDER_KEY = "securechat/v1/sender-key"
    GROUP_CONTROL = "securechat/v1/group-control"
    DELIVERY_REPORT = "securechat/v1/delivery-report"


def signing_input(purpose: Purpose, fields: Mapping[str, Any]) -> bytes:
    """The exact bytes a signature for ``purpose`` covers."""
    if "ctx" in fields:
        raise CodecError("fields must not contain 'ctx'; the purpose supplies it")
    return codec.encode({**fields, "ctx": Purpose(purpose).value})


def sign(private_key: Ed25519PrivateKey, purpose: Purpose, fields: Mapping[str, Any]) -> bytes:
    """Sign ``fields`` for ``purpose``; returns the 64-byte signature."""
    return private_key.sign(signing_input(purpose, fields))


def sign_input(private_key: Ed25519PrivateKey, data: bytes) -> bytes:
    """Sign bytes that ``signing_input`` produced (saves encoding the fields twice)."""
    return private_key.sign(data)


def verify(public_key: bytes, purpose: Purpose, fields: Mapping[str, Any], signature: bytes) -> None:
    """Raise ``InvalidSignature`` unless ``signature`` signs ``fields`` for ``purpose``."""
    if not isinstance(public_key, bytes) or len(public_key) != PUBLIC_KEY_LEN:
        raise InvalidSignature("public key must be 32 bytes")
    if not isinstance(signature, bytes) or len(signature) != SIGNATURE_LEN:
        raise InvalidSignature("signature must be 64 bytes")
    data = signing_input(purpose, fields)
    try:
        Ed25519PublicKey.from_public_bytes(public_key).verify(signature, data)
    except (_CryptoInvalidSignature, ValueError):
        raise InvalidSignature(f"signature does not verify for {Purpose(purpose).value}") from None


def open_signed(public_key: bytes, purpose: Purpose, body: bytes, signature: bytes) -> dict[str, Any]:
    """Verify an object carried as its signed bytes; return its fields without ``ctx``.

    ``body`` must be the canonical encoding of ``{ctx: purpose, ...}`` (objects such
    as device lists travel this way so that every party hashes the same bytes).
    """
    obj = codec.decode(body)
    if not isinstance(obj, dict) or obj.get("ctx") != Purpose(purpose).value:
        raise InvalidSignature(f"signed object is not a {Purpose(purpose).value} object")
    fields = {k: v for k, v in obj.items() if k != "ctx"}
    verify(public_key, purpose, fields, signature)
    return fields


def public_bytes(private_key: Ed25519PrivateKey) -> bytes:
    """Raw 32-byte public key of an Ed25519 private key."""
    return private_key.public_key().public_bytes_raw()
