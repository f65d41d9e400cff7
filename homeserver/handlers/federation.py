"""Federation (issue 5, DESIGN §5): durable outbound queues, verified inbound transactions,
remote keys and device lists, delivery reports.

``Federation`` composes three parts, each small and driven by the sans-I/O cores in
``federation/``: ``OutboundSender`` (``federation_outbound``), ``InboundReceiver``
(``federation_inbound``) and ``RemoteKeys`` (``remote_keys``); the pieces they share are
in ``federation_common``. It is the ``FederationEndpoint`` peers call, and runs the tasks.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Awaitable, Callable
from typing import Any

import trio

from federation.discovery import Discovery
from federation.errors import ErrorCode, RequestRejected
from federation.links import LinkPool
from federation.s2s import EnvelopeKind
from homeserver.clock import Clock
from homeserver.config import Config
from homeserver.handlers.federation_common import DomainNotPermitted, Rng
from homeserver.handlers.federation_inbound import InboundReceiver
from homeserver.handlers.federation_outbound import OutboundSender
from homeserver.handlers.remote_keys import RemoteKeys
from homeserver.ratelimit import RateLimiter
from homeserver.server_keys import ServerKey
from homeserver.storage.models import FederationStore

log = logging.getLogger("securechat.federation")


class Federation:
    """The federation side of one homeserver: the ``FederationEndpoint`` peers call, and the tasks."""

    def __init__(self, config: Config, store: FederationStore, server_keys: list[ServerKey], limiter: RateLimiter,
                 clock: Clock, *, discovery: Discovery | None = None, memory_network: Any = None,
                 rng: Rng = os.urandom) -> None:
        fed = config.federation
        self.config = config
        self.discovery = discovery or Discovery(static=fed.static, insecure_domains=fed.insecure_domains)
        self.memory_network = memory_network
        self._resolver: Callable[[str], Awaitable[Any]] | None = None
        self.links = LinkPool(self._resolve)
        self.outbound = OutboundSender(config, store, self.links, server_keys, clock, rng)
        self.inbound = InboundReceiver(config, store, self.discovery, limiter, clock)
        self.remote = RemoteKeys(config, store, self.links, self.discovery, server_keys, limiter, clock,
                                 self.outbound, rng)
        self.inbound.handlers[EnvelopeKind.DEVICE_LIST] = self.remote.on_device_list
        self.inbound.handlers[EnvelopeKind.DEVICE_LIST_DIGESTS] = self.remote.on_digests

    async def _resolve(self, domain: str) -> Any:
        if not self.config.federation.permits(domain):
            raise DomainNotPermitted(f"this server does not federate with {domain}")
        if self._resolver is None:
            raise RequestRejected("federation is starting", code=ErrorCode.SHUTTING_DOWN)
        return await self._resolver(domain)

    # FederationEndpoint ----------------------------------------------------------------
    async def receive_transaction(self, frame: bytes, remote: str) -> None:
        await self.inbound.receive_transaction(frame, remote)

    async def handle_request(self, frame: bytes, remote: str) -> bytes:
        return await self.remote.handle_request(frame, remote)

    # tasks -----------------------------------------------------------------------------
    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Links, the outbound workers, recovery of released envelopes, the digest rounds."""
        from federation import links as link_impl

        async with trio.open_nursery() as nursery:
            if self.memory_network is not None:
                self._resolver = link_impl.memory_resolver(self.memory_network, nursery,
                                                           timeout_s=self.config.federation.request_timeout_s)
            elif self.config.federation.transport == "http":
                import httpx
                client = httpx.AsyncClient(timeout=self.config.federation.request_timeout_s)
                self._http_client = client
                self._resolver = link_impl.http_resolver(self.discovery, client,
                                                         timeout_s=self.config.federation.request_timeout_s)
            else:
                self._resolver = link_impl.websocket_resolver(self.discovery, nursery,
                                                              timeout_s=self.config.federation.request_timeout_s)
            self.remote.nursery = nursery
            await nursery.start(self.outbound.run)
            recovered = await self.inbound.recover()
            if recovered:
                log.info("processed %d envelopes released before the restart", recovered)
            nursery.start_soon(self._digest_rounds)
            task_status.started()
            await trio.sleep_forever()

    async def _digest_rounds(self) -> None:
        while True:
            await trio.sleep(self.config.federation.digest_interval_s)
            try:
                await self.remote.send_digests()
            except Exception:
                log.exception("device-list digest round failed; next round retries")

    async def aclose(self) -> None:
        await self.links.aclose()
        client = getattr(self, "_http_client", None)
        if client is not None:
            await client.aclose()
        await self.discovery.aclose()
