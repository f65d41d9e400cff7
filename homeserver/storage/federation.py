"""Federation storage (DESIGN §5/§7): outbound queues, inbound ordering, remote device lists.

* **Outbound.** The envelope rows and the gap-free numbered queues live in
  federation_outbound.py (``insert_outbound`` is shared with the mailbox write);
  ``FederationRepository`` below queues them as ONE write op each.
* **Inbound.** ``queue_receive`` is the durable form of ``federation.inbound``'s
  ``InboundState.accept``: dedupe by txn id, hold envelopes behind a gap, release
  them in seq order per class (control first), bounded by ``max_held``
  (``HoldBackFull`` changes nothing).  Released rows stay until
  ``queue_processed``, so a crash between release and mailbox delivery loses
  nothing (``released()`` at start); their ids stay in ``fed_seen_envelopes``
  until they expire, a second line of dedupe behind seq.
* **Remote device lists** cache other domains' users' signed lists (a version
  only goes up); **subscriptions** record which remote domains fetched a local
  user's list, so its changes are pushed there.

Every write goes through ``Database.queue`` (group commit); the per-envelope
statements are ``Prepared`` (see db.py).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

from sqlalchemy import (
    Connection,
    bindparam,
    delete,
    false,
    func,
    insert,
    select,
    true,
    update,
)

from federation.addresses import UserAddress
from federation.s2s import Envelope, EnvelopeClass
from homeserver.storage.db import Database, Prepared
from homeserver.storage.federation_outbound import (
    _ENVELOPE_COLUMNS,
    _backoff,
    _envelope,
    _envelope_params,
    _envelope_values,
    _outbound_ack,
    _outbound_pending,
    _outbound_states,
    _outbound_stats,
    check_drafts,
    insert_outbound,
)
from homeserver.storage.models import (
    INBOUND_MAX_HELD,
    INBOUND_TXN_TTL_MS,
    SUBSCRIPTION_TTL_MS,
    Completion,
    DeliverResult,
    DeliveryPlan,
    HoldBackFull,
    OutboundDraft,
    OutboundState,
    ReceiveResult,
    RemoteDeviceList,
)
from homeserver.storage.schema import (
    fed_inbound,
    fed_inbound_seqs,
    fed_inbound_txns,
    fed_remote_device_lists,
    fed_seen_envelopes,
    fed_subscriptions,
)

HELD_PAGE = 512          # held seqs read per query while walking a run of consecutive seqs


# --- inbound --------------------------------------------------------------------------------------

_find_txn = Prepared(select(fed_inbound_txns.c.expires_ms).where(
    fed_inbound_txns.c.origin == bindparam("origin"), fed_inbound_txns.c.txn_id == bindparam("txn_id")))
_insert_txn = Prepared(insert(fed_inbound_txns).values(
    origin=bindparam("origin"), txn_id=bindparam("txn_id"), expires_ms=bindparam("expires_ms")))
_update_txn = Prepared(update(fed_inbound_txns).where(
    fed_inbound_txns.c.origin == bindparam("origin"), fed_inbound_txns.c.txn_id == bindparam("txn_id"))
    .values(expires_ms=bindparam("expires_ms")))
_inbound_seqs = Prepared(select(fed_inbound_seqs.c.cls, fed_inbound_seqs.c.next_seq).where(
    fed_inbound_seqs.c.origin == bindparam("origin")))
_update_inbound_seq = Prepared(update(fed_inbound_seqs).where(
    fed_inbound_seqs.c.origin == bindparam("origin"), fed_inbound_seqs.c.cls == bindparam("cls"))
    .values(next_seq=bindparam("next_seq")))
_insert_inbound_seq = Prepared(insert(fed_inbound_seqs).values(
    origin=bindparam("origin"), cls=bindparam("cls"), next_seq=bindparam("next_seq")))
_held_count = Prepared(select(func.count()).select_from(fed_inbound).where(
    fed_inbound.c.released == bindparam("released"), fed_inbound.c.origin == bindparam("origin")))
_row_at = (fed_inbound.c.origin == bindparam("origin"), fed_inbound.c.cls == bindparam("cls"),
           fed_inbound.c.seq == bindparam("seq"))
_exists_at = Prepared(select(fed_inbound.c.released).where(*_row_at))
_load_at = Prepared(select(*(fed_inbound.c[name] for name in _ENVELOPE_COLUMNS)).where(*_row_at))
_release_at = Prepared(update(fed_inbound).where(*_row_at).values(released=bindparam("released")))
_delete_at = Prepared(delete(fed_inbound).where(*_row_at))
_insert_inbound = Prepared(insert(fed_inbound).values(
    origin=bindparam("origin"), released=bindparam("released"), **_envelope_values(fed_inbound)))
_find_seen = Prepared(select(fed_seen_envelopes.c.expires_ms).where(
    fed_seen_envelopes.c.origin == bindparam("origin"),
    fed_seen_envelopes.c.envelope_id == bindparam("envelope_id")))
_insert_seen = Prepared(insert(fed_seen_envelopes).values(
    origin=bindparam("origin"), envelope_id=bindparam("envelope_id"), expires_ms=bindparam("expires_ms")))
_update_seen = Prepared(update(fed_seen_envelopes).where(
    fed_seen_envelopes.c.origin == bindparam("origin"),
    fed_seen_envelopes.c.envelope_id == bindparam("envelope_id"))
    .values(expires_ms=bindparam("expires_ms")))
_delete_processed = Prepared(delete(fed_inbound).where(
    fed_inbound.c.origin == bindparam("origin"), fed_inbound.c.envelope_id == bindparam("envelope_id"),
    fed_inbound.c.released == bindparam("released")))


def _next_seqs(conn: Connection, origin: str) -> dict[EnvelopeClass, int]:
    stored = {EnvelopeClass(cls): int(n) for cls, n in _inbound_seqs.all(conn, {"origin": origin})}
    return {c: stored.get(c, 1) for c in EnvelopeClass}


def _count_held(conn: Connection, origin: str) -> int:
    row = _held_count.first(conn, {"released": False, "origin": origin})
    return int(row[0]) if row is not None else 0


def _held_from(conn: Connection, origin: str, cls: EnvelopeClass, start: int) -> list[int]:
    return [int(seq) for seq in conn.execute(
        select(fed_inbound.c.seq).where(
            fed_inbound.c.released == false(), fed_inbound.c.origin == origin,
            fed_inbound.c.cls == cls.value, fed_inbound.c.seq >= start)
        .order_by(fed_inbound.c.seq).limit(HELD_PAGE)).scalars()]


def _run_end(conn: Connection, origin: str, cls: EnvelopeClass, start: int, fresh: dict[int, Envelope],
             any_held: bool) -> int:
    """The first seq from ``start`` that is neither new (``fresh``) nor held: the release bound."""
    seq = start
    while seq in fresh:
        seq += 1
    if not any_held:
        return seq
    while True:
        page = _held_from(conn, origin, cls, seq)
        for held in page:            # ascending, disjoint from ``fresh``
            if held != seq:
                return seq
            seq += 1
            while seq in fresh:
                seq += 1
        if len(page) < HELD_PAGE:
            return seq


def _remember_release(conn: Connection, origin: str, env: Envelope, now_ms: int) -> bool:
    """Record ``env``'s id as seen; False if it was already (a duplicate under another seq)."""
    key = {"origin": origin, "envelope_id": env.id}
    seen = _find_seen.first(conn, key)
    if seen is not None and int(seen[0]) > now_ms:
        return False
    (_insert_seen if seen is None else _update_seen).rowcount(conn, {**key, "expires_ms": env.expires_ms})
    return True


DeliverFn = Callable[[Connection, str, str, bytes, list[tuple[list[str], bytes]], int, int], DeliverResult]


def _receive(conn: Connection, origin: str, txn_id: bytes, envelopes: Sequence[Envelope], now_ms: int,
             txn_ttl_ms: int, max_held: int, plans: Mapping[bytes, DeliveryPlan] | None = None,
             deliver: DeliverFn | None = None) -> ReceiveResult:
    txn_key = {"origin": origin, "txn_id": txn_id}
    seen_txn = _find_txn.first(conn, txn_key)
    if seen_txn is not None and int(seen_txn[0]) > now_ms:
        return ReceiveResult(True, (), _count_held(conn, origin))
    next_seq = _next_seqs(conn, origin)
    held_before = _count_held(conn, origin)
    fresh: dict[EnvelopeClass, dict[int, Envelope]] = {c: {} for c in EnvelopeClass}
    for env in envelopes:
        new = fresh[env.cls]
        if env.seq < next_seq[env.cls] or env.seq in new:
            continue
        if held_before and _exists_at.first(conn, {"origin": origin, "cls": env.cls.value,
                                                   "seq": env.seq}) is not None:
            continue
        new[env.seq] = env
    # Plan before writing anything, so a refusal changes nothing (not even the txn id).
    end = {c: _run_end(conn, origin, c, next_seq[c], fresh[c], held_before > 0) for c in EnvelopeClass}
    held_after = held_before + sum(len(new) - (end[c] - next_seq[c]) for c, new in fresh.items())
    if held_after > max_held:
        raise HoldBackFull("too many envelopes held back behind a gap; retry later")
    (_insert_txn if seen_txn is None else _update_txn).rowcount(
        conn, {**txn_key, "expires_ms": now_ms + txn_ttl_ms})
    released: list[Envelope] = []
    delivered: list[tuple[Envelope, DeliverResult]] = []
    # Storing in this write keeps the order only if nothing released earlier is still
    # waiting to be processed, and only up to the first release without a plan.
    in_op = bool(plans) and deliver is not None and \
        int((_held_count.first(conn, {"released": True, "origin": origin}) or (0,))[0]) == 0
    for cls in EnvelopeClass:
        new = fresh[cls]
        in_order = in_op
        for seq in range(next_seq[cls], end[cls]):
            at = {"origin": origin, "cls": cls.value, "seq": seq}
            arrived = new.pop(seq, None)
            env = arrived if arrived is not None else _envelope(*_load(conn, at))
            if env.expires_ms <= now_ms or not _remember_release(conn, origin, env, now_ms):
                if arrived is None:
                    _delete_at.rowcount(conn, at)
                continue
            plan = plans.get(env.id) if in_order and plans and arrived is not None else None
            in_order = plan is not None
            if plan is not None and deliver is not None:     # in_order implies deliver
                # Released in the write that received it: straight into the mailboxes, so the
                # message is durable and deliverable after one commit, not two.
                delivered.append((env, deliver(conn, plan.sender, plan.message_id, plan.digest, plan.payloads,
                                               now_ms, plan.ttl_ms)))
                continue
            if arrived is None:
                _release_at.rowcount(conn, {**at, "released": True})
            else:
                _insert_inbound.rowcount(conn, {"origin": origin, "released": True,
                                                **_envelope_params(env)})
            released.append(env)
        for env in new.values():             # beyond the gap: held
            _insert_inbound.rowcount(conn, {"origin": origin, "released": False, **_envelope_params(env)})
        if end[cls] != next_seq[cls]:
            params = {"origin": origin, "cls": cls.value, "next_seq": end[cls]}
            if not _update_inbound_seq.rowcount(conn, params):
                _insert_inbound_seq.rowcount(conn, params)
    return ReceiveResult(False, tuple(released), held_after, tuple(delivered))


def _load(conn: Connection, at: dict[str, Any]) -> tuple[Any, ...]:
    row = _load_at.first(conn, at)
    if row is None:
        raise RuntimeError("a held envelope vanished inside its own transaction")
    return row


def _released(conn: Connection) -> list[tuple[str, Envelope]]:
    rows = conn.execute(
        select(fed_inbound.c.origin, *(fed_inbound.c[name] for name in _ENVELOPE_COLUMNS))
        .where(fed_inbound.c.released == true())
        .order_by(fed_inbound.c.origin, fed_inbound.c.cls, fed_inbound.c.seq))
    return [(row[0], _envelope(*row[1:])) for row in rows]


def _processed(conn: Connection, origin: str, envelope_ids: Iterable[bytes]) -> int:
    return sum(_delete_processed.rowcount(conn, {"origin": origin, "envelope_id": i, "released": True})
               for i in sorted(set(envelope_ids)))


# --- remote device lists, subscriptions, housekeeping -----------------------------------------------


def _put_remote_list(conn: Connection, entry: RemoteDeviceList, domain: str) -> bool:
    stored = conn.execute(select(fed_remote_device_lists.c.version).where(
        fed_remote_device_lists.c.user == entry.user)).scalar()
    values = {"version": entry.version, "body": entry.body, "sig": entry.sig,
              "fetched_ms": entry.fetched_ms, "master_key": entry.master_key}
    if stored is None:
        conn.execute(insert(fed_remote_device_lists).values(user=entry.user, domain=domain, **values))
        return True
    if entry.version <= int(stored):
        return False
    conn.execute(update(fed_remote_device_lists).where(
        fed_remote_device_lists.c.user == entry.user).values(**values))
    return True


def _remote_list(row: Any) -> RemoteDeviceList:
    return RemoteDeviceList(row.user, int(row.version), bytes(row.body), bytes(row.sig),
                            int(row.fetched_ms), bytes(row.master_key))


_remote_columns = (fed_remote_device_lists.c.user, fed_remote_device_lists.c.version,
                   fed_remote_device_lists.c.body, fed_remote_device_lists.c.sig,
                   fed_remote_device_lists.c.fetched_ms, fed_remote_device_lists.c.master_key)


def _subscribe(conn: Connection, user: str, domain: str, now_ms: int) -> None:
    changed = conn.execute(update(fed_subscriptions).where(
        fed_subscriptions.c.user == user, fed_subscriptions.c.domain == domain)
        .values(last_seen_ms=now_ms)).rowcount
    if not changed:
        conn.execute(insert(fed_subscriptions).values(user=user, domain=domain, last_seen_ms=now_ms))


def _subscriptions(conn: Connection) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for domain, user in conn.execute(
            select(fed_subscriptions.c.domain, fed_subscriptions.c.user)
            .order_by(fed_subscriptions.c.domain, fed_subscriptions.c.user)):
        out.setdefault(domain, []).append(user)
    return out


def _expire(conn: Connection, now_ms: int, subscription_ttl_ms: int) -> dict[str, int]:
    return {
        "txn_ids": conn.execute(
            delete(fed_inbound_txns).where(fed_inbound_txns.c.expires_ms <= now_ms)).rowcount,
        "envelope_ids": conn.execute(
            delete(fed_seen_envelopes).where(fed_seen_envelopes.c.expires_ms <= now_ms)).rowcount,
        "subscriptions": conn.execute(delete(fed_subscriptions).where(
            fed_subscriptions.c.last_seen_ms <= now_ms - subscription_ttl_ms)).rowcount,
    }


def user_domain(user: str) -> str:
    """The domain of a user address (``AddressError`` if it is none)."""
    return UserAddress.parse(user).domain


class FederationRepository:
    """``FederationStore`` over SQL; every write is one queued op (group commit)."""

    def __init__(self, db: Database, deliver: DeliverFn | None = None) -> None:
        self._db = db
        self._deliver = deliver          # the mailbox write, for plans applied inside queue_receive

    # --- outbound ---

    async def queue_outbound(self, drafts: Sequence[OutboundDraft], now_ms: int,
                             on_commit: Callable[[list[Envelope]], None] | None = None
                             ) -> Completion[list[Envelope]]:
        """Number and queue ``drafts`` in ONE write op; envelopes come back in draft order.

        Raises ``ValueError`` for an invalid draft (at once) or an envelope id
        already queued for its destination (from ``result()``); either way nothing changed.
        """
        items = list(drafts)
        check_drafts(items, now_ms)
        return await self._db.queue(lambda conn: insert_outbound(conn, items, now_ms), on_commit)

    async def outbound_states(self) -> list[OutboundState]:
        """Every destination that ever queued (or backed off), by name."""
        return await self._db.read(_outbound_states)

    async def outbound_pending(self, destination: str) -> list[Envelope]:
        """Unacknowledged envelopes of ``destination``, control first, seq order."""
        return await self._db.read(lambda conn: _outbound_pending(conn, destination))

    async def queue_outbound_ack(self, destination: str,
                                 envelope_ids: Sequence[bytes]) -> Completion[int]:
        """Delete acknowledged envelopes; the completion says how many were queued."""
        ids = list(envelope_ids)
        return await self._db.queue(lambda conn: _outbound_ack(conn, destination, ids))

    async def queue_backoff(self, destination: str, failures: int, next_attempt_ms: int,
                            last_failure_ms: int) -> Completion[None]:
        """Persist a destination's backoff, so a restart does not hammer a dead peer."""
        return await self._db.queue(lambda conn: _backoff(conn, destination, failures,
                                                          next_attempt_ms, last_failure_ms))

    async def outbound_stats(self, now_ms: int) -> dict[str, tuple[int, int]]:
        """destination -> (depth, age of the oldest entry in ms), for metrics; empty ones omitted."""
        return await self._db.read(lambda conn: _outbound_stats(conn, now_ms))

    # --- inbound ---

    async def queue_receive(self, origin: str, txn_id: bytes, envelopes: Sequence[Envelope],
                            now_ms: int, txn_ttl_ms: int = INBOUND_TXN_TTL_MS,
                            max_held: int = INBOUND_MAX_HELD, plans: Mapping[bytes, DeliveryPlan] | None = None,
                            on_commit: Callable[[ReceiveResult], None] | None = None
                            ) -> Completion[ReceiveResult]:
        """Store a verified transaction of ``origin`` in ONE write op; see the module docstring.

        ``plans`` (by envelope id): envelopes of THIS transaction released by this write are
        stored in mailboxes in the same write and reported in ``delivered``, not
        ``released``. ``result()`` raises ``HoldBackFull`` (nothing changed, the txn id
        not remembered) when more than ``max_held`` envelopes would wait behind a gap.
        """
        items = list(envelopes)
        deliver = self._deliver
        return await self._db.queue(
            lambda conn: _receive(conn, origin, txn_id, items, now_ms, txn_ttl_ms, max_held, plans, deliver),
            on_commit)

    async def released(self) -> list[tuple[str, Envelope]]:
        """Released but unprocessed envelopes (restart recovery), by origin, class, seq."""
        return await self._db.read(_released)

    async def queue_processed(self, origin: str, envelope_ids: Sequence[bytes]) -> Completion[int]:
        """Drop released rows now delivered (their ids stay seen until they expire)."""
        ids = list(envelope_ids)
        return await self._db.queue(lambda conn: _processed(conn, origin, ids))

    async def inbound_next_seq(self, origin: str) -> dict[EnvelopeClass, int]:
        return await self._db.read(lambda conn: _next_seqs(conn, origin))

    # --- remote device lists ---

    async def put_remote_device_list(self, entry: RemoteDeviceList) -> bool:
        """Store ``entry`` unless a version at least as high is stored; whether it changed."""
        domain = user_domain(entry.user)
        return await self._db.write(lambda conn: _put_remote_list(conn, entry, domain))

    async def get_remote_device_list(self, user: str) -> RemoteDeviceList | None:
        def read(conn: Connection) -> RemoteDeviceList | None:
            row = conn.execute(select(*_remote_columns).where(
                fed_remote_device_lists.c.user == user)).first()
            return None if row is None else _remote_list(row)
        return await self._db.read(read)

    async def remote_device_lists(self, domain: str) -> list[RemoteDeviceList]:
        """Every cached list of ``domain``'s users, by user (for digest comparison)."""
        return await self._db.read(lambda conn: [_remote_list(row) for row in conn.execute(
            select(*_remote_columns).where(fed_remote_device_lists.c.domain == domain)
            .order_by(fed_remote_device_lists.c.user))])

    # --- subscriptions ---

    async def subscribe(self, user: str, domain: str, now_ms: int) -> None:
        """``domain`` fetched ``user``'s list: push its changes there (idempotent, refreshes)."""
        await self._db.write(lambda conn: _subscribe(conn, user, domain, now_ms))

    async def subscribers(self, user: str) -> list[str]:
        return await self._db.read(lambda conn: list(conn.execute(
            select(fed_subscriptions.c.domain).where(fed_subscriptions.c.user == user)
            .order_by(fed_subscriptions.c.domain)).scalars()))

    async def subscriptions(self) -> dict[str, list[str]]:
        """domain -> subscribed local users, both sorted."""
        return await self._db.read(_subscriptions)

    # --- housekeeping ---

    async def expire(self, now_ms: int,
                     subscription_ttl_ms: int = SUBSCRIPTION_TTL_MS) -> dict[str, int]:
        """Drop txn ids and seen envelope ids past their TTL and stale subscriptions.

        Outbound rows are never expired: the queue must stay gap-free.
        """
        return await self._db.write(lambda conn: _expire(conn, now_ms, subscription_ttl_ms))
