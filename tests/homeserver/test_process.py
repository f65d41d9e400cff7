"""Real server processes over a real WebSocket: SIGKILL and SIGTERM lose nothing acknowledged."""

import signal
from contextlib import asynccontextmanager

import pytest
import trio

from conformance.client import authenticate, register, throwaway_user
from federation.errors import ErrorCode
from federation.rpc import RemoteError, open_rpc
from federation.transport import CLOSE_GOING_AWAY, TransportClosed, connect_websocket
from tests.serverproc import init_server, start_server, stop

DOMAIN = "localhost"


@asynccontextmanager
async def ws_rpc(url):
    transport = await connect_websocket(url)
    async with open_rpc(transport) as rpc:
        yield rpc


async def _pair(url):
    async with ws_rpc(url) as rpc:
        alice = await register(rpc, throwaway_user(DOMAIN, "alice"))
    async with ws_rpc(url) as rpc:
        bob = await register(rpc, throwaway_user(DOMAIN, "bob"))
    return alice, bob


async def _send_until_dead(url, alice, bob, acked: list[str], tag: str, after_some: trio.Event, threshold: int):
    """Send sequentially until the connection dies; record every acknowledged message id."""
    try:
        async with ws_rpc(url) as rpc:
            await authenticate(rpc, alice, DOMAIN)
            i = 0
            while True:
                mid = f"{tag}-{i:05d}"
                try:
                    await rpc.request("send", message_id=mid,
                                      payloads=[{"devices": [bob.address], "ciphertext": mid.encode()}])
                except RemoteError as exc:
                    assert exc.code == ErrorCode.SHUTTING_DOWN
                    break
                acked.append(mid)
                if len(acked) >= threshold:
                    after_some.set()
                i += 1
    except* (TransportClosed, OSError):
        pass


async def _drain(url, device, expected: int, timeout: float = 30) -> list[str]:
    """Receive until ``expected`` distinct message ids arrived; dedupe like an application would."""
    seen: list[str] = []
    with trio.fail_after(timeout):
        async with ws_rpc(url) as rpc:
            await authenticate(rpc, device, DOMAIN)
            while len(seen) < expected:
                push = await rpc.next_push("envelope")
                mid = push.fields["message_id"]
                if mid not in seen:
                    seen.append(mid)
                await rpc.request("ack", seqs=[push.fields["seq"]])
    return seen


@pytest.mark.slow
async def test_sigkill_loses_nothing_acknowledged(tmp_path):
    config = init_server(tmp_path / "hs")
    server = trio.to_thread.run_sync
    proc = start_server(config)
    try:
        alice, bob = await _pair(proc.url)
        acked: list[str] = []
        some = trio.Event()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_send_until_dead, proc.url, alice, bob, acked, "k", some, 150)
            await some.wait()
            proc.signal(signal.SIGKILL)
        await server(proc.wait)
        proc = start_server(config)
        delivered = await _drain(proc.url, bob, len(acked))
        # every acknowledged message, in order, exactly once; at most the one in flight beyond them
        assert delivered[:len(acked)] == acked
    finally:
        stop(proc)


@pytest.mark.slow
async def test_sigterm_under_load_closes_with_1001_and_loses_nothing(tmp_path):
    config = init_server(tmp_path / "hs")
    proc = start_server(config)
    try:
        pairs = [await _pair(proc.url) for _ in range(4)]
        acked: list[list[str]] = [[] for _ in pairs]
        close_codes: list[int | None] = []
        some = trio.Event()

        async def watch_close(device):
            async with ws_rpc(proc.url) as rpc:
                await authenticate(rpc, device, DOMAIN)
                await rpc.closed.wait()
                close_codes.append(rpc.close_code)

        async with trio.open_nursery() as nursery:
            for n, (alice, bob) in enumerate(pairs):
                nursery.start_soon(_send_until_dead, proc.url, alice, bob, acked[n], f"t{n}", some, 50)
                nursery.start_soon(watch_close, bob)
            await some.wait()
            await trio.sleep(0.2)
            proc.signal(signal.SIGTERM)
        assert await trio.to_thread.run_sync(proc.wait) == 0
        assert close_codes == [CLOSE_GOING_AWAY] * len(pairs)
        assert "shutting down" in proc.log()
        proc = start_server(config)
        for n, (_, bob) in enumerate(pairs):
            delivered = await _drain(proc.url, bob, len(acked[n]))
            assert delivered[:len(acked[n])] == acked[n]
    finally:
        stop(proc)
