"""End to end over the memory network: multi-device 1:1 messaging, offline delivery, restart from the store."""

from __future__ import annotations

import trio

from clientsdk.events import DeviceListChanged, MessageReceived
from tests.sdk.conftest import DOMAIN, collect

ALICE = f"alice@{DOMAIN}"
BOB = f"bob@{DOMAIN}"


async def test_one_device_each_both_ways(world):
    alice = await world.register("alice")
    bob = await world.register("bob")
    async with alice.connect(), bob.connect():
        await alice.send(BOB, "hello bob")
        [got] = await collect(bob, 1)
        assert (got.sender, got.text, got.conversation, got.outgoing) == (ALICE, "hello bob", ALICE, False)
        await bob.send(ALICE, "hi alice")
        await bob.send(ALICE, "second")
        got = await collect(alice, 2)
        assert [m.text for m in got] == ["hi alice", "second"]
    assert [h.text for h in await alice.history(BOB)] == ["hello bob", "hi alice", "second"]
    await alice.aclose()
    await bob.aclose()


async def test_two_devices_each_every_device_sees_every_message_once_in_order(world):
    alice1 = await world.register("alice")
    bob1 = await world.register("bob")
    alice2 = await world.login("alice", "alice2")
    bob2 = await world.login("bob", "bob2")
    devices = [alice1, alice2, bob1, bob2]
    async with alice1.connect(), bob1.connect(), alice2.connect(), bob2.connect():
        assert await alice1.approve_device(alice2.device_id, alice2.identity_key) >= 2
        assert await bob1.approve_device(bob2.device_id, bob2.identity_key) >= 2
        rounds = 3

        async def talk(client, to):
            for i in range(rounds):
                await client.send(to, f"{client.address}#{i}")

        received: dict[str, list[MessageReceived]] = {}

        async def listen(client):
            early = 1 if client in (alice1, bob2) else 2     # "first" and "reply", unless sent by it
            got = await collect(client, 3 * rounds + early)
            assert sorted(m.text for m in got[:early]) == sorted({"first", "reply"} - {mine[client]})
            received[str(client.address)] = got[early:]

        mine = {alice1: "first", bob2: "reply", alice2: None, bob1: None}

        with trio.fail_after(600):
            # first a sequential exchange (sessions start), then everyone at once
            await alice1.send(BOB, "first")
            await bob2.send(ALICE, "reply")
            async with trio.open_nursery() as nursery:
                for client in devices:
                    nursery.start_soon(listen, client)
                for client in devices:
                    nursery.start_soon(talk, client, BOB if client.user == ALICE else ALICE)
    # the first two messages: everyone but the sender saw each of them once
    for client in devices:
        mine = received[str(client.address)]
        senders = {m.sender_device for m in mine}
        assert str(client.address) not in senders
        assert len(senders) == 3
        for sender in senders:
            texts = [m.text for m in mine if m.sender_device == sender]
            assert texts == [f"{sender}#{i}" for i in range(rounds)], texts
        for m in mine:
            assert m.outgoing == (m.sender == client.user)
            assert m.conversation == (BOB if client.user == ALICE else ALICE)
    history = [h.text for h in await bob2.history(ALICE)]
    assert history[:2] == ["first", "reply"] and len(history) == 2 + 4 * rounds
    for client in devices:
        await client.aclose()


async def test_offline_delivery_after_hours(world, autojump_clock):
    alice = await world.register("alice")
    bob = await world.register("bob")
    async with bob.connect():
        pass                                  # bob has been online once, then goes away
    async with alice.connect():
        for i in range(3):
            await alice.send(BOB, f"while you were out {i}")
    await trio.sleep(5 * 3600)                # hours later
    async with bob.connect():
        got = await collect(bob, 3)   # (no fail_after: autojump would fire it during store thread hops)
        assert [m.text for m in got] == [f"while you were out {i}" for i in range(3)]
        await bob.send(ALICE, "back")
    async with alice.connect():
        [got] = await collect(alice, 1)
        assert got.text == "back"
    await alice.aclose()
    await bob.aclose()


async def test_restart_from_store_keeps_decrypting(world):
    alice = await world.register("alice")
    bob = await world.register("bob")
    async with alice.connect():
        async with bob.connect():
            await alice.send(BOB, "one")
            await collect(bob, 1)
            await bob.send(ALICE, "two")
            await collect(alice, 1)
        await bob.aclose()
        await alice.send(BOB, "three (bob is down)")
        bob = await world.reopen("bob")       # same device, same sessions, from the encrypted store
        async with bob.connect():
            [got] = await collect(bob, 1)
            assert got.text == "three (bob is down)"
            await bob.send(ALICE, "four")
            [got] = await collect(alice, 1)
            assert got.text == "four"
    assert [h.text for h in await bob.history(ALICE)] == ["one", "two", "three (bob is down)", "four"]
    await alice.aclose()
    await bob.aclose()


async def test_new_device_is_picked_up_by_contacts(world):
    alice = await world.register("alice")
    bob1 = await world.register("bob")
    events: list = []
    async with alice.connect(), bob1.connect():
        await alice.send(BOB, "before")
        await collect(bob1, 1)
        bob2 = await world.login("bob", "bob2")
        async with bob2.connect():
            await bob1.approve_device(bob2.device_id, bob2.identity_key)
            await alice.send(BOB, "after")              # alice's cached list is stale: refetch and retry
            [got1] = await collect(bob1, 1)
            [got2] = await collect(bob2, 1)
            assert got1.text == got2.text == "after"
            await bob2.send(ALICE, "from the new device")
            got = await collect(alice, 1, events)
            assert got[0].sender_device == str(bob2.address)
        await bob2.aclose()
    changes = [e for e in events if isinstance(e, DeviceListChanged) and e.user == BOB]
    assert changes and bob2.device_id in changes[-1].devices and changes[-1].version >= 2
    await alice.aclose()
    await bob1.aclose()
