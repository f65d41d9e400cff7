"""A newly linked device gets its master device's contacts, trust and recent history (LESSONS #9)."""

from __future__ import annotations

import pytest
import trio
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from clientsdk import cli, history
from clientsdk.crypto.errors import MalformedMessage, UnsupportedVersion
from clientsdk.crypto.identity import MasterKey
from clientsdk.devices import master_device_id, master_first
from clientsdk.events import Event, HistoryImported, MessageReceived, SecurityEvent
from clientsdk.groups import GroupChanged, GroupMessageReceived
from clientsdk.history import HistoryChunk, Transfer, pack_chunks, select_messages
from clientsdk.store import HistoryEntry
from clientsdk.verify import TrustState
from federation import codec
from federation.keys import DeviceEntry, DeviceList
from federation.transport import TransportClosed
from tests.sdk.conftest import DOMAIN, collect

ALICE = f"alice@{DOMAIN}"
BOB = f"bob@{DOMAIN}"
CAROL = f"carol@{DOMAIN}"


async def _next(client, cls, seen: list[Event] | None = None):
    """The next event of type ``cls`` (the ones before it go to ``seen``)."""
    with trio.fail_after(30):
        async for event in client.events():
            if isinstance(event, cls):
                return event
            if seen is not None:
                seen.append(event)
    raise AssertionError("event channel closed")


async def _texts(client, conversation: str) -> list[str]:
    return [h.text for h in await client.history(conversation)]


def _entry(i: int, conversation: str = BOB, text: str = "x") -> HistoryEntry:
    return HistoryEntry(conversation, f"{BOB}/BBBBBBBBBB", f"id{i}", f"{text}{i}", i, i, False)


# --- through the server ---------------------------------------------------------------------------

async def test_linked_device_gets_contacts_trust_groups_and_history(world):
    alice1 = await world.register("alice")
    bob = await world.register("bob")
    carol = await world.register("carol")
    async with alice1.connect(), bob.connect(), carol.connect():
        await alice1.send(BOB, "a1")
        await collect(bob, 1)
        await bob.send(ALICE, "b1")
        await collect(alice1, 1)
        await alice1.send(CAROL, "c1")
        await collect(carol, 1)
        await alice1.mark_verified(BOB)
        gid = await alice1.create_group("team", [BOB])
        await _next(bob, GroupChanged)
        await alice1.send_group(gid, "g1")
        assert (await _next(bob, GroupMessageReceived)).text == "g1"

        alice2 = await world.login("alice", "alice2")
        async with alice2.connect():
            assert await alice1.approve_link(alice2.linking_code()) == 2
            imported = await _next(alice2, HistoryImported)
            assert imported == HistoryImported(str(alice1.address), messages=4, conversations=3, contacts=2,
                                               omitted=0)
            assert await _texts(alice2, BOB) == await _texts(alice1, BOB) == ["a1", "b1"]
            assert await _texts(alice2, CAROL) == ["c1"]
            assert alice2.trust(BOB) is TrustState.VERIFIED                # trust decisions come along
            assert alice2.trust(CAROL) is TrustState.UNVERIFIED
            assert alice2.safety_number(BOB) == alice1.safety_number(BOB)
            assert [h.text for h in await alice2.group_history(gid)] == ["g1"]
            with trio.fail_after(30):                                   # membership: clientsdk.groups' sync
                while await alice2.groups() != [gid]:
                    await trio.sleep(0.05)
            assert (await alice2.group_info(gid)).members == (ALICE, BOB)

            # live traffic continues after the imported history, in order
            await bob.send(ALICE, "b2")
            [live] = await collect(alice2, 1)
            assert live.text == "b2"
            assert await _texts(alice2, BOB) == ["a1", "b1", "b2"]
            await alice2.send(BOB, "from the new device")
            assert [m.text for m in await collect(bob, 1)] == ["from the new device"]
        await alice2.aclose()
    for client in (alice1, bob, carol):
        await client.aclose()


async def test_a_connection_lost_while_a_decrypted_chunk_is_checked_loses_nothing(world, monkeypatch):
    """Checking a chunk's sender may need the network after decryption moved the ratchet.

    If the connection drops there, the envelope comes again on the next connection; it
    must decrypt and import then (no spent message key, no session reset).
    """
    alice1 = await world.register("alice")
    bob = await world.register("bob")
    async with alice1.connect(), bob.connect():
        await alice1.send(BOB, "a1")
        await collect(bob, 1)
        alice2 = await world.login("alice", "alice2")
        real_check = alice2._from_master_device
        dropped: list[str] = []

        async def connection_drops_once(rpc, sender):
            if not dropped:
                dropped.append(str(sender))
                await rpc.transport.aclose()
                raise TransportClosed(1006, "connection lost")
            return await real_check(rpc, sender)

        monkeypatch.setattr(alice2, "_from_master_device", connection_drops_once)
        async with alice2.connect():
            await alice1.approve_link(alice2.linking_code())
            seen: list[Event] = []
            imported = await _next(alice2, HistoryImported, seen)
            assert dropped == [str(alice1.address)]
            assert imported.messages == 1
            assert [e for e in seen if isinstance(e, SecurityEvent)] == []
            assert await _texts(alice2, BOB) == ["a1"]
            await alice1.send(ALICE, "still in session")
            assert [m.text for m in await collect(alice2, 1)] == ["still in session"]
        await alice2.aclose()
    await alice1.aclose()
    await bob.aclose()


async def test_no_history_when_the_app_opts_out(world):
    alice1 = await world.register("alice")
    bob = await world.register("bob")
    async with alice1.connect(), bob.connect():
        await bob.send(ALICE, "before")
        await collect(alice1, 1)
        alice2 = await world.login("alice", "alice2")
        async with alice2.connect():
            await alice1.approve_link(alice2.linking_code(), share_history=False)
            await bob.send(ALICE, "after")
            seen: list[Event] = []
            assert (await _next(alice2, MessageReceived, seen)).text == "after"
            assert not any(isinstance(e, HistoryImported) for e in seen)
            assert await _texts(alice2, BOB) == ["after"]
        await alice2.aclose()
    await alice1.aclose()
    await bob.aclose()


async def test_a_bundle_from_a_device_other_than_the_master_is_ignored(world):
    alice1 = await world.register("alice")
    alice2 = await world.login("alice", "alice2")
    alice3 = await world.login("alice", "alice3")
    async with alice1.connect(), alice2.connect(), alice3.connect():
        await alice1.approve_link(alice2.linking_code())
        # alice2 (linked, no master key) forges a bundle for the pending alice3
        forged = HistoryChunk(b"\x01" * 16, 0, True, alice3.device_id,
                              messages=(HistoryEntry(BOB, f"{BOB}/BBBBBBBBBB", "forged", "forged", 1, 1, False),))
        transfer = Transfer(forged.transfer, str(alice3.address), alice3.identity_key, 0, 0, 0, 0)
        await alice2._send_history_chunk(transfer, forged)
        await alice1.approve_link(alice3.linking_code(), share_history=False)
        await alice1.send(ALICE, "note to self")
        seen: list[Event] = []
        assert (await _next(alice3, MessageReceived, seen)).text == "note to self"
        assert not any(isinstance(e, HistoryImported) for e in seen)
        assert await _texts(alice3, BOB) == []
    for client in (alice1, alice2, alice3):
        await client.aclose()


async def test_long_history_is_capped_chunked_and_the_cap_reported(world, monkeypatch):
    monkeypatch.setattr(history, "MAX_MESSAGES_PER_CONVERSATION", 20)
    monkeypatch.setattr(history, "CHUNK_BYTES", 2_000)
    chunk_counts: list[int] = []
    real_pack = history.pack_chunks

    def counting_pack(*args, **kwargs):
        chunks = real_pack(*args, **kwargs)
        chunk_counts.append(len(chunks))
        assert all(len(c.to_bytes()) <= 2_000 for c in chunks)
        return chunks

    monkeypatch.setattr(history, "pack_chunks", counting_pack)
    alice1 = await world.register("alice")
    bob = await world.register("bob")
    async with alice1.connect(), bob.connect():
        for i in range(30):
            await bob.send(ALICE, f"message {i} " + "." * 100)
        await collect(alice1, 30)
        alice2 = await world.login("alice", "alice2")
        async with alice2.connect():
            await alice1.approve_link(alice2.linking_code())
            imported = await _next(alice2, HistoryImported)
        await alice2.aclose()
    assert (imported.messages, imported.omitted, imported.conversations) == (20, 10, 1)
    assert chunk_counts[0] > 1 and chunk_counts[1] == 1          # bulk in several chunks, then the final one
    assert [t.split()[1] for t in await _texts(alice2, BOB)] == [str(i) for i in range(10, 30)]
    await alice1.aclose()
    await bob.aclose()


# --- sans-I/O --------------------------------------------------------------------------------------

def test_select_messages_keeps_the_newest_within_the_budget() -> None:
    entries = [_entry(i) for i in range(10)]
    size = len(codec.encode(history.entry_to_wire(entries[0])))
    chosen, dropped = select_messages(entries, budget=size * 4, max_entry=10_000)
    assert [e.message_id for e in chosen] == ["id6", "id7", "id8", "id9"] and dropped == 6
    big = HistoryEntry(BOB, f"{BOB}/BBBBBBBBBB", "big", "y" * 5_000, 1, 1, False)
    chosen, dropped = select_messages([*entries[:2], big], budget=10**6, max_entry=1_000)
    assert [e.message_id for e in chosen] == ["id0", "id1"] and dropped == 1


def test_pack_chunks_round_trip_sizes_and_final_chunk() -> None:
    transfer = bytes(16)
    contacts = [{"user": CAROL, "v": 1, "master_key": bytes(32), "trust": "tofu", "min_version": 0}]
    messages = [_entry(i, text="z" * 50) for i in range(40)]
    chunks = pack_chunks(transfer, "DEVICEIDXX", contacts=contacts, messages=messages,
                         first_index=3, final=True, omitted=7, chunk_bytes=1_000)
    assert len(chunks) > 3
    assert [c.index for c in chunks] == list(range(3, 3 + len(chunks)))
    assert [c.final for c in chunks] == [False] * (len(chunks) - 1) + [True]
    assert [c.omitted for c in chunks] == [0] * (len(chunks) - 1) + [7]
    for chunk in chunks:
        data = chunk.to_bytes()
        assert len(data) <= 1_000
        assert HistoryChunk.from_bytes(data) == chunk
    assert [m for c in chunks for m in c.messages] == messages
    assert chunks[0].contacts == tuple(contacts)
    # nothing left for a final transfer: one empty final chunk; nothing for a bulk: no chunk
    [empty] = pack_chunks(transfer, "DEVICEIDXX", final=True, omitted=2)
    assert (empty.final, empty.messages, empty.omitted) == (True, (), 2)
    assert pack_chunks(transfer, "DEVICEIDXX") == []


def test_history_chunk_rejects_garbage() -> None:
    chunk = HistoryChunk(bytes(16), 0, True, "DEVICEIDXX", messages=(_entry(1),))
    obj = codec.decode(chunk.to_bytes())
    with pytest.raises(UnsupportedVersion):
        HistoryChunk.from_bytes(codec.encode({**obj, "v": 2}))
    for bad in ({**obj, "transfer": b"short"}, {**obj, "messages": [{"id": "x"}]},
                {**obj, "messages": [{**history.entry_to_wire(_entry(1)), "kind": "weird"}]}):
        with pytest.raises(MalformedMessage):
            HistoryChunk.from_bytes(codec.encode(bad))
    with pytest.raises(MalformedMessage):
        HistoryChunk.from_bytes(b"\xc1")


def test_the_master_device_signs_itself_first() -> None:
    master = MasterKey.generate()
    now = 1_800_000_000_000
    keys = [Ed25519PrivateKey.generate().public_key().public_bytes_raw() for _ in range(3)]
    devices = tuple(DeviceEntry(f"DEVICE{'ABC'[i]}AAA", keys[i], now) for i in range(3))
    signed = DeviceList(ALICE, 5, now, now + 86_400_000, devices).sign(master.signing_key)
    moved = master_first(master, signed, "DEVICECAAA")
    opened = moved.open(master.public_key)
    assert master_device_id(opened) == "DEVICECAAA"
    assert [d.id for d in opened.devices] == ["DEVICECAAA", "DEVICEAAAA", "DEVICEBAAA"]
    assert (opened.version, opened.issued_ms, opened.expires_ms) == (5, now, now + 86_400_000)
    assert master_first(master, moved, "DEVICECAAA") is moved          # already first: unchanged
    assert master_first(master, signed, "UNLISTEDAA") is signed


def test_cli_approve_takes_no_history() -> None:
    parser = cli.build_parser()
    assert parser.parse_args(["approve", "--no-history", "ABCDEFGHIJ"]).no_history is True
    assert parser.parse_args(["link", "ABCDEFGHIJ"]).no_history is False
