"""Store at rest, wrong key, reconnects, prekey upkeep and the bot decorator."""

from __future__ import annotations

import time
from dataclasses import replace

import pytest
import trio

from clientsdk.client import Client
from clientsdk.errors import StoreKeyInvalid
from clientsdk.events import MessageReceived
from federation.transport import MemoryNetwork
from homeserver.storage import MemoryStorage
from tests.sdk.conftest import DOMAIN, OPTIONS, PASSWORD, World, collect, homeserver

ALICE = f"alice@{DOMAIN}"
BOB = f"bob@{DOMAIN}"
CANARY = "plaintext-canary-5d1e"


async def test_store_is_encrypted_at_rest_and_needs_the_right_passphrase(world, tmp_path):
    alice = await Client.register(tmp_path / "a.db", ALICE, PASSWORD, connect=world.connector,
                                  passphrase="alice pass", options=OPTIONS)
    bob = await world.register("bob")
    async with alice.connect(), bob.connect():
        await alice.send(BOB, CANARY + " out")
        await collect(bob, 1)
        await bob.send(ALICE, CANARY + " in")
        await collect(alice, 1)
    secrets_ = [alice._identity.private_bytes(), alice._master.private_bytes()]
    secrets_ += [s.private for s in alice._prekeys.signed.values()] + list(alice._prekeys.one_time.values())
    await alice.aclose()
    await bob.aclose()
    raw = b"".join(p.read_bytes() for p in tmp_path.glob("a.db*"))
    assert raw and CANARY.encode() not in raw
    for secret in secrets_:
        assert secret not in raw
    with pytest.raises(StoreKeyInvalid):
        await Client.open(tmp_path / "a.db", passphrase="wrong pass")
    with pytest.raises(StoreKeyInvalid):
        await Client.open(tmp_path / "a.db", store_key=bytes(32))
    again = await Client.open(tmp_path / "a.db", passphrase="alice pass", connect=world.connector, options=OPTIONS)
    assert [h.text for h in await again.history(BOB)] == [CANARY + " out", CANARY + " in"]
    assert again.device_id == alice.device_id and again.is_master
    await again.aclose()


async def test_reconnect_after_server_restart_loses_nothing(tmp_path):
    network = MemoryNetwork()
    storage = MemoryStorage()
    world = World(tmp_path, network)
    async with homeserver(tmp_path, network, storage) as server:
        alice = await world.register("alice")
        bob = await world.register("bob")
        async with alice.connect(), bob.connect():
            await alice.send(BOB, "before restart")
            await collect(bob, 1)
            server.stop.set()                                  # the server goes away ...
            async with trio.open_nursery() as nursery:
                nursery.start_soon(alice.send, BOB, "during restart")   # ... a send waits for it
                await trio.sleep(0.1)
                async with homeserver(tmp_path, network, storage):      # ... and comes back
                    with trio.fail_after(10):
                        [got] = await collect(bob, 1)
                    assert got.text == "during restart"
                    await bob.send(ALICE, "after restart")
                    with trio.fail_after(10):
                        [got] = await collect(alice, 1)
                    assert got.text == "after restart"
    await alice.aclose()
    await bob.aclose()


async def test_prekeys_topped_up_and_signed_prekey_rotated(world, autojump_clock):
    bob = await world.register("bob")
    first_spk = max(bob._prekeys.signed)
    bob._options = replace(bob._options, one_time_prekeys=60)   # e.g. reopened with a higher target
    async with bob.connect():
        rpc = await bob._wait_rpc()
        # The top-up's store write runs in a thread, and the autojump clock does not wait
        # for threads: poll (bounded in real time) instead of sleeping a fixed mock second.
        deadline = time.monotonic() + 10
        while (await rpc.request("key_count"))["one_time"] != 60:
            assert time.monotonic() < deadline, "one-time prekeys were not topped up to 60"
            await trio.sleep(0.001)
        await trio.sleep(8 * 24 * 3600)            # a week and a day, connected
        rpc = await bob._wait_rpc()
        assert max(bob._prekeys.signed) > first_spk
        assert (await rpc.request("get_device_list", user=BOB))["version"] > 1    # re-signed weekly
        alice = await world.register("alice")
        async with alice.connect():
            await alice.send(BOB, "under the new signed prekey")
            [got] = await collect(bob, 1)
            assert got.text == "under the new signed prekey"
        await alice.aclose()
    await bob.aclose()


async def test_bot_decorator_echoes(world):
    bot = await world.register("bot")
    alice = await world.register("alice")

    @bot.on_message
    async def echo(event: MessageReceived) -> None:
        await bot.send(event.sender, f"echo: {event.text}")

    async with trio.open_nursery() as nursery:
        nursery.start_soon(bot.run)
        async with alice.connect():
            await alice.send(f"bot@{DOMAIN}", "ping")
            with trio.fail_after(10):
                [got] = await collect(alice, 1)
            assert got.text == "echo: ping"
        nursery.cancel_scope.cancel()
    await bot.aclose()
    await alice.aclose()
