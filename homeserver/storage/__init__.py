"""Homeserver storage: narrow repositories over SQLAlchemy Core, plus an in-memory fake.

Handlers receive the repository they need (``AccountRepository``,
``DeviceRepository``, ``MailboxRepository``, ``FederationRepository``, or the
``MemoryStorage`` ones in tests) through their constructors, typed as the
``AccountStore`` / ``DeviceStore`` / ``MailboxStore`` / ``FederationStore`` protocols.  Only the composition root opens
storage::

    async with trio.open_nursery() as nursery:
        storage = await open_storage("sqlite:///data/securechat.db", nursery)
        ...
        await storage.aclose()          # flushes queued writes, stops the writer
"""

from __future__ import annotations

import trio

from homeserver.storage.accounts import AccountRepository
from homeserver.storage.db import DEFAULT_URL, Database, WriteFailed, create_storage_engine, open_database
from homeserver.storage.devices import DeviceRepository
from homeserver.storage.federation import FederationRepository
from homeserver.storage.mailboxes import MailboxRepository, deliver_in_transaction
from homeserver.storage.memory import MemoryStorage
from homeserver.storage.memory_federation import MemoryFederation
from homeserver.storage.models import (
    CLAIMED_PREKEY_TTL_MS,
    MAILBOX_TTL_MS,
    Account,
    AccountExists,
    AccountStore,
    ClaimedBundle,
    DatabaseClosed,
    DeliverResult,
    Device,
    DeviceExists,
    DeviceListConflict,
    DeviceState,
    DeviceStore,
    DuplicatePrekey,
    FederationStore,
    HoldBackFull,
    Invite,
    InviteExists,
    InviteInvalid,
    MailboxEntry,
    MailboxStore,
    OutboundDraft,
    OutboundState,
    ReceiveResult,
    RemoteDeviceList,
    SchemaTooNew,
    Storage,
    StoredDeviceList,
    UnknownDevice,
    device_address,
)
from homeserver.storage.schema import SCHEMA_VERSION


class SqlStorage:
    """The SQL repositories over one ``Database`` (whose writer must be running)."""

    def __init__(self, database: Database, *,
                 claimed_ttl_ms: int = CLAIMED_PREKEY_TTL_MS) -> None:
        self.database = database
        self.accounts = AccountRepository(database)
        self.devices = DeviceRepository(database, claimed_ttl_ms=claimed_ttl_ms)
        self.mailboxes = MailboxRepository(database)
        self.federation = FederationRepository(database, deliver=deliver_in_transaction)

    async def aclose(self) -> None:
        """Refuse new writes, flush the queued ones, close the database."""
        await self.database.aclose()


async def open_storage(url: str, nursery: trio.Nursery, *,
                       claimed_ttl_ms: int = CLAIMED_PREKEY_TTL_MS) -> SqlStorage:
    """Open and migrate ``url`` (in a thread), start its writer in ``nursery``."""
    engine = await trio.to_thread.run_sync(create_storage_engine, url)
    database = Database(engine)
    await nursery.start(database.run)
    return SqlStorage(database, claimed_ttl_ms=claimed_ttl_ms)


__all__ = [
    "CLAIMED_PREKEY_TTL_MS", "DEFAULT_URL", "MAILBOX_TTL_MS", "SCHEMA_VERSION",
    "Account", "AccountExists", "AccountRepository", "AccountStore", "ClaimedBundle",
    "Database", "DatabaseClosed", "DeliverResult", "Device", "DeviceExists",
    "DeviceListConflict", "DeviceRepository", "DeviceState", "DeviceStore", "DuplicatePrekey",
    "FederationRepository", "FederationStore", "HoldBackFull",
    "Invite", "InviteExists", "InviteInvalid", "MailboxEntry", "MailboxRepository",
    "MailboxStore", "MemoryFederation", "MemoryStorage", "OutboundDraft", "OutboundState",
    "ReceiveResult", "RemoteDeviceList", "SchemaTooNew", "SqlStorage", "Storage",
    "StoredDeviceList", "UnknownDevice", "WriteFailed", "create_storage_engine",
    "device_address", "open_database", "open_storage",
]
