"""Group healing (issue 4): sender-key re-requests, rotation when a device leaves, new devices
learning their groups, the mailbox backlog before group sends, and groups in backups.

Every test drives real clients against an in-process homeserver over the memory network;
fakes (a transport that delays or drops pushes) stand in for slow or old servers.
"""

from __future__ import annotations

import logging
import math
from collections import deque
from typing import Any

import pytest
import trio
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from clientsdk.backups import open_backup_file
from clientsdk.client import Client
from clientsdk.connection import Connector
from clientsdk.content import SENDER_KEY_REQUEST, Content
from clientsdk.crypto.backup import BackupContents, BackupGroup
from clientsdk.crypto.group_session import GroupSession
from clientsdk.crypto.sender_keys import UnknownSenderKey
from clientsdk.events import ReceiptReceived, SecurityEvent
from clientsdk.group_records import HOLD_MS, KeyRequest
from clientsdk.groups import BACKLOG_WAIT_S, GroupsMixin, parse_group_id
from clientsdk.lifecycle import ConnectionMixin
from federation import codec
from federation.rpc import open_rpc
from federation.transport import CLOSE_NORMAL, Transport
from tests.sdk.conftest import DOMAIN, OPTIONS, PASSWORD, World
from tests.sdk.test_groups import (
    Inbox,
    Online,
    addr,
    info,
    shared_ciphertexts,
    spy_sends,
    until,
    wait_members,
)

NEW_KEY = b"restored".ljust(32, b"k")


# --- fakes ------------------------------------------------------------------------------------


class FilteredPushes(Transport):
    """A client transport that holds back pushes for ``hold_s`` after connecting (a slow
    backlog) and can drop pushes of some kinds (an old server that sends no ``backlog_done``)."""

    def __init__(self, inner: Transport, hold_s: float = 0.0, drop: frozenset[str] = frozenset()) -> None:
        self.inner = inner
        self.until = trio.current_time() + hold_s
        self.drop = drop
        self.held: deque[bytes] = deque()

    async def send(self, frame: bytes) -> None:
        await self.inner.send(frame)

    async def receive(self) -> bytes:
        while True:
            now = trio.current_time()
            if self.held and now >= self.until:
                return self.held.popleft()
            with trio.move_on_at(self.until if now < self.until else math.inf):
                frame = await self.inner.receive()
                kind = codec.decode(frame).get("push")
                if kind in self.drop:
                    continue
                if kind is not None and (self.held or trio.current_time() < self.until):
                    self.held.append(frame)          # pushes keep their order behind the held ones
                    continue
                return frame

    async def aclose(self, code: int = CLOSE_NORMAL, reason: str = "") -> None:
        await self.inner.aclose(code, reason)

    @property
    def close_code(self) -> int | None:
        return self.inner.close_code


def filtered(world: World, hold_s: float = 0.0, drop: frozenset[str] = frozenset()) -> Connector:
    async def connect(nursery: trio.Nursery) -> Transport:
        return FilteredPushes(await world.network.connect(DOMAIN), hold_s, drop)
    return connect


def spy_contents(client: Client) -> list[Content]:
    """Every content the client sends through the 1:1 send path (a spy: the send still happens)."""
    seen: list[Content] = []
    original = client._send_content

    async def recording(recipients: list[str], template: Content, **kwargs: Any) -> None:
        seen.append(template)
        await original(recipients, template, **kwargs)

    client._send_content = recording               # type: ignore[method-assign]
    return seen


def forget_chains(client: Client, gid: str) -> None:
    """The device loses every sender key of the group (as after a store rolled back by a file copy)."""
    group = client._groups[parse_group_id(gid)]
    group.session = GroupSession(group.session.replica, client._resolve)


def security(inbox: Inbox) -> list[SecurityEvent]:
    return [e for e in inbox.failures() if isinstance(e, SecurityEvent)]


async def make_users(world: World, names: list[str]) -> list[Client]:
    return [await world.register(name) for name in names]


async def close_all(clients: list[Client]) -> None:
    for client in clients:
        await client.aclose()


# --- item 3: backlog_done ---------------------------------------------------------------------


async def test_backlog_done_marks_the_end_of_the_stored_backlog(world):
    alice, bob = await make_users(world, ["alice", "bob"])
    async with alice.connect():
        for i in range(3):
            await alice.send(addr("bob"), f"stored {i}")
        async with open_rpc(await world.network.connect(DOMAIN)) as rpc:
            await bob._authenticate(rpc)
            kinds, seqs = [], []
            while not kinds or kinds[-1] != "backlog_done":
                push = await rpc.next_push()
                kinds.append(push.kind)
                seqs.append(push.fields.get("seq"))
            assert [k for k in kinds if k != "prekeys_low"] == ["envelope"] * 3 + ["backlog_done"]
            assert seqs[-1] == max(s for k, s in zip(kinds, seqs) if k == "envelope")
            await alice.send(addr("bob"), "live")           # after the backlog: a plain envelope, no marker
            push = await rpc.next_push()
            assert push.kind == "envelope" and push.fields["seq"] > seqs[-1]
    async with open_rpc(await world.network.connect(DOMAIN)) as rpc:    # an empty backlog: seq 0
        await alice._authenticate(rpc)
        assert (await rpc.next_push("backlog_done")).fields == {"seq": 0}
    await close_all([alice, bob])


async def test_an_offline_member_applies_a_removal_from_its_backlog_before_sending(world):
    ann, ben, cat, dan = clients = await make_users(world, ["ann", "ben", "cat", "dan"])
    async with trio.open_nursery() as nursery:
        online = Online(nursery)
        for client in clients:
            await online.up(client)
        inboxes = {c: Inbox(c) for c in clients}
        gid = await ann.create_group("four", [addr(n) for n in ("ben", "cat", "dan")])
        await wait_members(clients, gid, {addr(n) for n in ("ann", "ben", "cat", "dan")})
        await cat.send_group(gid, "before")                   # dan holds cat's chain now
        for client in (ann, ben, dan):
            await inboxes[client].take(1)
        old_key = cat._groups[parse_group_id(gid)].session.outbound.key_id

        await online.down(cat)
        await ann.remove_member(gid, addr("dan"))            # the removal waits in cat's mailbox
        await wait_members([ann, ben], gid, {addr(n) for n in ("ann", "ben", "cat")})

        # cat reconnects to a server whose backlog arrives late, and sends at once.
        sent = spy_sends(cat)
        async with cat.connect(filtered(world, hold_s=1.0)):
            await cat.send_group(gid, "after")
            assert addr("dan") not in (await cat.group_info(gid)).members
            for client in (ann, ben):
                [got] = await inboxes[client].take(1)
                assert got.text == "after"
        assert sent and not any(d.startswith(addr("dan")) for payloads in sent for p in payloads
                                for d in p["devices"])
        assert cat._groups[parse_group_id(gid)].session.outbound.key_id != old_key
        await trio.sleep(0.1)
        inboxes[dan].drain()
        assert [m.text for m in inboxes[dan].messages] == ["before"]
        await online.close()
    await close_all(clients)


async def test_a_server_without_backlog_done_delays_group_sends_but_not_for_ever(world, autojump_clock, caplog):
    ann, ben = clients = await make_users(world, ["ann", "ben"])
    async with ann.connect(), ben.connect():
        gid = await ann.create_group("pair", [addr("ben")])
        while await info(ben, gid) is None:
            await trio.sleep(0.05)
    caplog.set_level(logging.INFO, logger="clientsdk.groups")
    async with ben.connect(), ann.connect(filtered(world, drop=frozenset({"backlog_done"}))):
        await ann.send(addr("ben"), "a 1:1 message does not wait")
        assert "no backlog_done" not in caplog.text
        start = trio.current_time()
        await ann.send_group(gid, "sent anyway")
        assert trio.current_time() - start >= BACKLOG_WAIT_S - 0.1
        assert "no backlog_done" in caplog.text
        inbox = Inbox(ben)
        while not inbox.messages:
            await trio.sleep(0.05)
            inbox.drain()
        assert inbox.messages[0].text == "sent anyway"
        await ann.send_group(gid, "and now without waiting")   # once per connection only
    await close_all(clients)


class _Closing:
    """A client whose connection has closed while its connection loop is still letting go of
    it (a close handshake, say): ``_rpc`` stays the closed connection for a while."""

    _until_backlog_done = GroupsMixin._until_backlog_done

    def __init__(self) -> None:
        self._rpc: Any = self.connection(closed=True)
        self._connected, self._dropped = trio.Event(), trio.Event()
        self._connected.set()
        self._running, self.revoked = True, False
        self._backlog_for: Any = None
        self._backlog_wait: Any = None
        self._backlog_signal: trio.Event | None = None
        self.waits = 0

    async def _wait_rpc(self) -> Any:
        self.waits += 1
        return await ConnectionMixin._wait_rpc(self)  # type: ignore[arg-type]

    @staticmethod
    def connection(closed: bool) -> Any:
        rpc = type("Rpc", (), {"closed": trio.Event()})()
        if closed:
            rpc.closed.set()
        return rpc


async def test_waiting_for_backlog_done_does_not_spin_on_a_closing_connection():
    client = _Closing()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(client._until_backlog_done)
        await trio.sleep(0.2)                          # real time: the old connection is closing
        fresh = client.connection(closed=False)
        client._rpc, client._backlog_for = fresh, fresh       # the loop let go; a new one is up
        client._dropped.set()
    assert client.waits <= 2, f"{client.waits} wake-ups in 0.2 s: the wait spins"


# --- item 1: sender-key re-request ------------------------------------------------------------


async def test_a_lost_sender_key_is_requested_and_the_held_message_decrypts(world):
    ann, ben = clients = await make_users(world, ["ann", "ben"])
    async with ann.connect(), ben.connect():
        inbox = Inbox(ben)
        gid = await ann.create_group("pair", [addr("ben")])
        await until(lambda: _known(ben, gid), "ben joined")
        await ann.send_group(gid, "one")
        assert [m.text for m in await inbox.take(1)] == ["one"]
        forget_chains(ben, gid)
        requests = spy_contents(ben)
        await ann.send_group(gid, "two")                     # shared: ann believes ben holds her chain
        await ann.send_group(gid, "three")
        got = await inbox.take(2)
        assert sorted(m.text for m in got) == ["three", "two"]
        assert all(m.group_id == gid and m.sender == addr("ann") for m in got)
        assert not security(inbox)
        kinds = [c.type for c in requests]
        assert kinds.count(SENDER_KEY_REQUEST) == 1          # rate-limited: one request for both
        request = KeyRequest.from_refs(next(c.refs for c in requests if c.type == SENDER_KEY_REQUEST))
        assert (request.group_id.hex(), request.device) == (gid, str(ann.address))
        await ann.send_group(gid, "four")                    # and the chain goes on
        assert [m.text for m in await inbox.take(1)] == ["four"]
        assert [h.text for h in await ben.group_history(gid)] == ["one", "two", "three", "four"]
        assert not ben._recovery.held
    await close_all(clients)


async def test_a_key_the_sender_no_longer_has_gives_one_clear_event(world):
    ann, ben, _cat = clients = await make_users(world, ["ann", "ben", "cat"])
    async with trio.open_nursery() as nursery:
        online = Online(nursery)
        for client in clients:
            await online.up(client)
        inbox = Inbox(ben)
        gid = await ann.create_group("three", [addr("ben"), addr("cat")])
        await wait_members(clients, gid, {addr(n) for n in ("ann", "ben", "cat")})
        await ann.send_group(gid, "one")
        await inbox.take(1)
        await online.down(ben)
        forget_chains(ben, gid)
        await ann.send_group(gid, "two")
        await ann.send_group(gid, "three")
        await ann.remove_member(gid, addr("cat"))            # ann's chain must rotate: she cannot serve it
        await online.up(ben)

        async def reported() -> bool:
            return bool(security(inbox))
        await until(reported, "ben reports the loss")
        await trio.sleep(0.2)
        [event] = security(inbox)
        assert (event.kind, event.user, event.device) == ("decryption_failed", addr("ann"), str(ann.address))
        assert event.detail.startswith("2 group message(s)")
        notices = [h for h in await ben.group_history(gid) if h.kind == "notice"]
        assert len(notices) == 1 and notices[0].text == event.detail
        await ann.send_group(gid, "four")                    # a fresh chain reaches ben again
        got = await inbox.take(1)
        assert [m.text for m in got] == ["four"]
        assert len(security(inbox)) == 1
        await online.close()
    await close_all(clients)


async def test_held_messages_without_an_answer_are_reported_once(world, autojump_clock):
    ann, ben = clients = await make_users(world, ["ann", "ben"])
    async with ann.connect(), ben.connect():
        gid = await ann.create_group("pair", [addr("ben")])
        while await info(ben, gid) is None:
            await trio.sleep(0.05)
        await ann.send_group(gid, "one")
        inbox = Inbox(ben)
        while not inbox.messages:
            await trio.sleep(0.05)
            inbox.drain()
    forget_chains(ben, gid)
    async with ann.connect():
        await ann.send_group(gid, "two")
        await ann.send_group(gid, "three")
    requests = spy_contents(ben)
    async with ben.connect():                                # ann stays offline: nobody answers
        # (short polls, no fail_after: autojump would jump over store thread hops)
        while len(ben._recovery.held) < 2 or ben._recovery.due:
            await trio.sleep(0.05)
        assert not security(inbox)
        await trio.sleep(HOLD_MS / 1000)
        while not security(inbox):
            await trio.sleep(0.05)
        events = security(inbox)
        assert len(events) == 1 and events[0].detail.startswith("2 group message(s)")
        assert [c.type for c in requests].count(SENDER_KEY_REQUEST) == 1
        assert not ben._recovery.held
    # The held messages survived nothing silently: the store knows they were given up.
    assert [h.kind for h in await ben.group_history(gid)] == ["text", "notice"]
    await close_all(clients)


async def test_a_key_request_from_a_non_member_is_not_answered(world):
    ann, ben, eve = clients = await make_users(world, ["ann", "ben", "eve"])
    async with ann.connect(), ben.connect(), eve.connect():
        gid = await ann.create_group("pair", [addr("ben")])
        await until(lambda: _known(ben, gid), "ben joined")
        await ann.send_group(gid, "one")
        key = ann._groups[parse_group_id(gid)].session.outbound.key_id
        await eve.send(addr("ann"), "hello")                 # eve has a session with ann
        with trio.fail_after(10):
            async for event in eve.events():                  # ann's delivery receipt is out of the way
                if isinstance(event, ReceiptReceived):
                    break
        sent = spy_sends(ann)
        request = KeyRequest(parse_group_id(gid), str(ann.address), key, 0)
        await eve._send_content([addr("ann")], Content(SENDER_KEY_REQUEST, "r1", "", "", 0, 0, bytes(32),
                                                       request.to_refs()))
        await trio.sleep(0.5)
        assert not any(d.startswith(addr("eve")) for payloads in sent for p in payloads for d in p["devices"])
        assert not ann._recovery.answers
    await close_all(clients)


# --- item 2: rotation when a device leaves, new devices get the key ---------------------------


async def test_a_revoked_device_cannot_read_on_and_a_new_device_can(world):
    ann = await world.register("ann")
    bob1 = await world.register("bob")
    bob2 = await world.login("bob", "bob2")
    bob3 = await world.login("bob", "bob3")
    clients = [ann, bob1, bob2, bob3]
    async with trio.open_nursery() as nursery:
        online = Online(nursery)
        for client in (ann, bob1, bob2):
            await online.up(client)
        await bob1.approve_device(bob2.device_id, bob2.identity_key)
        inboxes = {c: Inbox(c) for c in clients}
        gid = await ann.create_group("pair", [addr("bob")])
        await wait_members([bob1, bob2], gid, {addr("ann"), addr("bob")})
        await ann.send_group(gid, "one")
        for bob in (bob1, bob2):
            assert [m.text for m in await inboxes[bob].take(1)] == ["one"]
        raw = parse_group_id(gid)
        stolen = bob2._groups[raw].session.to_bytes()         # what a thief of bob2 keeps
        old_key = ann._groups[raw].session.outbound.key_id

        await bob1.revoke_device(bob2.device_id)
        await online.up(bob3)
        await bob1.approve_device(bob3.device_id, bob3.identity_key, share_history=False)
        await until(lambda: _known(bob3, gid), "bob3 learnt the group from bob1")

        sent = spy_sends(ann)
        for text in ("two", "three"):
            await ann.send_group(gid, text)
        for bob in (bob1, bob3):
            assert [m.text for m in await inboxes[bob].take(2)] == ["two", "three"]
            assert not security(inboxes[bob])
        assert ann._groups[raw].session.outbound.key_id != old_key
        assert not any(d == str(bob2.address) for payloads in sent for p in payloads for d in p["devices"])
        spoiled = GroupSession.from_bytes(stolen, lambda d: None)
        shared = shared_ciphertexts(sent)
        assert shared                                        # "three" went to both bobs as one ciphertext
        for _, ciphertext in shared:
            with pytest.raises(UnknownSenderKey):
                spoiled.decrypt(ann.address, ciphertext, 0)
        await bob3.send_group(gid, "from the new device")      # and it takes part in the group
        assert [m.text for m in await inboxes[ann].take(1)] == ["from the new device"]
        await online.close()
    await close_all(clients)


async def test_group_content_for_a_group_not_known_yet_waits_for_the_group(world):
    ann = await world.register("ann")
    bob1 = await world.register("bob")
    clients = [ann, bob1]
    async with ann.connect(), bob1.connect():
        gid = await ann.create_group("pair", [addr("bob")])
        await until(lambda: _known(bob1, gid), "bob joined")
        bob2 = await world.login("bob", "bob2")
        clients.append(bob2)
        async with bob2.connect():
            bob1._sync_new_own_devices = _no_sync              # type: ignore[method-assign]
            await bob1.approve_device(bob2.device_id, bob2.identity_key, share_history=False)
            inbox = Inbox(bob2)
            await ann.send_group(gid, "early")               # bob2 does not know the group yet: held
            await until(lambda: _has_held(bob2), "held")
            assert await info(bob2, gid) is None
            del bob1._sync_new_own_devices
            await bob1._sync_new_own_devices({bob2.device_id})
            [got] = await inbox.take(1)
            assert got.text == "early" and not security(inbox)
    await close_all(clients)


async def _no_sync(added: set[str]) -> None:
    return None


async def _has_held(client: Client) -> bool:
    return client._recovery is not None and bool(client._recovery.held)


async def _known(client: Client, gid: str) -> bool:
    return await info(client, gid) is not None


# --- item 4: groups in backups ----------------------------------------------------------------


async def test_a_restored_device_knows_its_groups_gets_keys_and_sends(world, tmp_path):
    ann, ben = await make_users(world, ["ann", "ben"])
    async with ann.connect(), ben.connect():
        gid = await ann.create_group("hiking", [addr("ben")])
        await until(lambda: _known(ben, gid), "ben joined")
        await ann.rename_group(gid, "hiking club")
        await ann.send_group(gid, "one")
        await Inbox(ben).take(1)
        await ben.send_group(gid, "hi")
        await Inbox(ann).take(1)
        raw = parse_group_id(gid)
        secrets_ = [ann._groups[raw].session.outbound._chain_key, ben._groups[raw].session.outbound._chain_key]
        path = tmp_path / "ann.backup"
        key = await ann.export_backup(path)
    contents = open_backup_file(path, passphrase=None, recovery_key=key)
    [group] = contents.groups
    assert (group.group_id, group.name, group.epoch) == (raw, "hiking club", 1) and group.chain is not None
    assert not any(s in contents.encode() for s in secrets_)              # no sender key in the backup
    assert codec.decode(contents.encode())["v"] == 2
    await ann.aclose()

    restored = await Client.restore_backup(path, tmp_path / "restored.db", PASSWORD, connect=world.connector,
                                           recovery_key=key, store_key=NEW_KEY, options=OPTIONS)
    assert await restored.groups() == [gid]
    state = await restored.group_info(gid)
    assert (state.name, state.members, state.admins) == ("hiking club", (addr("ann"), addr("ben")), (addr("ann"),))
    assert [h.text for h in await restored.group_history(gid)] == ["one", "hi"]
    async with restored.connect(), ben.connect():
        inbox = Inbox(restored)
        await ben.send_group(gid, "welcome back")             # ben hands his chain to the new device
        got = await inbox.take(1)
        assert got[0].text == "welcome back" and not security(inbox)
        await restored.send_group(gid, "back again")
        assert [m.text for m in await Inbox(ben).take(1)] == ["back again"]
        await restored.rename_group(gid, "hikers")            # the restored chain settles later changes
        await until(lambda: _named(ben, gid, "hikers"), "ben sees the rename")
    await close_all([restored, ben])


async def _named(client: Client, gid: str, name: str) -> bool:
    state = await info(client, gid)
    return state is not None and state.name == name


def test_backups_without_group_chains_stay_version_1():
    master = bytes(range(32))
    public = Ed25519PrivateKey.from_private_bytes(master).public_key().public_bytes_raw()
    old = BackupContents("alice@example.org", public, 1, master,
                         groups=(BackupGroup(b"\x11" * 32, "old", 0, bytes(32), ("alice@example.org",),
                                             ("alice@example.org",)),))
    encoded = old.encode()
    assert codec.decode(encoded)["v"] == 1
    assert BackupContents.decode(encoded) == old
    with pytest.raises(ValueError):                          # a chain must describe the same state
        BackupGroup(b"\x11" * 32, "old", 0, bytes(32), ("alice@example.org",), ("alice@example.org",), b"junk")


def test_records_and_books_round_trip_and_old_group_records_still_load():
    from clientsdk.crypto.group_state import GroupReplica, GroupState
    from clientsdk.crypto.primitives import system_rng
    from clientsdk.group_records import GroupBundle, Held, KeyRecovery, LocalGroup
    from federation.addresses import DeviceAddress

    me = DeviceAddress.parse(f"{addr('ann')}/AAAAAAAAAA")
    state = GroupState.new("g", me.user, [], system_rng)
    session = GroupSession(GroupReplica(state, me), lambda d: None)
    session.encrypt(b"x", system_rng)
    old = codec.encode({"v": 1, "session": session.to_bytes(), "sent_key": session.outbound.key_id,
                        "given": [f"{addr('ben')}/BBBBBBBBBB"], "outbox": []})
    group = LocalGroup.from_bytes(old, lambda d: None)
    assert group.given == {f"{addr('ben')}/BBBBBBBBBB": 1} and group.anchor is None     # nothing older re-served
    assert group.served_distribution(f"{addr('ben')}/BBBBBBBBBB", session.outbound.key_id, 0) is None
    again = LocalGroup.from_bytes(group.to_bytes(), lambda d: None)
    assert again.given == group.given and again.sent_key == group.sent_key

    bundle = GroupBundle(state.group_id, sync=b"s", reply=b"k" * 8, distribution=b"d")
    assert GroupBundle.from_bytes(bundle.to_bytes()) == bundle
    book = KeyRecovery()
    book.hold(Held(str(me), [state.group_id], b"ct", 5))
    assert book.want_request(state.group_id, str(me), b"k" * 8, 3, 10)
    assert not book.want_request(state.group_id, str(me), b"k" * 8, 4, 20)      # once a minute
    assert book.want_answer(str(me), KeyRequest(state.group_id, str(me), b"k" * 8, 3))
    copy = KeyRecovery.from_bytes(book.to_bytes())
    assert (copy.held, copy.requests, copy.due, copy.answers) == (book.held, book.requests, book.due, book.answers)
