"""Backup export to a local file, and what a restore writes into a new device's store (DESIGN §4).

Why: a user who loses every device keeps their identity, contacts, trust decisions,
groups and history.  A backup holds exactly ``clientsdk.crypto.backup.BackupContents``:
the master key (if this device has it), contacts with their trust state, each group's
state with its epoch chain (``GroupReplica`` bytes: states and admin-signed changes),
and history — never ratchet state, sender-key chains nor the device identity key.  A
restore therefore is a NEW device, signed into the device list by the restored master
key, which opens fresh sessions and gets the members' sender keys with their next
group messages (LESSONS #8: a restored ratchet state is what breaks sessions).

Two protections: a random recovery key (``RecoveryKey``, the default; the blob is the
same one a server could hold), or a passphrase through Argon2id (local files only).
History entries travel as canonical msgpack bodies ``{v: 1, id, text, device,
received_ms, outgoing, kind}``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import trio

from clientsdk.account import ClientOptions
from clientsdk.client_parts import ClientParts
from clientsdk.connection import Connector
from clientsdk.contacts import SELF, TOFU, VERIFIED, Contact
from clientsdk.crypto.backup import (
    KIND_PASSPHRASE, BackupContact, BackupContents, BackupGroup, BackupMessage, RecoveryKey, TrustState,
    export_local_file, open_local_file, open_server_backup, read_header, seal_for_server,
)
from clientsdk.crypto.errors import BackupInvalid
from clientsdk.crypto.identity import MasterKey, add_device
from clientsdk.errors import BackupFailed
from clientsdk.store import Batch, HistoryEntry
from federation import codec
from federation.errors import CodecError, ProtocolError
from federation.rpc import RpcClient

if TYPE_CHECKING:
    from clientsdk.client import Client

BODY_VERSION = 1
MAX_BACKUP_FILE = 256 << 20


class BackupMixin(ClientParts):
    if TYPE_CHECKING:   # provided by Client (stubs here would shadow them in the MRO)
        async def _backup_groups(self) -> tuple[BackupGroup, ...]: ...             # clientsdk.groups

        def _restored_group_rows(self, groups: tuple[BackupGroup, ...]) -> dict[str, bytes]: ...   # groups

        @classmethod
        async def _create(cls, store_path: str | Path, user: str, master: MasterKey | None, connect: Connector,
                          store_key: bytes | None, passphrase: str | None, options: ClientOptions) -> Client: ...

    @classmethod
    async def restore_backup(cls, backup_path: str | Path, store_path: str | Path, password: str, *,
                             connect: Connector, backup_passphrase: str | None = None,
                             recovery_key: RecoveryKey | str | None = None, store_key: bytes | None = None,
                             passphrase: str | None = None, options: ClientOptions | None = None) -> Client:
        """Restore a backup file as a NEW device of its user, with a new store at ``store_path``.

        The backup's contacts (with their trust), groups and history are imported; nothing
        of the old device's sessions or sender keys is (members hand this device their keys
        with their next group messages).  If the backup holds the master key, the new device signs
        itself into the device list with it (and is the master device from then on);
        otherwise it is a pending device until a master device approves it.  ``password``
        is the account password (a restore logs in); ``passphrase``/``store_key`` protect
        the new store as in ``register``.  A wrong backup passphrase or key raises
        ``BackupInvalid`` before anything is created.
        """
        contents = await trio.to_thread.run_sync(lambda: open_backup_file(
            backup_path, passphrase=backup_passphrase, recovery_key=recovery_key))
        master = None
        if contents.master_private_key is not None:
            master = MasterKey.from_private_bytes(contents.master_private_key)
        client = await cls._create(store_path, contents.user, master, connect, store_key, passphrase,
                                   options or ClientOptions())
        batch, contacts = restored_batch(contents)
        batch.kv.update(client._restored_group_rows(contents.groups))
        client._book.contacts.update(contacts)
        batch.contacts = {}            # written after the login, once the own list is verified
        await client._enrol("login", {"user": client.user, "password": password, "device_id": client.device_id,
                                      "identity_key": client.identity_key}, batch, after=client._join_own_list)
        return client

    async def _join_own_list(self, rpc: RpcClient) -> None:
        """After a restore with the master key: sign this new device into the list the server holds."""
        current = await self._device_list(rpc, self.user, force=True)      # verified under the backup's key
        await self._persist(Batch(contacts={u: self._book.record(u) for u in self._book.contacts}))
        if self._master is not None:
            await self._publish_own_list(rpc, add_device(self._master, current.device_list, self.device_id,
                                                         self.identity_key, self._clock()))

    async def export_backup(self, path: str | os.PathLike[str], *, passphrase: str | None = None,
                            recovery_key: RecoveryKey | None = None) -> RecoveryKey | None:
        """Write an encrypted backup file; returns the recovery key that opens it (None for a passphrase).

        Without ``passphrase`` a new ``RecoveryKey`` is drawn unless one is given: show
        ``key.display()`` to the user.  With ``passphrase`` the file is protected by
        Argon2id (opslimit 3, 256 MiB: about a second) and must stay a local file.
        """
        if passphrase is not None and recovery_key is not None:
            raise ValueError("give a passphrase or a recovery key, not both")
        history = await trio.to_thread.run_sync(self._store.all_history, limiter=self._store_limiter)
        contents = self._backup_contents(history, self._clock(), await self._backup_groups())
        if passphrase is not None:
            blob = await trio.to_thread.run_sync(export_local_file, contents, passphrase)
            key = None
        else:
            key = recovery_key or RecoveryKey.generate()
            blob = seal_for_server(contents, key)
        await trio.to_thread.run_sync(_write_private, Path(path), blob)
        return key

    def _backup_contents(self, entries: list[HistoryEntry], now_ms: int,
                         groups: tuple[BackupGroup, ...] = ()) -> BackupContents:
        own = self._book.contacts.get(self.user)
        if own is None:
            raise BackupFailed("this device does not know its user's master key yet; connect once first")
        contacts = tuple(
            BackupContact(user, c.master_key, TrustState.VERIFIED if c.trust == VERIFIED else TrustState.UNVERIFIED)
            for user, c in sorted(self._book.contacts.items()) if user != self.user)
        history = tuple(
            BackupMessage(e.conversation, self.user if e.outgoing else e.sender_device.partition("/")[0],
                          e.sent_ms, codec.encode({"v": BODY_VERSION, "id": e.message_id, "text": e.text,
                                                   "device": e.sender_device, "received_ms": e.received_ms,
                                                   "outgoing": e.outgoing, "kind": e.kind}))
            for e in entries)
        return BackupContents(self.user, own.master_key, now_ms,
                              self._master.private_bytes() if self._master is not None else None,
                              contacts, groups, history)


def _write_private(path: Path, blob: bytes) -> None:
    """Write atomically with owner-only permissions: the file holds the master key."""
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        with os.fdopen(fd, "wb") as out:
            out.write(blob)
            out.flush()
            os.fsync(out.fileno())
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    os.replace(tmp, path)


def open_backup_file(path: str | os.PathLike[str], *, passphrase: str | None,
                     recovery_key: RecoveryKey | str | None) -> BackupContents:
    """Read and decrypt a backup file (synchronous: Argon2id is slow; call it in a thread).

    ``BackupInvalid`` for a wrong passphrase or key, a damaged file or the wrong kind
    of protection; ``RecoveryKeyMistyped`` for a typo in a typed recovery key.
    """
    if (passphrase is None) == (recovery_key is None):
        raise ValueError("give the backup's passphrase or its recovery key")
    try:
        blob = Path(path).read_bytes()
    except OSError as exc:
        raise BackupFailed(f"cannot read the backup file ({type(exc).__name__})") from None
    if len(blob) > MAX_BACKUP_FILE:
        raise BackupInvalid("backup invalid: file too large")
    if passphrase is not None:
        return open_local_file(blob, passphrase)
    if read_header(blob).kind == KIND_PASSPHRASE:
        raise BackupInvalid("backup invalid: this file is protected by a passphrase, not a recovery key")
    key = RecoveryKey.parse(recovery_key) if isinstance(recovery_key, str) else recovery_key
    return open_server_backup(blob, key)  # type: ignore[arg-type]


def restored_batch(contents: BackupContents) -> tuple[Batch, dict[str, Contact]]:
    """The new device's store rows from a backup: contacts with their trust, and the history."""
    contacts = {contents.user: Contact(contents.user, contents.master_public_key, SELF)}
    for c in contents.contacts:
        contacts[c.address] = Contact(c.address, c.master_public_key,
                                      VERIFIED if c.trust == TrustState.VERIFIED else TOFU)
    batch = Batch(contacts={user: c.to_record() for user, c in contacts.items()})
    for message in contents.history:
        batch.messages.append(_history_entry(message))
    return batch, contacts


def _history_entry(message: BackupMessage) -> HistoryEntry:
    try:
        body: Any = codec.decode(message.body)
        if not isinstance(body, dict) or body.get("v") != BODY_VERSION:
            raise BackupInvalid("backup invalid: a history entry has an unknown format")
        entry = HistoryEntry(message.conversation, body["device"], body["id"], body["text"], message.sent_ms,
                             body["received_ms"], body["outgoing"], body["kind"])
    except (KeyError, CodecError, ProtocolError):
        raise BackupInvalid("backup invalid: a history entry does not parse") from None
    if not (isinstance(entry.sender_device, str) and isinstance(entry.message_id, str)
            and isinstance(entry.text, str) and isinstance(entry.received_ms, int)
            and isinstance(entry.outgoing, bool) and isinstance(entry.kind, str)):
        raise BackupInvalid("backup invalid: a history entry does not parse")
    return entry
