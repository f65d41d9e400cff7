"""The outbound queue for one destination (DESIGN §5, LESSONS #4), sans-I/O.

``enqueue`` numbers envelopes with a consecutive ``seq`` per (origin, destination,
class).  ``next_batch`` cuts a batch bounded by envelope count and encoded bytes,
waiting at most ``max_wait_ms`` for a batch to fill; control envelopes always go
before message envelopes (key and device traffic first on recovery).  Up to
``max_in_flight`` batches are outstanding at once, so one slow batch blocks nothing.
A failed batch's envelopes go back to the queue with their seqs and are re-batched
under a fresh transaction id (the receiver deduplicates and reorders); failures set a
capped exponential backoff with jitter for the whole destination.  ``to_bytes`` /
``from_bytes`` persist it: batches in flight at a restart are simply sent again.

The driver (next session): ``batch = q.next_batch(now, rng)`` → ``sign_transaction``
→ send → ``q.on_ack(batch.txn_id)`` or ``q.on_failure(batch.txn_id, now, rng)``; sleep
until ``q.next_wakeup_ms(now)`` or the next enqueue.
"""

from __future__ import annotations

import heapq
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from federation import codec
from federation.errors import AddressError, CodecError, ErrorCode, ProtocolError, RequestRejected
from federation.inbound import STATE_LIMITS, CorruptState
from federation.s2s import (
    ENVELOPE_ID_LEN, MAX_ENVELOPES, Envelope, EnvelopeClass, EnvelopeKind, address_domain, check_envelope_binding,
    new_id,
)
from federation.s2s_frame import MAX_RECIPIENTS, UnsupportedVersion
from federation.validate import field, require_map

Rng = Callable[[int], bytes]
STATE_VERSION = 1


class EnvelopeTooLarge(RequestRejected):
    """One envelope alone exceeds the batch byte bound."""

    code = ErrorCode.TOO_LARGE


@dataclass(frozen=True, slots=True)
class OutboundConfig:
    max_batch_envelopes: int = 100
    max_batch_bytes: int = 256 * 1024       # sum of encoded envelopes; the txn frame stays < 1 MiB
    max_wait_ms: int = 5                    # how long a partial batch may wait to fill
    max_in_flight: int = 4
    backoff_base_ms: int = 1_000
    backoff_cap_ms: int = 10 * 60 * 1000

    def __post_init__(self) -> None:
        if not 1 <= self.max_batch_envelopes <= MAX_ENVELOPES:
            raise ValueError("max_batch_envelopes must be within 1..MAX_ENVELOPES")
        if self.max_in_flight < 1 or self.max_batch_bytes < 1 or self.max_wait_ms < 0:
            raise ValueError("bounds must be positive")
        if not 0 < self.backoff_base_ms <= self.backoff_cap_ms:
            raise ValueError("need 0 < backoff_base_ms <= backoff_cap_ms")


@dataclass(frozen=True, slots=True)
class EnvelopeDraft:
    """What the caller knows about an envelope; the queue adds class, seq and ts_ms."""

    id: bytes
    kind: EnvelopeKind
    sender: str
    recipients: tuple[str, ...]
    payload: bytes
    expires_ms: int


@dataclass(frozen=True, slots=True)
class Batch:
    """One attempt: sign ``envelopes`` as transaction ``txn_id``."""

    txn_id: bytes
    envelopes: list[Envelope]


@dataclass(slots=True)
class _InFlight:
    envelopes: list[Envelope]
    sent_ms: int


class OutboundQueue:
    """Per-destination queue; persist ``to_bytes()`` after every change you must not lose."""

    def __init__(self, origin: str, destination: str, config: OutboundConfig | None = None) -> None:
        self.origin = origin
        self.destination = destination
        self.config = config or OutboundConfig()
        self._next_seq: dict[EnvelopeClass, int] = {c: 1 for c in EnvelopeClass}
        self._pending: dict[EnvelopeClass, list[tuple[int, Envelope]]] = {c: [] for c in EnvelopeClass}
        self._sizes: dict[bytes, int] = {}                 # envelope id -> encoded size
        self._pending_bytes = 0
        self._in_flight: dict[bytes, _InFlight] = {}
        self._failures = 0
        self._next_attempt_ms = 0
        self._last_failure_ms = -1

    # --- producing -----------------------------------------------------------------

    def enqueue(self, draft: EnvelopeDraft, cls: EnvelopeClass, now_ms: int) -> Envelope:
        """Number and queue one envelope; raises before queueing anything invalid."""
        env = Envelope(draft.id, EnvelopeKind(draft.kind), EnvelopeClass(cls), self._next_seq[cls],
                       draft.sender, tuple(draft.recipients), draft.payload, now_ms, draft.expires_ms)
        try:
            Envelope.from_wire(env.to_wire())
        except (ProtocolError, AddressError) as exc:
            raise ValueError(f"invalid envelope: {exc.message}") from None
        check_envelope_binding(env, self.origin, self.destination)
        size = len(codec.encode(env.to_wire(), _ENVELOPE_LIMITS))
        if size > self.config.max_batch_bytes:
            raise EnvelopeTooLarge("envelope is larger than a whole batch")
        if env.id in self._sizes:
            raise ValueError("envelope id already queued")
        self._next_seq[cls] += 1
        self._push(env, size)
        return env

    def add(self, env: Envelope) -> None:
        """Queue an envelope that durable storage has already numbered.

        The homeserver assigns ``seq`` inside the same database write that stores the
        envelope (so a failed write can never leave a gap); the in-memory queue then
        only checks that numbering and its own agree.
        """
        check_envelope_binding(env, self.origin, self.destination)
        if env.seq != self._next_seq[env.cls]:
            raise ValueError(f"{env.cls.value} envelope seq {env.seq} is not the next one "
                             f"({self._next_seq[env.cls]})")
        if env.id in self._sizes:
            raise ValueError("envelope id already queued")
        size = len(codec.encode(env.to_wire(), _ENVELOPE_LIMITS))
        self._next_seq[env.cls] += 1
        self._push(env, size)

    @classmethod
    def restore(cls, origin: str, destination: str, *, next_seq: dict[EnvelopeClass, int], failures: int,
                next_attempt_ms: int, last_failure_ms: int, envelopes: Sequence[Envelope],
                config: OutboundConfig | None = None) -> OutboundQueue:
        """Rebuild a queue from storage rows after a restart (unacked envelopes are sent again)."""
        queue = cls(origin, destination, config)
        queue._next_seq.update(next_seq)
        queue._failures = failures
        queue._next_attempt_ms = next_attempt_ms
        queue._last_failure_ms = last_failure_ms
        for env in envelopes:
            queue._push(env, len(codec.encode(env.to_wire(), _ENVELOPE_LIMITS)))
        return queue

    @property
    def backoff_state(self) -> tuple[int, int, int]:
        """(failures, next_attempt_ms, last_failure_ms): what storage keeps across restarts."""
        return self._failures, self._next_attempt_ms, self._last_failure_ms

    def _push(self, env: Envelope, size: int) -> None:
        heapq.heappush(self._pending[env.cls], (env.seq, env))
        self._sizes[env.id] = size
        self._pending_bytes += size

    # --- sending -------------------------------------------------------------------

    def _pending_count(self) -> int:
        return sum(len(p) for p in self._pending.values())

    def _batch_due(self, now_ms: int) -> bool:
        count = self._pending_count()
        if count == 0:
            return False
        if count >= self.config.max_batch_envelopes or self._pending_bytes >= self.config.max_batch_bytes:
            return True
        return self._oldest_pending_ms() + self.config.max_wait_ms <= now_ms

    def _oldest_pending_ms(self) -> int:
        return min(env.ts_ms for p in self._pending.values() for _, env in p)

    def next_batch(self, now_ms: int, rng: Rng) -> Batch | None:
        """The next transaction to send, or None (window full, backing off, or nothing due)."""
        if len(self._in_flight) >= self.config.max_in_flight or now_ms < self._next_attempt_ms:
            return None
        if not self._batch_due(now_ms):
            return None
        envelopes: list[Envelope] = []
        total = 0
        for cls in (EnvelopeClass.CONTROL, EnvelopeClass.MESSAGE):
            heap = self._pending[cls]
            while heap and len(envelopes) < self.config.max_batch_envelopes:
                size = self._sizes[heap[0][1].id]
                if envelopes and total + size > self.config.max_batch_bytes:
                    break
                envelopes.append(heapq.heappop(heap)[1])
                total += size
        self._pending_bytes -= total
        txn_id = new_id(rng)
        while txn_id in self._in_flight:
            txn_id = new_id(rng)
        self._in_flight[txn_id] = _InFlight(envelopes, now_ms)
        return Batch(txn_id, envelopes)

    def on_ack(self, txn_id: bytes) -> bool:
        """The destination stored the transaction; False if it is no longer in flight."""
        batch = self._in_flight.pop(txn_id, None)
        if batch is None:
            return False
        for env in batch.envelopes:
            del self._sizes[env.id]
        self._failures = 0
        self._next_attempt_ms = 0
        return True

    def on_failure(self, txn_id: bytes, now_ms: int, rng: Rng) -> bool:
        """The attempt failed (error, timeout, connection lost): requeue and back off."""
        batch = self._in_flight.pop(txn_id, None)
        if batch is None:
            return False
        for env in batch.envelopes:
            self._push(env, self._sizes.pop(env.id))
        # Batches sent before the last failure was seen belong to the same outage:
        # they requeue without growing the backoff exponent.
        if batch.sent_ms > self._last_failure_ms or self._failures == 0:
            self._failures += 1
            self._next_attempt_ms = now_ms + backoff_delay_ms(self._failures, self.config, rng)
        self._last_failure_ms = now_ms
        return True

    # --- observation -----------------------------------------------------------------

    @property
    def next_attempt_ms(self) -> int:
        """No batch is offered before this time (0 when not backing off)."""
        return self._next_attempt_ms

    @property
    def in_flight(self) -> int:
        return len(self._in_flight)

    def next_wakeup_ms(self, now_ms: int) -> int | None:
        """When ``next_batch`` may next return a batch without a new enqueue/ack; None = never."""
        if self._pending_count() == 0 or len(self._in_flight) >= self.config.max_in_flight:
            return None
        due = now_ms if self._batch_due(now_ms) else self._oldest_pending_ms() + self.config.max_wait_ms
        return max(due, self._next_attempt_ms)

    def depth(self) -> int:
        """Envelopes not yet acknowledged (queued or in flight)."""
        return len(self._sizes)

    def oldest_age_ms(self, now_ms: int) -> int:
        """Age of the oldest unacknowledged envelope (0 when empty)."""
        times = [env.ts_ms for p in self._pending.values() for _, env in p]
        times += [env.ts_ms for b in self._in_flight.values() for env in b.envelopes]
        return max(0, now_ms - min(times)) if times else 0

    # --- persistence -------------------------------------------------------------------

    def to_bytes(self) -> bytes:
        unacked = [env for p in self._pending.values() for _, env in p]
        unacked += [env for b in self._in_flight.values() for env in b.envelopes]
        return codec.encode({
            "v": STATE_VERSION,
            "origin": self.origin,
            "destination": self.destination,
            "next_seq": {c.value: n for c, n in self._next_seq.items()},
            "failures": self._failures,
            "next_attempt_ms": self._next_attempt_ms,
            "last_failure_ms": self._last_failure_ms,
            "unacked": [env.to_wire() for env in sorted(unacked, key=lambda e: (e.cls.value, e.seq))],
        }, STATE_LIMITS)

    @classmethod
    def from_bytes(cls, data: bytes, config: OutboundConfig | None = None) -> OutboundQueue:
        """Restore; envelopes that were in flight are queued again (the receiver dedupes)."""
        try:
            obj = require_map(codec.decode(data, STATE_LIMITS), "outbound state")
            version = field(obj, "v", int)
            if version != STATE_VERSION:
                raise UnsupportedVersion(f"outbound state version {version} is not supported")
            queue = cls(field(obj, "origin", str), field(obj, "destination", str), config)
            next_seq = require_map(field(obj, "next_seq", dict), "next_seq")
            for c in EnvelopeClass:
                queue._next_seq[c] = field(next_seq, c.value, int)
            queue._failures = field(obj, "failures", int)
            queue._next_attempt_ms = field(obj, "next_attempt_ms", int)
            queue._last_failure_ms = field(obj, "last_failure_ms", int)
            for raw in field(obj, "unacked", list):
                env = Envelope.from_wire(raw)
                queue._push(env, len(codec.encode(env.to_wire(), _ENVELOPE_LIMITS)))
        except (CodecError, AddressError, ProtocolError) as exc:
            raise CorruptState(f"outbound state does not parse: {exc.message}") from None
        return queue


_ENVELOPE_LIMITS = codec.Limits(max_bytes=1 << 20, max_depth=4, max_items=MAX_RECIPIENTS + 16,
                                max_container=MAX_RECIPIENTS)


def backoff_delay_ms(failures: int, config: OutboundConfig, rng: Rng) -> int:
    """Capped exponential backoff with "equal jitter": uniform in [d/2, d], d = min(cap, base·2^(n-1))."""
    delay = min(config.backoff_cap_ms, config.backoff_base_ms << min(failures - 1, 40))
    half = delay // 2
    jitter = int.from_bytes(rng(8), "big") % (delay - half + 1)
    return half + jitter


def draft(kind: EnvelopeKind, sender: str, recipients: Sequence[str], payload: bytes, expires_ms: int,
          rng: Rng) -> EnvelopeDraft:
    """A draft with a fresh random envelope id."""
    envelope_id = rng(ENVELOPE_ID_LEN)
    address_domain(sender)
    return EnvelopeDraft(envelope_id, kind, sender, tuple(recipients), payload, expires_ms)
