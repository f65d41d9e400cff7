"""The serving side of federation links: answer the ``s2s_txn`` / ``s2s_request`` RPC ops.

``serve_federation_connection`` answers the RPC ops on a WebSocket or memory transport,
up to ``max_concurrent`` at once; ``http_federation_app_handler`` is the same for one HTTP
request.  Both hand frames to a ``FederationEndpoint`` (the homeserver) and answer errors
with the exception's code and OUR message; anything that is not a ``SecureChatError`` is
our bug: logged with its traceback, answered ``internal``.  The ops, paths and frame
bounds are defined once, on the client side (``federation.links``).
"""

from __future__ import annotations

import logging
from typing import Any, Protocol

import trio

from federation import codec
from federation.errors import ErrorCode, ProtocolError, SecureChatError
from federation.frames import Request, Response, encode_frame, parse_request, request_id_of
from federation.links import HTTP_REQUEST_PATH, HTTP_TXN_PATH, OP_PARAMS, REQUEST_OP, RPC_LIMITS, TXN_OP
from federation.transport import CLOSE_POLICY, CLOSE_PROTOCOL_ERROR, Transport, TransportClosed
from federation.validate import field

log = logging.getLogger("securechat.federation.links")     # the links' logger: one name for both sides

DEFAULT_MAX_CONCURRENT = 16
MAX_BAD_FRAMES = 20                      # a peer that keeps sending garbage is disconnected
_PATHS = {HTTP_TXN_PATH: TXN_OP, HTTP_REQUEST_PATH: REQUEST_OP}
_HTTP_STATUS = {
    ErrorCode.BAD_REQUEST: 400, ErrorCode.UNAUTHORIZED: 401, ErrorCode.FORBIDDEN: 403,
    ErrorCode.NOT_FOUND: 404, ErrorCode.UNKNOWN_OP: 404, ErrorCode.CONFLICT: 409, ErrorCode.TOO_LARGE: 413,
    ErrorCode.RATE_LIMITED: 429, ErrorCode.INTERNAL: 500, ErrorCode.REMOTE_ERROR: 502,
    ErrorCode.SHUTTING_DOWN: 503,
}


class FederationEndpoint(Protocol):
    """What the homeserver offers to links; ``remote`` is the peer's network address (for logs).

    ``receive_transaction`` returns once the transaction is durably stored; both raise a
    ``SecureChatError`` (with its ``ErrorCode``) to refuse.
    """

    async def receive_transaction(self, frame: bytes, remote: str) -> None: ...

    async def handle_request(self, frame: bytes, remote: str) -> bytes: ...


async def _answer(endpoint: FederationEndpoint, op: str, frame: bytes, remote: str) -> dict[str, Any]:
    """Run one op against the endpoint: the ``ok`` map, or raise a ``SecureChatError`` to send."""
    try:
        if op == TXN_OP:
            await endpoint.receive_transaction(frame, remote)
            return {}
        response = await endpoint.handle_request(frame, remote)
        if not isinstance(response, bytes):
            raise TypeError("handle_request must return the signed response frame")
        return {"response": response}
    except SecureChatError:
        raise
    except Exception:     # our bug: log it (no payloads), answer 'internal', keep serving
        log.exception("federation %s from %s failed", op, remote)
        raise SecureChatError("internal error") from None


def _encode_reply(response: Response) -> bytes:
    try:
        return encode_frame(response, RPC_LIMITS)
    except SecureChatError:   # an answer we cannot encode (too big, bad details): our bug
        log.exception("federation answer could not be encoded")
        return encode_frame(Response.failure(response.id, SecureChatError("internal error")), RPC_LIMITS)


def _rpc_frame(request: Request) -> bytes:
    """The signed frame a request carries; ``unknown_op`` / ``bad_request`` otherwise."""
    name = OP_PARAMS.get(request.op)
    if name is None:
        raise ProtocolError(f"unknown op {request.op[:64]!r}", code=ErrorCode.UNKNOWN_OP)
    if set(request.params) != {name}:
        raise ProtocolError(f"{request.op} takes exactly one field, {name}")
    return field(request.params, name, bytes)


async def serve_federation_connection(transport: Transport, endpoint: FederationEndpoint, remote: str, *,
                                      max_concurrent: int = DEFAULT_MAX_CONCURRENT) -> None:
    """Answer ``s2s_txn`` / ``s2s_request`` on one connection until the peer leaves.

    Up to ``max_concurrent`` calls run at once (a window of transactions per link); past
    that the connection is not read, which pushes back on the peer.  A frame with a
    request id gets an error answer; bytes with none close the connection with 1002, and
    a peer that keeps sending bad frames is closed with 1008.  Calls still running when
    the connection ends are cancelled (the origin retries; the receiver deduplicates).
    """
    if max_concurrent < 1:
        raise ValueError("max_concurrent must be at least 1")
    send_lock = trio.Lock()
    slots = trio.Semaphore(max_concurrent)

    async def reply(response: Response) -> None:
        data = _encode_reply(response)
        try:
            async with send_lock:
                await transport.send(data)
        except (TransportClosed, trio.ClosedResourceError, trio.BrokenResourceError):
            pass

    async def handle(request: Request, frame: bytes) -> None:
        try:
            try:
                response = Response(request.id, ok=await _answer(endpoint, request.op, frame, remote))
            except SecureChatError as exc:
                response = Response.failure(request.id, exc)
            await reply(response)
        finally:
            slots.release()

    bad_frames = 0
    async with trio.open_nursery() as nursery:
        try:
            while True:
                try:
                    data = await transport.receive()
                except (TransportClosed, trio.ClosedResourceError, trio.BrokenResourceError):
                    return
                request: Request | None = None
                try:
                    request = parse_request(codec.decode(data, RPC_LIMITS))
                    frame = _rpc_frame(request)
                except ProtocolError as exc:
                    rid = request.id if request is not None else request_id_of(data)
                    if exc.code is not ErrorCode.UNKNOWN_OP:
                        bad_frames += 1
                    log.info("bad federation frame from %s: %s", remote, exc.message)
                    if rid is None or bad_frames > MAX_BAD_FRAMES:
                        await transport.aclose(CLOSE_POLICY if bad_frames > MAX_BAD_FRAMES else CLOSE_PROTOCOL_ERROR,
                                               exc.message[:100])
                        return
                    await reply(Response.failure(rid, exc))
                    continue
                await slots.acquire()
                nursery.start_soon(handle, request, frame)
        finally:
            nursery.cancel_scope.cancel()


async def http_federation_app_handler(endpoint: FederationEndpoint, method: str, path: str, body: bytes,
                                      remote: str) -> tuple[int, bytes]:
    """One HTTP federation request → (status, msgpack reply), for the ASGI app to send.

    ``POST /_securechat/federation/v1/txn`` and ``/request`` with the signed frame as the
    body.  The caller reads the body with a cap of ``MAX_FED_FRAME`` bytes (larger bodies:
    answer 413 without calling this) and sends ``content-type: application/msgpack``.
    """
    op = _PATHS.get(path)
    try:
        if op is None:
            raise SecureChatError("no such federation endpoint", code=ErrorCode.NOT_FOUND)
        if method != "POST":
            return 405, codec.encode({"error": {"code": ErrorCode.BAD_REQUEST.value,
                                                "message": "federation endpoints take POST"}})
        ok = await _answer(endpoint, op, bytes(body), remote)
    except SecureChatError as exc:
        return _HTTP_STATUS.get(exc.code, 400), _encode_http_error(exc)
    return 200, _encode_http_ok(ok)


def _encode_http_ok(ok: dict[str, Any]) -> bytes:
    try:
        return codec.encode({"ok": ok}, RPC_LIMITS)
    except SecureChatError:
        log.exception("federation answer could not be encoded")
        return _encode_http_error(SecureChatError("internal error"))


def _encode_http_error(exc: SecureChatError) -> bytes:
    try:
        return codec.encode({"error": exc.to_wire()}, RPC_LIMITS)
    except SecureChatError:
        log.exception("federation error answer could not be encoded")
        return codec.encode({"error": SecureChatError("internal error").to_wire()})
