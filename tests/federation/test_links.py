"""Links between homeservers: one contract over memory, WebSocket and HTTP, plus the serving side.

The endpoint is a small fake (no homeserver): it records frames, can refuse, fail or hold
calls at a gate, and counts how many calls it is running at once.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

import httpx
import msgpack
import pytest
import trio
from hypercorn.config import Config as HypercornConfig
from hypercorn.trio import serve as hypercorn_serve

from federation import codec, s2s
from federation.discovery import Discovery, DiscoveryDocument, Endpoints
from federation.errors import ErrorCode, RequestRejected
from federation.link_server import http_federation_app_handler, serve_federation_connection
from federation.links import (
    HTTP_REQUEST_PATH, HTTP_TXN_PATH, MAX_FED_FRAME, HttpLink, Link, LinkClosed, LinkError, LinkPool, MemoryLink,
    WebSocketLink, http_resolver, memory_listener_name, memory_resolver, websocket_resolver,
)
from federation.rpc import RemoteError
from federation.transport import (
    CLOSE_POLICY, CLOSE_PROTOCOL_ERROR, MemoryNetwork, Transport, TransportClosed, connect_websocket,
    serve_websocket_transport,
)

DOMAIN = "example.net"


class FakeEndpoint:
    """Records what it is given; ``refuse`` raises, ``gate`` holds every call until set."""

    def __init__(self) -> None:
        self.transactions: list[tuple[bytes, str]] = []
        self.requests: list[tuple[bytes, str]] = []
        self.refuse: BaseException | None = None
        self.gate: trio.Event | None = None
        self.active = 0
        self.max_active = 0
        self._waiters: list[tuple[int, trio.Event]] = []

    async def wait_active(self, n: int) -> None:
        if self.active < n:
            event = trio.Event()
            self._waiters.append((n, event))
            await event.wait()

    async def _run(self) -> None:
        self.active += 1
        self.max_active = max(self.max_active, self.active)
        for n, event in self._waiters:
            if self.active >= n:
                event.set()
        try:
            if self.gate is not None:
                await self.gate.wait()
            if self.refuse is not None:
                raise self.refuse
        finally:
            self.active -= 1

    async def receive_transaction(self, frame: bytes, remote: str) -> None:
        await self._run()
        self.transactions.append((frame, remote))

    async def handle_request(self, frame: bytes, remote: str) -> bytes:
        await self._run()
        self.requests.append((frame, remote))
        return b"answer:" + frame


# --- harnesses: one server + one link per kind -----------------------------------------------


async def _cancellable(serve: Callable[..., Awaitable[Any]], *, task_status: trio.TaskStatus[Any]) -> None:
    """Run ``serve`` in its own cancel scope; report (scope, what serve reported, an event set once it ended)."""
    done = trio.Event()
    try:
        with trio.CancelScope() as scope:
            async with trio.open_nursery() as inner:
                value = await inner.start(serve)
                task_status.started((scope, value, done))
    finally:
        done.set()


class Harness:
    kind = ""
    rpc = True

    def __init__(self, nursery: trio.Nursery, endpoint: FakeEndpoint, max_concurrent: int = 16) -> None:
        self.nursery = nursery
        self.endpoint = endpoint
        self.max_concurrent = max_concurrent
        self.server_transports: list[Transport] = []
        self.scope: trio.CancelScope | None = None
        self.stopped: trio.Event | None = None
        self.link: Link

    async def handler(self, transport: Transport) -> None:
        self.server_transports.append(transport)
        await serve_federation_connection(transport, self.endpoint, transport.remote,
                                          max_concurrent=self.max_concurrent)

    async def start_server(self) -> None:
        raise NotImplementedError

    async def stop_server(self) -> None:
        """Close the server's connections, stop listening, return once it is gone."""
        assert self.scope is not None and self.stopped is not None
        for transport in self.server_transports:
            await transport.aclose()
        self.scope.cancel()
        await self.stopped.wait()

    async def aclose(self) -> None:
        await self.link.aclose()


class MemoryHarness(Harness):
    kind = "memory"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.network = MemoryNetwork()
        self.link = MemoryLink(DOMAIN, self.network, self.nursery, source="memory:example.org")

    async def start_server(self) -> None:
        self.scope, _, self.stopped = await self.nursery.start(_cancellable, lambda task_status: self.network.serve(
            memory_listener_name(DOMAIN), self.handler, max_frame=MAX_FED_FRAME, task_status=task_status))


class WebSocketHarness(Harness):
    kind = "websocket"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.port = 0

    async def start_server(self) -> None:
        self.scope, self.port, self.stopped = await self.nursery.start(
            _cancellable, lambda task_status: serve_websocket_transport(
                {"/fed": self.handler}, "127.0.0.1", self.port, max_frame=MAX_FED_FRAME, task_status=task_status))
        if not hasattr(self, "link"):
            self.link = WebSocketLink(DOMAIN, f"ws://127.0.0.1:{self.port}/fed", self.nursery)


class HttpHarness(Harness):
    """``httpx.MockTransport`` calling ``http_federation_app_handler`` in-process."""

    kind = "http"
    rpc = False

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.up = False
        self.client = httpx.AsyncClient(transport=httpx.MockTransport(self.handle_http))
        self.link = HttpLink(DOMAIN, "http://example.net", self.client)

    async def handle_http(self, request: httpx.Request) -> httpx.Response:
        if not self.up:
            raise httpx.ConnectError("connection refused", request=request)
        status, body = await http_federation_app_handler(self.endpoint, request.method, request.url.path,
                                                         await request.aread(), "mock:example.org")
        return httpx.Response(status, content=body, headers={"content-type": "application/msgpack"})

    async def start_server(self) -> None:
        self.up = True

    async def stop_server(self) -> None:
        self.up = False

    async def aclose(self) -> None:
        await self.link.aclose()
        await self.client.aclose()


class HypercornHarness(HttpHarness):
    """A real HTTP server (hypercorn's trio worker) serving an app built on the handler."""

    kind = "hypercorn"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        Harness.__init__(self, *args, **kwargs)
        self.client = httpx.AsyncClient()
        self.port = 0

    async def app(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                elif message["type"] == "lifespan.shutdown":
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        if scope["type"] != "http":
            return
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        status, data = await http_federation_app_handler(self.endpoint, scope["method"], scope["path"], body,
                                                         str(scope.get("client")))
        await send({"type": "http.response.start", "status": status,
                    "headers": [(b"content-type", b"application/msgpack")]})
        await send({"type": "http.response.body", "body": data})

    async def start_server(self) -> None:
        stop = trio.Event()
        config = HypercornConfig()
        config.bind = [f"127.0.0.1:{self.port}"]
        config.accesslog = None
        config.errorlog = None
        config.graceful_timeout = 1
        self.stop_event = stop

        async def serve(task_status: trio.TaskStatus[Any]) -> None:
            await hypercorn_serve(self.app, config, shutdown_trigger=stop.wait,  # type: ignore[arg-type]
                                  task_status=task_status, mode="asgi")

        self.scope, bound, self.stopped = await self.nursery.start(_cancellable, serve)
        self.port = int(bound[0].rsplit(":", 1)[1])
        if not hasattr(self, "link"):
            self.link = HttpLink(DOMAIN, f"http://127.0.0.1:{self.port}", self.client)

    async def stop_server(self) -> None:
        assert self.stopped is not None
        self.stop_event.set()
        await self.stopped.wait()


HARNESSES = {h.kind: h for h in (MemoryHarness, WebSocketHarness, HttpHarness, HypercornHarness)}


@asynccontextmanager
async def harness(kind: str, *, max_concurrent: int = 16) -> AsyncIterator[Harness]:
    async with trio.open_nursery() as nursery:
        h = HARNESSES[kind](nursery, FakeEndpoint(), max_concurrent)
        await h.start_server()
        try:
            yield h
        finally:
            await h.aclose()
            nursery.cancel_scope.cancel()


@pytest.fixture(params=list(HARNESSES))
def kind(request: pytest.FixtureRequest) -> str:
    return str(request.param)


rpc_kinds = pytest.mark.parametrize("kind", ["memory", "websocket"])


# --- the contract ----------------------------------------------------------------------------


async def test_transaction_and_request_round_trip(kind):
    async with harness(kind) as h:
        assert await h.link.send_transaction(b"txn-frame") is None
        assert await h.link.request(b"req-frame") == b"answer:req-frame"
        [(frame, remote)] = h.endpoint.transactions
        assert frame == b"txn-frame" and isinstance(remote, str) and remote
        assert h.endpoint.requests[0][0] == b"req-frame"


async def test_refusal_codes_and_details_reach_the_caller(kind):
    async with harness(kind) as h:
        h.endpoint.refuse = s2s.ForgedOrigin("message envelope sender is not of the origin domain")
        with pytest.raises(RemoteError) as info:
            await h.link.send_transaction(b"txn")
        assert info.value.code is ErrorCode.FORBIDDEN
        assert info.value.details == {"reason": "forged_origin"}
        h.endpoint.refuse = RequestRejected("slow down", code=ErrorCode.RATE_LIMITED)
        with pytest.raises(RemoteError) as info:
            await h.link.request(b"req")
        assert info.value.code is ErrorCode.RATE_LIMITED
        h.endpoint.refuse = None
        await h.link.send_transaction(b"still fine")


async def test_endpoint_bugs_answer_internal_without_detail(kind, caplog):
    async with harness(kind) as h:
        h.endpoint.refuse = RuntimeError("secret-canary")
        with caplog.at_level(logging.ERROR, logger="securechat.federation.links"):
            with pytest.raises(RemoteError) as info:
                await h.link.send_transaction(b"txn")
        assert (info.value.code, info.value.message) == (ErrorCode.INTERNAL, "internal error")
        assert any(r.exc_info and "secret-canary" in str(r.exc_info[1]) for r in caplog.records)
        h.endpoint.refuse = None
        await h.link.send_transaction(b"served on")


async def test_concurrent_transactions_are_in_flight_together_on_one_link(kind):
    async with harness(kind) as h:
        h.endpoint.gate = trio.Event()
        done: list[int] = []

        async def send(i: int) -> None:
            await h.link.send_transaction(b"t%d" % i)
            done.append(i)

        async with trio.open_nursery() as nursery:
            for i in range(8):
                nursery.start_soon(send, i)
            with trio.fail_after(10):
                await h.endpoint.wait_active(8)
            assert done == []
            h.endpoint.gate.set()
        assert sorted(done) == list(range(8))
        if h.rpc:
            assert isinstance(h.link, MemoryLink | WebSocketLink)
            assert h.link.connections == 1 and len(h.server_transports) == 1


async def test_server_down_then_back(kind):
    async with harness(kind) as h:
        await h.link.send_transaction(b"before")
        await h.stop_server()
        with pytest.raises(LinkError):
            await h.link.send_transaction(b"while down")
        with pytest.raises(LinkError):       # no reconnect loop: each call tries once
            await h.link.request(b"while down")
        await h.start_server()
        await h.link.send_transaction(b"after")
        assert [f for f, _ in h.endpoint.transactions] == [b"before", b"after"]


@rpc_kinds
async def test_connection_dying_fails_calls_in_flight_and_next_call_reconnects(kind):
    async with harness(kind) as h:
        h.endpoint.gate = trio.Event()
        async with trio.open_nursery() as nursery:
            async def doomed() -> None:
                with pytest.raises(LinkError):
                    await h.link.send_transaction(b"doomed")

            nursery.start_soon(doomed)
            with trio.fail_after(10):
                await h.endpoint.wait_active(1)
            await h.server_transports[0].aclose()
        h.endpoint.gate = None
        await h.link.send_transaction(b"next")
        assert isinstance(h.link, MemoryLink | WebSocketLink)
        assert h.link.connections == 2


async def test_window_of_concurrent_calls_per_connection_is_bounded():
    async with harness("memory", max_concurrent=2) as h:
        h.endpoint.gate = trio.Event()
        async with trio.open_nursery() as nursery:
            for i in range(5):
                nursery.start_soon(h.link.send_transaction, b"t%d" % i)
            await h.endpoint.wait_active(2)
            for _ in range(20):
                await trio.testing.wait_all_tasks_blocked()
            assert (h.endpoint.active, h.endpoint.max_active) == (2, 2)
            h.endpoint.gate.set()
        assert len(h.endpoint.transactions) == 5 and h.endpoint.max_active == 2


@pytest.mark.parametrize("kind", ["memory", "http"])
async def test_no_answer_within_the_timeout_is_a_link_error(kind, autojump_clock):
    async with harness(kind) as h:
        h.endpoint.gate = trio.Event()           # never set: the peer hangs
        start = trio.current_time()
        with pytest.raises(LinkError, match="did not answer within 30 s"):
            await h.link.send_transaction(b"hangs")
        assert trio.current_time() - start == pytest.approx(30)
        h.endpoint.gate = None
        await h.link.send_transaction(b"answered")
        if isinstance(h.link, MemoryLink):
            assert h.link.connections == 2       # the silent connection was dropped


async def test_closing_a_link_fails_calls_in_flight_then_refuses(kind):
    async with harness(kind) as h:
        if not h.rpc:
            await h.link.aclose()
            with pytest.raises(LinkClosed):
                await h.link.send_transaction(b"late")
            return
        h.endpoint.gate = trio.Event()
        async with trio.open_nursery() as nursery:
            async def doomed() -> None:
                with pytest.raises(LinkError):
                    await h.link.send_transaction(b"doomed")

            nursery.start_soon(doomed)
            await h.endpoint.wait_active(1)
            await h.link.aclose()
        with pytest.raises(LinkClosed):
            await h.link.request(b"late")


# --- the serving side keeps going whatever a peer sends ------------------------------------


@asynccontextmanager
async def raw_connection(kind: str, h: Harness) -> AsyncIterator[Transport]:
    if isinstance(h, MemoryHarness):
        yield await h.network.connect(memory_listener_name(DOMAIN))
    else:
        assert isinstance(h, WebSocketHarness)
        transport = await connect_websocket(f"ws://127.0.0.1:{h.port}/fed", max_frame=MAX_FED_FRAME)
        try:
            yield transport
        finally:
            await transport.aclose()


async def _answer(transport: Transport, obj: Any) -> dict[str, Any]:
    await transport.send(codec.encode(obj))
    answer: dict[str, Any] = codec.decode(await transport.receive())
    return answer


@rpc_kinds
async def test_bad_frames_get_errors_or_a_clean_close_and_the_server_serves_on(kind):
    async with harness(kind) as h:
        async with raw_connection(kind, h) as raw:
            answer = await _answer(raw, {"id": 1, "op": "s2s_subscribe", "txn": b"x"})
            assert answer["id"] == 1 and answer["error"]["code"] == "unknown_op"
            answer = await _answer(raw, {"id": 2, "op": "s2s_txn", "txn": "not bytes"})
            assert answer["error"]["code"] == "bad_request"
            answer = await _answer(raw, {"id": 3, "op": "s2s_txn", "txn": b"x", "extra": 1})
            assert answer["error"]["code"] == "bad_request"
            answer = await _answer(raw, {"id": 4, "op": "s2s_request"})
            assert answer["error"]["code"] == "bad_request"
            assert await _answer(raw, {"id": 5, "op": "s2s_txn", "txn": b"fine"}) == {"id": 5, "ok": {}}
            answer = await _answer(raw, {"id": 6, "op": "s2s_request", "request": b"q"})
            assert answer == {"id": 6, "ok": {"response": b"answer:q"}}
            await raw.send(b"\xc1 not msgpack")
            with pytest.raises(TransportClosed) as info:
                await raw.receive()
            assert info.value.code == CLOSE_PROTOCOL_ERROR
        await h.link.send_transaction(b"other connections are unaffected")
        assert [f for f, _ in h.endpoint.transactions] == [b"fine", b"other connections are unaffected"]


async def test_a_peer_that_keeps_sending_bad_frames_is_closed_with_1008():
    async with harness("memory") as h:
        raw = await h.network.connect(memory_listener_name(DOMAIN))
        for i in range(20):
            answer = await _answer(raw, {"id": i, "op": "s2s_txn", "txn": 1})
            assert answer["error"]["code"] == "bad_request"
        await raw.send(codec.encode({"id": 99, "op": "s2s_txn", "txn": 1}))
        with pytest.raises(TransportClosed) as info:
            await raw.receive()
        assert info.value.code == CLOSE_POLICY


async def _bad_peer(reply: Callable[[dict[str, Any]], bytes], network: MemoryNetwork) -> Callable[..., Any]:
    async def handler(transport: Transport) -> None:
        try:
            while True:
                request = codec.decode(await transport.receive())
                await transport.send(reply(request))
        except TransportClosed:
            pass

    return lambda task_status: network.serve(memory_listener_name(DOMAIN), handler, max_frame=4 << 20,
                                             task_status=task_status)


@pytest.mark.parametrize("reply", [
    lambda req: b"\xc1garbage",
    lambda req: codec.encode({"push": "envelope"}),
    lambda req: codec.encode({"id": req["id"], "ok": {"response": "text, not bytes"}}),
    lambda req: msgpack.packb({"id": req["id"], "ok": {"response": b"x" * (MAX_FED_FRAME + 10)}}),
], ids=["undecodable", "push", "malformed-answer", "oversized"])
async def test_a_peer_breaking_the_protocol_fails_the_call_not_us(reply):
    async with trio.open_nursery() as nursery:
        network = MemoryNetwork()
        await nursery.start(await _bad_peer(reply, network))
        link = MemoryLink(DOMAIN, network, nursery)
        with pytest.raises(LinkError):
            await link.request(b"q")
        with pytest.raises(LinkError):       # and again on a fresh connection
            await link.request(b"q")
        await link.aclose()
        nursery.cancel_scope.cancel()


# --- HTTP specifics --------------------------------------------------------------------------


async def test_http_handler_routes_and_statuses():
    endpoint = FakeEndpoint()
    status, body = await http_federation_app_handler(endpoint, "GET", HTTP_TXN_PATH, b"", "r")
    assert status == 405 and codec.decode(body)["error"]["code"] == "bad_request"
    status, body = await http_federation_app_handler(endpoint, "POST", "/_securechat/federation/v1/nope", b"", "r")
    assert status == 404 and codec.decode(body)["error"]["code"] == "not_found"
    assert await http_federation_app_handler(endpoint, "POST", HTTP_TXN_PATH, b"t", "r") == (
        200, codec.encode({"ok": {}}))
    assert await http_federation_app_handler(endpoint, "POST", HTTP_REQUEST_PATH, b"q", "r") == (
        200, codec.encode({"ok": {"response": b"answer:q"}}))
    for exc, expected in [(s2s.BadTransactionSignature("x"), 401), (s2s.ForgedOrigin("x"), 403),
                          (s2s.MalformedTransaction("x"), 400),
                          (RequestRejected("x", code=ErrorCode.RATE_LIMITED), 429),
                          (RequestRejected("x", code=ErrorCode.SHUTTING_DOWN), 503)]:
        endpoint.refuse = exc
        status, body = await http_federation_app_handler(endpoint, "POST", HTTP_TXN_PATH, b"t", "r")
        assert status == expected
        assert codec.decode(body)["error"] == exc.to_wire()


@pytest.mark.parametrize("response", [
    httpx.Response(502, content=b"<html>bad gateway</html>"),
    httpx.Response(200, content=codec.encode({"something": "else"})),
    httpx.Response(500, content=codec.encode({"ok": {}})),
    httpx.Response(200, content=b"x" * (MAX_FED_FRAME + 1)),
], ids=["html-502", "no-ok", "ok-with-500", "oversized"])
async def test_http_link_turns_non_federation_answers_into_link_errors(response):
    async with httpx.AsyncClient(transport=httpx.MockTransport(lambda request: response)) as client:
        link = HttpLink(DOMAIN, "http://example.net", client)
        with pytest.raises(LinkError):
            await link.send_transaction(b"t")


async def test_http_link_posts_msgpack_to_the_federation_paths():
    seen: list[tuple[str, str, str, bytes]] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append((request.method, str(request.url), request.headers["content-type"], request.content))
        return httpx.Response(200, content=codec.encode({"ok": {"response": b"r"}}))

    async with httpx.AsyncClient(transport=httpx.MockTransport(handler)) as client:
        link = HttpLink(DOMAIN, "https://fed.example.net/", client)
        await link.send_transaction(b"t")
        assert await link.request(b"q") == b"r"
    assert seen == [
        ("POST", "https://fed.example.net/_securechat/federation/v1/txn", "application/msgpack", b"t"),
        ("POST", "https://fed.example.net/_securechat/federation/v1/request", "application/msgpack", b"q"),
    ]


# --- the pool and the resolvers --------------------------------------------------------------


class CountingResolver:
    def __init__(self) -> None:
        self.calls: list[str] = []
        self.fail_next = False
        self.closed: list[str] = []

    async def __call__(self, domain: str) -> Link:
        self.calls.append(domain)
        await trio.sleep(0.01)        # let concurrent getters pile up
        if self.fail_next:
            self.fail_next = False
            raise LinkError("resolution failed")
        resolver = self

        class Dummy(Link):
            async def send_transaction(self, frame: bytes) -> None: ...

            async def request(self, frame: bytes) -> bytes:
                return b""

            async def aclose(self) -> None:
                resolver.closed.append(self.domain)

        link = Dummy()
        link.domain = domain
        return link


async def test_pool_makes_one_link_per_domain_shared_by_concurrent_getters(autojump_clock):
    resolve = CountingResolver()
    pool = LinkPool(resolve)
    got: list[Link] = []
    async with trio.open_nursery() as nursery:
        for _ in range(5):
            nursery.start_soon(lambda: _append(got, pool.get("a.example")))
        nursery.start_soon(lambda: _append(got, pool.get("b.example")))
    assert sorted(resolve.calls) == ["a.example", "b.example"]
    a_links = {id(link): link for link in got if link.domain == "a.example"}
    assert len(got) == 6 and len(a_links) == 1
    assert "a.example" in pool and await pool.get("a.example") is next(iter(a_links.values()))
    await pool.aclose()
    assert sorted(resolve.closed) == ["a.example", "b.example"]
    with pytest.raises(LinkClosed):
        await pool.get("a.example")


async def _append(out: list[Link], getting: Awaitable[Link]) -> None:
    out.append(await getting)


async def test_pool_retries_resolution_after_a_failure(autojump_clock):
    resolve = CountingResolver()
    resolve.fail_next = True
    pool = LinkPool(resolve)
    with pytest.raises(LinkError):
        await pool.get("a.example")
    assert (await pool.get("a.example")).domain == "a.example"
    assert resolve.calls == ["a.example", "a.example"]
    await pool.aclose()


def _document(domain: str, *, fed: str | None, http: str = "http://127.0.0.1:1") -> DiscoveryDocument:
    return DiscoveryDocument(domain, Endpoints(c2s="ws://127.0.0.1:1/c2s", http=http, fed=fed), ())


async def test_memory_resolver_reaches_fed_listeners():
    async with harness("memory") as h:
        assert isinstance(h, MemoryHarness)
        pool = LinkPool(memory_resolver(h.network, h.nursery, source="memory:example.org"))
        link = await pool.get(DOMAIN)
        await link.send_transaction(b"via pool")
        assert h.endpoint.transactions == [(b"via pool", "memory:example.org")]
        with pytest.raises(LinkError):
            await (await pool.get("nowhere.example")).send_transaction(b"t")
        await pool.aclose()


async def test_websocket_resolver_uses_the_fed_endpoint():
    async with harness("websocket") as h:
        assert isinstance(h, WebSocketHarness)
        static = {DOMAIN: _document(DOMAIN, fed=f"ws://127.0.0.1:{h.port}/fed"),
                  "nofed.example": _document("nofed.example", fed=None),
                  "httpfed.example": _document("httpfed.example", fed="https://httpfed.example/")}
        async with Discovery(static=static, transport=httpx.MockTransport(lambda r: httpx.Response(404))) as disc:
            pool = LinkPool(websocket_resolver(disc, h.nursery))
            await (await pool.get(DOMAIN)).send_transaction(b"over ws")
            assert h.endpoint.transactions[0][0] == b"over ws"
            for domain in ("nofed.example", "httpfed.example"):
                with pytest.raises(LinkError) as info:
                    await (await pool.get(domain)).send_transaction(b"t")
                assert info.value.code is ErrorCode.UNKNOWN_DOMAIN
            with pytest.raises(LinkError) as info:                 # discovery finds nothing (404)
                await (await pool.get("unknown.example")).send_transaction(b"t")
            assert info.value.code is ErrorCode.UNKNOWN_DOMAIN
            await pool.aclose()


async def test_http_resolver_uses_the_http_endpoint():
    endpoint = FakeEndpoint()
    urls: list[str] = []

    async def handler(request: httpx.Request) -> httpx.Response:
        urls.append(str(request.url))
        status, body = await http_federation_app_handler(endpoint, request.method, request.url.path,
                                                         await request.aread(), "mock")
        return httpx.Response(status, content=body)

    static = {DOMAIN: _document(DOMAIN, fed=None, http="https://hs.example.net")}
    async with Discovery(static=static) as disc, \
            httpx.AsyncClient(transport=httpx.MockTransport(handler)) as client:
        pool = LinkPool(http_resolver(disc, client))
        link = await pool.get(DOMAIN)
        await link.send_transaction(b"over http")
        assert await link.request(b"q") == b"answer:q"
        await pool.aclose()
    assert urls == ["https://hs.example.net/_securechat/federation/v1/txn",
                    "https://hs.example.net/_securechat/federation/v1/request"]
    assert endpoint.transactions == [(b"over http", "mock")]


async def test_concurrent_callers_share_one_failed_connect_attempt(autojump_clock):
    attempts: list[float] = []

    async def url() -> str:
        attempts.append(trio.current_time())
        await trio.sleep(1)                   # a slow discovery that then finds nothing
        raise LinkError("cannot discover example.net", code=ErrorCode.UNKNOWN_DOMAIN)

    codes: list[ErrorCode] = []
    async with trio.open_nursery() as nursery:
        link = WebSocketLink(DOMAIN, url, nursery)

        async def send() -> None:
            with pytest.raises(LinkError) as info:
                await link.send_transaction(b"t")
            codes.append(info.value.code)

        async with trio.open_nursery() as callers:
            for _ in range(5):
                callers.start_soon(send)
        assert len(attempts) == 1 and codes == [ErrorCode.UNKNOWN_DOMAIN] * 5
        with pytest.raises(LinkError):        # a later call tries again (once)
            await link.send_transaction(b"t")
        assert len(attempts) == 2
        await link.aclose()
