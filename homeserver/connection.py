"""One client connection: read frames, dispatch ops, write responses and pushes.

Every request gets exactly one response.  Bad input gets an error frame (or, for
bytes that cannot even be framed, a clean close) and never disturbs other
connections.  Outgoing frames go through one writer task, so responses and
pushes never interleave mid-frame and a slow reader only slows itself.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import trio

from federation import codec
from federation.errors import ErrorCode, ProtocolError, RequestRejected, SecureChatError
from federation.frames import Push, Request, Response, encode_frame, parse_request, request_id_of
from federation.transport import CLOSE_POLICY, CLOSE_PROTOCOL_ERROR, Transport, TransportClosed
from homeserver.storage.models import Completion

log = logging.getLogger("securechat.connection")
T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class Deferred:
    """A handler's answer that completes later.

    The handler did its ordered part (e.g. queued its write) before returning;
    ``finish`` awaits the rest (the commit) while the connection reads the next
    request.  This pipelines one connection's sends without reordering them.

    ``ready``/``now`` are the cheaper path, taken when given: ``ready(callback)``
    returns True if it will call ``callback()`` on the trio thread once ``now()``
    answers without waiting (the writer's wake-up answers, no task per request).
    Exactly one of ``finish`` and ``now`` is called.
    """

    finish: Callable[[], Awaitable[dict[str, Any]]]
    ready: Callable[[Callable[[], None]], bool] | None = None
    now: Callable[[], dict[str, Any]] | None = None

    @classmethod
    def of(cls, completion: Completion[T], answer: Callable[[T], dict[str, Any]]) -> Deferred:
        """The answer ``answer(result)`` once ``completion`` is committed."""
        async def finish() -> dict[str, Any]:
            return answer(await completion.result())

        return cls(finish, completion.on_done, lambda: answer(completion.result_now()))


OpHandler = Callable[["Session", dict[str, Any]], Awaitable["dict[str, Any] | Deferred"]]
MAX_BAD_FRAMES = 20           # a peer that keeps sending garbage is disconnected
MAX_DEFERRED = 64             # requests of one connection awaiting their commit at once
OUTBOX_SIZE = 1024
COALESCE_FRAMES = 64          # frames joined into one transport write, at most
COALESCE_BYTES = 256 * 1024   # ... and about this many bytes


class Unauthenticated(RequestRejected):
    code = ErrorCode.UNAUTHORIZED


@dataclass(eq=False)
class Session:
    """State of one connection; handlers receive it with every request."""

    transport: Transport
    remote: str
    outbox: trio.MemorySendChannel[bytes]
    user: str | None = None
    device_id: str | None = None
    closing: bool = False
    nursery: trio.Nursery | None = None    # connection-scoped tasks (delivery) run here
    close_code: tuple[int, str] | None = None
    attributes: dict[str, Any] = field(default_factory=dict)

    @property
    def device(self) -> str:
        if self.user is None or self.device_id is None:
            raise Unauthenticated("authenticate first (challenge, then auth)")
        return f"{self.user}/{self.device_id}"

    @property
    def authenticated(self) -> bool:
        return self.device_id is not None

    def require_auth(self) -> str:
        return self.device

    def push_nowait(self, push: Push) -> bool:
        """Queue a push if there is room; False if the connection is gone or saturated."""
        return self.push_frame_nowait(encode_frame(push))

    def push_frame_nowait(self, frame: bytes) -> bool:
        """``push_nowait`` of an already encoded push frame."""
        if self.closing:
            return False
        try:
            self.outbox.send_nowait(frame)
        except (trio.WouldBlock, trio.ClosedResourceError, trio.BrokenResourceError):
            return False
        return True

    async def push(self, push: Push) -> None:
        """Queue a push, waiting for room (back-pressure from a slow reader)."""
        if self.closing:
            raise trio.ClosedResourceError("session closing")
        frame = encode_frame(push)
        try:
            self.outbox.send_nowait(frame)      # no scheduling round trip when there is room
        except trio.WouldBlock:
            await self.outbox.send(frame)

    async def close(self, code: int, reason: str = "") -> None:
        """Close at once (revoked, replaced, protocol violation)."""
        self.closing = True
        await self.transport.aclose(code, reason)

    def close_after_flush(self, code: int, reason: str = "") -> None:
        """Close once every queued frame is written (graceful shutdown)."""
        self.close_code = (code, reason)
        self.closing = True
        self.outbox.close()


class Dispatcher:
    """Maps op names to handlers; ops flagged ``public`` work before authentication.

    Counts requests in progress so a graceful shutdown can wait for them.
    """

    def __init__(self) -> None:
        self._ops: dict[str, tuple[OpHandler, bool]] = {}
        self.in_flight = 0
        self._idle = trio.Event()
        self._idle.set()

    async def wait_idle(self) -> None:
        await self._idle.wait()

    def add(self, op: str, handler: OpHandler, *, public: bool = False) -> None:
        if op in self._ops:
            raise ValueError(f"op {op} registered twice")
        self._ops[op] = (handler, public)

    def _begin(self) -> None:
        self.in_flight += 1
        if self.in_flight == 1:
            self._idle = trio.Event()

    def _end(self) -> None:
        self.in_flight -= 1
        if self.in_flight == 0:
            self._idle.set()

    async def dispatch(self, session: Session, request: Request) -> Response | Deferred:
        """Run the handler's ordered part; a ``Deferred`` still counts as in flight until finished."""
        entry = self._ops.get(request.op)
        try:
            if entry is None:
                raise ProtocolError(f"unknown op {request.op[:64]!r}", code=ErrorCode.UNKNOWN_OP)
            handler, public = entry
            if not public:
                session.require_auth()
            self._begin()
            try:
                answer = await handler(session, request.params)
            except BaseException:
                self._end()
                raise
            if isinstance(answer, Deferred):
                now = answer.now
                return Deferred(lambda: self._finish(answer), answer.ready,
                                None if now is None else lambda: self._finish_now(now))
            self._end()
            return Response(request.id, ok=answer)
        except SecureChatError as exc:
            return Response.failure(request.id, exc)

    async def _finish(self, deferred: Deferred) -> dict[str, Any]:
        try:
            return await deferred.finish()
        finally:
            self._end()

    def _finish_now(self, now: Callable[[], dict[str, Any]]) -> dict[str, Any]:
        try:
            return now()
        finally:
            self._end()


async def serve_connection(transport: Transport, dispatcher: Dispatcher,
                           on_open: Callable[[Session], None],
                           on_close: Callable[[Session], Awaitable[None]],
                           limits: codec.Limits) -> None:
    """Run one connection until the peer leaves or the server closes it."""
    send_channel, receive_channel = trio.open_memory_channel[bytes](OUTBOX_SIZE)
    session = Session(transport, transport.remote, send_channel)
    on_open(session)
    try:
        async with trio.open_nursery() as nursery:
            session.nursery = nursery
            nursery.start_soon(_writer, session, receive_channel, nursery.cancel_scope)
            await _reader(session, dispatcher, limits)
            nursery.cancel_scope.cancel()
    finally:
        session.closing = True
        with trio.CancelScope(shield=True):
            await on_close(session)
            await transport.aclose(*(session.close_code or (1000, "")))


async def _writer(session: Session, outbox: trio.MemoryReceiveChannel[bytes],
                  done: trio.CancelScope) -> None:
    """Write queued frames in order; frames already waiting go out in one transport write."""
    transport = session.transport
    try:
        async for frame in outbox:
            frames = [frame]
            size = len(frame)
            while len(frames) < COALESCE_FRAMES and size < COALESCE_BYTES:
                try:
                    frame = outbox.receive_nowait()
                except (trio.WouldBlock, trio.EndOfChannel):
                    break
                frames.append(frame)
                size += len(frame)
            if len(frames) == 1:
                await transport.send(frames[0])
            else:
                await transport.send_many(frames)
        if session.close_code is not None:
            await session.transport.aclose(*session.close_code)
    except (TransportClosed, trio.ClosedResourceError, trio.BrokenResourceError):
        pass
    done.cancel()


async def _reader(session: Session, dispatcher: Dispatcher, limits: codec.Limits) -> None:
    """Requests of one connection are handled one after another, in arrival order.

    That keeps a sender's messages in order end to end; throughput comes from many
    connections sharing each group commit, not from reordering one connection.
    """
    bad_frames = 0
    deferred_slots = trio.Semaphore(MAX_DEFERRED)
    while True:
        try:
            data = await session.transport.receive()
        except (TransportClosed, trio.ClosedResourceError, trio.BrokenResourceError):
            return
        try:
            request = parse_request(codec.decode(data, limits))
        except ProtocolError as exc:
            bad_frames += 1
            rid = request_id_of(data)
            log.info("bad frame from %s: %s", session.remote, exc.message)
            if rid is None or bad_frames > MAX_BAD_FRAMES:
                # Nothing to correlate an error with: close cleanly with a reason.
                await session.close(CLOSE_PROTOCOL_ERROR if bad_frames <= MAX_BAD_FRAMES else CLOSE_POLICY,
                                    exc.message[:100])
                return
            await _respond(session, Response.failure(rid, exc))
            continue
        try:
            response = await dispatcher.dispatch(session, request)
        except Exception:  # our bug: log it (no payloads), answer 'internal', keep serving
            log.exception("handler for op %s failed", request.op)
            response = Response.failure(request.id, SecureChatError("internal error"))
        if isinstance(response, Deferred):
            try:
                deferred_slots.acquire_nowait()
            except trio.WouldBlock:
                await deferred_slots.acquire()
            if session.nursery is None:
                raise RuntimeError("session has no nursery")
            if response.ready is not None and response.now is not None \
                    and response.ready(_answer_later(session, request, response.now, deferred_slots)):
                continue
            session.nursery.start_soon(_complete, session, request, response, deferred_slots)
            continue
        await _respond(session, response)


def _answer_later(session: Session, request: Request, now: Callable[[], dict[str, Any]],
                  slots: trio.Semaphore) -> Callable[[], None]:
    """The callback that answers a ``Deferred`` on its fast path (see ``Deferred``)."""
    def answer() -> None:
        try:
            try:
                response = Response(request.id, ok=now())
            except SecureChatError as exc:
                response = Response.failure(request.id, exc)
            except Exception:
                log.exception("handler for op %s failed", request.op)
                response = Response.failure(request.id, SecureChatError("internal error"))
            frame = encode_frame(response)
            try:
                session.outbox.send_nowait(frame)
            except trio.WouldBlock:          # a full outbox: wait for room in a task
                if session.nursery is not None:
                    session.nursery.start_soon(_send_frame, session, frame)
            except (trio.ClosedResourceError, trio.BrokenResourceError):
                pass
        finally:
            slots.release()
    return answer


async def _complete(session: Session, request: Request, deferred: Deferred,
                    slots: trio.Semaphore) -> None:
    try:
        try:
            response = Response(request.id, ok=await deferred.finish())
        except SecureChatError as exc:
            response = Response.failure(request.id, exc)
        except Exception:
            log.exception("handler for op %s failed", request.op)
            response = Response.failure(request.id, SecureChatError("internal error"))
        await _respond(session, response)
    finally:
        slots.release()


async def _respond(session: Session, response: Response) -> None:
    await _send_frame(session, encode_frame(response))


async def _send_frame(session: Session, frame: bytes) -> None:
    try:
        session.outbox.send_nowait(frame)       # no scheduling round trip when there is room
    except trio.WouldBlock:
        try:
            await session.outbox.send(frame)
        except (trio.ClosedResourceError, trio.BrokenResourceError):
            pass
    except (trio.ClosedResourceError, trio.BrokenResourceError):
        pass
