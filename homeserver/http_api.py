"""The HTTP listener on hypercorn's trio worker: ``/healthz`` and ``/.well-known/securechat``.

A plain ASGI callable: two read-only JSON endpoints do not need a framework.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

import trio
from hypercorn.config import Config as HypercornConfig
from hypercorn.trio import serve as hypercorn_serve
from hypercorn.typing import ASGIReceiveCallable, ASGISendCallable, HTTPScope
from hypercorn.typing import Scope as Scope

from federation import codec
from federation.link_server import http_federation_app_handler
from federation.links import MAX_FED_FRAME

if TYPE_CHECKING:
    from homeserver.app import Homeserver

log = logging.getLogger("securechat.http")
FEDERATION_PREFIX = "/_securechat/federation/"

# hypercorn's ASGI TypedDicts (``Scope`` is the union of http/websocket/lifespan scopes).
Receive = ASGIReceiveCallable
Send = ASGISendCallable


def discovery_document(hs: Homeserver) -> dict[str, Any]:
    config = hs.config
    ws_port, http_port = hs.ports.get("ws", config.websocket_port), hs.ports.get("http", config.http_port)
    now = hs.clock()
    base = config.public_base or f"ws://{config.websocket_host}:{ws_port}"
    # Behind a reverse proxy both listeners share the public origin (wss:// -> https://).
    http = ("http" + config.public_base[2:] if config.public_base.startswith("ws")
            else f"http://{config.http_host}:{http_port}")
    endpoints = {"c2s": f"{base}/c2s", "http": http}
    if hs.federation is not None:
        endpoints["fed"] = f"{base}/fed"
    return {
        "domain": config.domain,
        "version": 1,
        "endpoints": endpoints,
        "server_keys": [k.describe() for k in hs.server_keys if k.valid_until_ms > now],
    }


def make_app(hs: Homeserver) -> Callable[[Scope, Receive, Send], Awaitable[None]]:
    async def app(scope: Scope, receive: Receive, send: Send) -> None:
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
        path, method = scope["path"], scope["method"]
        if path.startswith(FEDERATION_PREFIX):
            await _federation(hs, scope, receive, send)
        elif method not in ("GET", "HEAD"):
            await _json(send, 405, {"error": {"code": "bad_request", "message": "method not allowed"}})
        elif path == "/healthz":
            health = await hs.health()
            await _json(send, 200 if health["status"] == "ok" else 503, health)
        elif path == "/.well-known/securechat":
            await _json(send, 200, discovery_document(hs))
        else:
            await _json(send, 404, {"error": {"code": "not_found", "message": "no such endpoint"}})

    return app


async def _federation(hs: Homeserver, scope: HTTPScope, receive: Receive, send: Send) -> None:
    """HTTP federation (``transport = "http"``): the signed frame is the body, msgpack answers."""
    if hs.federation is None:
        status, reply = 404, codec.encode({"error": {"code": "not_found", "message": "federation is disabled"}})
    else:
        body = await _read_body(receive, MAX_FED_FRAME)
        if body is None:
            status, reply = 413, codec.encode({"error": {"code": "too_large", "message": "request body too large"}})
        else:
            client = scope.get("client") or ("?", 0)
            status, reply = await http_federation_app_handler(hs.federation, scope["method"], scope["path"], body,
                                                              f"{client[0]}:{client[1]}")
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/msgpack"), (b"content-length", str(len(reply)).encode())]})
    await send({"type": "http.response.body", "body": reply, "more_body": False})


async def _read_body(receive: Receive, limit: int) -> bytes | None:
    """The whole request body, or None once it exceeds ``limit`` bytes."""
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] != "http.request":
            return None
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            return None
        chunks.append(chunk)
        if not message.get("more_body", False):
            return b"".join(chunks)


async def _json(send: Send, status: int, body: dict[str, Any]) -> None:
    data = json.dumps(body, sort_keys=True).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode()),
                            (b"cache-control", b"no-store")]})
    await send({"type": "http.response.body", "body": data, "more_body": False})


async def serve_http(hs: Homeserver, host: str, port: int, stop: trio.Event, *,
                     task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
    """Serve until ``stop`` is set; reports the bound port."""
    config = HypercornConfig()
    config.bind = [f"{host}:{port}"]
    config.accesslog = None
    config.errorlog = None
    config.graceful_timeout = 5
    app = make_app(hs)
    async with trio.open_nursery() as nursery:
        bound = await nursery.start(lambda task_status: hypercorn_serve(
            app, config, shutdown_trigger=stop.wait, task_status=task_status, mode="asgi"))
        hs.ports["http"] = int(bound[0].rsplit(":", 1)[1])
        task_status.started(hs.ports["http"])
