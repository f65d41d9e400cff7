"""The connection loop's cheaper paths: deferred answers from the writer's wake-up
(no task per request), and frames already queued leaving in one transport write."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import trio
import trio.testing

from federation import codec
from federation.errors import ErrorCode, RequestRejected
from federation.frames import Push
from federation.rpc import RemoteError, open_rpc
from federation.transport import Transport, memory_transport_pair
from homeserver.connection import Deferred, Dispatcher, Session, serve_connection
from homeserver.storage.models import Completion


class ManualCompletion(Completion[int]):
    """A write the test commits by hand; supports the ``on_done`` path."""

    def __init__(self) -> None:
        self.callbacks: list[Callable[[], None]] = []
        self.value: int | None = None
        self.error: Exception | None = None
        self.done = trio.Event()

    def commit(self, value: int | None = None, error: Exception | None = None) -> None:
        self.value, self.error = value, error
        self.done.set()
        for callback in self.callbacks:
            callback()

    async def result(self) -> int:
        await self.done.wait()
        return self.result_now()

    def on_done(self, callback: Callable[[], None]) -> bool:
        self.callbacks.append(callback)
        return True

    def result_now(self) -> int:
        if self.error is not None:
            raise self.error
        assert self.value is not None
        return self.value


class AwaitOnly(ManualCompletion):
    def on_done(self, callback: Callable[[], None]) -> bool:
        return False


async def _serve(dispatcher: Dispatcher, transport: Transport, sessions: list[Session]) -> None:
    async def on_close(session: Session) -> None:
        pass

    await serve_connection(transport, dispatcher, sessions.append, on_close, codec.DEFAULT_LIMITS)


@pytest.mark.parametrize("completion_type", [ManualCompletion, AwaitOnly])
async def test_deferred_answers_after_commit_in_any_order(completion_type, nursery) -> None:
    pending: list[ManualCompletion] = []

    async def write(session: Session, params: dict[str, Any]) -> Deferred:
        completion = completion_type()
        pending.append(completion)
        return Deferred.of(completion, lambda n: {"n": n})

    dispatcher = Dispatcher()
    dispatcher.add("write", write, public=True)
    client, server = memory_transport_pair()
    nursery.start_soon(_serve, dispatcher, server, [])
    answers: dict[str, Any] = {}
    async with open_rpc(client) as rpc:
        async def call(name: str) -> None:
            try:
                answers[name] = await rpc.request("write")
            except RemoteError as exc:
                answers[name] = exc.code

        async with trio.open_nursery() as calls:
            for name in ("a", "b", "c"):
                calls.start_soon(call, name)
                await trio.testing.wait_all_tasks_blocked()
            assert len(pending) == 3 and answers == {}
            assert dispatcher.in_flight == 3
            pending[1].commit(2)
            pending[2].commit(error=RequestRejected("taken", code=ErrorCode.CONFLICT))
            pending[0].commit(1)
        assert answers == {"a": {"n": 1}, "b": {"n": 2}, "c": ErrorCode.CONFLICT}
        with trio.fail_after(1):
            await dispatcher.wait_idle()


async def test_an_answer_that_fails_unexpectedly_is_internal_and_the_connection_lives(nursery) -> None:
    completion = ManualCompletion()

    async def write(session: Session, params: dict[str, Any]) -> Deferred:
        return Deferred.of(completion, lambda n: {"n": 1 // n})

    async def ping(session: Session, params: dict[str, Any]) -> dict[str, Any]:
        return {"pong": True}

    dispatcher = Dispatcher()
    dispatcher.add("write", write, public=True)
    dispatcher.add("ping", ping, public=True)
    client, server = memory_transport_pair()
    nursery.start_soon(_serve, dispatcher, server, [])
    async with open_rpc(client) as rpc:
        async with trio.open_nursery() as calls:
            errors: list[str] = []

            async def call() -> None:
                try:
                    await rpc.request("write")
                except RemoteError as exc:
                    errors.append(exc.code)

            calls.start_soon(call)
            await trio.testing.wait_all_tasks_blocked()
            completion.commit(0)                       # ZeroDivisionError in the answer
        assert errors == [ErrorCode.INTERNAL]
        assert await rpc.request("ping") == {"pong": True}
    assert dispatcher.in_flight == 0


class RecordingTransport(Transport):
    """Records every write; ``send_many`` is one write."""

    def __init__(self) -> None:
        self.writes: list[list[bytes]] = []
        self.incoming, self._incoming = trio.open_memory_channel[bytes](10)
        self._closed: int | None = None

    async def send(self, frame: bytes) -> None:
        self.writes.append([frame])
        await trio.lowlevel.checkpoint()

    async def send_many(self, frames: list[bytes]) -> None:
        self.writes.append(list(frames))
        await trio.lowlevel.checkpoint()

    async def receive(self) -> bytes:
        return await self._incoming.receive()

    async def aclose(self, code: int = 1000, reason: str = "") -> None:
        self._closed = code
        await trio.lowlevel.checkpoint()

    @property
    def close_code(self) -> int | None:
        return self._closed


async def test_frames_queued_together_leave_in_one_write_in_order(nursery) -> None:
    transport = RecordingTransport()
    sessions: list[Session] = []
    nursery.start_soon(_serve, Dispatcher(), transport, sessions)
    await trio.testing.wait_all_tasks_blocked()
    (session,) = sessions
    frames = [codec.encode({"push": "envelope", "seq": i}) for i in range(1, 6)]
    for frame in frames:
        assert session.push_frame_nowait(frame)
    await trio.testing.wait_all_tasks_blocked()
    assert transport.writes == [frames]
    assert session.push_nowait(Push("envelope", {"seq": 6}))
    await trio.testing.wait_all_tasks_blocked()
    assert transport.writes[1] == [codec.encode({"push": "envelope", "seq": 6})]
    session.close_after_flush(1001, "bye")
    await trio.testing.wait_all_tasks_blocked()
    assert transport.close_code == 1001


async def test_websocket_send_many_delivers_each_frame_in_order(nursery) -> None:
    from federation.transport import connect_websocket, serve_websocket_transport

    frames = [bytes([i]) * (i * 1000 + 1) for i in range(5)]
    got: list[bytes] = []
    done = trio.Event()

    async def handler(transport: Transport) -> None:
        await transport.send_many(frames)
        await transport.send_many([b"last"])
        await done.wait()

    port = await nursery.start(lambda task_status: serve_websocket_transport(
        {"/c2s": handler}, "127.0.0.1", 0, task_status=task_status))
    client = await connect_websocket(f"ws://127.0.0.1:{port}/c2s")
    for _ in range(len(frames) + 1):
        got.append(await client.receive())
    done.set()
    await client.aclose()
    assert got == [*frames, b"last"]
