"""Pluggable frame transports (DESIGN §6): one small interface, several implementations.

A ``Transport`` is a bidirectional stream of whole frames (bytes).  Implementations:

* memory   — ``MemoryNetwork``: in-process listeners and connections (many servers
             and clients in one test), with the same close semantics as WebSocket;
* websocket — trio-websocket client (``connect_websocket``) and server
             (``serve_websocket_transport``): the hot path.

Errors follow trio's split: ``TransportClosed`` means the *peer* (or network)
closed the stream and carries the close code; using a transport after *we* closed
it raises ``trio.ClosedResourceError``.  One contract test runs against every
implementation (``tests/federation/test_transport.py``).
"""

from __future__ import annotations

import ssl
from abc import ABC, abstractmethod
from collections.abc import Awaitable, Callable
from typing import Any

import trio
import trio_websocket
from wsproto.connection import ConnectionState
from wsproto.events import BytesMessage

CLOSE_NORMAL = 1000
CLOSE_GOING_AWAY = 1001
CLOSE_PROTOCOL_ERROR = 1002
CLOSE_POLICY = 1008
CLOSE_TOO_BIG = 1009
CLOSE_INTERNAL = 1011
CLOSE_TRY_AGAIN = 1013

DEFAULT_MAX_FRAME = 1 << 20


class TransportClosed(Exception):
    """The peer or the network closed the transport."""

    def __init__(self, code: int | None, reason: str | None = None) -> None:
        super().__init__(f"transport closed (code {code}{': ' + reason if reason else ''})")
        self.code = code
        self.reason = reason


class Transport(ABC):
    """A bidirectional stream of frames between two parties."""

    remote: str = "unknown"          # peer network address, for per-source limits and logs

    @abstractmethod
    async def send(self, frame: bytes) -> None: ...

    async def send_many(self, frames: list[bytes]) -> None:
        """Send ``frames`` in order; an implementation may write them in one go."""
        for frame in frames:
            await self.send(frame)

    @abstractmethod
    async def receive(self) -> bytes: ...

    @abstractmethod
    async def aclose(self, code: int = CLOSE_NORMAL, reason: str = "") -> None: ...

    @property
    @abstractmethod
    def close_code(self) -> int | None:
        """The close code once closed by either side, else None."""

    async def __aenter__(self) -> Transport:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()


ConnectionHandler = Callable[[Transport], Awaitable[None]]


# --- memory ---------------------------------------------------------------------------


class MemoryTransport(Transport):
    """One end of an in-process pair.  Frames over ``max_frame`` close the pair with 1009."""

    def __init__(self, outgoing: trio.MemorySendChannel[bytes], incoming: trio.MemoryReceiveChannel[bytes],
                 shared: dict[str, Any], remote: str, max_frame: int) -> None:
        self._out = outgoing
        self._in = incoming
        self._shared = shared            # close state shared by both ends
        self._closed_locally = False
        self.remote = remote
        self.max_frame = max_frame

    @property
    def close_code(self) -> int | None:
        code: int | None = self._shared.get("code")
        return code

    def _close_both(self, code: int, reason: str) -> None:
        self._shared.setdefault("code", code)
        self._shared.setdefault("reason", reason)
        # Close only our own ends: the peer still reads what we sent before closing
        # (as with a WebSocket close frame), then sees TransportClosed.
        self._out.close()
        self._in.close()

    def _raise_closed(self) -> None:
        if self._closed_locally:
            raise trio.ClosedResourceError("transport was closed by us")
        raise TransportClosed(self._shared.get("code"), self._shared.get("reason"))

    async def send(self, frame: bytes) -> None:
        if self._closed_locally:
            raise trio.ClosedResourceError("transport was closed by us")
        if "code" in self._shared:
            self._raise_closed()
        if len(frame) > self.max_frame:
            self._close_both(CLOSE_TOO_BIG, "frame too large")
            self._raise_closed()
        try:
            await self._out.send(bytes(frame))
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            self._raise_closed()

    async def receive(self) -> bytes:
        if self._closed_locally:
            raise trio.ClosedResourceError("transport was closed by us")
        try:
            return await self._in.receive()
        except (trio.EndOfChannel, trio.ClosedResourceError, trio.BrokenResourceError):
            self._raise_closed()
            raise  # unreachable: _raise_closed always raises

    async def aclose(self, code: int = CLOSE_NORMAL, reason: str = "") -> None:
        if self._closed_locally:
            return
        self._close_both(code, reason)
        self._closed_locally = True
        await trio.lowlevel.checkpoint()


def memory_transport_pair(max_frame: int = DEFAULT_MAX_FRAME, buffer: int = 64,
                          names: tuple[str, str] = ("memory:a", "memory:b")) -> tuple[MemoryTransport, MemoryTransport]:
    """Two connected in-process transports; ``names`` are what each side sees as ``remote``."""
    a_send, b_recv = trio.open_memory_channel[bytes](buffer)
    b_send, a_recv = trio.open_memory_channel[bytes](buffer)
    shared: dict[str, Any] = {}
    return (MemoryTransport(a_send, a_recv, shared, names[1], max_frame),
            MemoryTransport(b_send, b_recv, shared, names[0], max_frame))


class MemoryNetwork:
    """A registry of in-process listeners: ``listen(name, handler)`` then ``connect(name)``."""

    def __init__(self) -> None:
        self._listeners: dict[str, tuple[trio.Nursery, ConnectionHandler, int]] = {}
        self._counter = 0

    async def serve(self, name: str, handler: ConnectionHandler, *, max_frame: int = DEFAULT_MAX_FRAME,
                    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Listen on ``name`` until cancelled; each connection's handler runs in this task's nursery."""
        async with trio.open_nursery() as nursery:
            self._listeners[name] = (nursery, handler, max_frame)
            try:
                task_status.started()
                await trio.sleep_forever()
            finally:
                self._listeners.pop(name, None)

    async def connect(self, name: str, source: str | None = None) -> MemoryTransport:
        entry = self._listeners.get(name)
        if entry is None:
            raise TransportClosed(None, f"no memory listener named {name!r}")
        nursery, handler, max_frame = entry
        self._counter += 1
        client_name = source or f"memory-client-{self._counter}"
        client, server = memory_transport_pair(max_frame, names=(client_name, f"memory:{name}"))
        nursery.start_soon(_run_handler, handler, server)
        await trio.lowlevel.checkpoint()
        return client


async def _run_handler(handler: ConnectionHandler, transport: Transport) -> None:
    try:
        await handler(transport)
    finally:
        await transport.aclose(CLOSE_NORMAL)


# --- WebSocket ------------------------------------------------------------------------


class WebSocketTransport(Transport):
    """A trio-websocket connection carrying one binary message per frame."""

    def __init__(self, ws: trio_websocket.WebSocketConnection, owner: trio.Nursery | None = None,
                 max_frame: int | None = None) -> None:
        self._ws = ws
        self._max_frame = max_frame       # tighter than the listener's limit (one port, several paths)
        self._closed_locally = False
        remote = ws.remote
        self.remote = str(getattr(remote, "address", remote))
        self._owner = owner

    @property
    def close_code(self) -> int | None:
        reason = self._ws.closed
        return None if reason is None else int(reason.code)

    def _peer_closed(self, exc: trio_websocket.ConnectionClosed) -> TransportClosed:
        reason = exc.reason
        return TransportClosed(None if reason is None else int(reason.code),
                               None if reason is None else reason.reason)

    async def send(self, frame: bytes) -> None:
        await self.send_many([frame])

    async def send_many(self, frames: list[bytes]) -> None:
        """Binary messages in ONE write to the socket (one syscall, not one each).

        Does what trio-websocket's ``send_message`` does (its wsproto connection,
        its stream lock), minus a scheduling round trip when the lock is free;
        without those attributes (another version) it calls ``send_message``.
        """
        if self._closed_locally:
            raise trio.ClosedResourceError("transport was closed by us")
        ws = self._ws
        proto = getattr(ws, "_wsproto", None)
        lock = getattr(ws, "_stream_lock", None)
        stream = getattr(ws, "_stream", None)
        if proto is None or lock is None or stream is None or ws.closed is not None \
                or proto.state is not ConnectionState.OPEN:
            for frame in frames:
                try:
                    await ws.send_message(bytes(frame))
                except trio_websocket.ConnectionClosed as exc:
                    raise self._peer_closed(exc) from None
            return
        data = b"".join([proto.send(BytesMessage(data=bytes(frame))) for frame in frames])
        try:
            lock.acquire_nowait()
        except trio.WouldBlock:
            await lock.acquire()
        try:
            await stream.send_all(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            # What send_message does: record the abnormal close, report it as the peer's.
            await ws._abort_web_socket()
            reason = ws.closed
            raise TransportClosed(None if reason is None else int(reason.code),
                                  None if reason is None else reason.reason) from None
        finally:
            lock.release()

    async def receive(self) -> bytes:
        if self._closed_locally:
            raise trio.ClosedResourceError("transport was closed by us")
        try:
            message = await self._ws.get_message()
        except trio_websocket.ConnectionClosed as exc:
            raise self._peer_closed(exc) from None
        if isinstance(message, str):
            await self._ws.aclose(CLOSE_PROTOCOL_ERROR, "binary frames only")
            raise TransportClosed(CLOSE_PROTOCOL_ERROR, "text frame received")
        if self._max_frame is not None and len(message) > self._max_frame:
            await self.aclose(CLOSE_TOO_BIG, "frame too large")
            raise TransportClosed(CLOSE_TOO_BIG, "frame too large")
        return message

    async def aclose(self, code: int = CLOSE_NORMAL, reason: str = "") -> None:
        if self._closed_locally:
            return
        self._closed_locally = True
        with trio.move_on_after(5) as scope:
            scope.shield = True
            await self._ws.aclose(code, reason or None)
            # trio-websocket 0.12 leaves the TCP stream open after it closes a
            # connection for an oversized message (1009): close it ourselves, or a
            # peer sending big frames would exhaust our file descriptors.
            stream = getattr(self._ws, "_stream", None)
            if stream is not None:
                await stream.aclose()


async def connect_websocket(nursery: trio.Nursery, url: str, *, max_frame: int = DEFAULT_MAX_FRAME,
                            ssl_context: ssl.SSLContext | None = None) -> WebSocketTransport:
    """Open a client transport to ``ws://`` or ``wss://`` ``url``; its reader task lives in ``nursery``."""
    try:
        ws = await trio_websocket.connect_websocket_url(nursery, url, ssl_context, max_message_size=max_frame,
                                                        message_queue_size=16)
    except (OSError, trio_websocket.HandshakeError) as exc:
        raise TransportClosed(None, f"cannot connect: {type(exc).__name__}") from None
    return WebSocketTransport(ws, nursery)


async def serve_websocket_transport(handlers: dict[str, ConnectionHandler], host: str, port: int, *,
                                    max_frame: int = DEFAULT_MAX_FRAME,
                                    path_max_frame: dict[str, int] | None = None,
                                    ssl_context: ssl.SSLContext | None = None,
                                    task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
    """Serve WebSocket connections, routing by request path (e.g. ``{"/c2s": handle}``).

    ``max_frame`` bounds every path; ``path_max_frame`` may raise it for some paths
    (a larger frame on another path still closes that connection with 1009).
    ``task_status.started`` reports the bound port (useful with ``port=0``).
    """
    limits = {path: (path_max_frame or {}).get(path, max_frame) for path in handlers}
    listener_max = max(limits.values(), default=max_frame)

    async def on_request(request: trio_websocket.WebSocketRequest) -> None:
        handler = handlers.get(request.path)
        if handler is None:
            await request.reject(404, body=b"unknown path")
            return
        ws = await request.accept()
        limit = limits[request.path]
        transport = WebSocketTransport(ws, max_frame=limit if limit < listener_max else None)
        try:
            await handler(transport)
        finally:
            await transport.aclose(CLOSE_NORMAL)

    async with trio.open_nursery() as nursery:
        server = await nursery.start(lambda task_status: trio_websocket.serve_websocket(
            on_request, host, port, ssl_context, max_message_size=listener_max, message_queue_size=16,
            connect_timeout=10, disconnect_timeout=5, task_status=task_status))
        task_status.started(server.port)
