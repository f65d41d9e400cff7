"""When the origin's cached view of a remote user's devices is stale: reports and repairs.

A device-list change normally crosses domains as a control envelope before any later
message.  These tests cut that path (the destination forgets that the origin
subscribed) to check the two safety nets: the destination's own coverage check with a
signed ``delivery_report`` that makes the sender re-encrypt for the missed device, and
the periodic digest comparison that repairs the origin's cache.
"""

from __future__ import annotations

import trio

from clientsdk.events import DeviceListChanged
from tests.interdomain.conftest import federation_of
from tests.sdk.conftest import collect

ALICE, BOB = "alice@example.org", "bob@example.net"


def forget_subscriptions(fed, domain: str) -> None:
    """``domain`` no longer knows who fetched its users' lists (a lost subscription)."""
    fed.orgs[domain].storage.federation._subs.clear()      # noqa: SLF001 - the fault we inject


async def test_a_device_the_origin_did_not_know_gets_the_message_after_a_delivery_report(tmp_path):
    async with federation_of(tmp_path) as fed:
        alice, bob1 = await fed.register(ALICE), await fed.register(BOB)
        async with alice.connect(), bob1.connect():
            with trio.fail_after(120):
                await alice.send(BOB, "first")
                await collect(bob1, 1)
                forget_subscriptions(fed, "example.net")
                bob2 = await fed.login(BOB, "bob2")
                async with bob2.connect():
                    await bob1.approve_device(bob2.device_id, bob2.identity_key)
                    # example.org still believes bob has one device; alice's client too
                    await alice.send(BOB, "to every device of bob")
                    [on_first] = await collect(bob1, 1)
                    [on_second] = await collect(bob2, 1)       # arrived through the repair
                    assert on_first.text == on_second.text == "to every device of bob"
                    assert on_second.message_id == on_first.message_id
                    org = fed.orgs["example.org"].homeserver
                    cached = await org.storage.federation.get_remote_device_list(BOB)
                    assert cached.version >= 2                  # the repair re-fetched the list
                await bob2.aclose()
        await fed.drained()
        await alice.aclose()
        await bob1.aclose()


async def test_digest_comparison_repairs_a_missed_device_list_change(tmp_path):
    async with federation_of(tmp_path) as fed:
        alice, bob1 = await fed.register(ALICE), await fed.register(BOB)
        async with alice.connect(), bob1.connect():
            with trio.fail_after(120):
                await alice.send(BOB, "first")
                await collect(bob1, 1)
                net = fed.orgs["example.net"].homeserver
                subscriptions = dict(fed.orgs["example.net"].storage.federation._subs)   # noqa: SLF001
                forget_subscriptions(fed, "example.net")
                bob2 = await fed.login(BOB, "bob2")
                async with bob2.connect():
                    await bob1.approve_device(bob2.device_id, bob2.identity_key)
                await bob2.aclose()
                org = fed.orgs["example.org"].homeserver
                assert (await org.storage.federation.get_remote_device_list(BOB)).version == 1
                fed.orgs["example.net"].storage.federation._subs.update(subscriptions)   # noqa: SLF001
                assert await net.federation.remote.send_digests() == 1     # one digest round
                async for event in alice.events():      # the repaired list reaches alice by push
                    if isinstance(event, DeviceListChanged) and event.user == BOB and event.version >= 2:
                        assert bob2.device_id in event.devices
                        break
                assert (await org.storage.federation.get_remote_device_list(BOB)).version >= 2
        await alice.aclose()
        await bob1.aclose()
