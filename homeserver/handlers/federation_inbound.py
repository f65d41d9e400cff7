"""Federation inbound (DESIGN §5): ``InboundReceiver`` is the ``FederationEndpoint`` half
that takes transactions: allow/deny lists, per-origin rate limits, ``verify_transaction``
(the ONE origin-binding check), store-and-ack, then release in ``seq`` order to the
registered envelope handlers (mailboxes, the device-list cache).
Released envelopes stay in storage until processed, so a crash re-processes them;
every effect is idempotent (mailbox delivery is keyed by sender and message id).
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

import trio

from federation import s2s
from federation.discovery import Discovery
from federation.errors import SecureChatError
from federation.s2s import Envelope, EnvelopeKind
from homeserver.clock import Clock
from homeserver.config import Config
from homeserver.handlers.federation_common import DomainNotPermitted, key_lookup_for
from homeserver.ratelimit import RateLimiter
from homeserver.storage.models import FederationStore

log = logging.getLogger("securechat.federation")

EnvelopeHandler = Callable[[str, Envelope], Awaitable[None]]


class _Turn:
    """One transaction's place in its origin's processing order."""

    def __init__(self, previous: trio.Event | None) -> None:
        self._previous = previous
        self.done = trio.Event()

    async def __aenter__(self) -> None:
        if self._previous is not None:
            try:
                await self._previous.wait()
            except BaseException:
                self.done.set()          # cancelled while waiting: never block the turns after us
                raise

    async def __aexit__(self, *exc: object) -> None:
        self.done.set()


class _Lane:
    """Per origin: ``lock`` orders the queueing, turns order the processing."""

    def __init__(self) -> None:
        self.lock = trio.Lock()
        self._tail: trio.Event | None = None

    def next_turn(self) -> _Turn:
        turn = _Turn(self._tail)
        self._tail = turn.done
        return turn


class InboundReceiver:
    """Takes transactions: refuse, verify, store and acknowledge, then release in order."""

    def __init__(self, config: Config, store: FederationStore, discovery: Discovery, limiter: RateLimiter,
                 clock: Clock) -> None:
        self.config = config
        self.domain = config.domain
        self.store = store
        self.discovery = discovery
        self.limiter = limiter
        self.clock = clock
        self.handlers: dict[EnvelopeKind, EnvelopeHandler] = {}
        # Message envelopes released by the write that receives them are stored in that same
        # write (one commit before the recipient sees them, not two): set by the composition root.
        self.planner: Callable[[Envelope], Awaitable[Any]] | None = None
        self.on_delivered: Callable[[Any], None] | None = None
        self.report_stale: Callable[[str, Envelope, Any], Awaitable[None]] | None = None
        self._lanes: dict[str, _Lane] = {}
        self.received_transactions = 0
        self.rejected_transactions = 0

    def check_origin(self, origin: str) -> None:
        """Allow/deny lists, applied before any work is spent on a peer."""
        if not self.config.federation.permits(origin):
            raise DomainNotPermitted(f"this server does not federate with {origin}")

    async def receive_transaction(self, frame: bytes, remote: str) -> None:
        try:
            await self._receive(frame)
        except SecureChatError as exc:
            self.rejected_transactions += 1
            log.warning("refused a transaction from %s: %s (%s)", remote, exc.code.value,
                        (exc.details or {}).get("reason", "") if isinstance(exc.details, dict) else "")
            raise

    async def _receive(self, frame: bytes) -> None:
        origin, key_id = s2s.claimed_signer(frame)
        self.check_origin(origin)
        self.limiter.take("s2s-txn", origin, self.config.federation.transactions_per_origin)
        lookup = await key_lookup_for(self.discovery, origin, key_id)
        txn = s2s.verify_transaction(frame, expected_destination=self.domain, now_ms=self.clock(),
                                     key_lookup=lookup)
        plans = await self._plan_messages(txn.envelopes)
        lane = self._lanes.setdefault(txn.origin, _Lane())
        async with lane.lock:
            # Queued in arrival order, so storage releases in that order; the commit is
            # awaited outside the lock, so several transactions of one origin share a
            # group commit, and their releases are processed one after the other.
            completion = await self.store.queue_receive(
                txn.origin, txn.txn_id, list(txn.envelopes), self.clock(),
                max_held=self.config.federation.max_held_per_origin,
                plans={i: p.delivery for i, p in plans.items() if p.delivery is not None},
                on_commit=self._on_receive_committed)
            turn = lane.next_turn()
        async with turn:
            result = await completion.result()
            if result.duplicate:
                raise s2s.ReplayedTransaction("this transaction id was already received")
            self.received_transactions += 1
            if self.report_stale is not None:
                for env, _ in result.delivered:
                    await self.report_stale(txn.origin, env, plans[env.id])
            await self._process(txn.origin, result.released)

    async def _plan_messages(self, envelopes: Iterable[Envelope]) -> dict[bytes, Any]:
        """Coverage plans for the message envelopes, so a release stores them in the same write."""
        plans: dict[bytes, Any] = {}
        if self.planner is None:
            return plans
        for env in envelopes:
            if env.kind is EnvelopeKind.MESSAGE:
                try:
                    plans[env.id] = await self.planner(env)
                except SecureChatError:
                    continue          # a bad payload: the ordinary path drops it, with a log line
        return plans

    def _on_receive_committed(self, result: Any) -> None:
        if self.on_delivered is not None:
            for _, delivered in result.delivered:
                self.on_delivered(delivered)

    async def recover(self) -> int:
        """Process envelopes released before a restart but not yet handed on."""
        pending = await self.store.released()
        for origin, env in pending:
            lane = self._lanes.setdefault(origin, _Lane())
            async with lane.lock:
                turn = lane.next_turn()
            async with turn:
                await self._process(origin, [env])
        return len(pending)

    async def _process(self, origin: str, envelopes: Iterable[Envelope]) -> None:
        done: list[bytes] = []
        for env in envelopes:
            handler = self.handlers.get(env.kind)
            try:
                if handler is None:
                    log.warning("no handler for %s envelopes; dropped", env.kind.value)
                else:
                    await handler(origin, env)
            except SecureChatError as exc:
                # The envelope is bad in a way the signature could not show (e.g. an
                # unparsable payload); it is dropped, never retried forever.
                log.warning("dropped a %s envelope from %s: %s", env.kind.value, origin, exc.code.value)
            done.append(env.id)
        if done:
            await self.store.queue_processed(origin, done)
