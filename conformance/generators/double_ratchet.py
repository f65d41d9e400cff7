"""Vectors for the Double Ratchet (DESIGN §4, normative parameters).

``conversation``: 22 messages between Alice (initiator) and Bob with out-of-order
delivery, skipped keys across DH steps, and every intermediate value (root, chain and
message keys, DH private seeds, public keys and outputs, headers, ciphertexts, tags).
``invalid``: receiver states (serialised, so they double as golden state for format
migrations) with messages that must be rejected and leave the state unchanged."""

from __future__ import annotations

import hashlib
from typing import Any

from clientsdk.crypto import primitives, ratchet
from clientsdk.crypto.ratchet import RatchetMessage, RatchetState

T0 = 1_700_000_000_000
DAY_MS = 86_400_000
SHARED_KEY = hashlib.sha256(b"securechat/vectors/double_ratchet/shared-key").digest()
BOB_SIGNED_PREKEY_SEED = hashlib.sha256(b"securechat/vectors/double_ratchet/bob-signed-prekey").digest()
AD = hashlib.sha256(b"securechat/vectors/double_ratchet/alice-ik").digest() + \
    hashlib.sha256(b"securechat/vectors/double_ratchet/bob-ik").digest() + b"fixed associated data"

# (op, party, message id); Alice's messages are a*, Bob's b*.
SCRIPT: list[tuple[str, str, str]] = [
    ("send", "alice", "a0"), ("send", "alice", "a1"), ("send", "alice", "a2"), ("send", "alice", "a3"),
    ("receive", "bob", "a1"), ("receive", "bob", "a0"), ("receive", "bob", "a3"),
    ("send", "bob", "b0"), ("send", "bob", "b1"),
    ("receive", "alice", "b1"), ("receive", "alice", "b0"),
    ("send", "alice", "a4"), ("send", "alice", "a5"), ("send", "alice", "a6"),
    ("receive", "bob", "a5"), ("receive", "bob", "a2"), ("receive", "bob", "a4"),
    ("send", "bob", "b2"), ("send", "bob", "b3"), ("send", "bob", "b4"),
    ("receive", "alice", "b4"), ("receive", "alice", "b2"), ("receive", "bob", "a6"),
    ("send", "alice", "a7"), ("send", "alice", "a8"),
    ("receive", "bob", "a8"), ("receive", "bob", "a7"),
    ("send", "bob", "b5"), ("receive", "alice", "b3"), ("receive", "alice", "b5"),
    ("send", "alice", "a9"), ("send", "alice", "a10"), ("send", "alice", "a11"),
    ("send", "bob", "b6"), ("receive", "alice", "b6"),
    ("receive", "bob", "a11"), ("receive", "bob", "a9"), ("receive", "bob", "a10"),
    ("send", "bob", "b7"), ("receive", "alice", "b7"),
    ("send", "alice", "a12"), ("receive", "bob", "a12"), ("send", "alice", "a13"), ("receive", "bob", "a13"),
]


class SeededRng:
    """Deterministic randomness for vectors: draw i is SHA-256(label ‖ u64 BE i), recorded."""

    def __init__(self, label: str) -> None:
        self.label = label.encode()
        self.draws: list[bytes] = []

    def __call__(self, n: int) -> bytes:
        out = b""
        while len(out) < n:
            out += hashlib.sha256(self.label + len(self.draws).to_bytes(8, "big")).digest()
            self.draws.append(out[-32:])
        return out[:n]


def _pair() -> tuple[RatchetState, RatchetState, dict[str, SeededRng], dict[str, Any]]:
    rngs = {"alice": SeededRng("securechat/vectors/double_ratchet/alice"),
            "bob": SeededRng("securechat/vectors/double_ratchet/bob")}
    spk = primitives.x25519_from_seed(BOB_SIGNED_PREKEY_SEED)
    spk_public = primitives.x25519_public_bytes(spk)
    alice = RatchetState.initiator(SHARED_KEY, spk_public, rngs["alice"])
    bob = RatchetState.responder(SHARED_KEY, spk)
    alice_seed = rngs["alice"].draws[-1]
    dh_output = primitives.x25519(primitives.x25519_from_seed(alice_seed), spk_public)
    sending = alice.sending_chain_key or b""
    init = {"alice_ratchet_seed": alice_seed.hex(), "alice_ratchet_public": alice.ratchet_public_key.hex(),
            "bob_signed_prekey_public": spk_public.hex(), "dh_output": dh_output.hex(),
            "root_key": alice.root_key.hex(), "alice_sending_chain_key": sending.hex()}
    return alice, bob, rngs, init


def _hex(value: bytes | None) -> str | None:
    return None if value is None else value.hex()


def _conversation() -> tuple[dict[str, Any], dict[str, RatchetState], dict[str, SeededRng]]:
    alice, bob, rngs, init = _pair()
    states = {"alice": alice, "bob": bob}
    seeds = {"alice": rngs["alice"].draws[-1], "bob": BOB_SIGNED_PREKEY_SEED}
    messages: dict[str, RatchetMessage] = {}
    steps: list[dict[str, Any]] = []
    for number, (op, party, message_id) in enumerate(SCRIPT):
        state = states[party]
        if op == "send":
            plaintext = f"message {message_id}: {'x' * (number % 17)}".encode()
            chain_key = state.sending_chain_key
            next_chain, message_key = ratchet.kdf_ck(chain_key)  # type: ignore[arg-type]
            enc, mac, iv = ratchet.message_keys(message_key)
            msg = state.encrypt(plaintext, AD)
            messages[message_id] = msg
            steps.append({
                "op": "send", "party": party, "id": message_id, "plaintext": plaintext.hex(),
                "ratchet_public": state.ratchet_public_key.hex(), "pn": msg.previous_count, "n": msg.number,
                "chain_key": chain_key.hex(), "next_chain_key": next_chain.hex(),  # type: ignore[union-attr]
                "message_key": message_key.hex(), "enc_key": enc.hex(), "mac_key": mac.hex(), "iv": iv.hex(),
                "header": msg.header.hex(), "ciphertext": msg.ciphertext.hex(), "tag": msg.tag.hex(),
                "message": msg.to_bytes().hex(),
            })
            continue
        msg = messages[message_id]
        old_remote, old_root, old_seed = state.remote_ratchet_key, state.root_key, seeds[party]
        used_skipped = state.has_skipped_key(msg.ratchet_key, msg.number)
        plaintext = state.decrypt(msg, AD, T0 + number, rngs[party])
        step: dict[str, Any] = {"op": "receive", "party": party, "id": message_id, "plaintext": plaintext.hex(),
                                "used_skipped_key": used_skipped}
        if state.remote_ratchet_key != old_remote:
            seeds[party] = rngs[party].draws[-1]
            dh_receive = primitives.x25519(primitives.x25519_from_seed(old_seed), msg.ratchet_key)
            root_mid, receiving_first = ratchet.kdf_rk(old_root, dh_receive)
            dh_send = primitives.x25519(primitives.x25519_from_seed(seeds[party]), msg.ratchet_key)
            root_new, sending = ratchet.kdf_rk(root_mid, dh_send)
            if (root_new, sending) != (state.root_key, state.sending_chain_key):
                raise RuntimeError("generator self-check failed")
            step["dh_step"] = {
                "remote_ratchet_key": msg.ratchet_key.hex(), "previous_ratchet_seed": old_seed.hex(),
                "previous_root_key": old_root.hex(), "dh_receive_output": dh_receive.hex(),
                "root_key_mid": root_mid.hex(), "receiving_chain_key_first": receiving_first.hex(),
                "new_ratchet_seed": seeds[party].hex(), "new_ratchet_public": state.ratchet_public_key.hex(),
                "dh_send_output": dh_send.hex(), "root_key": root_new.hex(), "sending_chain_key": sending.hex(),
            }
        ns, nr, pn = state.counters
        step.update({"root_key": state.root_key.hex(), "sending_chain_key": _hex(state.sending_chain_key),
                     "receiving_chain_key": _hex(state.receiving_chain_key), "ns": ns, "nr": nr, "pn": pn,
                     "skipped_count": state.skipped_count, "now_ms": T0 + number})
        steps.append(step)
    case = {
        "description": f"conversation of {sum(op == 'send' for op, _, _ in SCRIPT)} messages with out-of-order "
                       "delivery, skipped keys across DH steps and every intermediate key",
        "result": "valid", "shared_key": SHARED_KEY.hex(), "bob_signed_prekey_seed": BOB_SIGNED_PREKEY_SEED.hex(),
        "associated_data": AD.hex(), "init": init,
        "rng": {party: [d.hex() for d in rng.draws] for party, rng in rngs.items()},
        "steps": steps,
        "final_state": {party: s.to_bytes().hex() for party, s in states.items()},
    }
    return case, states, rngs


def _invalid_cases(states: dict[str, RatchetState], last_delivered: bytes) -> list[dict[str, Any]]:
    alice = RatchetState.from_bytes(states["alice"].to_bytes())
    bob = RatchetState.from_bytes(states["bob"].to_bytes())
    bob_rng = SeededRng("securechat/vectors/double_ratchet/bob-invalid")
    fresh = alice.encrypt(b"not delivered yet", AD)
    state_hex = bob.to_bytes().hex()
    now = T0 + 1000

    def case(description: str, message: bytes, error: str, *, state: str = state_hex, ad: bytes = AD,
             now_ms: int = now) -> dict[str, Any]:
        return {"description": description, "result": "invalid", "error": error, "receiver_state": state,
                "associated_data": ad.hex(), "message": message.hex(), "now_ms": now_ms}

    def flip(data: bytes, index: int) -> bytes:
        out = bytearray(data)
        out[index] ^= 0x01
        return bytes(out)

    raw = fresh.to_bytes()
    cases = [
        case("tampered tag", flip(raw, len(raw) - 1), "DecryptionFailed"),
        case("tampered ciphertext", flip(raw, ratchet.HEADER_LEN), "DecryptionFailed"),
        case("tampered header counter N", flip(raw, ratchet.HEADER_LEN - 1), "DecryptionFailed"),
        case("tampered header PN", flip(raw, 35), "DecryptionFailed"),
        case("wrong associated data", raw, "DecryptionFailed", ad=AD + b"!"),
        case("replay of the last delivered message", last_delivered, "ReplayedMessage"),
        case("gap of 1,001 in the current chain (over MAX_SKIP)",
             ratchet.encode_header(fresh.ratchet_key, fresh.previous_count, fresh.number + ratchet.MAX_SKIP + 1)
             + fresh.ciphertext + fresh.tag, "TooManySkipped"),
        case("gap of 1,001 in a new chain (over MAX_SKIP)",
             ratchet.encode_header(primitives.x25519_public_bytes(primitives.x25519_from_seed(bytes(31) + b"\x07")),
                                   0, ratchet.MAX_SKIP + 1) + fresh.ciphertext + fresh.tag, "TooManySkipped"),
        case("small-order ratchet key in the header",
             ratchet.encode_header(bytes(32), 0, 0) + fresh.ciphertext + fresh.tag, "InvalidKey"),
        case("truncated by one byte", raw[:-1], "MalformedMessage"),
        case("header only", fresh.header, "MalformedMessage"),
    ]
    # a skipped key expires after 30 days
    late = alice.encrypt(b"late", AD)
    bob.decrypt(alice.encrypt(b"overtakes", AD), AD, now, bob_rng)
    skipped_state = bob.to_bytes().hex()
    cases.append(case("skipped key older than 30 days", late.to_bytes(), "ReplayedMessage",
                      state=skipped_state, now_ms=now + 30 * DAY_MS + 1))
    cases.append({"description": "skipped key at exactly 30 days still decrypts", "result": "valid",
                  "receiver_state": skipped_state, "associated_data": AD.hex(), "message": late.to_bytes().hex(),
                  "now_ms": now + 30 * DAY_MS, "plaintext": b"late".hex()})
    return cases


def generate() -> dict[str, dict[str, Any]]:
    conversation, states, _rngs = _conversation()
    last_delivered = bytes.fromhex(next(s["message"] for s in reversed(conversation["steps"])
                                        if s["op"] == "send" and s["party"] == "alice"))
    source = ("Self-generated by conformance/generators/double_ratchet.py from a fixed shared key, a fixed "
              "signed-prekey seed and deterministic DH seeds (draw i of a party = SHA-256(label || u64 BE i), "
              "listed under 'rng'); timestamps are fixed.")
    params = {"kdf_rk_info": ratchet.RATCHET_INFO.decode(), "message_keys_info": ratchet.MESSAGE_KEYS_INFO.decode(),
              "max_skip": ratchet.MAX_SKIP, "max_skipped_keys": ratchet.MAX_SKIPPED_KEYS,
              "skipped_key_max_age_ms": ratchet.SKIPPED_KEY_MAX_AGE_MS}
    return {
        "conversation": {"source": source, "parameters": params, "cases": [conversation]},
        "invalid": {"source": source, "parameters": params, "cases": _invalid_cases(states, last_delivered)},
    }
