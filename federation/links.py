"""Links to other homeservers (issue 5): how signed transactions and s2s-requests travel.

A ``Link`` is our side of the channel to ONE destination domain.  The frames it carries
are already signed (``federation.s2s``); a link only moves bytes and reports how the
exchange ended:

* ``send_transaction(frame) -> None`` once the receiver acknowledged (stored) it;
* ``request(frame) -> bytes``: the responder's signed answer frame;
* a refusal raises ``federation.rpc.RemoteError`` carrying the receiver's ``ErrorCode``
  and ``details`` (its message is the remote's text: log it, never relay it);
* everything transient (unreachable, connection lost, no answer within the per-call
  timeout, 30 s by default) raises ``LinkError``; the caller's backoff decides when to
  try again.  A link never retries or reconnects in a loop of its own.

Implementations, all behind the same contract:

* ``WebSocketLink`` and ``MemoryLink``: one persistent connection, opened lazily on the
  first call and shared by concurrent calls (``RpcClient`` multiplexing, so a window of
  transactions is in flight at once).  RPC ops: ``s2s_txn {txn}`` → ``{}`` and
  ``s2s_request {request}`` → ``{response}``.  If the connection dies, the calls in
  flight raise ``LinkError`` and the next call reconnects; a call that times out drops
  the connection (a half-open TCP connection would otherwise never be noticed).
* ``HttpLink``: ``POST {http base}/_securechat/federation/v1/txn`` and ``/request``,
  body = the signed frame (``application/msgpack``), reply ``{ok: {...}}`` or
  ``{error: {code, message[, details]}}``.

The serving side (``serve_federation_connection``, ``http_federation_app_handler``, the
``FederationEndpoint`` they call) is ``federation.link_server``; it uses the ops, paths
and bounds defined here.

``LinkPool`` keeps one link per domain; resolvers build links from discovery
(``websocket_resolver``: ``endpoints.fed``; ``http_resolver``: ``endpoints.http``) or
from a ``MemoryNetwork`` (listener ``fed:<domain>``).
"""

from __future__ import annotations

import logging
import ssl
from abc import ABC, abstractmethod
from collections.abc import AsyncGenerator, Awaitable, Callable, Iterator
from contextlib import aclosing, contextmanager
from typing import Any, cast

import httpx
import trio

from federation import codec, s2s
from federation.discovery import Discovery, DiscoveryError
from federation.errors import ErrorCode, ProtocolError, SecureChatError
from federation.frames import ErrorInfo
from federation.rpc import RemoteError, RpcClient
from federation.transport import (
    CLOSE_NORMAL, CLOSE_PROTOCOL_ERROR, MemoryNetwork, Transport, TransportClosed, connect_websocket,
)
from federation.validate import field, require_map

log = logging.getLogger("securechat.federation.links")

TXN_OP = "s2s_txn"
REQUEST_OP = "s2s_request"
HTTP_PREFIX = "/_securechat/federation/v1"
HTTP_TXN_PATH = f"{HTTP_PREFIX}/txn"
HTTP_REQUEST_PATH = f"{HTTP_PREFIX}/request"
CONTENT_TYPE = "application/msgpack"
MEMORY_PREFIX = "fed:"
DEFAULT_TIMEOUT_S = 30.0
# One RPC frame carries one signed frame (≤ 1 MiB body + its envelope) plus a little framing.
# A listener serving federation must accept frames this big (``max_frame`` of the transport).
MAX_FED_FRAME = s2s.MAX_TRANSACTION_BYTES + 4096
RPC_LIMITS = codec.Limits(max_bytes=MAX_FED_FRAME, max_depth=8, max_items=4096, max_container=1024)
OP_PARAMS = {TXN_OP: "txn", REQUEST_OP: "request"}     # op -> the parameter holding the frame


class LinkError(SecureChatError):
    """Transient: the peer is unreachable, the connection closed, or no answer in time.

    The message is ours.  ``code`` is ``remote_error``, or ``unknown_domain`` when
    discovery found nothing to connect to.
    """

    code = ErrorCode.REMOTE_ERROR


class LinkClosed(LinkError):
    """We closed the link (or its pool): the server is shutting down."""


class Link(ABC):
    """Our side of the channel to one destination domain (see the module docstring)."""

    domain: str

    @abstractmethod
    async def send_transaction(self, frame: bytes) -> None:
        """Deliver one signed transaction frame; returns on the receiver's ack."""

    @abstractmethod
    async def request(self, frame: bytes) -> bytes:
        """Send one signed s2s-request frame; returns the signed response frame."""

    @abstractmethod
    async def aclose(self) -> None:
        """Close the link; calls in flight raise ``LinkError``, later calls ``LinkClosed``."""


Resolver = Callable[[str], Awaitable[Link]]
UrlSource = str | Callable[[], Awaitable[str]]


def memory_listener_name(domain: str) -> str:
    """The ``MemoryNetwork`` name a homeserver's federation listener serves under."""
    return f"{MEMORY_PREFIX}{domain}"


def _response_frame(ok: dict[str, Any]) -> bytes:
    response = ok.get("response")
    if not isinstance(response, bytes):
        raise LinkError("the peer sent a malformed answer")
    return response


# --- persistent RPC links (WebSocket, memory) ------------------------------------------------


class _RpcConnection:
    """One transport with its ``RpcClient`` reader running in the link's nursery."""

    def __init__(self, transport: Transport, domain: str) -> None:
        # A federation peer never pushes: the first push overflows the zero-size buffer
        # and ends the connection.
        self.rpc = RpcClient(transport, push_buffer=0, limits=RPC_LIMITS)
        self.domain = domain
        self._scope = trio.CancelScope()
        self._closing = False
        self.finished = trio.Event()

    @property
    def dead(self) -> bool:
        return self._closing or self.rpc.closed.is_set()

    def close(self) -> None:
        """Drop the connection: dead at once for new calls, calls in flight fail when the reader stops."""
        self._closing = True
        self._scope.cancel()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        code = CLOSE_NORMAL
        try:
            with self._scope:
                task_status.started()
                try:
                    await self.rpc.run_reader()
                except SecureChatError as exc:    # bytes that are not a response frame
                    log.warning("federation peer %s broke the protocol (%s); connection closed",
                                self.domain, exc.message)
                    code = CLOSE_PROTOCOL_ERROR
                except trio.BrokenResourceError:  # the network broke the stream
                    pass
        finally:
            with trio.CancelScope(shield=True):
                await self.rpc.transport.aclose(code)
            self.finished.set()


class _RpcLink(Link):
    """A link over one lazily opened, shared ``Transport`` (see ``WebSocketLink``, ``MemoryLink``)."""

    def __init__(self, domain: str, nursery: trio.Nursery, *, timeout_s: float = DEFAULT_TIMEOUT_S) -> None:
        self.domain = domain
        self.timeout_s = timeout_s
        self._nursery = nursery
        self._conn: _RpcConnection | None = None
        self._lock = trio.Lock()
        self._failures = 0
        self._last_failure = LinkError("not connected")
        self._closed = False
        self.connections = 0                  # connections opened so far (tests, metrics)

    @abstractmethod
    async def _connect(self) -> Transport:
        """Open a new transport; ``TransportClosed`` or ``LinkError`` if the peer cannot be reached."""

    async def _connection(self) -> _RpcConnection:
        failures_seen = self._failures
        async with self._lock:
            if self._closed:
                raise LinkClosed(f"link to {self.domain} is closed")
            conn = self._conn
            if conn is not None and not conn.dead:
                return conn
            if self._failures != failures_seen:
                # Someone else's attempt failed while we waited: share its verdict rather
                # than hammering the peer; the caller's backoff decides when to retry.
                raise LinkError(self._last_failure.message, code=self._last_failure.code)
            try:
                transport = await self._connect()
            except (TransportClosed, OSError, trio.BrokenResourceError):    # refused, DNS, TLS, ...
                self._failures += 1
                self._last_failure = LinkError(f"cannot connect to {self.domain}")
                raise LinkError(self._last_failure.message) from None
            except LinkError as exc:
                self._failures += 1
                self._last_failure = exc
                raise
            conn = _RpcConnection(transport, self.domain)
            await self._nursery.start(conn.run)
            if self._closed:                  # closed while we were connecting
                conn.close()
                raise LinkClosed(f"link to {self.domain} is closed")
            self._conn = conn
            self.connections += 1
            return conn

    async def _call(self, op: str, frame: bytes) -> dict[str, Any]:
        conn: _RpcConnection | None = None
        with trio.move_on_after(self.timeout_s):
            conn = await self._connection()
            try:
                return await conn.rpc.request(op, **{OP_PARAMS[op]: frame})
            except (TransportClosed, trio.ClosedResourceError, trio.BrokenResourceError):
                if self._closed:
                    raise LinkClosed(f"link to {self.domain} is closed") from None
                raise LinkError(f"connection to {self.domain} closed") from None
        if conn is not None:
            conn.close()
        raise LinkError(f"{self.domain} did not answer within {self.timeout_s:g} s")

    async def send_transaction(self, frame: bytes) -> None:
        await self._call(TXN_OP, frame)

    async def request(self, frame: bytes) -> bytes:
        return _response_frame(await self._call(REQUEST_OP, frame))

    async def aclose(self) -> None:
        self._closed = True
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.close()
            with trio.CancelScope(shield=True):
                await conn.finished.wait()
        await trio.lowlevel.checkpoint()


class MemoryLink(_RpcLink):
    """A link over a ``MemoryNetwork`` to the listener ``fed:<domain>``; ``source`` is what the peer sees."""

    def __init__(self, domain: str, network: MemoryNetwork, nursery: trio.Nursery, *,
                 source: str | None = None, timeout_s: float = DEFAULT_TIMEOUT_S) -> None:
        super().__init__(domain, nursery, timeout_s=timeout_s)
        self._network = network
        self._source = source

    async def _connect(self) -> Transport:
        return await self._network.connect(memory_listener_name(self.domain), self._source)


class WebSocketLink(_RpcLink):
    """A link over one WebSocket; ``url`` is fixed or looked up (discovery) at each connect."""

    def __init__(self, domain: str, url: UrlSource, nursery: trio.Nursery, *,
                 timeout_s: float = DEFAULT_TIMEOUT_S, ssl_context: ssl.SSLContext | None = None) -> None:
        super().__init__(domain, nursery, timeout_s=timeout_s)
        self._url = url
        self._ssl_context = ssl_context

    async def _connect(self) -> Transport:
        url = self._url if isinstance(self._url, str) else await self._url()
        return await connect_websocket(url, max_frame=MAX_FED_FRAME, ssl_context=self._ssl_context)


# --- HTTP links ------------------------------------------------------------------------------


@contextmanager
def _map_httpx(domain: str) -> Iterator[None]:
    """Translate httpx's exceptions once, here (httpcore's ``map_exceptions``)."""
    try:
        yield
    except httpx.TimeoutException as exc:
        raise LinkError(f"{domain} did not answer in time") from exc
    except httpx.HTTPError as exc:
        raise LinkError(f"cannot reach {domain} ({type(exc).__name__})") from exc


async def _read_capped(chunks: AsyncGenerator[bytes, None], limit: int, domain: str) -> bytes:
    out, size = [], 0
    async with aclosing(chunks) as stream:
        async for chunk in stream:
            size += len(chunk)
            if size > limit:
                raise LinkError(f"{domain} sent an answer over {limit} bytes")
            out.append(chunk)
    return b"".join(out)


def _parse_http_reply(domain: str, status: int, body: bytes) -> dict[str, Any]:
    try:
        reply = require_map(codec.decode(body, RPC_LIMITS), "reply")
        if "error" in reply:
            error = require_map(reply["error"], "error")
            info = ErrorInfo(field(error, "code", str, max_length=64), field(error, "message", str),
                             error.get("details"))
        else:
            info = None
            ok = require_map(reply.get("ok"), "ok")
    except ProtocolError:
        raise LinkError(f"{domain} answered HTTP {status} without a federation reply") from None
    if info is not None:
        raise RemoteError(info)
    if status != 200:
        raise LinkError(f"{domain} answered HTTP {status}")
    return ok


class HttpLink(Link):
    """POSTs frames to ``{base}/_securechat/federation/v1/...`` with a shared ``httpx.AsyncClient``.

    The client belongs to the caller (``aclose`` does not close it); ``base_url`` is fixed
    or looked up (discovery) at each call.
    """

    def __init__(self, domain: str, base_url: UrlSource, client: httpx.AsyncClient, *,
                 timeout_s: float = DEFAULT_TIMEOUT_S) -> None:
        self.domain = domain
        self.timeout_s = timeout_s
        self._base = base_url
        self._client = client
        self._closed = False

    async def _post(self, path: str, frame: bytes) -> dict[str, Any]:
        if self._closed:
            raise LinkClosed(f"link to {self.domain} is closed")
        with trio.move_on_after(self.timeout_s):
            base = self._base if isinstance(self._base, str) else await self._base()
            with _map_httpx(self.domain):
                async with self._client.stream(
                        "POST", base.rstrip("/") + path, content=frame,
                        headers={"content-type": CONTENT_TYPE, "accept": CONTENT_TYPE}) as reply:
                    body = await _read_capped(cast(AsyncGenerator[bytes, None], reply.aiter_bytes()),
                                              MAX_FED_FRAME, self.domain)
            return _parse_http_reply(self.domain, reply.status_code, body)
        raise LinkError(f"{self.domain} did not answer within {self.timeout_s:g} s")

    async def send_transaction(self, frame: bytes) -> None:
        await self._post(HTTP_TXN_PATH, frame)

    async def request(self, frame: bytes) -> bytes:
        return _response_frame(await self._post(HTTP_REQUEST_PATH, frame))

    async def aclose(self) -> None:
        self._closed = True
        await trio.lowlevel.checkpoint()


# --- the pool and the resolvers --------------------------------------------------------------


class LinkPool:
    """One link per domain, created on first use; concurrent getters share the one being made."""

    def __init__(self, resolve: Resolver) -> None:
        self._resolve = resolve
        self._links: dict[str, Link] = {}
        self._pending: dict[str, trio.Event] = {}
        self._closed = False

    def __contains__(self, domain: object) -> bool:
        return domain in self._links

    async def get(self, domain: str) -> Link:
        while True:
            if self._closed:
                raise LinkClosed("federation links are closed")
            link = self._links.get(domain)
            if link is not None:
                return link
            pending = self._pending.get(domain)
            if pending is None:
                break
            await pending.wait()      # someone else is creating it; if that failed, we try in turn
        done = self._pending[domain] = trio.Event()
        try:
            link = await self._resolve(domain)
            if self._closed:
                with trio.CancelScope(shield=True):
                    await link.aclose()
                raise LinkClosed("federation links are closed")
            self._links[domain] = link
            return link
        finally:
            del self._pending[domain]
            done.set()

    async def aclose(self) -> None:
        """Close every link; later ``get`` calls raise ``LinkClosed``."""
        self._closed = True
        links, self._links = list(self._links.values()), {}
        with trio.CancelScope(shield=True):
            for link in links:
                await link.aclose()


async def _lookup(discovery: Discovery, domain: str) -> Any:
    try:
        return await discovery.lookup(domain)
    except DiscoveryError as exc:
        raise LinkError(f"cannot discover {domain}", code=exc.code) from exc


def websocket_resolver(discovery: Discovery, nursery: trio.Nursery, *, timeout_s: float = DEFAULT_TIMEOUT_S,
                       ssl_context: ssl.SSLContext | None = None) -> Resolver:
    """WebSocket links to each domain's ``endpoints.fed`` (looked up again at every connect)."""

    async def resolve(domain: str) -> Link:
        async def url() -> str:
            fed = (await _lookup(discovery, domain)).endpoints.fed
            if fed is None or not fed.startswith(("ws://", "wss://")):
                raise LinkError(f"{domain} publishes no WebSocket federation endpoint",
                                code=ErrorCode.UNKNOWN_DOMAIN)
            return str(fed)

        return WebSocketLink(domain, url, nursery, timeout_s=timeout_s, ssl_context=ssl_context)

    return resolve


def http_resolver(discovery: Discovery, http_client: httpx.AsyncClient, *,
                  timeout_s: float = DEFAULT_TIMEOUT_S) -> Resolver:
    """HTTP links to each domain's ``endpoints.http`` (looked up, from discovery's cache, per call)."""

    async def resolve(domain: str) -> Link:
        async def base() -> str:
            return str((await _lookup(discovery, domain)).endpoints.http)

        return HttpLink(domain, base, http_client, timeout_s=timeout_s)

    return resolve


def memory_resolver(network: MemoryNetwork, nursery: trio.Nursery, *, source: str | None = None,
                    timeout_s: float = DEFAULT_TIMEOUT_S) -> Resolver:
    """Memory links to ``fed:<domain>`` listeners (tests; many homeservers in one process).

    ``nursery`` runs each link's reader task (the WebSocket resolver needs one too).
    """

    async def resolve(domain: str) -> Link:
        return MemoryLink(domain, network, nursery, source=source, timeout_s=timeout_s)

    return resolve
