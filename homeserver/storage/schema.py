"""Tables (SQLAlchemy Core, portable SQL) and the schema migration runner.

``MIGRATIONS[i]`` takes a database from version ``i`` to ``i + 1``; ``migrate``
runs the missing ones at open, each in its own transaction together with the
version bump.  A database newer than ``SCHEMA_VERSION`` is refused: an old
binary must never write into a layout it does not know.

Every growing table carries an ``expires_ms`` column (or is cleaned up on ack),
so ``MailboxRepository.expire`` can bound it (LESSONS #6).
"""

from __future__ import annotations

from collections.abc import Callable

from sqlalchemy import (
    BigInteger,
    Boolean,
    Column,
    Connection,
    ForeignKey,
    ForeignKeyConstraint,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Table,
    UniqueConstraint,
    insert,
    inspect,
    select,
    update,
)

from homeserver.storage.models import SchemaTooNew

SCHEMA_VERSION = 1

metadata = MetaData()

# SQLite's INTEGER PRIMARY KEY may reuse the highest rowid after a delete; ids
# that clients see (mailbox seq) must only grow, hence ``sqlite_autoincrement``
# (ignored by other dialects, whose sequences never go back).

schema_version = Table(
    "schema_version", metadata,
    Column("version", Integer, nullable=False),
)

accounts = Table(
    "accounts", metadata,
    Column("user", String(320), primary_key=True),
    Column("password_hash", String(512), nullable=False),
    Column("master_key", LargeBinary, nullable=False),
    Column("disabled", Boolean, nullable=False),
    Column("created_ms", BigInteger, nullable=False),
)

invites = Table(
    "invites", metadata,
    Column("invite_id", String(12), primary_key=True),
    Column("token_hash", LargeBinary, nullable=False, unique=True),
    Column("created_ms", BigInteger, nullable=False),
    Column("expires_ms", BigInteger, nullable=False, index=True),
    Column("uses_left", Integer, nullable=False),
    Column("note", String(1000), nullable=False),
    Column("revoked", Boolean, nullable=False),
)

devices = Table(
    "devices", metadata,
    Column("user", String(320), primary_key=True),
    Column("device_id", String(64), primary_key=True),
    Column("identity_key", LargeBinary, nullable=False),
    Column("state", String(16), nullable=False),
    Column("created_ms", BigInteger, nullable=False),
)

device_lists = Table(
    "device_lists", metadata,
    Column("user", String(320), primary_key=True),
    Column("version", BigInteger, nullable=False),
    Column("body", LargeBinary, nullable=False),
    Column("signature", LargeBinary, nullable=False),
    Column("updated_ms", BigInteger, nullable=False),
)



def _device_fk() -> ForeignKeyConstraint:
    return ForeignKeyConstraint(["user", "device_id"], ["devices.user", "devices.device_id"])


signed_prekeys = Table(
    "signed_prekeys", metadata,
    Column("user", String(320), primary_key=True),
    Column("device_id", String(64), primary_key=True),
    Column("key_id", BigInteger, nullable=False),
    Column("encoded", LargeBinary, nullable=False),
    Column("updated_ms", BigInteger, nullable=False),
    _device_fk(),
)

# ``id`` is the upload order: claims hand out the lowest id first.
one_time_prekeys = Table(
    "one_time_prekeys", metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("user", String(320), nullable=False),
    Column("device_id", String(64), nullable=False),
    Column("key_id", BigInteger, nullable=False),
    Column("encoded", LargeBinary, nullable=False),
    Column("uploaded_ms", BigInteger, nullable=False),
    UniqueConstraint("user", "device_id", "key_id"),
    _device_fk(),
    Index("ix_one_time_prekeys_device", "user", "device_id", "id"),
    sqlite_autoincrement=True,
)

pq_prekeys = Table(
    "pq_prekeys", metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("user", String(320), nullable=False),
    Column("device_id", String(64), nullable=False),
    Column("key_id", BigInteger, nullable=False),
    Column("last_resort", Boolean, nullable=False),
    Column("encoded", LargeBinary, nullable=False),
    Column("uploaded_ms", BigInteger, nullable=False),
    _device_fk(),
    Index("ix_pq_prekeys_device", "user", "device_id", "last_resort", "id"),
    sqlite_autoincrement=True,
)

# Ids handed out by a claim, kept until ``expires_ms`` so a client cannot
# re-upload (and the server hand out twice) a key id a peer may still use.
claimed_prekeys = Table(
    "claimed_prekeys", metadata,
    Column("user", String(320), primary_key=True),
    Column("device_id", String(64), primary_key=True),
    Column("kind", String(8), primary_key=True),          # "x25519" | "pq"
    Column("key_id", BigInteger, primary_key=True),
    Column("expires_ms", BigInteger, nullable=False, index=True),
)

# Dedupe of (sender, message_id) for the message TTL.
message_ids = Table(
    "message_ids", metadata,
    Column("sender", String(400), primary_key=True),
    Column("message_id", String(200), primary_key=True),
    Column("digest", LargeBinary, nullable=False),
    Column("expires_ms", BigInteger, nullable=False, index=True),
)

# One row per distinct ciphertext; mailbox entries point at it.
blobs = Table(
    "blobs", metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("ciphertext", LargeBinary, nullable=False),
    sqlite_autoincrement=True,
)

# ``seq`` is global and only grows, so per-device order is commit order.
mailbox = Table(
    "mailbox", metadata,
    Column("seq", Integer, primary_key=True, autoincrement=True),
    Column("device", String(400), nullable=False),
    Column("sender", String(400), nullable=False),
    Column("message_id", String(200), nullable=False),
    Column("blob_id", Integer, ForeignKey("blobs.id"), nullable=False, index=True),
    Column("ts_ms", BigInteger, nullable=False),
    Column("expires_ms", BigInteger, nullable=False, index=True),
    Index("ix_mailbox_device_seq", "device", "seq"),
    sqlite_autoincrement=True,
)

V1_TABLES = [accounts, invites, devices, device_lists, signed_prekeys, one_time_prekeys,
             pq_prekeys, claimed_prekeys, message_ids, blobs, mailbox]


def _v1(conn: Connection) -> None:
    """Version 1: every table.  Later migrations must spell out their own DDL."""
    metadata.create_all(conn, tables=V1_TABLES)


MIGRATIONS: list[Callable[[Connection], None]] = [_v1]


def current_version(conn: Connection) -> int:
    """The stored schema version; 0 for an empty database."""
    if not inspect(conn).has_table("schema_version"):
        return 0
    version = conn.execute(select(schema_version.c.version)).scalar()
    return int(version) if version is not None else 0


def migrate(conn: Connection) -> int:
    """Bring the database to ``SCHEMA_VERSION``, one committed step at a time.

    ``conn`` must not be inside a transaction.  Returns the version reached.
    """
    with conn.begin():
        version = current_version(conn)
    if version > SCHEMA_VERSION:
        raise SchemaTooNew(
            f"database schema version {version} is newer than this release supports "
            f"({SCHEMA_VERSION}); upgrade securechat")
    while version < SCHEMA_VERSION:
        with conn.begin():
            if version == 0:
                schema_version.create(conn, checkfirst=True)
                conn.execute(insert(schema_version).values(version=0))
            MIGRATIONS[version](conn)
            version += 1
            conn.execute(update(schema_version).values(version=version))
    return version
