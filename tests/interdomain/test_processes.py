"""Federation between real homeserver processes over real sockets (issue 5, item 7).

Two ``securechat-server`` processes (example.org, example.net), SQLite each, find each
other through ``[federation] static`` on loopback.  SDK clients talk end to end across
them over WebSocket and HTTP links; raw protocol devices check that a SIGKILL at either
end loses nothing that was acknowledged.
"""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest
import trio

from clientsdk.account import ClientOptions
from clientsdk.client import Client
from clientsdk.connection import Backoff, websocket_connector
from clientsdk.groups import GroupMessageReceived
from federation.links import CONTENT_TYPE, HTTP_TXN_PATH
from tests.interdomain.procs import Org, receive_all, register_on, running_orgs, send_opaque, ws_rpc
from tests.sdk.conftest import FAST_KDF, PASSWORD, collect

ORG, NET = "example.org", "example.net"
ALICE, BOB = f"alice@{ORG}", f"bob@{NET}"
# Real time: the servers are other processes, so the clients read the wall clock too.
OPTIONS = ClientOptions(one_time_prekeys=20, kdf=FAST_KDF, backoff=Backoff(initial_s=0.05, maximum_s=0.5))

PLAINTEXTS = ("hello from example.org", "hi from example.net", "second from example.net", "hello group",
              "group reply from example.net", "across orgs")

pytestmark = pytest.mark.slow


async def sdk_client(tmp_path: Path, org: Org, user: str) -> Client:
    return await Client.register(tmp_path / f"{user}.client.db", user, PASSWORD,
                                 connect=websocket_connector(org.c2s_url),
                                 store_key=user.encode()[:32].ljust(32, b"k"), options=OPTIONS)


async def group_messages(client: Client, count: int) -> list[GroupMessageReceived]:
    out: list[GroupMessageReceived] = []
    async for event in client.events():
        if isinstance(event, GroupMessageReceived):
            out.append(event)
            if len(out) == count:
                break
    return out


async def one_to_one_both_ways(alice: Client, bob: Client) -> None:
    await alice.send(BOB, "hello from example.org")
    [got] = await collect(bob, 1)
    assert (got.sender, got.text, got.conversation) == (ALICE, "hello from example.org", ALICE)
    await bob.send(ALICE, "hi from example.net")
    await bob.send(ALICE, "second from example.net")
    assert [m.text for m in await collect(alice, 2)] == ["hi from example.net", "second from example.net"]
    assert [h.text for h in await alice.history(BOB)] == [
        "hello from example.org", "hi from example.net", "second from example.net"]


async def test_sdk_clients_across_two_processes_over_websocket(tmp_path):
    async with running_orgs(tmp_path / "servers", (ORG, NET)) as orgs:
        alice, bob = await sdk_client(tmp_path, orgs[ORG], ALICE), await sdk_client(tmp_path, orgs[NET], BOB)
        try:
            with trio.fail_after(60):
                async with alice.connect(), bob.connect():
                    await one_to_one_both_ways(alice, bob)
                    gid = await alice.create_group("across orgs", [BOB])
                    await alice.send_group(gid, "hello group")
                    [got] = await group_messages(bob, 1)
                    assert (got.group_id, got.sender, got.text) == (gid, ALICE, "hello group")
                    await bob.send_group(gid, "group reply from example.net")
                    [got] = await group_messages(alice, 1)
                    assert (got.sender, got.text) == (BOB, "group reply from example.net")
                await orgs[ORG].wait_drained(NET)        # receipts still in flight settle
                await orgs[NET].wait_drained(ORG)
        finally:
            await alice.aclose()
            await bob.aclose()
        for org in orgs.values():                         # ciphertext only: no plaintext in any log
            assert not [text for text in PLAINTEXTS if text in org.log()]


async def test_sdk_clients_across_two_processes_over_http_links(tmp_path):
    async with running_orgs(tmp_path / "servers", (ORG, NET), transport="http") as orgs:
        async with httpx.AsyncClient() as http:         # what a peer's HttpLink posts to
            reply = await http.post(orgs[NET].http_base + HTTP_TXN_PATH, content=b"",
                                    headers={"content-type": CONTENT_TYPE})
        assert reply.status_code != 405, "the HTTP listener does not take federation POSTs"
        alice, bob = await sdk_client(tmp_path, orgs[ORG], ALICE), await sdk_client(tmp_path, orgs[NET], BOB)
        try:
            with trio.fail_after(60):
                async with alice.connect(), bob.connect():
                    await one_to_one_both_ways(alice, bob)
                await orgs[ORG].wait_drained(NET)
                await orgs[NET].wait_drained(ORG)
        finally:
            await alice.aclose()
            await bob.aclose()


async def test_origin_sigkilled_with_a_full_queue_loses_nothing(tmp_path):
    """Acknowledged to the sender, queued for a peer that is down, origin SIGKILLed: all of it arrives."""
    async with running_orgs(tmp_path / "servers", (ORG, NET)) as orgs:
        origin, destination = orgs[ORG], orgs[NET]
        alice, bob = await register_on(origin, "alice"), await register_on(destination, "bob")
        async with ws_rpc(origin.c2s_url, alice, ORG) as rpc:
            await send_opaque(rpc, bob, "warm-up")        # the origin fetches and caches bob's device list
        assert await receive_all(destination, bob, 1, quiet_s=0) == ["warm-up"]
        await origin.wait_drained(NET)
        await destination.kill()
        sent = [f"queued-{i:04d}" for i in range(200)]
        async with ws_rpc(origin.c2s_url, alice, ORG) as rpc:
            for message_id in sent:
                await send_opaque(rpc, bob, message_id)   # each one acknowledged by the origin
        assert await origin.outbound_depth(NET) == len(sent)
        await origin.kill()
        await destination.start()
        await origin.start()
        assert await receive_all(destination, bob, len(sent)) == sent     # every one, once, in order
        await origin.wait_drained(NET)


async def test_destination_sigkilled_after_acknowledging_loses_nothing(tmp_path):
    """What the destination acknowledged survives its SIGKILL (the origin never sends it again)."""
    async with running_orgs(tmp_path / "servers", (ORG, NET)) as orgs:
        origin, destination = orgs[ORG], orgs[NET]
        alice, bob = await register_on(origin, "alice"), await register_on(destination, "bob")
        async with ws_rpc(origin.c2s_url, alice, ORG) as rpc:
            await send_opaque(rpc, bob, "warm-up")
            assert await receive_all(destination, bob, 1, quiet_s=0) == ["warm-up"]
            # 1. everything acknowledged, then SIGKILL at once: the origin holds nothing to resend
            first = [f"acked-{i:04d}" for i in range(100)]
            for message_id in first:
                await send_opaque(rpc, bob, message_id)
            await origin.wait_drained(NET, poll_s=0.005)
            await destination.kill()
            assert await origin.outbound_depth(NET) == 0
            await destination.start()
            assert await receive_all(destination, bob, len(first)) == first
            # 2. SIGKILL mid-stream, just after it acknowledged some transactions: what it
            # acknowledged is kept, the rest is sent again, nothing arrives twice
            second = [f"stream-{i:04d}" for i in range(200)]
            sent = 0
            killed = trio.Event()

            async def kill_after_some_acks() -> None:
                while not (sent >= len(second) // 3 and await origin.outbound_depth(NET) < sent):
                    await trio.sleep(0.005)
                await destination.kill()
                killed.set()

            async with trio.open_nursery() as nursery:
                nursery.start_soon(kill_after_some_acks)
                for message_id in second:
                    await send_opaque(rpc, bob, message_id)
                    sent += 1
            assert killed.is_set()
            await destination.start()
            assert await receive_all(destination, bob, len(second)) == second
            await origin.wait_drained(NET)


async def test_sigterm_of_a_federating_server_is_prompt(tmp_path):
    async with running_orgs(tmp_path / "servers", (ORG, NET)) as orgs:
        alice, bob = await register_on(orgs[ORG], "alice"), await register_on(orgs[NET], "bob")
        async with ws_rpc(orgs[ORG].c2s_url, alice, ORG) as rpc:
            await send_opaque(rpc, bob, "org to net")
        async with ws_rpc(orgs[NET].c2s_url, bob, NET) as rpc:
            await send_opaque(rpc, alice, "net to org")
        assert await receive_all(orgs[ORG], alice, 1, quiet_s=0) == ["net to org"]
        assert await receive_all(orgs[NET], bob, 1, quiet_s=0) == ["org to net"]
        started = trio.current_time()
        await orgs[ORG].terminate()                       # nothing in flight: nothing to wait for
        assert trio.current_time() - started < 3
        assert orgs[ORG].process is not None and orgs[ORG].process.process.returncode == 0
