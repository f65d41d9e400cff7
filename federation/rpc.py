"""Request/response correlation over a ``Transport``: the client half of the c2s protocol.

Used by the client SDK, the conformance runner, tests and benchmarks, so that
the framing rules live in one place.  One reader task routes responses to their
waiting callers and pushes to ``pushes``; callers may run requests concurrently.
"""

from __future__ import annotations

import itertools
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import trio

from federation import codec
from federation.errors import ErrorCode, RequestRejected
from federation.frames import ErrorInfo, Push, Request, Response, encode_frame, parse_server_frame
from federation.transport import Transport, TransportClosed


class RemoteError(RequestRejected):
    """The server answered a request with an error frame."""

    def __init__(self, info: ErrorInfo) -> None:
        try:
            code = ErrorCode(info.code)
        except ValueError:
            code = ErrorCode.INTERNAL
        super().__init__(info.message, code=code, details=info.details)
        self.info = info


@asynccontextmanager
async def open_rpc(transport: Transport, **kwargs: Any) -> AsyncIterator[RpcClient]:
    """An ``RpcClient`` whose reader runs for the duration of the ``async with`` block."""
    rpc = RpcClient(transport, **kwargs)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(rpc.run_reader)
        try:
            yield rpc
        finally:
            nursery.cancel_scope.cancel()
            with trio.CancelScope(shield=True):
                await transport.aclose()


class RpcClient:
    """Send requests, await their single response, receive pushes.

    Open with ``async with open_rpc(transport) as rpc:`` (which runs ``run_reader``).
    ``closed`` is set once the transport ends.
    """

    def __init__(self, transport: Transport, *, push_buffer: int = 10_000,
                 limits: codec.Limits = codec.DEFAULT_LIMITS) -> None:
        self.transport = transport
        self._ids = itertools.count(1)
        self._waiting: dict[int, tuple[trio.Event, list[Response]]] = {}
        self._push_send, self.pushes = trio.open_memory_channel[Push](push_buffer)
        self._send_lock = trio.Lock()
        self._limits = limits
        self.closed = trio.Event()
        self.close_code: int | None = None

    async def run_reader(self) -> None:
        try:
            while True:
                data = await self.transport.receive()
                frame = parse_server_frame(codec.decode(data, self._limits))
                if isinstance(frame, Push):
                    self._push_send.send_nowait(frame)
                    continue
                waiter = self._waiting.pop(frame.id, None)
                if waiter is not None:
                    waiter[1].append(frame)
                    waiter[0].set()
        except TransportClosed as exc:
            self.close_code = exc.code
        except trio.ClosedResourceError:
            pass
        except trio.WouldBlock:
            self.close_code = None  # push buffer overflow: treat as a broken connection
        finally:
            self.closed.set()
            self._push_send.close()
            for event, _ in self._waiting.values():
                event.set()

    async def send_raw(self, data: bytes) -> None:
        """Send bytes as they are (tests of malformed input)."""
        async with self._send_lock:
            await self.transport.send(data)

    async def request(self, op: str, **params: Any) -> dict[str, Any]:
        """Send one request and return its ``ok`` map; raises ``RemoteError`` or ``TransportClosed``."""
        request_id = next(self._ids)
        event = trio.Event()
        slot: list[Response] = []
        self._waiting[request_id] = (event, slot)
        try:
            if self.closed.is_set():
                raise TransportClosed(self.close_code, "connection closed")
            async with self._send_lock:
                await self.transport.send(encode_frame(Request(request_id, op, params)))
            await event.wait()
        finally:
            self._waiting.pop(request_id, None)
        if not slot:
            raise TransportClosed(self.close_code, "connection closed before the response")
        response = slot[0]
        if response.error is not None:
            raise RemoteError(response.error)
        return response.ok or {}

    async def next_push(self, kind: str | None = None) -> Push:
        """The next push (of ``kind``, skipping others); raises ``TransportClosed`` at the end."""
        while True:
            try:
                push = await self.pushes.receive()
            except trio.EndOfChannel:
                raise TransportClosed(self.close_code, "connection closed") from None
            if kind is None or push.kind == kind:
                return push
