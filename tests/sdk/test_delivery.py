"""Delivery edge cases: a lost ack means redelivery without a duplicate event; garbage gives one clear event."""

from __future__ import annotations

import trio
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from clientsdk.connection import memory_connector
from clientsdk.events import MessageReceived, SecurityEvent
from conformance.client import ProtocolDevice
from federation import codec
from federation.rpc import open_rpc
from federation.transport import Transport
from tests.sdk.conftest import DOMAIN, PASSWORD, collect, mock_ms

ALICE = f"alice@{DOMAIN}"
BOB = f"bob@{DOMAIN}"


class LoseFirstAck(Transport):
    """Wraps a transport; the first ``ack`` request kills the connection instead (a crash before the ack)."""

    fired = False

    def __init__(self, inner: Transport) -> None:
        self.inner = inner

    async def send(self, frame: bytes) -> None:
        if not LoseFirstAck.fired and codec.decode(frame).get("op") == "ack":
            LoseFirstAck.fired = True
            await self.inner.aclose()
            raise trio.ClosedResourceError("simulated loss")
        await self.inner.send(frame)

    async def receive(self) -> bytes:
        return await self.inner.receive()

    async def aclose(self, code: int = 1000, reason: str = "") -> None:
        await self.inner.aclose(code, reason)

    @property
    def close_code(self) -> int | None:
        return self.inner.close_code


async def test_lost_ack_redelivers_without_duplicate(world):
    LoseFirstAck.fired = False
    alice = await world.register("alice")
    bob = await world.register("bob")
    plain = memory_connector(world.network, DOMAIN)

    async def lossy(nursery: trio.Nursery) -> Transport:
        return LoseFirstAck(await plain(nursery))

    async with alice.connect():
        await alice.send(BOB, "exactly once")
        await alice.send(BOB, "and this too")
    async with bob.connect(lossy):
        got = await collect(bob, 2)
        await alice.aclose()
        assert LoseFirstAck.fired
        # the redelivered envelopes are recognised as processed: nothing new arrives
        with trio.move_on_after(1):
            extra = await collect(bob, 1)
            raise AssertionError(f"duplicate delivered: {extra}")
    assert [m.text for m in got] == ["exactly once", "and this too"]
    assert [h.text for h in await bob.history(ALICE)] == ["exactly once", "and this too"]
    await bob.aclose()


async def test_garbage_envelope_gives_one_security_event_and_is_acked(world):
    bob = await world.register("bob")
    async with bob.connect():
        pass
    transport = await world.network.connect(DOMAIN)
    async with open_rpc(transport) as rpc:
        mallory = ProtocolDevice(f"mallory@{DOMAIN}", master=Ed25519PrivateKey.generate())
        await rpc.request("register", user=mallory.user, password=PASSWORD,
                          master_key=mallory.master.public_key().public_bytes_raw(),
                          device_id=mallory.device_id, identity_key=mallory.identity_public,
                          device_list=mallory.device_list([mallory], issued_ms=mock_ms()).to_wire())
        challenge = await rpc.request("challenge")
        await rpc.request("auth", **mallory.auth_params(DOMAIN, challenge["nonce"], challenge["now_ms"]))
        await rpc.request("send", message_id="junk-1", ephemeral=False,
                          payloads=[{"devices": [str(bob.address)], "ciphertext": b"\x00not a session message"}])
    events = []
    async with bob.connect():
        with trio.move_on_after(1):
            await collect(bob, 1, events)
    assert [(e.kind, e.device) for e in events if isinstance(e, SecurityEvent)] == [
        ("decryption_failed", mallory.address)]
    events.clear()
    async with bob.connect():                       # acknowledged: not delivered again
        with trio.move_on_after(1):
            await collect(bob, 1, events)
    assert not [e for e in events if isinstance(e, (SecurityEvent, MessageReceived))]
    await bob.aclose()
