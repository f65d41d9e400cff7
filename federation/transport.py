"""Pluggable frame transports (DESIGN §6): one small interface, several implementations.

A ``Transport`` is a bidirectional stream of whole frames (bytes).  Implementations:

* memory   — ``MemoryNetwork``: in-process listeners and connections (many servers
             and clients in one test), with the same close semantics as WebSocket;
* websocket — the client (``connect_websocket``: wsproto, parsed in the receiving
             task) and the server (``serve_websocket_transport``: trio-websocket's
             listener): the hot path.

Errors follow trio's split: ``TransportClosed`` means the *peer* (or network)
closed the stream and carries the close code; using a transport after *we* closed
it raises ``trio.ClosedResourceError``.  One contract test runs against every
implementation (``tests/federation/test_transport.py``).
"""

from __future__ import annotations

import collections
import contextlib
import ssl
from abc import ABC, abstractmethod
from collections.abc import Awaitable, Callable, Iterator
from typing import Any
from urllib.parse import urlsplit

import trio
import trio_websocket
from wsproto import ConnectionType, WSConnection
from wsproto.connection import ConnectionState
from wsproto.events import (
    AcceptConnection,
    BytesMessage,
    CloseConnection,
    Event,
    Ping,
    RejectConnection,
    Request,
    TextMessage,
)
from wsproto.utilities import RemoteProtocolError

CLOSE_NORMAL = 1000
CLOSE_GOING_AWAY = 1001
CLOSE_PROTOCOL_ERROR = 1002
CLOSE_POLICY = 1008
CLOSE_TOO_BIG = 1009
CLOSE_INTERNAL = 1011
CLOSE_TRY_AGAIN = 1013

CLOSE_ABNORMAL = 1006             # never sent: the code of a connection that ended without a close frame

DEFAULT_MAX_FRAME = 1 << 20
CLOSE_WAIT_S = 5                  # a WebSocket close waits this long for the peer's close frame
RECEIVE_CHUNK = 1 << 16           # bytes per read of a WebSocket client: one read often brings several frames


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
    """The server end of a WebSocket (trio-websocket's listener), one binary message per frame."""

    def __init__(self, ws: trio_websocket.WebSocketConnection, max_frame: int | None = None) -> None:
        self._ws = ws
        self._max_frame = max_frame       # tighter than the listener's limit (one port, several paths)
        self._closed_locally = False
        remote = ws.remote
        self.remote = str(getattr(remote, "address", remote))

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
        with trio.move_on_after(CLOSE_WAIT_S) as scope:
            scope.shield = True
            await self._ws.aclose(code, reason or None)
            # trio-websocket 0.12 leaves the TCP stream open after it closes a
            # connection for an oversized message (1009): close it ourselves, or a
            # peer sending big frames would exhaust our file descriptors.
            stream = getattr(self._ws, "_stream", None)
            if stream is not None:
                await stream.aclose()


class WebSocketClientTransport(Transport):
    """The client end of a WebSocket: wsproto's protocol, parsed in the task that receives.

    Why not trio-websocket's client: its reader task parses every frame and hands it
    over a channel to whoever calls ``get_message``, two scheduling rounds per frame.
    Here ``receive`` reads the socket and parses in place, and a read that brings
    several frames serves the next calls without a yield (in bench/e2e.py, 13.2 → 10.4
    task steps and about 10% less SDK CPU per message).  wsproto still does all of
    the protocol: the handshake (h11), framing, masking, the close handshake.  One
    task receives at a time (the rpc reader); sends may come from any task.
    """

    def __init__(self, stream: trio.abc.Stream, ws: WSConnection, remote: str, max_frame: int) -> None:
        self._stream = stream
        self._ws = ws
        self.remote = remote
        self._max_frame = max_frame
        self._send_lock = trio.Lock()
        self._frames: collections.deque[bytes] = collections.deque()
        self._parts: list[bytes] = []            # a message arriving in several frames
        self._part_bytes = 0
        self._code: int | None = None            # set once the connection is over, by either side
        self._reason: str | None = None
        self._closed_locally = False
        self._receiving = False

    @property
    def close_code(self) -> int | None:
        return self._code

    def _ended(self) -> TransportClosed:
        return TransportClosed(self._code, self._reason)

    async def send(self, frame: bytes) -> None:
        await self.send_many([frame])

    async def send_many(self, frames: list[bytes]) -> None:
        """Binary messages in ONE write to the socket."""
        if self._closed_locally:
            raise trio.ClosedResourceError("transport was closed by us")
        if self._code is not None or self._ws.state is not ConnectionState.OPEN:
            raise self._ended()
        data = b"".join([self._ws.send(BytesMessage(data=bytes(frame))) for frame in frames])
        try:
            await self._write(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            if self._closed_locally:
                raise trio.ClosedResourceError("transport was closed by us") from None
            raise self._ended() from None

    async def _write(self, data: bytes) -> None:
        """Write under the send lock; a write that fails or is cancelled half-way ends the connection."""
        try:
            self._send_lock.acquire_nowait()          # free: no scheduling round trip
        except trio.WouldBlock:
            await self._send_lock.acquire()
        try:
            await self._stream.send_all(data)
        except BaseException:
            # Part of a frame may be on the wire: nothing more can be sent on this stream.
            self._lost("connection lost while sending")
            await trio.aclose_forcefully(self._stream)
            raise
        finally:
            self._send_lock.release()

    def _lost(self, reason: str) -> None:
        if self._code is None:
            self._code, self._reason = CLOSE_ABNORMAL, reason

    async def receive(self) -> bytes:
        """The next binary message.

        A message already read (one read often brings several) is returned without a
        yield.  Cancelled, it loses nothing: what was read stays queued for the next call.
        """
        while not self._frames:
            if self._closed_locally:
                raise trio.ClosedResourceError("transport was closed by us")
            if self._code is not None:
                raise self._ended()
            self._receiving = True
            try:
                data = await self._stream.receive_some(RECEIVE_CHUNK)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                data = b""
            finally:
                self._receiving = False
            if self._closed_locally:
                raise trio.ClosedResourceError("transport was closed by us")
            if not data:
                self._lost("connection lost")
                await trio.aclose_forcefully(self._stream)
                raise self._ended()
            self._ws.receive_data(bytes(data))
            await self._handle(self._ws.events())
        return self._frames.popleft()

    async def _handle(self, events: Iterator[Event]) -> None:
        """Queue whole binary messages; answer pings and the close handshake; end on anything else."""
        replies: list[bytes] = []
        closed_by_peer = False
        for event in events:
            if isinstance(event, BytesMessage):
                self._part_bytes += len(event.data)
                if self._part_bytes > self._max_frame:
                    await self._fail(CLOSE_TOO_BIG, "frame too large")
                    return
                if event.message_finished and not self._parts:
                    self._frames.append(bytes(event.data))
                    self._part_bytes = 0
                else:
                    self._parts.append(bytes(event.data))
                    if event.message_finished:
                        self._frames.append(b"".join(self._parts))
                        self._parts, self._part_bytes = [], 0
            elif isinstance(event, Ping):
                replies.append(self._ws.send(event.response()))
            elif isinstance(event, CloseConnection):
                if self._ws.state is not ConnectionState.REMOTE_CLOSING:   # wsproto's own parse error
                    await self._fail(int(event.code), event.reason or "protocol error")
                    return
                self._code, self._reason = int(event.code), event.reason or None
                replies.append(self._ws.send(event.response()))
                closed_by_peer = True
                break
            elif isinstance(event, TextMessage):
                await self._fail(CLOSE_PROTOCOL_ERROR, "text frame received")
                return
        if replies:
            with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                await self._write(b"".join(replies))
        if closed_by_peer:
            await trio.aclose_forcefully(self._stream)

    async def _fail(self, code: int, reason: str) -> None:
        """Close because the server broke the protocol: after the messages already queued,
        ``receive`` raises ``TransportClosed(code)``."""
        self._code, self._reason = code, reason
        with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
            if self._ws.state is ConnectionState.OPEN:
                await self._write(self._ws.send(CloseConnection(code=code, reason=reason)))
        await trio.aclose_forcefully(self._stream)

    def _awaiting_close_reply(self) -> bool:
        return self._ws.state is ConnectionState.LOCAL_CLOSING

    async def aclose(self, code: int = CLOSE_NORMAL, reason: str = "") -> None:
        """Send a close frame and wait (up to ``CLOSE_WAIT_S``) for the server's; idempotent."""
        if self._closed_locally:
            return
        self._closed_locally = True
        with trio.move_on_after(CLOSE_WAIT_S) as scope:
            scope.shield = True
            try:
                if self._code is None and self._ws.state is ConnectionState.OPEN:
                    await self._write(self._ws.send(CloseConnection(code=code, reason=reason)))
                    self._code, self._reason = code, reason or None
                    # Wait for the server's close frame (or its end of the stream), so that
                    # our socket is not closed with unread data (a reset, not a close).
                    while not self._receiving and self._awaiting_close_reply():
                        data = await self._stream.receive_some(RECEIVE_CHUNK)
                        if not data:
                            break
                        self._ws.receive_data(bytes(data))
                        for _ in self._ws.events():
                            pass
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                pass
        await trio.aclose_forcefully(self._stream)


def _websocket_target(url: str) -> tuple[str, int, str, str, bool]:
    """(host, port, Host header, request target, TLS?) of a ``ws://`` or ``wss://`` URL."""
    parts = urlsplit(url)
    if parts.scheme not in ("ws", "wss"):
        raise ValueError("a WebSocket URL starts with ws:// or wss://")
    host = parts.hostname
    if not host:
        raise ValueError("the WebSocket URL has no host")
    tls = parts.scheme == "wss"
    default_port = 443 if tls else 80
    port = parts.port or default_port
    name = f"[{host}]" if ":" in host else host
    header = name if port == default_port else f"{name}:{port}"
    target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    return host, port, header, target, tls


async def connect_websocket(url: str, *, max_frame: int = DEFAULT_MAX_FRAME,
                            ssl_context: ssl.SSLContext | None = None) -> WebSocketClientTransport:
    """Open a client transport to ``ws://`` or ``wss://`` ``url`` (it runs no background task).

    ``wss://`` verifies the server's certificate against ``ssl_context`` (default: the
    system's trust store).  Any failure to connect is ``TransportClosed`` (code None).
    """
    host, port, _, _, tls = _websocket_target(url)
    if ssl_context is not None and not tls:
        raise ValueError("an SSL context needs a wss:// URL")
    try:
        if tls:
            stream: trio.abc.Stream = await trio.open_ssl_over_tcp_stream(
                host, port, ssl_context=ssl_context or ssl.create_default_context(), https_compatible=True)
        else:
            stream = await trio.open_tcp_stream(host, port)
    except (OSError, trio.BrokenResourceError) as exc:
        raise TransportClosed(None, f"cannot connect: {type(exc).__name__}") from None
    return await websocket_over_stream(stream, url, max_frame=max_frame)


async def websocket_over_stream(stream: trio.abc.Stream, url: str, *,
                                max_frame: int = DEFAULT_MAX_FRAME) -> WebSocketClientTransport:
    """The client handshake for ``url`` over a stream already open (``connect_websocket``'s second
    half; tests drive it over memory streams).  The stream is closed if the handshake fails."""
    _, _, header, target, _ = _websocket_target(url)
    try:
        ws = WSConnection(ConnectionType.CLIENT)
        await stream.send_all(ws.send(Request(host=header, target=target)))
        while True:
            data = await stream.receive_some(RECEIVE_CHUNK)
            if not data:
                raise TransportClosed(None, "cannot connect: the server closed during the handshake")
            ws.receive_data(bytes(data))
            events = ws.events()
            for event in events:
                if isinstance(event, AcceptConnection):
                    transport = WebSocketClientTransport(stream, ws, header, max_frame)
                    await transport._handle(events)     # frames that came with the handshake's answer
                    return transport
                if isinstance(event, RejectConnection):
                    raise TransportClosed(None, f"cannot connect: the server refused (HTTP {event.status_code})")
    except (OSError, trio.BrokenResourceError, RemoteProtocolError) as exc:
        await trio.aclose_forcefully(stream)
        raise TransportClosed(None, f"cannot connect: {type(exc).__name__}") from None
    except BaseException:
        await trio.aclose_forcefully(stream)
        raise


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
