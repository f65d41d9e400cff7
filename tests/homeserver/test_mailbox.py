"""send / delivery / ack over the memory transport: coverage, idempotency, order, redelivery."""

import pytest
import trio

from conformance.client import ProtocolDevice, authenticate, login, register, throwaway_user
from federation.errors import ErrorCode
from federation.rpc import RemoteError

from .conftest import DOMAIN, connect, make_config, running_server
from .test_handlers import _user_with_devices


def payloads_for(devices, text=b"opaque"):
    return [{"devices": [d.address], "ciphertext": text + b"/" + d.device_id.encode()} for d in devices]


async def test_send_requires_exact_coverage(config):
    async with running_server(config) as (_, network):
        alice = await _user_with_devices(network, 1)
        bob = await _user_with_devices(network, 1)
        async with connect(network) as rpc:
            await authenticate(rpc, alice[0], DOMAIN)
            # missing bob's second device and alice's own other device
            with pytest.raises(RemoteError) as exc:
                await rpc.request("send", message_id="m1", payloads=payloads_for([bob[0]]))
            assert exc.value.code == ErrorCode.STALE_DEVICES
            assert exc.value.details == {
                bob[0].user: {"missing": [bob[1].device_id], "extra": [], "revoked": []},
                alice[0].user: {"missing": [alice[1].device_id], "extra": [], "revoked": []},
            }
            ghost = ProtocolDevice(bob[0].user)
            with pytest.raises(RemoteError) as exc:
                await rpc.request("send", message_id="m1", payloads=payloads_for([*bob, alice[1], ghost]))
            assert exc.value.details == {bob[0].user: {"missing": [], "extra": [ghost.device_id], "revoked": []}}
            ok = await rpc.request("send", message_id="m1", payloads=payloads_for([*bob, alice[1]]))
            assert ok == {"message_id": "m1", "duplicate": False}


async def test_revoked_device_reported_and_gets_nothing(config):
    async with running_server(config) as (_, network):
        alice = (await _user_with_devices(network, 0))[0]
        bob = await _user_with_devices(network, 1)
        async with connect(network) as rpc:
            await authenticate(rpc, bob[0], DOMAIN)
            await rpc.request("put_device_list", device_list=bob[0].device_list([bob[0]]).to_wire())
        async with connect(network) as rpc:
            await authenticate(rpc, alice, DOMAIN)
            with pytest.raises(RemoteError) as exc:
                await rpc.request("send", message_id="m", payloads=payloads_for(bob))
            assert exc.value.details == {bob[0].user: {"missing": [], "extra": [], "revoked": [bob[1].device_id]}}
        async with connect(network) as rpc:
            with pytest.raises(RemoteError) as exc:
                await authenticate(rpc, bob[1], DOMAIN)
            assert exc.value.code == ErrorCode.UNAUTHORIZED


async def test_delivery_ack_redelivery_in_order_and_idempotency(config):
    async with running_server(config) as (_, network):
        alice = (await _user_with_devices(network, 0))[0]
        bob = (await _user_with_devices(network, 0))[0]
        async with connect(network) as sender:
            await authenticate(sender, alice, DOMAIN)
            for i in range(10):
                await sender.request("send", message_id=f"m{i}", payloads=payloads_for([bob], b"c%d" % i))
            again = await sender.request("send", message_id="m3", payloads=payloads_for([bob], b"c3"))
            assert again["duplicate"] is True
            with pytest.raises(RemoteError) as exc:
                await sender.request("send", message_id="m3", payloads=payloads_for([bob], b"other"))
            assert exc.value.code == ErrorCode.CONFLICT
        async with connect(network) as rpc:  # offline until now: backlog in order
            await authenticate(rpc, bob, DOMAIN)
            got = [await rpc.next_push("envelope") for _ in range(10)]
            assert [p.fields["message_id"] for p in got] == [f"m{i}" for i in range(10)]
            assert all(p.fields["sender"] == alice.address for p in got)
            await rpc.request("ack", seqs=[p.fields["seq"] for p in got[:4]])
        async with connect(network) as rpc:  # unacked ones come again, acked ones never
            await authenticate(rpc, bob, DOMAIN)
            got = [await rpc.next_push("envelope") for _ in range(6)]
            assert [p.fields["message_id"] for p in got] == [f"m{i}" for i in range(4, 10)]
            await rpc.request("ack", seqs=[p.fields["seq"] for p in got])
            with trio.move_on_after(0.2) as scope:
                await rpc.next_push("envelope")
            assert scope.cancelled_caught


async def test_live_push_and_one_ciphertext_stored_once(config):
    async with running_server(config) as (running, network):
        alice = (await _user_with_devices(network, 0))[0]
        bob = await _user_with_devices(network, 1)
        async with connect(network) as receiver, connect(network) as sender:
            await authenticate(receiver, bob[1], DOMAIN)
            await authenticate(sender, alice, DOMAIN)
            await sender.request("send", message_id="g1",
                                 payloads=[{"devices": [b.address for b in bob], "ciphertext": b"group-ct"}])
            push = await receiver.next_push("envelope")
            assert push.fields["ciphertext"] == b"group-ct"
            counts = await running.homeserver.storage.mailboxes.counts()
            assert counts["blobs"] == 1 and counts["entries"] == 2


async def test_ephemeral_reaches_connected_devices_only_and_is_not_stored(config):
    async with running_server(config) as (running, network):
        alice = (await _user_with_devices(network, 0))[0]
        bob = await _user_with_devices(network, 1)
        async with connect(network) as receiver, connect(network) as sender:
            await authenticate(receiver, bob[0], DOMAIN)
            await authenticate(sender, alice, DOMAIN)
            ok = await sender.request("send", message_id="t1", ephemeral=True, payloads=payloads_for(bob, b"typing"))
            assert ok["delivered"] == 1
            push = await receiver.next_push("envelope")
            assert push.fields["ephemeral"] is True
            assert (await running.homeserver.storage.mailboxes.counts())["entries"] == 0
        async with connect(network) as rpc:
            await authenticate(rpc, bob[1], DOMAIN)
            with trio.move_on_after(0.2) as scope:
                await rpc.next_push("envelope")
            assert scope.cancelled_caught


async def test_pending_device_receives_only_from_own_user(config):
    async with running_server(config) as (_, network):
        alice = (await _user_with_devices(network, 0))[0]
        user = throwaway_user(DOMAIN)
        async with connect(network) as rpc:
            bob = await register(rpc, user)
            phone = await login(rpc, user)
        async with connect(network) as rpc:
            await authenticate(rpc, alice, DOMAIN)
            with pytest.raises(RemoteError) as exc:
                await rpc.request("send", message_id="x", payloads=payloads_for([bob, phone]))
            assert exc.value.details == {user: {"missing": [], "extra": [phone.device_id], "revoked": []}}
        async with connect(network) as rpc:
            await authenticate(rpc, bob, DOMAIN)
            await rpc.request("send", message_id="link", payloads=payloads_for([phone]))
            await rpc.request("send", message_id="self", payloads=[{"devices": [phone.address], "ciphertext": b"x"}])
        async with connect(network) as rpc:
            await authenticate(rpc, phone, DOMAIN)
            with pytest.raises(RemoteError) as exc:
                await rpc.request("send", message_id="y", payloads=payloads_for([alice, bob]))
            assert exc.value.code == ErrorCode.FORBIDDEN


async def test_message_rate_limit(tmp_path):
    from homeserver.config import Limits, Rate
    config = make_config(tmp_path, limits=Limits(messages_per_device=Rate(1, 3)))
    async with running_server(config) as (_, network):
        alice = (await _user_with_devices(network, 0))[0]
        bob = (await _user_with_devices(network, 0))[0]
        async with connect(network) as rpc:
            await authenticate(rpc, alice, DOMAIN)
            for i in range(3):
                await rpc.request("send", message_id=f"r{i}", payloads=payloads_for([bob]))
            with pytest.raises(RemoteError) as exc:
                await rpc.request("send", message_id="r3", payloads=payloads_for([bob]))
            assert exc.value.code == ErrorCode.RATE_LIMITED
            await rpc.request("ping")  # still connected and served


async def test_offline_for_hours_then_delivered_and_expired_after_ttl(config, autojump_clock):
    from conformance.client import now_ms
    base = now_ms()
    clock = lambda: base + int(trio.current_time() * 1000)  # noqa: E731
    async with running_server(config, clock=clock) as (running, network):
        alice = (await _user_with_devices(network, 0))[0]
        bob = await _user_with_devices(network, 0)
        async with connect(network) as rpc:
            await authenticate(rpc, alice, DOMAIN)
            await rpc.request("send", message_id="late", payloads=payloads_for(bob))
        await trio.sleep(5 * 3600)
        async with connect(network) as rpc:
            await rpc.request("ping")
        counts = await running.homeserver.housekeep_once()
        assert counts.get("entries", 0) == 0
        assert (await running.homeserver.storage.mailboxes.counts())["entries"] == 1
        await trio.sleep(31 * 86400)
        await running.homeserver.housekeep_once()
        assert (await running.homeserver.storage.mailboxes.counts())["entries"] == 0


async def test_device_approved_while_connected_may_send_at_once(config):
    async with running_server(config) as (_, network):
        alice = (await _user_with_devices(network, 0))[0]
        user = throwaway_user(DOMAIN)
        async with connect(network) as rpc:
            bob = await register(rpc, user)
            phone = await login(rpc, user)
        async with connect(network) as phone_rpc, connect(network) as bob_rpc:
            await authenticate(phone_rpc, phone, DOMAIN)
            with pytest.raises(RemoteError) as exc:
                await phone_rpc.request("send", message_id="early", payloads=payloads_for([alice, bob]))
            assert exc.value.code == ErrorCode.FORBIDDEN
            await authenticate(bob_rpc, bob, DOMAIN)
            await bob_rpc.request("put_device_list", device_list=bob.device_list([bob, phone]).to_wire())
            ok = await phone_rpc.request("send", message_id="now", payloads=payloads_for([alice, bob]))
            assert ok["duplicate"] is False
