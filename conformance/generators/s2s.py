"""Vectors for server-to-server transactions (DESIGN §5): one signed transaction and the
ways a receiver must reject one.

Each case runs ``verify_transaction(frame, expected_destination=..., now_ms=...,
key_lookup=...)`` with ``key_lookup`` answering from ``parameters.keys`` (anything else
is unknown)."""

from __future__ import annotations

import hashlib
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from federation import codec, signing
from federation.s2s import (
    DEFAULT_CLASS, Envelope, EnvelopeClass, EnvelopeKind, Transaction, sign_transaction,
)
from federation.signing import Purpose

ORIGIN = "example.org"
DESTINATION = "example.net"
THIRD = "example.com"
T0 = 1_700_000_000_000
DAY_MS = 86_400_000
KEY_ID = "ed25519:k1"
OLD_KEY_ID = "ed25519:old"      # valid at T0, expired 60 s later
NEW_KEY_ID = "ed25519:new"      # valid only from 60 s after T0


def _seed(label: str) -> bytes:
    return hashlib.sha256(f"securechat/vectors/s2s/{label}".encode()).digest()


def _id(label: str) -> bytes:
    return _seed(label)[:16]


def envelope(kind: EnvelopeKind, seq: int, sender: str, recipients: tuple[str, ...] = ("bob@example.net",),
             label: str = "") -> Envelope:
    return Envelope(_id(f"envelope/{kind.value}/{seq}/{label}"), kind, DEFAULT_CLASS[kind], seq, sender,
                    recipients, f"payload {kind.value} {seq}".encode(), T0 - 1000, T0 + 30 * DAY_MS)


def envelope_json(env: Envelope) -> dict[str, Any]:
    return {"id": env.id.hex(), "kind": env.kind.value, "class": env.cls.value, "seq": env.seq,
            "sender": env.sender, "recipients": list(env.recipients), "payload": env.payload.hex(),
            "ts_ms": env.ts_ms, "expires_ms": env.expires_ms}


def _frame(body: bytes, key_id: str, sig: bytes) -> bytes:
    return codec.encode({"body": body, "key_id": key_id, "sig": sig})


def generate() -> dict[str, dict[str, Any]]:
    key = Ed25519PrivateKey.from_private_bytes(_seed("origin-key"))
    old_key = Ed25519PrivateKey.from_private_bytes(_seed("origin-old-key"))
    new_key = Ed25519PrivateKey.from_private_bytes(_seed("origin-new-key"))
    keys = [
        {"origin": ORIGIN, "key_id": KEY_ID, "public_key": signing.public_bytes(key).hex(),
         "valid_from_ms": T0 - DAY_MS, "valid_until_ms": T0 + 365 * DAY_MS},
        {"origin": ORIGIN, "key_id": OLD_KEY_ID, "public_key": signing.public_bytes(old_key).hex(),
         "valid_from_ms": T0 - DAY_MS, "valid_until_ms": T0 + 60_000},
        {"origin": ORIGIN, "key_id": NEW_KEY_ID, "public_key": signing.public_bytes(new_key).hex(),
         "valid_from_ms": T0 + 60_000, "valid_until_ms": T0 + 365 * DAY_MS},
    ]
    good_envelopes = (
        envelope(EnvelopeKind.DEVICE_LIST, 1, "alice@example.org"),
        envelope(EnvelopeKind.MESSAGE, 1, "alice@example.org/ALICEPHON2",
                 ("bob@example.net/BOBLAPTOP2", "bob@example.net/BOBPHONE22")),
        envelope(EnvelopeKind.MESSAGE, 2, "alice@example.org/ALICEPHON2", ("bob@example.net/BOBLAPTOP2",)),
    )
    txn_id = _id("txn/1")

    def signed(envelopes: tuple[Envelope, ...] = good_envelopes, signer: Ed25519PrivateKey = key,
               key_id: str = KEY_ID, origin: str = ORIGIN, txn: bytes = txn_id) -> bytes:
        return sign_transaction(signer, key_id, origin=origin, destination=DESTINATION, ts_ms=T0,
                                txn_id=txn, envelopes=envelopes)

    good = signed()
    fields = Transaction(ORIGIN, DESTINATION, T0, txn_id, good_envelopes).fields()
    body = signing.signing_input(Purpose.S2S_TXN, fields)
    sig = signing.sign(key, Purpose.S2S_TXN, fields)
    tampered_sig = bytes([sig[0] ^ 1]) + sig[1:]
    extra_body = signing.signing_input(Purpose.S2S_TXN, {**fields, "priority": 1})
    v2_body = codec.encode({**fields, "ctx": "securechat/v2/s2s-txn"})
    non_canonical = good.replace(b"\xa6key_id", b"\xd9\x06key_id", 1)

    def case(description: str, frame: bytes, result: str, *, now_ms: int = T0 + 30_000,
             destination: str = DESTINATION, **extra: Any) -> dict[str, Any]:
        return {"description": description, "result": result, "frame": frame.hex(), "now_ms": now_ms,
                "expected_destination": destination, **extra}

    cases = [
        case("signed transaction: a device list (control) and two messages", good, "valid",
             transaction={"origin": ORIGIN, "destination": DESTINATION, "ts_ms": T0, "txn_id": txn_id.hex(),
                          "key_id": KEY_ID, "envelopes": [envelope_json(e) for e in good_envelopes]},
             signing_input=body.hex()),
        case("signature with one bit flipped", _frame(body, KEY_ID, tampered_sig), "invalid",
             error="BadTransactionSignature"),
        case("signed by the origin's key for s2s-request, not s2s-txn",
             _frame(body, KEY_ID, signing.sign(key, Purpose.S2S_REQUEST, fields)), "invalid",
             error="BadTransactionSignature"),
        case("key id the origin never published", signed(key_id="ed25519:zz"), "invalid",
             error="UnknownServerKey"),
        case("key valid at ts but expired now", signed(signer=old_key, key_id=OLD_KEY_ID), "invalid",
             now_ms=T0 + 120_000, error="ExpiredServerKey"),
        case("key valid now but not yet at ts", signed(signer=new_key, key_id=NEW_KEY_ID), "invalid",
             now_ms=T0 + 120_000, error="ExpiredServerKey"),
        case("replayed to a third server", good, "invalid", destination=THIRD, error="WrongDestination"),
        case("replayed 10 minutes later", good, "invalid", now_ms=T0 + 600_000, error="StaleTransaction"),
        case("timestamp 6 minutes in the future", good, "invalid", now_ms=T0 - 360_000,
             error="StaleTransaction"),
        case("recipient outside the destination domain",
             signed((envelope(EnvelopeKind.MESSAGE, 1, "alice@example.org", ("carol@example.com",)),)),
             "invalid", error="MisaddressedEnvelope"),
        case("frame not canonical (long string header)", non_canonical, "invalid", error="MalformedTransaction"),
        case("signed body with an unknown field",
             _frame(extra_body, KEY_ID, key.sign(extra_body)), "invalid", error="MalformedTransaction"),
        case("signed body of transaction format v2", _frame(v2_body, KEY_ID, key.sign(v2_body)), "invalid",
             error="UnsupportedVersion"),
    ]
    for kind in EnvelopeKind:
        forged: tuple[Envelope, ...] = (envelope(EnvelopeKind.MESSAGE, 3, "alice@example.org/ALICEPHON2"),
                                        envelope(kind, 9, "mallory@example.com", label="forged"))
        if kind is EnvelopeKind.MESSAGE:
            forged = (envelope(kind, 9, "mallory@example.com/MALLORYPH2", label="forged"),)
        cases.append(case(f"forged origin: {kind.value} envelope from another domain's user",
                          signed(forged, txn=_id(f"txn/forged/{kind.value}")), "invalid", error="ForgedOrigin"))
    return {"transaction": {
        "source": "Self-generated by conformance/generators/s2s.py from fixed Ed25519 server keys "
                  "(seeds = SHA-256 of fixed labels), fixed envelope and transaction ids and fixed "
                  "timestamps; Ed25519 is deterministic, so the frames are reproducible byte for byte.",
        "parameters": {"origin": ORIGIN, "destination": DESTINATION, "max_clock_skew_ms": 300_000,
                       "origin_key_seed": _seed("origin-key").hex(), "keys": keys,
                       "classes": {k.value: c.value for k, c in DEFAULT_CLASS.items()},
                       "envelope_classes": [c.value for c in EnvelopeClass]},
        "cases": cases,
    }}
