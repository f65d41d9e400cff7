"""Federation outbound (DESIGN §5): ``OutboundSender`` keeps one ``OutboundQueue`` per
destination, fed by storage (envelopes are numbered inside the database write that stores
them, so nothing acknowledged to a client is lost and no seq gap can appear), a window of
signed transactions in flight, backoff kept in storage, control before messages.
It also sends the signed delivery reports that tell a sender its device view was stale.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable
from typing import Any

import trio

from federation import codec, s2s, signing
from federation.errors import ErrorCode, SecureChatError
from federation.links import LinkPool
from federation.outbound import OutboundConfig, OutboundQueue, draft
from federation.s2s import Envelope, EnvelopeClass, EnvelopeKind
from federation.signing import Purpose
from homeserver.clock import Clock
from homeserver.config import Config
from homeserver.handlers.federation_common import Rng, server_address
from homeserver.server_keys import ServerKey, current_key
from homeserver.storage.models import FederationStore, OutboundDraft

log = logging.getLogger("securechat.federation")

DELIVERY_REPORT_TTL_MS = 7 * 86_400_000


class OutboundSender:
    """Sends every destination's queue as signed transactions, a window at a time."""

    def __init__(self, config: Config, store: FederationStore, links: LinkPool, server_keys: list[ServerKey],
                 clock: Clock, rng: Rng = os.urandom) -> None:
        fed = config.federation
        self.domain = config.domain
        self.store = store
        self.links = links
        self.server_keys = server_keys
        self.clock = clock
        self.rng = rng
        self.queue_config = OutboundConfig(max_batch_envelopes=fed.max_batch_envelopes, max_wait_ms=fed.batch_wait_ms,
                                           max_in_flight=fed.max_in_flight, backoff_base_ms=fed.backoff_base_ms,
                                           backoff_cap_ms=fed.backoff_cap_ms)
        self.queues: dict[str, OutboundQueue] = {}
        self._wakeups: dict[str, trio.Event] = {}
        self._nursery: trio.Nursery | None = None
        self.sent_transactions = 0
        self.failed_transactions = 0

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Restore every queue from storage, then run one worker per destination."""
        async with trio.open_nursery() as nursery:
            for state in await self.store.outbound_states():
                pending = await self.store.outbound_pending(state.destination)
                self.queues[state.destination] = OutboundQueue.restore(
                    self.domain, state.destination, next_seq=dict(state.next_seq), failures=state.failures,
                    next_attempt_ms=state.next_attempt_ms, last_failure_ms=state.last_failure_ms,
                    envelopes=pending, config=self.queue_config)
            self._nursery = nursery
            for destination in self.queues:
                self._start_worker(destination)
            task_status.started()
            await trio.sleep_forever()

    def on_committed(self, envelopes: Iterable[Envelope]) -> None:
        """Storage committed these numbered envelopes (called in commit order): send them."""
        for env in envelopes:
            destination = s2s.address_domain(env.recipients[0])
            queue = self.queues.get(destination)
            if queue is None:
                queue = self.queues[destination] = OutboundQueue(self.domain, destination, self.queue_config)
                self._start_worker(destination)
            queue.add(env)
            self._wake(destination)

    async def enqueue(self, drafts: list[OutboundDraft]) -> None:
        """Durably queue server-originated envelopes (control traffic, reports)."""
        if drafts:
            completion = await self.store.queue_outbound(drafts, self.clock(), on_commit=self.on_committed)
            await completion.result()

    async def report_delivery(self, origin: str, env: Envelope, message_id: str,
                              stale: dict[str, dict[str, list[str]]]) -> None:
        """Send a signed ``delivery_report`` back to the sending device (DESIGN §5)."""
        now = self.clock()
        key = current_key(self.server_keys, now)
        fields = {"reporter": self.domain, "sender": env.sender, "message_id": message_id, "ts_ms": now,
                  "users": stale}
        body = signing.signing_input(Purpose.DELIVERY_REPORT, fields)
        report = codec.encode({"body": body, "key_id": key.key_id,
                               "sig": signing.sign(key.private_key, Purpose.DELIVERY_REPORT, fields)})
        await self.enqueue([OutboundDraft(origin, EnvelopeClass.CONTROL, draft(
            EnvelopeKind.DELIVERY_REPORT, server_address(self.domain), [env.sender], report,
            now + DELIVERY_REPORT_TTL_MS, self.rng))])

    def stats(self) -> dict[str, dict[str, int]]:
        now = self.clock()
        return {dest: {"depth": q.depth(), "oldest_age_ms": q.oldest_age_ms(now), "in_flight": q.in_flight,
                       "failures": q.backoff_state[0], "next_attempt_ms": q.next_attempt_ms}
                for dest, q in sorted(self.queues.items())}

    def _wake(self, destination: str) -> None:
        event = self._wakeups.get(destination)
        if event is not None:
            event.set()

    def _start_worker(self, destination: str) -> None:
        if self._nursery is not None and destination not in self._wakeups:
            self._wakeups[destination] = trio.Event()
            self._nursery.start_soon(self._worker, destination, self._nursery)

    async def _worker(self, destination: str, nursery: trio.Nursery) -> None:
        queue = self.queues[destination]
        while True:
            now = self.clock()
            batch = queue.next_batch(now, self.rng)
            if batch is not None:
                nursery.start_soon(self._attempt, destination, queue, batch)
                continue
            self._wakeups[destination] = event = trio.Event()
            wake_ms = queue.next_wakeup_ms(now)
            with trio.move_on_after((wake_ms - now) / 1000 if wake_ms is not None else float("inf")):
                await event.wait()

    async def _attempt(self, destination: str, queue: OutboundQueue, batch: Any) -> None:
        now = self.clock()
        key = current_key(self.server_keys, now)
        frame = s2s.sign_transaction(key.private_key, key.key_id, origin=self.domain, destination=destination,
                                     ts_ms=now, txn_id=batch.txn_id, envelopes=batch.envelopes,
                                     envelopes_checked=True)      # storage checked each when it was queued
        try:
            link = await self.links.get(destination)
            await link.send_transaction(frame)
        except (SecureChatError, OSError) as exc:
            self.failed_transactions += 1
            code = getattr(exc, "code", ErrorCode.REMOTE_ERROR)
            log.warning("transaction to %s failed (%s: %s); %d envelopes requeued", destination,
                        getattr(code, "value", code), getattr(exc, "message", type(exc).__name__),
                        len(batch.envelopes))
            queue.on_failure(batch.txn_id, self.clock(), self.rng)
            failures, next_attempt, last_failure = queue.backoff_state
            await self.store.queue_backoff(destination, failures, next_attempt, last_failure)
        else:
            self.sent_transactions += 1
            had_failures = queue.backoff_state[0] > 0
            queue.on_ack(batch.txn_id)
            await self.store.queue_outbound_ack(destination, [e.id for e in batch.envelopes])
            if had_failures:
                await self.store.queue_backoff(destination, 0, 0, queue.backoff_state[2])
        self._wake(destination)
