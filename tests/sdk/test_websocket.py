"""The same client over a real WebSocket (127.0.0.1) to an in-process homeserver."""

from __future__ import annotations

import pytest
import trio

from clientsdk.client import Client
from clientsdk.connection import websocket_connector
from clientsdk.errors import NotConnected
from homeserver.app import serve
from homeserver.config import Config
from homeserver.server_keys import new_server_key
from homeserver.storage import MemoryStorage
from tests.sdk.conftest import DOMAIN, OPTIONS, PASSWORD, collect


async def test_messages_over_websocket(tmp_path):
    config = Config(domain=DOMAIN, data_dir=tmp_path / "server", websocket_port=0, http_port=0,
                    password_opslimit=1, password_memlimit=8 * 1024 * 1024, shutdown_grace_s=0.5)
    async with trio.open_nursery() as nursery:
        running = await nursery.start(lambda task_status: serve(
            config, [new_server_key(0, 10**15)], storage=MemoryStorage(), task_status=task_status))
        connector = websocket_connector(running.c2s_url)
        alice = await Client.register(tmp_path / "a.db", f"alice@{DOMAIN}", PASSWORD, connect=connector,
                                      store_key=b"a" * 32, options=OPTIONS)
        bob = await Client.register(tmp_path / "b.db", f"bob@{DOMAIN}", PASSWORD, connect=connector,
                                    store_key=b"b" * 32, options=OPTIONS)
        with pytest.raises(NotConnected):
            await alice.send(f"bob@{DOMAIN}", "not connected yet")
        with trio.fail_after(20):
            async with alice.connect(), bob.connect():
                await alice.send(f"bob@{DOMAIN}", "over the wire")
                [got] = await collect(bob, 1)
                assert got.text == "over the wire"
                await bob.send(f"alice@{DOMAIN}", "and back")
                [got] = await collect(alice, 1)
                assert got.text == "and back"
        await alice.aclose()
        await bob.aclose()
        running.stop.set()
