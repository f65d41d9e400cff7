"""Federation storage, outbound side (DESIGN §5/§7): the envelope rows and the outbound queues.

``queue_outbound`` numbers envelopes inside ONE write op: per (destination, class)
it bumps ``fed_outbound_seqs`` and inserts the rows, so a failed op (or batch)
leaves counters and rows untouched and the sequence can never have a gap.  Rows
leave only on the destination's ack; they are never expired (the receiver drops
expired envelopes but still advances its seq).  ``insert_outbound`` is the same
step for other ops (a local delivery queues its remote copies in the same
transaction: ``MailboxRepository.queue_deliver``).

Envelopes are stored field by field and rebuilt on read (``_envelope``, shared
with the inbound rows of federation.py); ``recipients`` is a canonical msgpack list.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Sequence
from typing import Any

from sqlalchemy import Connection, bindparam, delete, func, insert, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.types import BigInteger

from federation import codec
from federation.addresses import parse_domain
from federation.errors import AddressError, ProtocolError
from federation.s2s import (
    MAX_RECIPIENTS,
    Envelope,
    EnvelopeClass,
    EnvelopeKind,
    address_domain,
)
from homeserver.storage.db import Prepared
from homeserver.storage.models import OutboundDraft, OutboundState
from homeserver.storage.schema import fed_destinations, fed_outbound, fed_outbound_seqs

RECIPIENT_LIMITS = codec.Limits(max_bytes=1 << 23, max_depth=1, max_items=MAX_RECIPIENTS,
                                max_container=MAX_RECIPIENTS)


# --- envelopes <-> rows ---------------------------------------------------------------------------


def outbound_envelope(item: OutboundDraft, seq: int, now_ms: int) -> Envelope:
    """The envelope ``item`` becomes once numbered ``seq`` at ``now_ms``."""
    d = item.draft
    return Envelope(d.id, EnvelopeKind(d.kind), EnvelopeClass(item.cls), seq, d.sender,
                    tuple(d.recipients), d.payload, now_ms, d.expires_ms)


def check_drafts(drafts: Sequence[OutboundDraft], now_ms: int) -> None:
    """Refuse (``ValueError``) a draft that no receiver would accept.

    A queued envelope is never dropped, so one malformed envelope would block its
    destination for good: check it before it is queued.  (The sender's domain is
    the service's to check: storage does not know our own domain.)
    """
    keys: set[tuple[str, bytes]] = set()
    for item in drafts:
        try:
            parse_domain(item.destination)
            env = outbound_envelope(item, 1, now_ms)
            Envelope.from_wire(env.to_wire())
            if any(address_domain(r) != item.destination for r in env.recipients):
                raise ValueError("outbound envelope names a recipient outside its destination")
        except (ProtocolError, AddressError) as exc:
            raise ValueError(f"invalid outbound envelope: {exc.message}") from None
        key = (item.destination, item.draft.id)
        if key in keys:
            raise ValueError("envelope id repeated for one destination")
        keys.add(key)


def encode_recipients(recipients: Sequence[str]) -> bytes:
    return codec.encode(list(recipients), RECIPIENT_LIMITS)


def _envelope(envelope_id: Any, kind: str, cls: str, seq: Any, sender: str, recipients: Any,
              payload: Any, ts_ms: Any, expires_ms: Any) -> Envelope:
    return Envelope(bytes(envelope_id), EnvelopeKind(kind), EnvelopeClass(cls), int(seq), sender,
                    tuple(codec.decode(bytes(recipients), RECIPIENT_LIMITS)), bytes(payload),
                    int(ts_ms), int(expires_ms))


def _envelope_params(env: Envelope) -> dict[str, Any]:
    return {"envelope_id": env.id, "kind": env.kind.value, "cls": env.cls.value, "seq": env.seq,
            "sender": env.sender, "recipients": encode_recipients(env.recipients),
            "payload": env.payload, "ts_ms": env.ts_ms, "expires_ms": env.expires_ms}


def _is_integrity_error(conn: Connection, exc: Exception) -> bool:
    # Prepared statements run on the driver cursor, so the driver's own error surfaces.
    return isinstance(exc, (IntegrityError, conn.dialect.loaded_dbapi.IntegrityError))


_ENVELOPE_COLUMNS = ("envelope_id", "kind", "cls", "seq", "sender", "recipients", "payload",
                     "ts_ms", "expires_ms")


def _envelope_values(table: Any) -> dict[str, Any]:
    return {name: bindparam(name, type_=table.c[name].type) for name in _ENVELOPE_COLUMNS}


# --- outbound -------------------------------------------------------------------------------------

_bump_outbound_seq = Prepared(
    update(fed_outbound_seqs)
    .where(fed_outbound_seqs.c.destination == bindparam("destination"),
           fed_outbound_seqs.c.cls == bindparam("cls"))
    .values(next_seq=fed_outbound_seqs.c.next_seq + bindparam("n", type_=BigInteger))
    .returning(fed_outbound_seqs.c.next_seq))
_insert_outbound_seq = Prepared(insert(fed_outbound_seqs).values(
    destination=bindparam("destination"), cls=bindparam("cls"), next_seq=bindparam("next_seq")))
_insert_outbound = Prepared(insert(fed_outbound).values(
    destination=bindparam("destination"), **_envelope_values(fed_outbound)))
_delete_outbound = Prepared(delete(fed_outbound).where(
    fed_outbound.c.destination == bindparam("destination"),
    fed_outbound.c.envelope_id == bindparam("envelope_id")))


def _ensure_destination(conn: Connection, destination: str) -> None:
    known = conn.execute(select(fed_destinations.c.destination).where(
        fed_destinations.c.destination == destination)).first()
    if known is None:
        conn.execute(insert(fed_destinations).values(destination=destination, failures=0,
                                                     next_attempt_ms=0, last_failure_ms=-1))


def _reserve_seqs(conn: Connection, destination: str, cls: EnvelopeClass, n: int) -> int:
    """Take ``n`` consecutive seqs of (destination, class); returns the first."""
    row = _bump_outbound_seq.first(conn, {"destination": destination, "cls": cls.value, "n": n})
    if row is not None:
        return int(row[0]) - n
    _ensure_destination(conn, destination)
    _insert_outbound_seq.rowcount(conn, {"destination": destination, "cls": cls.value,
                                         "next_seq": 1 + n})
    return 1


def insert_outbound(conn: Connection, drafts: Sequence[OutboundDraft], now_ms: int) -> list[Envelope]:
    """Number and insert ``drafts`` (already passed ``check_drafts``) on ``conn``.

    Runs inside the caller's write op, so the seqs and rows commit or vanish
    together.  Raises ``ValueError`` if an envelope id is already queued for its
    destination (the op's savepoint then rolls back every change, counters too).
    """
    counts: dict[tuple[str, EnvelopeClass], int] = defaultdict(int)
    for item in drafts:
        counts[(item.destination, EnvelopeClass(item.cls))] += 1
    next_seq = {key: _reserve_seqs(conn, key[0], key[1], n) for key, n in counts.items()}
    out: list[Envelope] = []
    for item in drafts:
        key = (item.destination, EnvelopeClass(item.cls))
        env = outbound_envelope(item, next_seq[key], now_ms)
        next_seq[key] += 1
        try:
            _insert_outbound.rowcount(conn, {"destination": item.destination, **_envelope_params(env)})
        except Exception as exc:
            if _is_integrity_error(conn, exc):
                raise ValueError("envelope id already queued for this destination") from None
            raise
        out.append(env)
    return out


def _outbound_states(conn: Connection) -> list[OutboundState]:
    seqs: dict[str, dict[EnvelopeClass, int]] = defaultdict(dict)
    for row in conn.execute(select(fed_outbound_seqs)):
        seqs[row.destination][EnvelopeClass(row.cls)] = int(row.next_seq)
    rows = conn.execute(select(fed_destinations).order_by(fed_destinations.c.destination))
    return [OutboundState(r.destination, {c: seqs[r.destination].get(c, 1) for c in EnvelopeClass},
                          int(r.failures), int(r.next_attempt_ms), int(r.last_failure_ms))
            for r in rows]


def _outbound_pending(conn: Connection, destination: str) -> list[Envelope]:
    rows = conn.execute(
        select(*(fed_outbound.c[name] for name in _ENVELOPE_COLUMNS))
        .where(fed_outbound.c.destination == destination)
        .order_by(fed_outbound.c.cls, fed_outbound.c.seq))
    return [_envelope(*row) for row in rows]


def _outbound_ack(conn: Connection, destination: str, envelope_ids: Iterable[bytes]) -> int:
    return sum(_delete_outbound.rowcount(conn, {"destination": destination, "envelope_id": i})
               for i in sorted(set(envelope_ids)))


def _backoff(conn: Connection, destination: str, failures: int, next_attempt_ms: int,
             last_failure_ms: int) -> None:
    values = {"failures": failures, "next_attempt_ms": next_attempt_ms,
              "last_failure_ms": last_failure_ms}
    changed = conn.execute(update(fed_destinations).where(
        fed_destinations.c.destination == destination).values(**values)).rowcount
    if not changed:
        conn.execute(insert(fed_destinations).values(destination=destination, **values))


def _outbound_stats(conn: Connection, now_ms: int) -> dict[str, tuple[int, int]]:
    rows = conn.execute(
        select(fed_outbound.c.destination, func.count(), func.min(fed_outbound.c.ts_ms))
        .group_by(fed_outbound.c.destination).order_by(fed_outbound.c.destination))
    return {dest: (int(depth), max(0, now_ms - int(oldest))) for dest, depth, oldest in rows}
