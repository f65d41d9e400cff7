"""Composition root (DESIGN §7): config -> storage -> handlers -> listeners.

Nothing else constructs services.  ``Homeserver`` wires the handlers over given
repositories (SQL in production, the in-memory fake in tests and the null-relay
benchmark); ``serve`` opens storage, starts both listeners and runs until its
``stop`` event, then shuts down gracefully (DESIGN §6).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import trio

from federation import codec
from federation.frames import Op
from federation.transport import CLOSE_GOING_AWAY, MemoryNetwork, Transport, serve_websocket_transport
from homeserver.clock import Clock, wall_clock_ms
from federation.discovery import Discovery
from federation.link_server import serve_federation_connection
from federation.links import MAX_FED_FRAME, memory_listener_name
from federation.s2s import EnvelopeKind
from homeserver.config import Config
from homeserver.connection import Dispatcher, Session, serve_connection
from homeserver.handlers.accounts import AccountsHandler
from homeserver.handlers.auth import AuthHandler
from homeserver.handlers.directory import DeviceDirectory
from homeserver.handlers.federation import Federation
from homeserver.handlers.keys import KeysHandler
from homeserver.handlers.mailbox import MailboxHandler
from homeserver.passwords import PasswordHasher
from homeserver.ratelimit import RateLimiter
from homeserver.server_keys import ServerKey
from homeserver.storage.models import Storage

log = logging.getLogger("securechat.server")


class Homeserver:
    """All handlers of one homeserver over one storage."""

    def __init__(self, config: Config, storage: Storage, server_keys: list[ServerKey],
                 clock: Clock = wall_clock_ms, *, memory_network: MemoryNetwork | None = None,
                 discovery: Discovery | None = None) -> None:
        self.config = config
        self.storage = storage
        self.server_keys = server_keys
        self.clock = clock
        self.limiter = RateLimiter()
        self.directory = DeviceDirectory(storage.devices)
        self.codec_limits = codec.Limits(max_bytes=config.limits.max_frame_bytes)
        self.accounts = AccountsHandler(config, storage.accounts, storage.devices, self.directory,
                                        PasswordHasher(config.password_opslimit, config.password_memlimit),
                                        self.limiter, clock)
        self.keys = KeysHandler(config, storage.accounts, storage.devices, storage.mailboxes, self.directory,
                                self.limiter, clock)
        self.mailbox = MailboxHandler(config, storage.mailboxes, self.directory, self.limiter, clock)
        self.auth = AuthHandler(config.domain, storage.accounts, storage.devices, self.directory, clock,
                                self._on_authenticated)
        self.dispatcher = Dispatcher()
        d = self.dispatcher
        d.add(Op.REGISTER, self.accounts.register, public=True)
        d.add(Op.LOGIN, self.accounts.login, public=True)
        d.add(Op.CHALLENGE, self.auth.challenge, public=True)
        d.add(Op.AUTH, self.auth.auth, public=True)
        d.add(Op.PING, self._ping, public=True)
        d.add(Op.UPLOAD_KEYS, self.keys.upload_keys)
        d.add(Op.PUT_DEVICE_LIST, self.keys.put_device_list)
        d.add(Op.GET_DEVICE_LIST, self.keys.get_device_list)
        d.add(Op.CLAIM, self.keys.claim)
        d.add(Op.KEY_COUNT, self.keys.key_count)
        d.add(Op.DEVICES, self.keys.devices_of_self)
        d.add(Op.REVOKE_DEVICE, self.keys.revoke_device)
        d.add(Op.SEND, self.mailbox.send)
        d.add(Op.ACK, self.mailbox.ack)
        self.federation: Federation | None = None
        if config.federation.enabled:
            self.federation = self._wire_federation(memory_network, discovery)
        self.sessions: set[Session] = set()
        self.federation_links: set[Transport] = set()      # peers' incoming /fed connections
        self.ports: dict[str, int] = {}          # bound listener ports, for the discovery document
        self.started_ms = clock()

    def _wire_federation(self, memory_network: MemoryNetwork | None, discovery: Discovery | None) -> Federation:
        fed = Federation(self.config, self.storage.federation, self.server_keys, self.limiter, self.clock,
                         discovery=discovery, memory_network=memory_network)
        self.keys.remote = self.mailbox.remote = fed.remote
        self.mailbox.outbound = fed.outbound
        fed.remote.local_device_list = self.keys.local_device_list
        fed.remote.local_claim = lambda user, device_ids: self.keys.claim_for(user, device_ids)
        fed.remote.notify_local = self.directory.notify_list_changed
        fed.inbound.handlers[EnvelopeKind.MESSAGE] = self.mailbox.deliver_remote
        fed.inbound.planner = self.mailbox.plan_remote
        fed.inbound.on_delivered = self.mailbox.on_delivered
        fed.inbound.report_stale = self.mailbox.report_stale
        fed.inbound.handlers[EnvelopeKind.DELIVERY_REPORT] = self.mailbox.deliver_report
        return fed

    async def _ping(self, session: Session, params: dict[str, Any]) -> dict[str, Any]:
        return {"ts_ms": self.clock()}

    async def _on_authenticated(self, session: Session) -> dict[str, Any]:
        self.mailbox.start_delivery(session)
        return {"prekeys": await self.keys.low_prekeys_on_connect(session)}

    # -- connections --------------------------------------------------------------------
    async def handle_connection(self, transport: Transport) -> None:
        if not self.limiter.try_take("connect", transport.remote, self.config.limits.connections_per_address) \
                or len(self.sessions) >= self.config.limits.max_connections:
            await transport.aclose(1013, "too many connections; retry later")
            return
        if self.mailbox.draining:
            await transport.aclose(CLOSE_GOING_AWAY, "server is shutting down")
            return
        await serve_connection(transport, self.dispatcher, self._on_open, self._on_close, self.codec_limits)

    async def handle_federation_connection(self, transport: Transport) -> None:
        """A peer server's persistent link (``/fed``): transactions and key requests."""
        if self.federation is None:
            await transport.aclose(1008, "federation is disabled on this server")
            return
        self.federation_links.add(transport)
        try:
            await serve_federation_connection(transport, self.federation, transport.remote)
        finally:
            self.federation_links.discard(transport)

    def _on_open(self, session: Session) -> None:
        self.sessions.add(session)

    async def _on_close(self, session: Session) -> None:
        self.sessions.discard(session)
        if session.authenticated:
            self.mailbox.stop_delivery(session)
            self.directory.detach(session.device, session)

    # -- housekeeping -------------------------------------------------------------------
    async def housekeep_once(self) -> dict[str, int]:
        now = self.clock()
        counts = dict(await self.storage.mailboxes.expire(now))
        if self.federation is not None:
            counts.update({f"federation_{k}": v for k, v in (await self.storage.federation.expire(now)).items()})
        counts["nonces"] = self.auth.expire_nonces(now)
        counts["rate_buckets"] = self.limiter.prune()
        return counts

    async def housekeeping(self) -> None:
        while True:
            await trio.sleep(self.config.housekeeping_interval_s)
            try:
                counts = await self.housekeep_once()
            except Exception:
                log.exception("housekeeping failed; will retry")
                continue
            if any(counts.values()):
                log.info("housekeeping removed %s", counts)

    # -- shutdown -----------------------------------------------------------------------
    async def drain(self, grace_s: float) -> None:
        """Refuse new sends, let in-flight requests finish, close every connection with 1001."""
        self.mailbox.draining = True
        with trio.move_on_after(grace_s):
            await self.dispatcher.wait_idle()
        for session in list(self.sessions):
            session.close_after_flush(CLOSE_GOING_AWAY, "server shutting down")
        with trio.move_on_after(grace_s):
            while self.sessions:
                await trio.sleep(0.01)
        for transport in list(self.federation_links):      # peers retry against our successor
            with trio.move_on_after(1):
                await transport.aclose(CLOSE_GOING_AWAY, "server shutting down")

    async def health(self) -> dict[str, Any]:
        counts = await self.storage.mailboxes.counts()
        health: dict[str, Any] = {"status": "draining" if self.mailbox.draining else "ok", "domain": self.config.domain,
                  "connections": len(self.sessions), "mailbox": counts,
                  "uptime_s": (self.clock() - self.started_ms) // 1000}
        if self.federation is not None:
            health["federation"] = {"outbound": self.federation.outbound.stats()}
        return health


@dataclass
class RunningServer:
    """What ``serve`` reports once both listeners are up."""

    homeserver: Homeserver
    websocket_port: int
    http_port: int
    stop: trio.Event = field(default_factory=trio.Event)

    @property
    def c2s_url(self) -> str:
        return f"ws://{self.homeserver.config.websocket_host}:{self.websocket_port}/c2s"


async def serve(config: Config, server_keys: list[ServerKey], *, storage: Storage | None = None,
                memory_network: MemoryNetwork | None = None, clock: Clock = wall_clock_ms,
                discovery: Discovery | None = None,
                task_status: trio.TaskStatus[RunningServer] = trio.TASK_STATUS_IGNORED) -> None:
    """Run a homeserver until ``RunningServer.stop`` is set, then shut down gracefully.

    With ``memory_network`` the c2s listener is registered there under the domain
    (in-process tests) instead of opening sockets; ``storage`` overrides the
    configured database (e.g. ``MemoryStorage``).
    """
    from homeserver.http_api import serve_http
    from homeserver.storage import open_storage

    async with trio.open_nursery() as nursery:
        own_storage = storage is None
        if storage is None:
            config.data_dir.mkdir(parents=True, exist_ok=True)
            storage = await open_storage(config.storage_url, nursery)
        hs = Homeserver(config, storage, server_keys, clock, memory_network=memory_network, discovery=discovery)
        http_stop = trio.Event()
        async with trio.open_nursery() as listeners:
            if memory_network is not None:
                await listeners.start(lambda task_status: memory_network.serve(
                    config.domain, hs.handle_connection, max_frame=config.limits.max_frame_bytes,
                    task_status=task_status))
                await listeners.start(lambda task_status: memory_network.serve(
                    memory_listener_name(config.domain), hs.handle_federation_connection, max_frame=MAX_FED_FRAME,
                    task_status=task_status))
                ws_port = http_port = 0
            else:
                ws_port = await listeners.start(lambda task_status: serve_websocket_transport(
                    {"/c2s": hs.handle_connection, "/fed": hs.handle_federation_connection},
                    config.websocket_host, config.websocket_port, max_frame=config.limits.max_frame_bytes,
                    path_max_frame={"/fed": MAX_FED_FRAME}, task_status=task_status))
                hs.ports["ws"] = ws_port
                http_port = await listeners.start(serve_http, hs, config.http_host, config.http_port, http_stop)
            listeners.start_soon(hs.housekeeping)
            federation_scope = trio.CancelScope()
            if hs.federation is not None:
                federation = hs.federation

                async def run_federation(task_status: trio.TaskStatus[None]) -> None:
                    with federation_scope:
                        await federation.run(task_status=task_status)

                await listeners.start(run_federation)
            running = RunningServer(hs, ws_port, http_port)
            log.info("homeserver %s listening: c2s ws port %s, http port %s", config.domain, ws_port, http_port)
            task_status.started(running)
            await running.stop.wait()
            log.info("shutting down: draining connections")
            await hs.drain(config.shutdown_grace_s)
            http_stop.set()
            if hs.federation is not None:
                # Links close while their readers still run (a clean close handshake);
                # then the senders stop, before storage closes.
                with trio.CancelScope(shield=True):
                    await hs.federation.aclose()
            federation_scope.cancel()
            if own_storage:
                await storage.aclose()
            listeners.cancel_scope.cancel()
        log.info("homeserver %s stopped", config.domain)
        nursery.cancel_scope.cancel()
