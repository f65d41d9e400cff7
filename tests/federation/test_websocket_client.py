"""The WebSocket client transport against a scripted server (wsproto over memory streams).

The contract every transport meets is in ``test_transport.py``; these are what only the
client's own parsing can get wrong: messages split over frames and reads, what it
does when the server breaks the protocol, pings, the close handshake, a refused
handshake, a send cut off half-way, and TLS.
"""

from __future__ import annotations

import datetime
import ssl
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
import trio
import trio.testing
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from hypothesis import given, settings
from hypothesis import strategies as st
from wsproto import ConnectionType, WSConnection
from wsproto.events import (
    AcceptConnection, BytesMessage, CloseConnection, Ping, Pong, RejectConnection, Request, TextMessage,
)

from federation.transport import (
    CLOSE_ABNORMAL, CLOSE_PROTOCOL_ERROR, CLOSE_TOO_BIG, Transport, TransportClosed, WebSocketClientTransport,
    connect_websocket, serve_websocket_transport, websocket_over_stream,
)

URL = "ws://hs.example/c2s"
MAX = 4096


class ScriptedServer:
    """The server end, written by hand with wsproto: sends exactly the frames a test asks for."""

    def __init__(self, stream: trio.abc.Stream) -> None:
        self.stream = stream
        self.ws = WSConnection(ConnectionType.SERVER)
        self.request: Request | None = None

    async def next_events(self) -> list[object]:
        """Read until the client sent something; its events."""
        while True:
            data = await self.stream.receive_some(65536)
            if not data:
                return [None]
            self.ws.receive_data(data)
            events = list(self.ws.events())
            if events:
                return events

    async def accept(self, *messages: bytes) -> None:
        """Accept the handshake; ``messages`` go in the same write as the answer."""
        (request,) = await self.next_events()
        assert isinstance(request, Request)
        self.request = request
        answer = self.ws.send(AcceptConnection())
        await self.stream.send_all(answer + b"".join(self.message(m) for m in messages))

    def message(self, data: bytes, parts: list[int] | None = None) -> bytes:
        """The frames of one binary message, split at ``parts`` (offsets)."""
        cuts = [0, *sorted(set(p for p in (parts or []) if 0 < p < len(data))), len(data)]
        return b"".join(self.ws.send(BytesMessage(data=data[a:b], message_finished=b == len(data)))
                        for a, b in zip(cuts, cuts[1:]))


@asynccontextmanager
async def scripted(max_frame: int = MAX) -> AsyncIterator[
        tuple[WebSocketClientTransport, ScriptedServer]]:
    client_stream, server_stream = trio.testing.memory_stream_pair()
    server = ScriptedServer(server_stream)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(server.accept)
        client = await websocket_over_stream(client_stream, URL, max_frame=max_frame)
    yield client, server


@settings(max_examples=60, deadline=None)
@given(messages=st.lists(st.binary(max_size=600), min_size=1, max_size=8),
       cuts=st.lists(st.integers(min_value=1, max_value=599), max_size=4),
       chunk=st.integers(min_value=1, max_value=700))
def test_messages_arrive_whole_and_in_order_however_framed_and_read(messages: list[bytes], cuts: list[int],
                                                                      chunk: int) -> None:
    async def main() -> None:
        async with scripted() as (client, server):
            wire = b"".join(server.message(m, cuts) for m in messages)
            for at in range(0, len(wire), chunk):       # the reads see arbitrary pieces of frames
                await server.stream.send_all(wire[at:at + chunk])
            assert [await client.receive() for _ in messages] == messages

    trio.run(main)


async def test_frames_sent_with_the_handshake_answer_are_not_lost():
    client_stream, server_stream = trio.testing.memory_stream_pair()
    server = ScriptedServer(server_stream)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(server.accept, b"early", b"bird")
        client = await websocket_over_stream(client_stream, URL)
    assert server.request is not None and server.request.host == "hs.example" and server.request.target == "/c2s"
    assert await client.receive() == b"early"
    assert await client.receive() == b"bird"


async def test_a_message_over_the_limit_closes_with_1009_after_the_ones_before():
    async with scripted() as (client, server):
        big = b"x" * (MAX + 1)
        await server.stream.send_all(server.message(b"fine") + server.message(big, [1000, 2000, 3000, 4000]))
        assert await client.receive() == b"fine"
        with pytest.raises(TransportClosed) as exc:
            await client.receive()
        assert exc.value.code == CLOSE_TOO_BIG == client.close_code
        (close,) = await server.next_events()
        assert isinstance(close, CloseConnection) and close.code == CLOSE_TOO_BIG
        with pytest.raises(TransportClosed):
            await client.send(b"after")


async def test_a_text_frame_closes_with_1002():
    async with scripted() as (client, server):
        await server.stream.send_all(server.ws.send(TextMessage(data="hello")))
        with pytest.raises(TransportClosed) as exc:
            await client.receive()
        assert exc.value.code == CLOSE_PROTOCOL_ERROR
        (close,) = await server.next_events()
        assert isinstance(close, CloseConnection) and close.code == CLOSE_PROTOCOL_ERROR


async def test_a_malformed_frame_closes_with_1002():
    async with scripted() as (client, server):
        await server.stream.send_all(bytes([0x83, 0x00]))       # FIN + reserved opcode 3
        with pytest.raises(TransportClosed) as exc:
            await client.receive()
        assert exc.value.code == CLOSE_PROTOCOL_ERROR


async def test_pings_are_answered_while_receiving():
    async with scripted() as (client, server):
        await server.stream.send_all(server.ws.send(Ping(payload=b"still there?")) + server.message(b"m"))
        assert await client.receive() == b"m"
        (pong,) = await server.next_events()
        assert isinstance(pong, Pong) and pong.payload == b"still there?"


async def test_a_server_close_is_answered_and_reported_with_its_code_after_pending_messages():
    async with scripted() as (client, server):
        await server.stream.send_all(server.message(b"last") + server.ws.send(CloseConnection(4000, "replaced")))
        assert await client.receive() == b"last"
        with pytest.raises(TransportClosed) as exc:
            await client.receive()
        assert (exc.value.code, exc.value.reason) == (4000, "replaced")
        (answer, *_) = await server.next_events()
        assert isinstance(answer, CloseConnection) and answer.code == 4000


async def test_our_close_waits_for_the_servers_answer():
    async with scripted() as (client, server):
        in_flight = server.message(b"in flight")          # sent before the server read the close
        async with trio.open_nursery() as nursery:
            nursery.start_soon(client.aclose, 1001, "bye")
            (close,) = await server.next_events()
            assert isinstance(close, CloseConnection) and close.code == 1001
            await server.stream.send_all(in_flight + server.ws.send(close.response()))
        assert await server.stream.receive_some(10) == b""        # then the client closed the stream
        with pytest.raises(trio.ClosedResourceError):
            await client.receive()


async def test_a_refused_handshake_is_transport_closed_with_the_status():
    client_stream, server_stream = trio.testing.memory_stream_pair()
    server = ScriptedServer(server_stream)

    async def refuse() -> None:
        await server.next_events()
        await server.stream.send_all(server.ws.send(RejectConnection(status_code=403)))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(refuse)
        with pytest.raises(TransportClosed, match="HTTP 403"):
            await websocket_over_stream(client_stream, URL)


async def test_a_send_cut_off_half_way_ends_the_connection():
    client_stream, server_stream = trio.testing.lockstep_stream_pair()   # a write waits for the reader
    server = ScriptedServer(server_stream)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(server.accept)
        client = await websocket_over_stream(client_stream, URL, max_frame=1 << 20)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(client.send, b"y" * 100_000)
        await server.stream.receive_some(1000)                           # part of the frame, then never more
        nursery.cancel_scope.cancel()
    assert client.close_code == CLOSE_ABNORMAL
    with pytest.raises(TransportClosed):
        await client.send(b"next")                                       # never the rest of a frame as a new one


def _self_signed(directory: Path) -> tuple[ssl.SSLContext, ssl.SSLContext]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost")]), critical=False)
            .sign(key, hashes.SHA256()))
    (directory / "cert.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (directory / "key.pem").write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                                          serialization.PrivateFormat.PKCS8,
                                                          serialization.NoEncryption()))
    server = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server.load_cert_chain(directory / "cert.pem", directory / "key.pem")
    client = ssl.create_default_context(cafile=str(directory / "cert.pem"))
    return server, client


async def test_wss_verifies_the_server_and_carries_frames(tmp_path: Path):
    server_context, client_context = _self_signed(tmp_path)
    got: list[Transport] = []
    ready = trio.Event()

    async def handler(t: Transport) -> None:
        got.append(t)
        ready.set()
        await t.send(await t.receive())

    async with trio.open_nursery() as nursery:
        port = await nursery.start(lambda task_status: serve_websocket_transport(
            {"/c2s": handler}, "127.0.0.1", 0, ssl_context=server_context, task_status=task_status))
        with pytest.raises(TransportClosed, match="cannot connect"):      # not trusted: refused
            await connect_websocket(f"wss://localhost:{port}/c2s", ssl_context=ssl.create_default_context())
        client = await connect_websocket(f"wss://localhost:{port}/c2s", ssl_context=client_context)
        await client.send(b"over tls")
        assert await client.receive() == b"over tls"
        await client.aclose()
        nursery.cancel_scope.cancel()


async def test_a_connection_that_ends_without_a_close_frame_is_1006_after_pending_messages():
    async with scripted() as (client, server):
        await server.stream.send_all(server.message(b"before the cut"))
        await server.stream.aclose()
        assert await client.receive() == b"before the cut"
        with pytest.raises(TransportClosed) as exc:
            await client.receive()
        assert exc.value.code == CLOSE_ABNORMAL == client.close_code
        with pytest.raises(TransportClosed):
            await client.send(b"into the void")
