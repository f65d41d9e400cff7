"""The in-memory ``FederationStore``: outbound queues, inbound ordering, remote lists in dicts.

Part of the in-memory storage (memory.py, which composes it into ``MemoryStorage``
and hands it the mailbox write for plans applied inside ``queue_receive``).  Same
rules as there: every method does its whole job synchronously after one
checkpoint, and a method that raises has changed nothing.  The shared contract
suite (tests/storage/test_federation_store.py) runs it against ``FederationRepository``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import trio

from federation.s2s import Envelope, EnvelopeClass
from homeserver.storage.federation import user_domain
from homeserver.storage.federation_outbound import check_drafts, outbound_envelope
from homeserver.storage.models import (
    INBOUND_MAX_HELD,
    INBOUND_TXN_TTL_MS,
    SUBSCRIPTION_TTL_MS,
    Completion,
    DeliverResult,
    DeliveryPlan,
    Done,
    HoldBackFull,
    OutboundDraft,
    OutboundState,
    ReceiveResult,
    RemoteDeviceList,
)


_Held = dict[tuple[EnvelopeClass, int], tuple[bool, Envelope]]    # (cls, seq) -> (released, env)


class MemoryFederation:
    """``FederationStore`` in dicts, with ``FederationRepository``'s semantics and errors."""

    def __init__(self) -> None:
        self._outbound: dict[str, dict[tuple[EnvelopeClass, int], Envelope]] = {}
        self._out_seq: dict[tuple[str, EnvelopeClass], int] = {}
        self._destinations: dict[str, tuple[int, int, int]] = {}
        self._in_seq: dict[tuple[str, EnvelopeClass], int] = {}
        self._inbound: dict[str, _Held] = {}
        self._txns: dict[tuple[str, bytes], int] = {}           # -> expires_ms
        self._seen: dict[tuple[str, bytes], int] = {}           # -> expires_ms
        self._lists: dict[str, RemoteDeviceList] = {}
        self._subs: dict[tuple[str, str], int] = {}             # (user, domain) -> last_seen_ms
        # the mailbox write, for plans applied inside queue_receive (set by MemoryStorage)
        self.deliver: Callable[..., DeliverResult] | None = None

    # --- outbound ---

    def check_not_queued(self, drafts: Sequence[OutboundDraft]) -> None:
        for item in drafts:
            queue = self._outbound.get(item.destination, {})
            if any(env.id == item.draft.id for env in queue.values()):
                raise ValueError("envelope id already queued for this destination")

    def insert_outbound(self, drafts: Sequence[OutboundDraft], now_ms: int) -> list[Envelope]:
        """Number and queue checked drafts (``check_drafts`` and ``check_not_queued``)."""
        out = []
        for item in drafts:
            key = (item.destination, EnvelopeClass(item.cls))
            if key not in self._out_seq:
                self._destinations.setdefault(item.destination, (0, 0, -1))
            seq = self._out_seq.get(key, 1)
            self._out_seq[key] = seq + 1
            env = outbound_envelope(item, seq, now_ms)
            self._outbound.setdefault(item.destination, {})[(env.cls, seq)] = env
            out.append(env)
        return out

    async def queue_outbound(self, drafts: Sequence[OutboundDraft], now_ms: int,
                             on_commit: Callable[[list[Envelope]], None] | None = None
                             ) -> Completion[list[Envelope]]:
        items = list(drafts)
        check_drafts(items, now_ms)
        await trio.lowlevel.checkpoint()
        self.check_not_queued(items)
        out = self.insert_outbound(items, now_ms)
        if on_commit is not None:
            on_commit(out)
        return Done(out)

    async def outbound_states(self) -> list[OutboundState]:
        await trio.lowlevel.checkpoint()
        return [OutboundState(dest, {c: self._out_seq.get((dest, c), 1) for c in EnvelopeClass}, *backoff)
                for dest, backoff in sorted(self._destinations.items())]

    async def outbound_pending(self, destination: str) -> list[Envelope]:
        await trio.lowlevel.checkpoint()
        queue = self._outbound.get(destination, {})
        return [queue[key] for key in sorted(queue)]

    async def queue_outbound_ack(self, destination: str,
                                 envelope_ids: Sequence[bytes]) -> Completion[int]:
        await trio.lowlevel.checkpoint()
        ids = set(envelope_ids)
        queue = self._outbound.get(destination, {})
        gone = [key for key, env in queue.items() if env.id in ids]
        for key in gone:
            del queue[key]
        if not queue:
            self._outbound.pop(destination, None)
        return Done(len(gone))

    async def queue_backoff(self, destination: str, failures: int, next_attempt_ms: int,
                            last_failure_ms: int) -> Completion[None]:
        await trio.lowlevel.checkpoint()
        self._destinations[destination] = (failures, next_attempt_ms, last_failure_ms)
        return Done(None)

    async def outbound_stats(self, now_ms: int) -> dict[str, tuple[int, int]]:
        await trio.lowlevel.checkpoint()
        return {dest: (len(queue), max(0, now_ms - min(e.ts_ms for e in queue.values())))
                for dest, queue in sorted(self._outbound.items()) if queue}

    # --- inbound ---

    def _held_count(self, origin: str) -> int:
        return sum(not released for released, _ in self._inbound.get(origin, {}).values())

    def _next_seqs(self, origin: str) -> dict[EnvelopeClass, int]:
        return {c: self._in_seq.get((origin, c), 1) for c in EnvelopeClass}

    async def queue_receive(self, origin: str, txn_id: bytes, envelopes: Sequence[Envelope],
                            now_ms: int, txn_ttl_ms: int = INBOUND_TXN_TTL_MS,
                            max_held: int = INBOUND_MAX_HELD, plans: Mapping[bytes, DeliveryPlan] | None = None,
                            on_commit: Callable[[ReceiveResult], None] | None = None
                            ) -> Completion[ReceiveResult]:
        await trio.lowlevel.checkpoint()
        rows = self._inbound.get(origin, {})
        if self._txns.get((origin, txn_id), now_ms) > now_ms:
            return Done(ReceiveResult(True, (), self._held_count(origin)))
        next_seq = self._next_seqs(origin)
        fresh: dict[EnvelopeClass, dict[int, Envelope]] = {c: {} for c in EnvelopeClass}
        for env in envelopes:
            if env.seq < next_seq[env.cls] or env.seq in fresh[env.cls] or (env.cls, env.seq) in rows:
                continue
            fresh[env.cls][env.seq] = env
        end = {}
        for cls in EnvelopeClass:
            seq = next_seq[cls]
            while seq in fresh[cls] or (cls, seq) in rows:
                seq += 1
            end[cls] = seq
        held_after = (self._held_count(origin)
                      + sum(len(new) - (end[c] - next_seq[c]) for c, new in fresh.items()))
        if held_after > max_held:
            raise HoldBackFull("too many envelopes held back behind a gap; retry later")
        self._txns[(origin, txn_id)] = now_ms + txn_ttl_ms
        rows = self._inbound.setdefault(origin, {})
        released: list[Envelope] = []
        delivered: list[tuple[Envelope, DeliverResult]] = []
        in_op = bool(plans) and self.deliver is not None and not any(r for r, _ in rows.values())
        for cls in EnvelopeClass:
            new = fresh[cls]
            in_order = in_op
            for seq in range(next_seq[cls], end[cls]):
                arrived = new.pop(seq, None)
                env = arrived if arrived is not None else rows.pop((cls, seq))[1]
                if env.expires_ms <= now_ms or self._seen.get((origin, env.id), now_ms) > now_ms:
                    continue
                self._seen[(origin, env.id)] = env.expires_ms
                plan = plans.get(env.id) if in_order and plans and arrived is not None else None
                in_order = plan is not None
                if plan is not None and self.deliver is not None:     # in_order implies deliver
                    delivered.append((env, self.deliver(plan.sender, plan.message_id, plan.digest, plan.payloads,
                                                        now_ms, plan.ttl_ms)))
                    continue
                rows[(cls, seq)] = (True, env)
                released.append(env)
            for env in new.values():
                rows[(cls, env.seq)] = (False, env)
            if end[cls] != next_seq[cls]:
                self._in_seq[(origin, cls)] = end[cls]
        if not rows:
            del self._inbound[origin]
        result = ReceiveResult(False, tuple(released), held_after, tuple(delivered))
        if on_commit is not None:
            on_commit(result)
        return Done(result)

    async def released(self) -> list[tuple[str, Envelope]]:
        await trio.lowlevel.checkpoint()
        return [(origin, env) for origin in sorted(self._inbound)
                for key, (released, env) in sorted(self._inbound[origin].items()) if released]

    async def queue_processed(self, origin: str, envelope_ids: Sequence[bytes]) -> Completion[int]:
        await trio.lowlevel.checkpoint()
        ids = set(envelope_ids)
        rows = self._inbound.get(origin, {})
        gone = [key for key, (released, env) in rows.items() if released and env.id in ids]
        for key in gone:
            del rows[key]
        if not rows:
            self._inbound.pop(origin, None)
        return Done(len(gone))

    async def inbound_next_seq(self, origin: str) -> dict[EnvelopeClass, int]:
        await trio.lowlevel.checkpoint()
        return self._next_seqs(origin)

    # --- remote device lists ---

    async def put_remote_device_list(self, entry: RemoteDeviceList) -> bool:
        user_domain(entry.user)
        await trio.lowlevel.checkpoint()
        stored = self._lists.get(entry.user)
        if stored is not None and entry.version <= stored.version:
            return False
        self._lists[entry.user] = entry
        return True

    async def get_remote_device_list(self, user: str) -> RemoteDeviceList | None:
        await trio.lowlevel.checkpoint()
        return self._lists.get(user)

    async def remote_device_lists(self, domain: str) -> list[RemoteDeviceList]:
        await trio.lowlevel.checkpoint()
        return [self._lists[u] for u in sorted(self._lists) if user_domain(u) == domain]

    # --- subscriptions ---

    async def subscribe(self, user: str, domain: str, now_ms: int) -> None:
        await trio.lowlevel.checkpoint()
        self._subs[(user, domain)] = now_ms

    async def subscribers(self, user: str) -> list[str]:
        await trio.lowlevel.checkpoint()
        return sorted(d for u, d in self._subs if u == user)

    async def subscriptions(self) -> dict[str, list[str]]:
        await trio.lowlevel.checkpoint()
        out: dict[str, list[str]] = {}
        for user, domain in sorted(self._subs, key=lambda k: (k[1], k[0])):
            out.setdefault(domain, []).append(user)
        return out

    # --- housekeeping ---

    async def expire(self, now_ms: int,
                     subscription_ttl_ms: int = SUBSCRIPTION_TTL_MS) -> dict[str, int]:
        await trio.lowlevel.checkpoint()
        before = len(self._txns), len(self._seen), len(self._subs)
        self._txns = {k: ms for k, ms in self._txns.items() if ms > now_ms}
        self._seen = {k: ms for k, ms in self._seen.items() if ms > now_ms}
        self._subs = {k: ms for k, ms in self._subs.items() if ms > now_ms - subscription_ttl_ms}
        return {"txn_ids": before[0] - len(self._txns), "envelope_ids": before[1] - len(self._seen),
                "subscriptions": before[2] - len(self._subs)}
