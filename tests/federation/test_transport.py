"""One contract for every transport implementation (trio's check_two_way_stream idea)."""

from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

import pytest
import trio

from federation.transport import (
    CLOSE_GOING_AWAY, CLOSE_TOO_BIG, MemoryNetwork, Transport, TransportClosed, connect_websocket,
    memory_transport_pair, serve_websocket_transport,
)

MAX = 4096


@asynccontextmanager
async def memory_pair() -> AsyncIterator[tuple[Transport, Transport]]:
    a, b = memory_transport_pair(max_frame=MAX)
    yield a, b


@asynccontextmanager
async def network_pair() -> AsyncIterator[tuple[Transport, Transport]]:
    net = MemoryNetwork()
    got: list[Transport] = []
    ready = trio.Event()
    done = trio.Event()

    async def handler(t: Transport) -> None:
        got.append(t)
        ready.set()
        await done.wait()

    async with trio.open_nursery() as nursery:
        await nursery.start(lambda task_status: net.serve("hs", handler, max_frame=MAX, task_status=task_status))
        client = await net.connect("hs")
        await ready.wait()
        yield client, got[0]
        done.set()
        nursery.cancel_scope.cancel()


@asynccontextmanager
async def websocket_pair() -> AsyncIterator[tuple[Transport, Transport]]:
    got: list[Transport] = []
    ready = trio.Event()
    done = trio.Event()

    async def handler(t: Transport) -> None:
        got.append(t)
        ready.set()
        await done.wait()

    async with trio.open_nursery() as nursery:
        port = await nursery.start(lambda task_status: serve_websocket_transport(
            {"/c2s": handler}, "127.0.0.1", 0, max_frame=MAX, task_status=task_status))
        client = await connect_websocket(f"ws://127.0.0.1:{port}/c2s", max_frame=MAX)
        await ready.wait()
        yield client, got[0]
        await client.aclose()
        await got[0].aclose()
        done.set()
        nursery.cancel_scope.cancel()


PAIRS: dict[str, Callable] = {"memory": memory_pair, "memory-network": network_pair, "websocket": websocket_pair}


@pytest.fixture(params=list(PAIRS))
def make_pair(request):
    return PAIRS[request.param]


async def test_frames_both_ways_in_order(make_pair):
    async with make_pair() as (a, b):
        for i in range(20):
            await a.send(b"a%d" % i)
        for i in range(20):
            assert await b.receive() == b"a%d" % i
        await b.send(b"")
        assert await a.receive() == b""


async def test_close_is_seen_with_code_after_pending_frames(make_pair):
    async with make_pair() as (a, b):
        await a.send(b"last words")
        await a.aclose(CLOSE_GOING_AWAY, "bye")
        assert await b.receive() == b"last words"
        with pytest.raises(TransportClosed) as exc:
            await b.receive()
        assert exc.value.code == CLOSE_GOING_AWAY
        with pytest.raises(TransportClosed):
            for _ in range(10):  # a WebSocket may accept a send or two before it notices
                await b.send(b"after close")
                await trio.sleep(0.01)
        with pytest.raises(trio.ClosedResourceError):
            await a.send(b"x")
        with pytest.raises(trio.ClosedResourceError):
            await a.receive()
        await a.aclose()  # idempotent


async def test_oversized_frame_closes_with_1009(make_pair):
    async with make_pair() as (a, b):
        with pytest.raises(TransportClosed):
            await a.send(b"x" * (MAX + 1))
            await a.receive()
        with pytest.raises(TransportClosed) as exc:
            await b.receive()
        assert exc.value.code == CLOSE_TOO_BIG


async def test_remote_is_known(make_pair):
    async with make_pair() as (a, b):
        assert isinstance(a.remote, str) and a.remote
        assert isinstance(b.remote, str) and b.remote


async def test_connect_to_nothing_fails_cleanly():
    with pytest.raises(TransportClosed):
        await MemoryNetwork().connect("nobody")
    async with trio.open_nursery() as nursery:
        with pytest.raises(TransportClosed):
            await connect_websocket("ws://127.0.0.1:1/c2s")
