"""Groups end to end over the memory network: 5 users with 2 devices each.

Creation, every member device seeing every message once and in order per sender,
joins (no access to earlier messages) and leaves, concurrent admin changes that
converge, sender-key rotation on removal, and a removed member that kept its keys
still unable to decrypt later messages — also from a member that was offline
during the removal.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import trio

from clientsdk.account import ClientOptions
from clientsdk.client import Client
from clientsdk.connection import Backoff, websocket_connector
from clientsdk.crypto.errors import CryptoError
from clientsdk.crypto.group_session import GroupSession
from clientsdk.crypto.group_state import NotMember
from clientsdk.crypto.sender_keys import UnknownSenderKey
from clientsdk.events import Event, SecurityEvent
from clientsdk.groups import (
    GroupBundle,
    GroupChanged,
    GroupMessageReceived,
    LocalGroup,
    UnknownGroup,
    is_group_message,
    parse_group_id,
)
from federation.addresses import DeviceAddress
from tests.sdk.conftest import DOMAIN, FAST_KDF
from tests.serverproc import ROOT, ServerProcess, init_server, start_server, stop

NAMES = ["ann", "ben", "cat", "dan", "eve"]
TIMEOUT_S = 30


def addr(name: str) -> str:
    return f"{name}@{DOMAIN}"


class Online:
    """Each client's connection in its own task, so a test can take one down and bring it back."""

    def __init__(self, nursery: trio.Nursery) -> None:
        self.nursery = nursery
        self.running: dict[Client, tuple[trio.Event, trio.Event]] = {}

    async def up(self, client: Client) -> None:
        stop, done = trio.Event(), trio.Event()

        async def hold(task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
            try:
                async with client.connect():
                    task_status.started()
                    await stop.wait()
            finally:
                done.set()

        await self.nursery.start(hold)
        self.running[client] = (stop, done)

    async def down(self, client: Client) -> None:
        stop, done = self.running.pop(client)
        stop.set()
        await done.wait()

    async def close(self) -> None:
        for client in list(self.running):
            await self.down(client)


async def until(check: Callable[[], Awaitable[bool]], what: str) -> None:
    with trio.fail_after(TIMEOUT_S):
        while not await check():
            await trio.sleep(0.01)


async def info(client: Client, gid: str) -> GroupChanged | None:
    try:
        return await client.group_info(gid)
    except UnknownGroup:
        return None


async def wait_members(clients: list[Client], gid: str, members: set[str]) -> None:
    async def ok() -> bool:
        for client in clients:
            state = await info(client, gid)
            if state is None or set(state.members) != members:
                return False
        return True
    await until(ok, f"members {members}")


class Inbox:
    """Per device: group messages in arrival order, and every other event."""

    def __init__(self, client: Client) -> None:
        self.client = client
        self.messages: list[GroupMessageReceived] = []
        self.others: list[Event] = []
        self.taken = 0

    def drain(self) -> None:
        while True:
            try:
                event = self.client.events().receive_nowait()
            except trio.WouldBlock:
                return
            if isinstance(event, GroupMessageReceived):
                self.messages.append(event)
            else:
                self.others.append(event)

    async def take(self, count: int) -> list[GroupMessageReceived]:
        """The next ``count`` group messages (after those already taken)."""
        async def enough() -> bool:
            self.drain()
            return len(self.messages) >= self.taken + count
        await until(enough, f"{count} group messages at {self.client.address}")
        got = self.messages[self.taken:self.taken + count]
        self.taken += count
        return got

    def failures(self) -> list[Event]:
        self.drain()
        return [e for e in self.others if isinstance(e, SecurityEvent)]


def spy_sends(client: Client) -> list[list[dict[str, Any]]]:
    """Record the payloads of every ``send`` op this client makes (a spy, not a mock: the op still runs)."""
    sent: list[list[dict[str, Any]]] = []
    original = client._send_op

    async def recording(message_id: str, payloads: list[dict[str, Any]], ephemeral: bool = False) -> None:
        sent.append(payloads)
        await original(message_id, payloads, ephemeral)

    client._send_op = recording                   # type: ignore[method-assign]
    return sent


def shared_ciphertexts(sent: list[list[dict[str, Any]]]) -> list[tuple[list[str], bytes]]:
    return [(p["devices"], p["ciphertext"]) for payloads in sent for p in payloads
            if is_group_message(p["ciphertext"])]


@asynccontextmanager
async def five_users(world: Any) -> AsyncIterator[tuple[dict[str, list[Client]], Online]]:
    """ann..eve, each with a master device and an approved second device, all connected.

    A context manager in the test's own task (not a fixture): connections are
    nurseries, and a test takes some down and up again.
    """
    devices: dict[str, list[Client]] = {}
    try:
        async with trio.open_nursery() as nursery:
            online = Online(nursery)
            for name in NAMES:
                first = await world.register(name)
                second = await world.login(name, f"{name}2")
                await online.up(first)
                await online.up(second)
                await first.approve_device(second.device_id, second.identity_key)
                devices[name] = [first, second]
            try:
                yield devices, online
            finally:
                await online.close()
    finally:
        for pair in devices.values():
            for client in pair:
                await client.aclose()


async def test_group_of_five_users_two_devices_each(world):
    async with five_users(world) as (devices, _online):
        ann1 = devices["ann"][0]
        every = [c for name in NAMES for c in devices[name]]
        inboxes = {c: Inbox(c) for c in every}
        members = ["ben", "cat", "dan"]
        gid = await ann1.create_group("friends", [addr(n) for n in members])
        group_devices = [c for n in ["ann", *members] for c in devices[n]]
        await wait_members(group_devices, gid, {addr(n) for n in ["ann", *members]})
        assert await info(devices["eve"][0], gid) is None

        # Everyone sends at once; every other member device sees every message once, in order per sender.
        senders = [ann1, devices["ben"][1], devices["cat"][0], devices["dan"][1]]
        rounds = 3

        async def talk(client: Client) -> None:
            for i in range(rounds):
                await client.send_group(gid, f"{client.address}#{i}")

        early = spy_sends(devices["ben"][1])
        async with trio.open_nursery() as nursery:
            for client in senders:
                nursery.start_soon(talk, client)
        for client in group_devices:
            expected = sum(rounds for s in senders if s is not client)
            got = await inboxes[client].take(expected)
            assert len(got) == expected, [m.text for m in got]
            for sender in senders:
                texts = [m.text for m in got if m.sender_device == str(sender.address)]
                assert texts == ([] if sender is client else [f"{sender.address}#{i}" for i in range(rounds)])
            assert all(m.group_id == gid and m.outgoing == (m.sender == client.user) for m in got)
            assert not inboxes[client].failures()
        history = await devices["cat"][1].group_history(gid)
        assert len(history) == rounds * len(senders)
        assert sorted(h.text for h in await ann1.group_history(gid)) == sorted(
            f"{s.address}#{i}" for s in senders for i in range(rounds))

        # A join: eve gets the state, not the earlier messages, and reads what follows.
        eve1, eve2 = devices["eve"]
        await ann1.add_member(gid, addr("eve"))
        everyone = {addr(n) for n in NAMES}
        await wait_members(every, gid, everyone)
        ben2 = devices["ben"][1]
        await ben2.send_group(gid, "welcome eve")
        for eve in (eve1, eve2):
            [got] = await inboxes[eve].take(1)
            assert (got.text, got.sender) == ("welcome eve", addr("ben"))
            assert [h.text for h in await eve.group_history(gid)] == ["welcome eve"]
            assert not inboxes[eve].failures()
            # The chain eve got starts after ben's earlier messages: they stay unreadable to her.
            session = eve._groups[parse_group_id(gid)].session
            old = shared_ciphertexts(early[:rounds])
            assert len(old) == rounds - 1        # ben's first message carried his chain pairwise
            for _, ciphertext in old:
                with pytest.raises(CryptoError):
                    session.decrypt(ben2.address, ciphertext, 0)
        for client in group_devices:
            if client is not ben2:
                [got] = await inboxes[client].take(1)
                assert got.text == "welcome eve"

        # A leave: dan is removed; his devices learn it and see nothing after.
        await ann1.remove_member(gid, addr("dan"))
        remaining = everyone - {addr("dan")}
        await wait_members([c for c in every if c.user != addr("dan")], gid, remaining)

        async def dan_knows() -> bool:
            return all([await _removed(d, gid, "dan") for d in devices["dan"]])
        await until(dan_knows, "dan removed")
        dan_before = {d: len(inboxes[d].messages) for d in devices["dan"]}
        await devices["cat"][0].send_group(gid, "dan has left")
        for client in [c for c in every if c.user not in (addr("dan"), addr("cat"))] + [devices["cat"][1]]:
            [got] = await inboxes[client].take(1)
            assert got.text == "dan has left"
        await trio.sleep(0.2)
        for dan in devices["dan"]:
            inboxes[dan].drain()
            assert len(inboxes[dan].messages) == dan_before[dan]
            assert any(isinstance(e, GroupChanged) and e.removed_me for e in inboxes[dan].others)
            with pytest.raises(NotMember):
                await dan.send_group(gid, "still here?")


async def test_concurrent_admin_changes_converge_on_every_device(world):
    async with five_users(world) as (devices, _online):
        ann1 = devices["ann"][0]
        ben1 = devices["ben"][0]
        every = [c for name in NAMES for c in devices[name]]
        gid = await ann1.create_group("team", [addr(n) for n in NAMES[1:]])
        await ann1.add_admin(gid, addr("ben"))
        await until(lambda: _all(devices["ben"], lambda c: _is_admin(c, gid, "ben")), "ben is admin")

        # Two admins change the same epoch at the same time (from different devices).
        async with trio.open_nursery() as nursery:
            nursery.start_soon(ann1.rename_group, gid, "ann's name")
            nursery.start_soon(ben1.rename_group, gid, "ben's name")
            nursery.start_soon(devices["ben"][1].remove_member, gid, addr("eve"))

        async def converged() -> bool:
            states = [await info(c, gid) for c in every if c.user != addr("eve")]
            if any(s is None for s in states):
                return False
            views = {(s.epoch, s.name, s.members, s.admins) for s in states if s is not None}
            outboxes = any(g.outbox for c in every if c._groups for g in c._groups.values())
            return len(views) == 1 and not outboxes
        await until(converged, "every device on one state")
        final = await info(ann1, gid)
        assert final is not None
        assert addr("eve") not in final.members
        assert final.name in ("ann's name", "ben's name")
        # All three survive: each loser was rebased and re-sent on top of the winner.
        assert final.epoch == 4           # created 0, admin 1, then all three concurrent changes
        hashes = {c._groups[parse_group_id(gid)].session.state.hash() for c in every
                  if c.user != addr("eve") and c._groups}
        assert len(hashes) == 1
        # And the group still works for everyone after the dust settles.
        inboxes = {c: Inbox(c) for c in every}
        await devices["cat"][1].send_group(gid, "still one group")
        for client in every:
            if client.user not in (addr("eve"),) and client is not devices["cat"][1]:
                got = await inboxes[client].take(1)
                assert got[-1].text == "still one group"


async def _all(clients: list[Client], check: Callable[[Client], Awaitable[bool]]) -> bool:
    return all([await check(c) for c in clients])


async def _is_admin(client: Client, gid: str, name: str) -> bool:
    state = await info(client, gid)
    return state is not None and addr(name) in state.admins


async def test_removal_rotates_keys_and_a_removed_member_cannot_decrypt_later_messages(world):
    async with five_users(world) as (devices, online):
        ann1 = devices["ann"][0]
        cat1, cat2 = devices["cat"]
        dan1 = devices["dan"][0]
        members = [c for n in ["ann", "ben", "cat", "dan"] for c in devices[n]]
        inboxes = {c: Inbox(c) for c in members}
        gid = await ann1.create_group("soon smaller", [addr(n) for n in ["ben", "cat", "dan"]])
        await wait_members(members, gid, {addr(n) for n in ["ann", "ben", "cat", "dan"]})
        ben1 = devices["ben"][0]
        for sender in (ann1, ben1, cat1):
            await sender.send_group(gid, f"before from {sender.user}")
        await inboxes[dan1].take(3)
        raw_gid = parse_group_id(gid)
        old_keys = {c: c._groups[raw_gid].session.outbound.key_id for c in (ann1, ben1, cat1)}
        # dan keeps a copy of his sender keys, as a malicious removed member would.
        kept = dan1._groups[raw_gid].session.to_bytes()

        # cat is offline (both devices) while dan is removed.
        await online.down(cat1)
        await online.down(cat2)
        await ann1.remove_member(gid, addr("dan"))
        sent = {c: spy_sends(c) for c in (ann1, ben1, cat1)}
        await until(lambda: _removed(devices["ben"][0], gid, "dan"), "ben saw the removal")
        for round_ in (1, 2):        # the first carries the new chain pairwise, the second is shared
            await ann1.send_group(gid, f"after from ann {round_}")
            await ben1.send_group(gid, f"after from ben {round_}")

        # cat comes back, catches up on the removal, and sends under a fresh key.
        await online.up(cat1)
        await online.up(cat2)
        await until(lambda: _removed(cat1, gid, "dan"), "cat saw the removal")
        for round_ in (1, 2):
            await cat1.send_group(gid, f"after from cat {round_}")

        for sender in (ann1, ben1, cat1):
            new_key = sender._groups[raw_gid].session.outbound.key_id
            assert new_key != old_keys[sender], "a removal rotates every remaining member's sender key"
        spoiled = GroupSession.from_bytes(kept, lambda d: None)
        ciphertexts = [(sender, devs, ct) for sender in sent for devs, ct in shared_ciphertexts(sent[sender])]
        assert len(ciphertexts) == 3
        for sender, devs, ct in ciphertexts:
            assert not any(d.startswith(addr("dan")) for d in devs)
            with pytest.raises(UnknownSenderKey):
                spoiled.decrypt(sender.address, ct, 0)
        # The pairwise bundles carried the new chains only to the remaining members.
        for ops in sent.values():
            for payloads in ops:
                assert not any(d.startswith(addr("dan")) for p in payloads for d in p["devices"])
        # Everyone remaining read every message.
        for client in members:
            if client.user == addr("dan"):
                continue
            got = await inboxes[client].take(2 + 4 if client in (ann1, ben1, cat1) else 3 + 6)
            texts = [m.text for m in got]
            for sender in (ann1, ben1, cat1):
                if sender is not client:
                    name = sender.user.partition("@")[0]
                    assert [t for t in texts if t.startswith(f"after from {name}")] == [
                        f"after from {name} 1", f"after from {name} 2"]
            assert not inboxes[client].failures()
        await trio.sleep(0.1)
        for dan in devices["dan"]:
            inboxes[dan].drain()
            assert not any(m.text.startswith("after") for m in inboxes[dan].messages)


async def _removed(client: Client, gid: str, name: str) -> bool:
    state = await info(client, gid)
    return state is not None and addr(name) not in state.members


async def test_group_state_survives_a_restart(world):
    ann = await world.register("ann")
    ben = await world.register("ben")
    async with ann.connect(), ben.connect():
        gid = await ann.create_group("pair", [addr("ben")])
        await until(lambda: _known(ben, gid), "ben joined")
        await ann.send_group(gid, "one")
        [got] = await Inbox(ben).take(1)
        assert got.text == "one"
    await ben.aclose()
    ben = await world.reopen("ben")
    async with ann.connect(), ben.connect():
        assert await ben.groups() == [gid]
        await ann.send_group(gid, "two")
        [got] = await Inbox(ben).take(1)
        assert got.text == "two"
        await ben.send_group(gid, "three")
        [got] = await Inbox(ann).take(1)
        assert got.text == "three"
    assert [h.text for h in await ben.group_history(gid)] == ["one", "two", "three"]
    await ann.aclose()
    await ben.aclose()


async def _known(client: Client, gid: str) -> bool:
    return await info(client, gid) is not None


def test_bundle_and_record_round_trip():
    bundle = GroupBundle(bytes(32), welcome=b"w", controls=(b"c1", b"c2"), distribution=b"d", message=b"m")
    assert GroupBundle.from_bytes(bundle.to_bytes()) == bundle
    assert not is_group_message(bundle.to_bytes())
    assert LocalGroup.__name__ == "LocalGroup"
    with pytest.raises(UnknownGroup):
        parse_group_id("nothex")
    assert DeviceAddress.parse(f"{addr('ann')}/AAAAAAAAAA")


# --- examples/group_bot.py, run for real over WebSocket against a homeserver process -------------

GROUP_BOT = ROOT / "examples" / "group_bot.py"
WS_OPTIONS = ClientOptions(one_time_prekeys=10, kdf=FAST_KDF, backoff=Backoff(initial_s=0.05, maximum_s=0.2))


@pytest.fixture
def server_process(tmp_path: Path) -> Iterator[ServerProcess]:
    running = start_server(init_server(tmp_path / "server", DOMAIN))
    yield running
    stop(running)


def start_group_bot(url: str, store: Path, members: list[str]) -> subprocess.Popen[str]:
    env = dict(os.environ, GROUP_BOT_PASSPHRASE="bot store passphrase", PYTHONUNBUFFERED="1")
    return subprocess.Popen([sys.executable, str(GROUP_BOT), url, addr("groupbot"), str(store), *members],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT)


async def test_group_bot_creates_a_group_and_echoes(server_process, tmp_path) -> None:
    connect = websocket_connector(server_process.url)
    alice = await Client.register(tmp_path / "alice.db", addr("alice"), "alice-password-1", connect=connect,
                                  store_key=b"a" * 32, options=WS_OPTIONS)
    bob = await Client.register(tmp_path / "bob.db", addr("bob"), "bob-password-12", connect=connect,
                                store_key=b"b" * 32, options=WS_OPTIONS)
    bot = start_group_bot(server_process.url, tmp_path / "bot.db", [addr("alice"), addr("bob")])
    try:
        async with alice, bob:
            with trio.fail_after(30):
                line = await trio.to_thread.run_sync(bot.stdout.readline)
                assert "ready" in line, line + bot.stderr.read()
                gid = line.split()[-1]
                async with alice.connect(), bob.connect():
                    await until(lambda: _known(alice, gid), "alice joined")
                    await until(lambda: _known(bob, gid), "bob joined")
                    assert (await alice.group_info(gid)).admins == (addr("groupbot"),)
                    await alice.send_group(gid, "hello group")
                    [echo] = await Inbox(alice).take(1)
                    assert (echo.text, echo.sender) == (f"{addr('alice')}: hello group", addr("groupbot"))
                    texts = [m.text for m in await Inbox(bob).take(2)]
                    assert texts == ["hello group", f"{addr('alice')}: hello group"]
    finally:
        if bot.poll() is None:
            bot.terminate()
            bot.wait(10)
        bot.stdout.close()
        bot.stderr.close()
