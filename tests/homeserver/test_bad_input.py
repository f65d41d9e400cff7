"""Hostile input over a real WebSocket: an error frame or a clean close, never a crash, no payloads in logs."""

import logging

import msgpack
import pytest
import trio

from conformance.client import authenticate, register, throwaway_user
from federation import codec
from federation.errors import ErrorCode
from federation.rpc import RemoteError, open_rpc
from federation.transport import CLOSE_PROTOCOL_ERROR, CLOSE_TOO_BIG, TransportClosed, connect_websocket
from homeserver.app import serve
from homeserver.server_keys import new_server_key

from .conftest import make_config

CANARY = b"PLAINTEXT-CANARY-7f3a"


@pytest.fixture
async def server(tmp_path, nursery):
    config = make_config(tmp_path, domain="localhost", websocket_port=0, http_port=0)
    running = await nursery.start(lambda task_status: serve(config, [new_server_key(0, 10**15)],
                                                              task_status=task_status))
    yield running
    running.stop.set()


async def ws(running):
    return await connect_websocket(running.c2s_url, max_frame=4 << 20)


async def test_bad_frames_get_errors_or_clean_close_and_others_are_unaffected(server, caplog):
    with trio.fail_after(30):
        await _body(server, caplog)


async def _body(server, caplog):
    caplog.set_level(logging.DEBUG)
    url_transport = await ws(server)
    async with open_rpc(url_transport) as bystander:
        alice = await register(bystander, throwaway_user("localhost"))
        bob_rpc_transport = await ws(server)
        async with open_rpc(bob_rpc_transport) as rpc:
            bob = await register(rpc, throwaway_user("localhost"))
        await authenticate(bystander, alice, "localhost")

        async def expect_error(frame: dict, code: ErrorCode) -> None:
            transport = await ws(server)
            await transport.send(codec.encode(frame))
            answer = codec.decode(await transport.receive())
            assert answer["id"] == frame["id"] and answer["error"]["code"] == code.value
            await transport.aclose()

        await expect_error({"id": 1, "op": "no_such_op"}, ErrorCode.UNKNOWN_OP)
        await expect_error({"id": 2, "op": "login", "user": 5, "password": "x" * 10}, ErrorCode.BAD_REQUEST)
        await expect_error({"id": 3, "op": "send", "message_id": "m", "payloads": []}, ErrorCode.UNAUTHORIZED)
        await expect_error({"id": 4, "op": "auth", "device": "nobody@localhost/AAAAAAAAAA", "nonce": b"x" * 32,
                            "ts_ms": 1, "sig": bytes(64)}, ErrorCode.UNAUTHORIZED)
        await expect_error({"id": 5, "op": "claim"}, ErrorCode.UNAUTHORIZED)

        for garbage in (b"\xc1", msgpack.packb({"op": "ping", "id": 1.5}), b"\x82\xa2op\xa4ping\xa2id\x01",
                        b"\x92\x01", msgpack.packb([1, 2, 3]), b"\x81\xa2id\xcc\x05"):
            async with open_rpc(await ws(server)) as rpc:
                await rpc.send_raw(garbage)
                with trio.fail_after(5):
                    await rpc.closed.wait()
                assert rpc.close_code == CLOSE_PROTOCOL_ERROR

        async with open_rpc(await ws(server)) as rpc:
            with pytest.raises(TransportClosed):
                await rpc.send_raw(msgpack.packb({"id": 9, "op": "ping", "pad": b"x" * (2 << 20)}))
                await rpc.request("ping")
            with trio.fail_after(5):
                await rpc.closed.wait()
            assert rpc.close_code == CLOSE_TOO_BIG

        async with open_rpc(await ws(server)) as rpc:
            await authenticate(rpc, bob, "localhost")
            with pytest.raises(RemoteError) as exc:
                await rpc.request("claim", user=throwaway_user("localhost"))
            assert exc.value.code == ErrorCode.NOT_FOUND
            with pytest.raises(RemoteError) as exc:
                await rpc.request("send", message_id="x", payloads=[{"devices": ["not an address"],
                                                                     "ciphertext": CANARY}])
            assert exc.value.code == ErrorCode.BAD_REQUEST

        # the bystander's connection kept working through all of it, and real traffic flows
        await bystander.request("send", message_id="after", payloads=[{"devices": [bob.address],
                                                                      "ciphertext": CANARY}])
        assert (await bystander.request("ping"))["ts_ms"] > 0
    logged = "\n".join(r.getMessage() for r in caplog.records)
    assert CANARY.decode() not in logged and "correct horse" not in logged
