"""Across three domains: a group, a device added on one domain seen on the others, a peer down for a day."""

from __future__ import annotations

import pytest
import trio

from clientsdk.events import DeviceListChanged
from clientsdk.groups import GroupMessageReceived
from tests.interdomain.conftest import DOMAINS, federation_of
from tests.sdk.conftest import collect

ALICE, BOB, CAROL = "alice@example.org", "bob@example.net", "carol@example.com"


@pytest.fixture
async def three(tmp_path):
    async with federation_of(tmp_path, DOMAINS) as fed:
        yield fed


async def group_messages(client, count: int) -> list[GroupMessageReceived]:
    out = []
    async for event in client.events():
        if isinstance(event, GroupMessageReceived):
            out.append(event)
            if len(out) == count:
                return out
    return out


async def test_three_domain_group(three):
    alice, bob, carol = [await three.register(u) for u in (ALICE, BOB, CAROL)]
    async with alice.connect(), bob.connect(), carol.connect():
        with trio.fail_after(120):
            gid = await alice.create_group("across orgs", [BOB, CAROL])
            await alice.send_group(gid, "hello all")
            for member in (bob, carol):
                [got] = await group_messages(member, 1)
                assert (got.group_id, got.sender, got.text) == (gid, ALICE, "hello all")
            await carol.send_group(gid, "from example.com")
            for member in (alice, bob):
                [got] = await group_messages(member, 1)
                assert (got.sender, got.text) == (CAROL, "from example.com")
    for client in (alice, bob, carol):
        await client.aclose()


async def test_device_added_on_one_domain_is_seen_on_the_others_without_polling(three):
    alice, bob = await three.register(ALICE), await three.register(BOB)
    async with alice.connect(), bob.connect():
        with trio.fail_after(120):
            await bob.send(ALICE, "hi")                     # alice's server fetched bob's list
            await collect(alice, 1)
            bob2 = await three.login(BOB, "bob2")
            async with bob2.connect():
                await bob.approve_device(bob2.device_id, bob2.identity_key)
                # alice learns of bob's new device by a push that crossed domains
                async for event in alice.events():
                    if isinstance(event, DeviceListChanged) and event.user == BOB:
                        assert bob2.device_id in event.devices
                        break
                await alice.send(BOB, "to both of your devices")
                [on_second] = await collect(bob2, 1)
                assert on_second.text == "to both of your devices"
            await bob2.aclose()
    await alice.aclose()
    await bob.aclose()


async def test_peer_down_for_a_day_gets_everything_in_order_exactly_once(tmp_path, autojump_clock):
    async with federation_of(tmp_path, DOMAINS[:2]) as fed:
        alice, bob = await fed.register(ALICE), await fed.register(BOB)
        async with alice.connect():
            async with bob.connect():
                await alice.send(BOB, "before")
                await collect(bob, 1)
            await fed.stop("example.net")
            sent = [f"while you were away #{i}" for i in range(20)]
            for text in sent:
                await alice.send(BOB, text)                 # acknowledged: queued durably at example.org
            stats = fed.orgs["example.org"].homeserver.federation.outbound.stats()["example.net"]
            assert stats["depth"] >= 20
            await trio.sleep(86_400)                         # a simulated day of failing retries
            assert fed.orgs["example.org"].homeserver.federation.outbound.stats()["example.net"]["failures"] > 5
            await fed.start("example.net")
            async with bob.connect():
                # (no fail_after: autojump would fire it during the store's thread hops)
                got = await collect(bob, len(sent))
                assert [m.text for m in got] == sent
                await fed.drained(timeout_s=None)
        await alice.aclose()
        await bob.aclose()
