"""Crypto core benchmark (issue 3, item 11): the client's per-message and per-file costs.

Everything runs in this one process, single-threaded, against baselines measured in
the same run:

* ``ratchet_burst``    -- one direction, 300-byte messages: load the sender's state from
  bytes, encrypt, store it; load the receiver's state, parse, decrypt, store it;
* ``ratchet_pingpong`` -- the same, but the direction alternates, so every message is a
  DH ratchet step;
* ``primitive``        -- the baseline of the burst: the same HMAC (chain step), HKDF,
  AES-256-CBC and HMAC (tag) calls of one encrypt + decrypt, in a bare loop;
* ``senderkey``        -- a sender-key group message encrypted + signed, then verified +
  decrypted by one member;
* ``pqxdh``            -- one key agreement, initiator and responder (ML-KEM-1024 included);
* ``attachment``       -- ``encrypt_stream`` of 10 MB (ciphertext SHA-256 in the same pass)
  against the baseline of one AES-256-GCM call plus one SHA-256 call over the same bytes.

The machine is shared and noisy: each measured loop and its baseline run interleaved in
rounds (alternating which goes first) and every rate is the median over the rounds.
The garbage collector is off inside timed loops (as ``timeit`` does).  Progress goes to
stderr; stdout is exactly one JSON object (fields: bench/README.md).
"""

from __future__ import annotations

import argparse
import gc
import hashlib
import io
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
# Run as a script, bench/ is first on sys.path and bench/federation.py would shadow the
# federation package: the repository root goes before it.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from bench._machine import MachineRecord  # noqa: E402
from clientsdk.crypto import pqxdh, primitives, ratchet
from clientsdk.crypto.attachments import decrypt_stream, encrypt_stream
from clientsdk.crypto.identity import DeviceIdentity, PrekeyStore
from clientsdk.crypto.ratchet import RatchetMessage, RatchetState
from clientsdk.crypto.sender_keys import InboundSenderKey, OutboundSenderKey
from conformance.rng import counter_rng
from federation.addresses import DeviceAddress
from federation.keys import PrekeyBundle

TARGETS = {"ratchet_ratio": 0.6, "attachment_ratio": 0.8}
ALICE = DeviceAddress.parse("alice@example.org/AAAAAAAAAA")
BOB = DeviceAddress.parse("bob@example.net/BBBBBBBBBB")
T0 = 1_700_000_000_000
MB = 1_000_000


class BenchError(Exception):
    """A benchmarked operation returned a wrong result: the numbers would be meaningless."""


def log(message: str) -> None:
    print(f"[bench] {message}", file=sys.stderr, flush=True)


def timed(run: Callable[[], object]) -> float:
    """Seconds one call of ``run`` takes, with the garbage collector off."""
    gc.collect()
    gc.disable()
    try:
        started = time.perf_counter()
        run()
        return time.perf_counter() - started
    finally:
        gc.enable()


def interleaved(loops: dict[str, Callable[[], object]], rounds: int) -> dict[str, list[float]]:
    """Seconds per round of every loop, the loops taking turns (the order rotates each round)."""
    names = list(loops)
    seconds: dict[str, list[float]] = {name: [] for name in names}
    for r in range(rounds):
        shift = r % len(names)
        for name in names[shift:] + names[:shift]:
            seconds[name].append(timed(loops[name]))
    return seconds


def rate_summary(count: float, seconds: list[float], digits: int = 1) -> dict[str, Any]:
    """``count`` units per round -> median and best rate over the rounds."""
    rates = [count / s for s in seconds]
    return {"median": round(statistics.median(rates), digits), "best": round(max(rates), digits),
            "worst": round(min(rates), digits)}


# --- Double Ratchet ----------------------------------------------------------------------


class StoredPair:
    """Two ratchet states as a client keeps them between messages: serialised bytes."""

    def __init__(self, seed: str) -> None:
        self.rng = counter_rng(seed)
        shared = self.rng(32)
        bob_prekey = primitives.x25519_from_seed(self.rng(32))
        alice = RatchetState.initiator(shared, primitives.x25519_public_bytes(bob_prekey), self.rng)
        bob = RatchetState.responder(shared, bob_prekey)
        self.stored = {"alice": alice.to_bytes(), "bob": bob.to_bytes()}
        self.now_ms = T0

    def send(self, sender: str, receiver: str, plaintext: bytes, ad: bytes) -> None:
        """One message with the state loaded and stored on both sides."""
        stored = self.stored
        state = RatchetState.from_bytes(stored[sender])
        wire = state.encrypt(plaintext, ad).to_bytes()
        stored[sender] = state.to_bytes()
        state = RatchetState.from_bytes(stored[receiver])
        if state.decrypt(RatchetMessage.from_bytes(wire), ad, self.now_ms, self.rng) != plaintext:
            raise BenchError("ratchet round trip returned the wrong plaintext")
        stored[receiver] = state.to_bytes()


def burst_loop(pair: StoredPair, count: int, plaintext: bytes, ad: bytes) -> Callable[[], None]:
    send = pair.send

    def run() -> None:
        for _ in range(count):
            send("alice", "bob", plaintext, ad)
    return run


def pingpong_loop(pair: StoredPair, count: int, plaintext: bytes, ad: bytes) -> Callable[[], None]:
    send = pair.send
    turn = [0]

    def run() -> None:
        for _ in range(count):
            if turn[0] % 2 == 0:
                send("alice", "bob", plaintext, ad)
            else:
                send("bob", "alice", plaintext, ad)
            turn[0] += 1
    return run


def primitive_loop(count: int, plaintext: bytes, ad: bytes) -> Callable[[], None]:
    """The burst's HMAC, HKDF, AES-CBC and HMAC calls (sender, then receiver), and nothing else."""
    hmac, hkdf, ct_equal = primitives.hmac_sha256, primitives.hkdf_sha256, primitives.ct_equal
    encrypt, decrypt = primitives.aes256_cbc_encrypt, primitives.aes256_cbc_decrypt
    salt, info = primitives.ZERO_SALT, ratchet.MESSAGE_KEYS_INFO
    header = ratchet.encode_header(bytes(32), 0, 0)
    chains = [hashlib.sha256(b"sending").digest(), hashlib.sha256(b"sending").digest()]

    def run() -> None:
        sending, receiving = chains
        for _ in range(count):
            message_key, sending = hmac(sending, b"\x01"), hmac(sending, b"\x02")
            keys = hkdf(message_key, salt, info, 80)
            ciphertext = encrypt(keys[:32], keys[64:], plaintext)
            tag = hmac(keys[32:64], ad + header + ciphertext)
            message_key, receiving = hmac(receiving, b"\x01"), hmac(receiving, b"\x02")
            keys = hkdf(message_key, salt, info, 80)
            if not ct_equal(hmac(keys[32:64], ad + header + ciphertext), tag) \
                    or decrypt(keys[:32], keys[64:], ciphertext) != plaintext:
                raise BenchError("primitive round trip failed")
        chains[:] = [sending, receiving]
    return run


# --- Sender Keys -------------------------------------------------------------------------


def senderkey_loop(count: int, body: bytes) -> Callable[[], None]:
    rng = counter_rng("bench/sender-key")
    outbound = OutboundSenderKey.create(rng(32), 0, rng)
    inbound = InboundSenderKey.from_distribution(outbound.distribution().to_bytes())

    def run() -> None:
        for _ in range(count):
            if inbound.decrypt(outbound.encrypt(body, 0), T0).body != body:
                raise BenchError("sender-key round trip returned the wrong body")
    return run


# --- PQXDH -------------------------------------------------------------------------------


def pqxdh_runs(runs: int) -> tuple[list[float], list[float]]:
    """Seconds of (initiator, responder) per agreement; ML-KEM encapsulation is the real, random one."""
    rng = counter_rng("bench/pqxdh")
    alice = DeviceIdentity.generate(rng)
    bob = DeviceIdentity.generate(rng)
    store = PrekeyStore()
    uploads = store.build_uploads(bob, T0, one_time_count=1, rng=rng)
    bundle = PrekeyBundle(str(BOB), bob.public_key, uploads.signed_prekey, uploads.pq_last_resort,
                          uploads.one_time_prekeys[0])
    initiator, responder = [], []
    for _ in range(runs):
        gc.disable()
        try:
            started = time.perf_counter()
            sent = pqxdh.initiate(alice, ALICE, bundle, rng)
            middle = time.perf_counter()
            received = pqxdh.respond(bob, BOB, ALICE, store, sent.initial)  # read-only: the bundle stays usable
            finished = time.perf_counter()
        finally:
            gc.enable()
        if sent.shared_key != received.shared_key:
            raise BenchError("PQXDH sides derived different keys")
        initiator.append(middle - started)
        responder.append(finished - middle)
    return initiator, responder


# --- attachments -------------------------------------------------------------------------


def attachment_loops(data: bytes) -> tuple[Callable[[], None], Callable[[], None], Callable[[], None]]:
    """(streaming encrypt, baseline, streaming decrypt) over ``data``; the output is kept, like the baseline's."""
    rng = counter_rng("bench/attachment")
    key, nonce = rng(32), rng(12)
    last: dict[str, Any] = {}

    def stream() -> None:
        parts: list[bytes] = []
        last["pointer"] = encrypt_stream(io.BytesIO(data), parts.append, rng=rng)
        last["ciphertext"] = parts

    def baseline() -> None:
        ciphertext = AESGCM(key).encrypt(nonce, data, None)
        hashlib.sha256(ciphertext).digest()

    stream()
    ciphertext = b"".join(last["ciphertext"])
    pointer = last["pointer"]
    if pointer.size != len(ciphertext) or pointer.sha256 != hashlib.sha256(ciphertext).digest():
        raise BenchError("attachment pointer does not describe the ciphertext")

    def decrypt() -> None:
        out: list[bytes] = []
        decrypt_stream(io.BytesIO(ciphertext), out.append, pointer)
        last["plaintext"] = out

    decrypt()
    if b"".join(last.pop("plaintext")) != data:
        raise BenchError("attachment round trip returned the wrong plaintext")
    return stream, baseline, decrypt


# --- the whole run -----------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="SecureChat crypto benchmark (prints one JSON object)")
    parser.add_argument("--messages", type=int, default=1000,
                        help="ratchet burst and primitive messages per round (default 1000)")
    parser.add_argument("--pingpong-messages", type=int, default=200, help="ping-pong messages per round (default 200)")
    parser.add_argument("--senderkey-messages", type=int, default=300,
                        help="sender-key messages per round (default 300)")
    parser.add_argument("--rounds", type=int, default=15, help="interleaved rounds of the message loops (default 15)")
    parser.add_argument("--pqxdh-runs", type=int, default=30, help="PQXDH agreements (default 30)")
    parser.add_argument("--attachment-mb", type=float, default=10.0, help="attachment size in MB of 10^6 bytes")
    parser.add_argument("--attachment-rounds", type=int, default=15, help="interleaved attachment rounds (default 15)")
    parser.add_argument("--payload", type=int, default=300, help="message plaintext bytes (default 300)")
    args = parser.parse_args(argv)
    if min(args.messages, args.pingpong_messages, args.senderkey_messages, args.rounds, args.pqxdh_runs,
           args.attachment_rounds) < 1 or args.attachment_mb <= 0 or args.payload < 0:
        parser.error("counts must be >= 1, --attachment-mb > 0 and --payload >= 0")
    return args


def _ratio(a: float, b: float) -> float | None:
    return round(a / b, 3) if b else None


def paired_ratio(measured: list[float], baseline: list[float]) -> float:
    """Median over rounds of (measured rate / baseline rate) of the same round: immune to slow drift."""
    return round(statistics.median(b / m for m, b in zip(measured, baseline)), 3)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    machine = MachineRecord()
    plaintext = hashlib.shake_256(b"bench/plaintext").digest(args.payload)
    ad = pqxdh.associated_data(bytes(range(32)), bytes(range(32, 64)), ALICE, BOB)   # a real AD's size
    try:
        burst, pingpong = StoredPair("bench/burst"), StoredPair("bench/pingpong")
        burst.send("alice", "bob", plaintext, ad)        # the responder's first DH step is not a burst message
        log(f"ratchet: {args.rounds} rounds of {args.messages} burst + primitive, "
            f"{args.pingpong_messages} ping-pong messages")
        seconds = interleaved({
            "burst": burst_loop(burst, args.messages, plaintext, ad),
            "primitive": primitive_loop(args.messages, plaintext, ad),
            "pingpong": pingpong_loop(pingpong, args.pingpong_messages, plaintext, ad),
        }, args.rounds)
        ratchet_paired = paired_ratio(seconds["burst"], seconds["primitive"])
        ratchet_burst = rate_summary(args.messages, seconds["burst"])
        primitive = rate_summary(args.messages, seconds["primitive"])
        ratchet_pingpong = rate_summary(args.pingpong_messages, seconds["pingpong"])
        log(f"ratchet: burst {ratchet_burst}, primitive {primitive}, ping-pong {ratchet_pingpong}")

        senderkey = rate_summary(args.senderkey_messages, interleaved(
            {"senderkey": senderkey_loop(args.senderkey_messages, plaintext)}, args.rounds)["senderkey"])
        log(f"sender keys: {senderkey}")

        initiator, responder = pqxdh_runs(args.pqxdh_runs)
        totals = [a + b for a, b in zip(initiator, responder)]
        log(f"pqxdh: median {1000 * statistics.median(totals):.2f} ms")

        size = int(args.attachment_mb * MB)
        data = hashlib.shake_256(b"bench/attachment").digest(size)
        stream, baseline, decrypt = attachment_loops(data)
        seconds = interleaved({"stream": stream, "baseline": baseline, "decrypt": decrypt}, args.attachment_rounds)
        attachment_paired = paired_ratio(seconds["stream"], seconds["baseline"])
        attachment = rate_summary(size / MB, seconds["stream"])
        attachment_baseline = rate_summary(size / MB, seconds["baseline"])
        attachment_decrypt = rate_summary(size / MB, seconds["decrypt"])
        log(f"attachment: stream {attachment}, baseline {attachment_baseline}, decrypt {attachment_decrypt}")
        state_bytes = len(burst.stored["alice"])
    except BenchError as exc:
        print(f"bench failed: {exc}", file=sys.stderr)
        return 1

    ratchet_ratio = _ratio(ratchet_burst["median"], primitive["median"])
    attachment_ratio = _ratio(attachment["median"], attachment_baseline["median"])
    result = {
        "ratchet_burst_msgs_per_s": ratchet_burst["median"],
        "ratchet_pingpong_msgs_per_s": ratchet_pingpong["median"],
        "primitive_msgs_per_s": primitive["median"],
        "senderkey_msgs_per_s": senderkey["median"],
        "pqxdh_ms": round(1000 * statistics.median(totals), 3),
        "attachment_mb_s": attachment["median"],
        "attachment_baseline_mb_s": attachment_baseline["median"],
        "ratchet_ratio": ratchet_ratio,
        "attachment_ratio": attachment_ratio,
        "targets": TARGETS,
        "targets_met": {
            "ratchet_ratio": ratchet_ratio is not None and ratchet_ratio >= TARGETS["ratchet_ratio"],
            "attachment_ratio": attachment_ratio is not None and attachment_ratio >= TARGETS["attachment_ratio"],
        },
        "parameters": {
            "messages": args.messages, "pingpong_messages": args.pingpong_messages,
            "senderkey_messages": args.senderkey_messages, "rounds": args.rounds, "pqxdh_runs": args.pqxdh_runs,
            "attachment_bytes": size, "attachment_rounds": args.attachment_rounds, "payload_bytes": args.payload,
            "associated_data_bytes": len(ad),
        },
        "details": {
            "ratchet_burst_msgs_per_s": ratchet_burst,
            "ratchet_pingpong_msgs_per_s": ratchet_pingpong,
            "primitive_msgs_per_s": primitive,
            "senderkey_msgs_per_s": senderkey,
            "pqxdh_initiator_ms": round(1000 * statistics.median(initiator), 3),
            "pqxdh_responder_ms": round(1000 * statistics.median(responder), 3),
            "pqxdh_best_ms": round(1000 * min(totals), 3),
            "attachment_mb_s": attachment,
            "attachment_baseline_mb_s": attachment_baseline,
            "attachment_decrypt_mb_s": attachment_decrypt,
            "ratchet_ratio_paired": ratchet_paired,
            "attachment_ratio_paired": attachment_paired,
            "ratchet_state_bytes": state_bytes,
        },
        "machine": machine.fields(),
    }
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
