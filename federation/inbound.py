"""Inbound ordering and deduplication for one origin (DESIGN §5), sans-I/O.

The receiver stores and acknowledges any verified transaction, but releases envelopes
to mailboxes only in ``seq`` order per (origin, class), holding back any after a gap
until it fills.  Duplicates are dropped three ways: by transaction id (kept
``txn_ttl_ms`` ≥ 1 hour), by envelope id (kept until the envelope's ``expires_ms``) and
by ``seq`` (anything below the next expected seq was already released).

``accept`` is all-or-nothing: if the hold-back buffer would exceed its bound the
transaction is refused with ``HoldBackFull`` and the state is unchanged, so the
origin retries later (its retries put the oldest seqs first, which fill the gap).
Envelopes whose ``expires_ms`` has passed still advance ``seq`` but are not released.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from federation import codec
from federation.errors import AddressError, CodecError, ErrorCode, ProtocolError, RequestRejected
from federation.s2s import Envelope, EnvelopeClass, Transaction
from federation.s2s_frame import UnsupportedVersion
from federation.validate import field as wire_field
from federation.validate import require_map

STATE_VERSION = 1
TXN_ID_TTL_MS = 3_600_000
DEFAULT_MAX_HELD = 10_000
STATE_LIMITS = codec.Limits(max_bytes=1 << 30, max_depth=8, max_items=1 << 26, max_container=1 << 24)


class HoldBackFull(RequestRejected):
    """Accepting this transaction would hold back more envelopes than allowed; retry later."""

    code = ErrorCode.RATE_LIMITED


class CorruptState(ProtocolError):
    """Serialised inbound/outbound state that does not parse."""


@dataclass(frozen=True, slots=True)
class AcceptResult:
    """``duplicate``: the transaction id was seen before (acknowledge it again, nothing new).
    ``release``: envelopes now deliverable, in seq order per class (control first)."""

    duplicate: bool
    release: list[Envelope] = field(default_factory=list)


class InboundState:
    """Per-origin receive state; persist ``to_bytes()`` together with the released envelopes."""

    def __init__(self, origin: str, *, max_held: int = DEFAULT_MAX_HELD,
                 txn_ttl_ms: int = TXN_ID_TTL_MS) -> None:
        if txn_ttl_ms < TXN_ID_TTL_MS:
            raise ValueError("transaction ids must be kept at least one hour")
        self.origin = origin
        self.max_held = max_held
        self.txn_ttl_ms = txn_ttl_ms
        self._txn_seen: dict[bytes, int] = {}            # txn id -> first seen (ms)
        self._envelope_expiry: dict[bytes, int] = {}     # envelope id -> expires_ms
        self._next_seq: dict[EnvelopeClass, int] = {c: 1 for c in EnvelopeClass}
        self._held: dict[EnvelopeClass, dict[int, Envelope]] = {c: {} for c in EnvelopeClass}

    # --- queries ----------------------------------------------------------------

    def next_seq(self, cls: EnvelopeClass) -> int:
        return self._next_seq[cls]

    def held_count(self) -> int:
        return sum(len(h) for h in self._held.values())

    # --- the state machine ------------------------------------------------------

    def accept(self, txn: Transaction, now_ms: int) -> AcceptResult:
        """Record a *verified* transaction; return what may be released now."""
        if txn.origin != self.origin:
            raise ValueError("transaction of another origin handed to this InboundState")
        if txn.txn_id in self._txn_seen:
            return AcceptResult(duplicate=True)
        fresh: dict[EnvelopeClass, dict[int, Envelope]] = {c: {} for c in EnvelopeClass}
        seen_ids: set[bytes] = set()
        for env in txn.envelopes:
            if (env.id in self._envelope_expiry or env.id in seen_ids
                    or env.seq < self._next_seq[env.cls] or env.seq in self._held[env.cls]
                    or env.seq in fresh[env.cls]):
                continue
            seen_ids.add(env.id)
            fresh[env.cls][env.seq] = env
        # Plan the release without touching state, so a refusal leaves it unchanged.
        plan: dict[EnvelopeClass, int] = {}
        held_after = 0
        for cls in EnvelopeClass:
            held, new = self._held[cls], fresh[cls]
            seq = self._next_seq[cls]
            while seq in held or seq in new:
                seq += 1
            plan[cls] = seq
            released = seq - self._next_seq[cls]
            held_after += len(held) + len(new) - released
        if held_after > self.max_held:
            raise HoldBackFull("too many envelopes held back behind a gap; retry later")
        self._txn_seen[txn.txn_id] = now_ms
        release: list[Envelope] = []
        for cls in EnvelopeClass:
            held, new = self._held[cls], fresh[cls]
            for env in new.values():
                self._envelope_expiry[env.id] = env.expires_ms
            held.update(new)
            for seq in range(self._next_seq[cls], plan[cls]):
                env = held.pop(seq)
                if env.expires_ms > now_ms:
                    release.append(env)
            self._next_seq[cls] = plan[cls]
        return AcceptResult(duplicate=False, release=release)

    def expire(self, now_ms: int) -> None:
        """Forget transaction ids older than the TTL and envelope ids past their expiry."""
        cutoff = now_ms - self.txn_ttl_ms
        self._txn_seen = {t: seen for t, seen in self._txn_seen.items() if seen > cutoff}
        self._envelope_expiry = {e: exp for e, exp in self._envelope_expiry.items() if exp > now_ms}

    # --- persistence -------------------------------------------------------------

    def to_bytes(self) -> bytes:
        return codec.encode({
            "v": STATE_VERSION,
            "origin": self.origin,
            "max_held": self.max_held,
            "txn_ttl_ms": self.txn_ttl_ms,
            "txn_seen": [[t, ms] for t, ms in self._txn_seen.items()],
            "envelope_expiry": [[e, ms] for e, ms in self._envelope_expiry.items()],
            "next_seq": {c.value: n for c, n in self._next_seq.items()},
            "held": [env.to_wire() for held in self._held.values() for env in held.values()],
        }, STATE_LIMITS)

    @classmethod
    def from_bytes(cls, data: bytes) -> InboundState:
        try:
            obj = require_map(codec.decode(data, STATE_LIMITS), "inbound state")
            version = wire_field(obj, "v", int)
            if version != STATE_VERSION:
                raise UnsupportedVersion(f"inbound state version {version} is not supported")
            state = cls(wire_field(obj, "origin", str), max_held=wire_field(obj, "max_held", int),
                        txn_ttl_ms=wire_field(obj, "txn_ttl_ms", int))
            state._txn_seen = _pairs(wire_field(obj, "txn_seen", list))
            state._envelope_expiry = _pairs(wire_field(obj, "envelope_expiry", list))
            next_seq = require_map(wire_field(obj, "next_seq", dict), "next_seq")
            for c in EnvelopeClass:
                state._next_seq[c] = wire_field(next_seq, c.value, int)
            for raw in wire_field(obj, "held", list):
                env = Envelope.from_wire(raw)
                state._held[env.cls][env.seq] = env
        except (CodecError, AddressError, ProtocolError) as exc:
            raise CorruptState(f"inbound state does not parse: {exc.message}") from None
        return state


def _pairs(raw: list[Any]) -> dict[bytes, int]:
    out: dict[bytes, int] = {}
    for pair in raw:
        if (not isinstance(pair, list) or len(pair) != 2 or not isinstance(pair[0], bytes)
                or not isinstance(pair[1], int) or isinstance(pair[1], bool)):
            raise ProtocolError("state entry must be [id, ms]")
        out[pair[0]] = pair[1]
    return out
