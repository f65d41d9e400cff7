"""End to end across two homeservers on the memory network: 1:1 both ways, ciphertext only."""

from __future__ import annotations

import trio

from tests.sdk.conftest import collect

ALICE, BOB = "alice@example.org", "bob@example.net"


async def test_one_device_each_both_ways_across_domains(two_orgs):
    alice = await two_orgs.register(ALICE)
    bob = await two_orgs.register(BOB)
    async with alice.connect(), bob.connect():
        with trio.fail_after(120):
            await alice.send(BOB, "hello from example.org")
            [got] = await collect(bob, 1)
            assert (got.sender, got.text, got.conversation) == (ALICE, "hello from example.org", ALICE)
            await bob.send(ALICE, "hi from example.net")
            await bob.send(ALICE, "second")
            got = await collect(alice, 2)
            assert [m.text for m in got] == ["hi from example.net", "second"]
    assert [h.text for h in await alice.history(BOB)] == ["hello from example.org", "hi from example.net", "second"]
    await two_orgs.drained()            # receipts still in flight settle; nothing stays queued
    await alice.aclose()
    await bob.aclose()
