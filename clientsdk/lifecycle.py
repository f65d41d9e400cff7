"""The connection half of ``Client``: connect, authenticate, reconnect with backoff, pump pushes.

Split from ``client.py`` so each module keeps one responsibility; ``Client`` mixes it in.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any, Self

import trio

from clientsdk.client_parts import ClientParts
from clientsdk.connection import CLOSE_REPLACED, CLOSE_REVOKED, Connector
from clientsdk.crypto.identity import needs_resign, resign_device_list
from clientsdk.errors import NotConnected, SdkError, SendFailed
from clientsdk.events import ConnectionChanged, MessageReceived, SecurityEvent
from clientsdk.resets import KV_NAME as RESETS_KV
from clientsdk.store import Batch
from clientsdk.upkeep import plan_prekey_upload
from federation import signing
from federation.errors import SecureChatError
from federation.frames import Push
from federation.rpc import RemoteError, RpcClient, open_rpc
from federation.signing import Purpose
from federation.transport import TransportClosed

log = logging.getLogger(__name__)

MessageHandler = Callable[[MessageReceived], Awaitable[None]]


PROCESSED_KEEP_MS = 31 * 86_400_000            # dedupe keys outlive the server's redelivery window
ENVELOPE_BATCH = 100
MAINTENANCE_INTERVAL_S = 6 * 3600
CLOSE_FLUSH_S = 5.0                             # at most this long at the end of connect() for queued receipts


def _leaves(group: BaseExceptionGroup[Any]) -> list[BaseException]:
    out: list[BaseException] = []
    for exc in group.exceptions:
        out.extend(_leaves(exc) if isinstance(exc, BaseExceptionGroup) else [exc])
    return out


class ConnectionMixin(ClientParts):
    """Connection lifecycle of ``Client`` (state is the ``Client``'s own attributes)."""

    if TYPE_CHECKING:   # this mixin comes first in the MRO: a stub here would shadow the real method
        # clientsdk.inbox
        async def _handle_envelopes(self, rpc: RpcClient, pushes: list[Any]) -> None: ...

        def _note_backlog_end(self, rpc: RpcClient, seq: object) -> None: ...

        # clientsdk.background
        async def _background_sends(self) -> None: ...

        # clientsdk.groups
        async def _group_background(self) -> None: ...

        def _backlog_reached(self, rpc: RpcClient) -> None: ...

        # clientsdk.repair
        async def _on_delivery_report(self, rpc: RpcClient, fields: dict[str, Any]) -> None: ...

    @asynccontextmanager
    async def connect(self, connector: Connector | None = None) -> AsyncIterator[Self]:
        """Stay connected (reconnecting with backoff) for the block; enters once authenticated."""
        connector = connector or self._connector
        if connector is None:
            raise NotConnected("no connector given")
        if self._running:
            raise NotConnected("this client is already connected")
        self._running = True
        self._stopping = False
        try:
            async with trio.open_nursery() as nursery:
                await nursery.start(self._connection_loop, connector, nursery)
                try:
                    yield self
                    await self._flush_receipts()      # a clean exit only: after an error, leave at once
                finally:
                    self._stopping = True
                    rpc = self._rpc
                    if rpc is not None:
                        # Close while the transport's reader still runs, so the close handshake completes.
                        with trio.CancelScope(shield=True):
                            await rpc.transport.aclose()
                    nursery.cancel_scope.cancel()
        finally:
            self._running = False

    async def _flush_receipts(self) -> None:
        """Let queued delivery receipts go out before the connection closes (bounded, best effort).

        They live in memory only (a crash loses them, never a message), so without this a
        client that reads a message and leaves at once, a bot or a CLI ``receive``, would
        never tell the sender: the end of ``connect()`` cancelled the background send.
        """
        with trio.move_on_after(CLOSE_FLUSH_S):
            while self._receipts_due and self._rpc is not None:
                await trio.sleep(0.01)

    async def _connection_loop(self, connector: Connector, transport_nursery: trio.Nursery,
                               task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Connect, authenticate, pump; on loss, back off (with jitter) and do it again.

        A transport's own tasks, if it has any (the memory and WebSocket ones have none),
        live in ``transport_nursery``, which outlives each connection, so a close
        handshake can complete even when this connection's tasks are torn down by an error.
        """
        attempt = 0
        started = False
        while True:
            close_code: int | None = None
            try:
                async with trio.open_nursery() as conn_nursery:
                    transport = await connector(transport_nursery)
                    async with open_rpc(transport) as rpc:
                        auth = await self._authenticate(rpc)
                        attempt = 0
                        self._rpc = rpc
                        self._dropped = trio.Event()
                        self._connected.set()
                        self._emit(ConnectionChanged(True))
                        await self._after_connect(rpc, auth)
                        if not started:
                            started = True
                            task_status.started()
                        conn_nursery.start_soon(self._maintenance, rpc)
                        conn_nursery.start_soon(self._background_sends)
                        conn_nursery.start_soon(self._group_background)
                        if self._resets.unsent or self._receipts_due:
                            self._work_ready.set()
                        await self._pump(rpc)
                        close_code = rpc.close_code
                    conn_nursery.cancel_scope.cancel()
            except* TransportClosed as group:
                close_code = next((e.code for e in _leaves(group) if isinstance(e, TransportClosed)), None)
                log.info("connection of %s closed (code %s)", self.address, close_code)
            except* (RemoteError, SdkError, trio.BrokenResourceError, trio.ClosedResourceError) as group:
                log.info("connection of %s lost: %s", self.address,
                         ", ".join(type(e).__name__ for e in _leaves(group)))
            finally:
                if self._rpc is not None:
                    self._rpc = None
                    self._connected = trio.Event()
                    self._dropped.set()
                    self._emit(ConnectionChanged(False))
            if self._stopping:
                return
            if close_code in (CLOSE_REVOKED, CLOSE_REPLACED) or self.revoked:
                self.revoked = self.revoked or close_code == CLOSE_REVOKED
                if not started:
                    task_status.started()
                return
            await trio.sleep(self._options.backoff.delay(attempt))
            attempt += 1

    async def _authenticate(self, rpc: RpcClient) -> dict[str, Any]:
        """Signed challenge (DESIGN §5): nothing reusable crosses the wire."""
        challenge = await rpc.request("challenge")
        domain = challenge.get("domain")
        if domain != self.address.domain:
            raise SendFailed("the server does not serve this account's domain", code="unknown_domain")
        fields = {"domain": domain, "device": str(self.address), "nonce": challenge["nonce"],
                  "ts_ms": challenge["now_ms"]}
        answer = await rpc.request("auth", **fields,
                                   sig=signing.sign(self._identity.signing_key, Purpose.C2S_AUTH, fields))
        self._auth_state = str(answer.get("state", "active"))
        return answer

    async def _wait_rpc(self) -> RpcClient:
        """The connection, once there is one that is open.

        A closed connection stays ``_rpc`` until the connection loop has finished with it
        (its close handshake, say): waiting for that, rather than handing it out, keeps a
        caller that loops on "wait for the connection, wait for an event or its close"
        from spinning.
        """
        while self._rpc is None or self._rpc.closed.is_set():
            if self.revoked:
                raise NotConnected("this device was revoked")
            if not self._running:
                raise NotConnected("use 'async with client.connect():' first")
            await (self._connected if self._rpc is None else self._dropped).wait()
        return self._rpc

    async def _after_connect(self, rpc: RpcClient, auth: dict[str, Any]) -> None:
        """Housekeeping on every connect: prekeys topped up, signed prekey rotated, own list re-signed."""
        counts = auth.get("prekeys") or {}
        await self._top_up_prekeys(rpc, int(counts.get("one_time", 0)))
        if self._master is not None:
            own = self._book.current(self.user)
            if own is not None and needs_resign(own.device_list, self._clock()):
                await self._publish_own_list(rpc, resign_device_list(self._master, own.device_list, self._clock()))
        cutoff = self._clock() - PROCESSED_KEEP_MS
        await trio.to_thread.run_sync(self._store.prune_processed, cutoff, limiter=self._store_limiter)
        async with self._lock:
            before = self._resets.to_bytes()
            self._resets.prune(self._clock())
            if self._resets.to_bytes() != before:
                await self._persist(Batch(kv={RESETS_KV: self._resets.to_bytes()}))

    async def _maintenance(self, rpc: RpcClient) -> None:
        """While connected: rotate the signed prekey and re-sign my list when they age (trio.sleep: MockClock)."""
        while True:
            await trio.sleep(MAINTENANCE_INTERVAL_S)
            counts = await rpc.request("key_count")
            await self._after_connect(rpc, {"prekeys": counts})

    async def _top_up_prekeys(self, rpc: RpcClient, one_time_count: int) -> None:
        async with self._lock:
            params = plan_prekey_upload(self._prekeys, self._identity, self._clock(), one_time_count,
                                        self._options.one_time_prekeys)
            if params is None:
                return
            await self._persist(Batch(kv={"prekeys": self._prekeys.to_bytes()}))   # private halves first
        await rpc.request("upload_keys", **params)

    async def _pump(self, rpc: RpcClient) -> None:
        """Route pushes until the connection ends: envelopes in batches, then keys and lists."""
        while True:
            try:
                push = await rpc.pushes.receive()
            except (trio.EndOfChannel, trio.ClosedResourceError):
                return
            if push.kind == "envelope":
                batch = [push]
                while len(batch) < ENVELOPE_BATCH:
                    try:
                        nxt = rpc.pushes.receive_nowait()
                    except (trio.WouldBlock, trio.EndOfChannel):
                        break
                    if nxt.kind != "envelope":
                        await self._handle_envelopes(rpc, batch)
                        batch = []
                        await self._handle_push(rpc, nxt)
                        continue
                    batch.append(nxt)
                if batch:
                    await self._handle_envelopes(rpc, batch)
            else:
                await self._handle_push(rpc, push)

    async def _handle_push(self, rpc: RpcClient, push: Push) -> None:
        fields = push.fields
        if push.kind == "prekeys_low":
            await self._top_up_prekeys(rpc, int(fields.get("one_time", 0)))
        elif push.kind == "device_list_changed":
            user = str(fields.get("user", ""))
            self._book.mark_stale(user)
            try:      # fetch now: the change (and any security event) shows without waiting for a send
                await self._device_list(rpc, user, force=True)
            except (SecureChatError, SdkError) as exc:
                # A refused list (SendFailed, ContactKeyChanged) has emitted its security event
                # already; raising here would end the pump and drop the connection.
                log.info("re-fetching a changed device list failed (%s); the next send retries", exc.code)
        elif push.kind == "delivery_report":
            await self._on_delivery_report(rpc, fields)
        elif push.kind == "backlog_done":
            self._note_backlog_end(rpc, fields.get("seq"))     # later envelopes skip the dedupe read (inbox)
            self._backlog_reached(rpc)            # every envelope pushed before it is processed (clientsdk.groups)
        elif push.kind == "device_revoked":
            self.revoked = True
            self._emit(SecurityEvent("device_revoked", self.user, str(self.address), "this device was revoked"))

