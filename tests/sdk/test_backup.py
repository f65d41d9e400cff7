"""Backup export/import: a restore is a new device signed in by the restored master key (DESIGN §4)."""

from __future__ import annotations

import os

import pytest
import trio

from clientsdk.backups import open_backup_file
from clientsdk.client import Client
from clientsdk.contacts import VERIFIED
from clientsdk.crypto.backup import RecoveryKey
from clientsdk.crypto.errors import BackupInvalid, RecoveryKeyMistyped
from clientsdk.events import MessageReceived
from tests.sdk.conftest import DOMAIN, OPTIONS, PASSWORD, collect

ALICE = f"alice@{DOMAIN}"
BOB = f"bob@{DOMAIN}"
NEW_KEY = b"restored".ljust(32, b"k")


async def _chat(world):
    alice = await world.register("alice")
    bob = await world.register("bob")
    async with alice.connect(), bob.connect():
        await alice.send(BOB, "before the backup")
        await collect(bob, 1)
        await bob.send(ALICE, "reply before the backup")
        await collect(alice, 1)
        await trio.sleep(0.2)
    return alice, bob


async def test_restore_is_a_new_listed_device_that_exchanges_messages(world, tmp_path):
    alice, bob = await _chat(world)
    alice._book.contacts[BOB].trust = VERIFIED               # as after comparing safety numbers
    path = tmp_path / "alice.backup"
    key = await alice.export_backup(path)
    assert isinstance(key, RecoveryKey)
    assert os.stat(path).st_mode & 0o077 == 0
    contents = open_backup_file(path, passphrase=None, recovery_key=key)
    secrets_ = [alice._identity.private_bytes()] + [s.private for s in alice._prekeys.signed.values()]
    assert contents.master_private_key == alice._master.private_bytes()
    assert not any(secret in contents.encode() for secret in secrets_)    # no device key, no session state
    old_device = alice.device_id
    await alice.aclose()

    restored = await Client.restore_backup(path, tmp_path / "restored.db", PASSWORD, connect=world.connector,
                                           recovery_key=key.display().lower(), store_key=NEW_KEY, options=OPTIONS)
    assert restored.is_master and restored.device_id != old_device and restored.user == ALICE
    assert [h.text for h in await restored.history(BOB)] == ["before the backup", "reply before the backup"]
    assert restored._book.contacts[BOB].trust == VERIFIED
    assert restored._sessions.has(f"{BOB}/{bob.device_id}") is False          # fresh sessions only
    async with restored.connect(), bob.connect():
        await restored.send(BOB, "from the restored device")
        [got] = await collect(bob, 1)
        assert (got.text, got.sender_device) == ("from the restored device", str(restored.address))
        listed = bob._book.current(ALICE).device_list.device_ids()
        assert {restored.device_id, old_device} <= listed
        await bob.send(ALICE, "welcome back")
        with trio.fail_after(10):
            [got] = await collect(restored, 1)
        assert got.text == "welcome back"
    # the restored device reopens from its own store as the same device
    await restored.aclose()
    again = await Client.open(tmp_path / "restored.db", store_key=NEW_KEY, connect=world.connector, options=OPTIONS)
    assert again.device_id == restored.device_id and again.is_master
    assert [h.text for h in await again.history(BOB)][-1] == "welcome back"
    await again.aclose()
    await bob.aclose()


async def test_wrong_passphrase_or_key_is_a_clear_error_and_creates_nothing(world, tmp_path):
    alice, bob = await _chat(world)
    path = tmp_path / "alice.backup"
    assert await alice.export_backup(path, passphrase="a long passphrase") is None
    await alice.aclose()
    await bob.aclose()
    target = tmp_path / "restored.db"
    with pytest.raises(BackupInvalid):
        await Client.restore_backup(path, target, PASSWORD, connect=world.connector,
                                    backup_passphrase="the wrong passphrase", store_key=NEW_KEY, options=OPTIONS)
    with pytest.raises(BackupInvalid):                       # a passphrase file is not opened by a key
        await Client.restore_backup(path, target, PASSWORD, connect=world.connector,
                                    recovery_key=RecoveryKey.generate(), store_key=NEW_KEY, options=OPTIONS)
    assert not target.exists()
    contents = await trio.to_thread.run_sync(
        lambda: open_backup_file(path, passphrase="a long passphrase", recovery_key=None))
    assert contents.user == ALICE and len(contents.history) == 2


async def test_recovery_key_typo_and_wrong_key(world, tmp_path):
    alice, bob = await _chat(world)
    path = tmp_path / "alice.backup"
    key = await alice.export_backup(path)
    await alice.aclose()
    await bob.aclose()
    text = key.display()
    typo = ("1" if text[0] != "1" else "2") + text[1:]
    with pytest.raises(RecoveryKeyMistyped):
        open_backup_file(path, passphrase=None, recovery_key=typo)
    with pytest.raises(BackupInvalid):
        open_backup_file(path, passphrase=None, recovery_key=RecoveryKey.generate())
    with pytest.raises(ValueError):
        await alice.export_backup(path, passphrase="x" * 10, recovery_key=key)


async def test_backup_of_a_linked_device_restores_as_pending_until_approved(world, tmp_path):
    alice1 = await world.register("alice")
    alice2 = await world.login("alice", "alice2")
    async with alice1.connect(), alice2.connect():
        await alice1.approve_device(alice2.device_id, alice2.identity_key)
        await alice1.send(ALICE, "note to self")
        await collect(alice2, 1)
    path = tmp_path / "alice2.backup"
    key = await alice2.export_backup(path)
    assert open_backup_file(path, passphrase=None, recovery_key=key).master_private_key is None
    await alice2.aclose()
    restored = await Client.restore_backup(path, tmp_path / "restored.db", PASSWORD, connect=world.connector,
                                           recovery_key=key, store_key=NEW_KEY, options=OPTIONS)
    assert not restored.is_master
    async with alice1.connect(), restored.connect():
        await alice1.approve_device(restored.device_id, restored.identity_key)
        await alice1.send(ALICE, "hello new device")
        with trio.fail_after(10):
            async for event in restored.events():
                if isinstance(event, MessageReceived):
                    assert event.text == "hello new device"
                    break
    await alice1.aclose()
    await restored.aclose()
