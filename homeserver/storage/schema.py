"""Tables (SQLAlchemy Core, portable SQL) and the schema migration runner.

``MIGRATIONS[i]`` takes a database from version ``i`` to ``i + 1``; ``migrate``
runs the missing ones at open, each in its own transaction together with the
version bump.  A database newer than ``SCHEMA_VERSION`` is refused: an old
binary must never write into a layout it does not know.

Every growing table carries an ``expires_ms`` column (or is cleaned up on ack),
so ``MailboxRepository.expire`` / ``FederationRepository.expire`` can bound it
(LESSONS #6).

Version 2 adds the federation tables (``fed_*``): the outbound queue per
destination, the inbound hold-back buffer per origin with its dedupe tables,
remote users' device lists and the remote domains subscribed to local users.
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

SCHEMA_VERSION = 2

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


# --- version 2: federation ------------------------------------------------------------------
# Envelopes are stored field by field (``recipients`` as a canonical msgpack list)
# and rebuilt on read.  ``cls`` text sorts "control" < "message", so ordering by
# (cls, seq) puts control traffic first, as the protocol wants on recovery.

# Envelopes queued for a destination, deleted on the destination's ack.  Never
# expired here: the queue must stay gap-free (the receiver drops expired ones).
fed_outbound = Table(
    "fed_outbound", metadata,
    Column("destination", String(255), primary_key=True),
    Column("cls", String(16), primary_key=True),
    Column("seq", BigInteger, primary_key=True, autoincrement=False),
    Column("envelope_id", LargeBinary, nullable=False),
    Column("kind", String(32), nullable=False),
    Column("sender", String(400), nullable=False),
    Column("recipients", LargeBinary, nullable=False),
    Column("payload", LargeBinary, nullable=False),
    Column("ts_ms", BigInteger, nullable=False),
    Column("expires_ms", BigInteger, nullable=False),
    UniqueConstraint("destination", "envelope_id", name="uq_fed_outbound_envelope"),
)

# One row per destination that ever queued: its backoff (LESSONS #4: in storage).
fed_destinations = Table(
    "fed_destinations", metadata,
    Column("destination", String(255), primary_key=True),
    Column("failures", Integer, nullable=False),
    Column("next_attempt_ms", BigInteger, nullable=False),
    Column("last_failure_ms", BigInteger, nullable=False),
)

# The seq the next envelope of (destination, class) gets; bumped in the queueing op.
fed_outbound_seqs = Table(
    "fed_outbound_seqs", metadata,
    Column("destination", String(255), primary_key=True),
    Column("cls", String(16), primary_key=True),
    Column("next_seq", BigInteger, nullable=False),
)

# The seq expected next from (origin, class); everything below it was handled.
fed_inbound_seqs = Table(
    "fed_inbound_seqs", metadata,
    Column("origin", String(255), primary_key=True),
    Column("cls", String(16), primary_key=True),
    Column("next_seq", BigInteger, nullable=False),
)

# Inbound envelopes: held back behind a gap (released false) or released and not
# yet processed into mailboxes (released true; deleted by ``queue_processed``).
fed_inbound = Table(
    "fed_inbound", metadata,
    Column("origin", String(255), primary_key=True),
    Column("cls", String(16), primary_key=True),
    Column("seq", BigInteger, primary_key=True, autoincrement=False),
    Column("released", Boolean, nullable=False),
    Column("envelope_id", LargeBinary, nullable=False),
    Column("kind", String(32), nullable=False),
    Column("sender", String(400), nullable=False),
    Column("recipients", LargeBinary, nullable=False),
    Column("payload", LargeBinary, nullable=False),
    Column("ts_ms", BigInteger, nullable=False),
    Column("expires_ms", BigInteger, nullable=False),
    # held count and gap walk per origin; restart recovery scans released rows
    Index("ix_fed_inbound_state", "released", "origin", "cls", "seq"),
    Index("ix_fed_inbound_envelope", "origin", "envelope_id"),
)

# Transaction ids seen per origin, kept until ``expires_ms`` (at least an hour).
fed_inbound_txns = Table(
    "fed_inbound_txns", metadata,
    Column("origin", String(255), primary_key=True),
    Column("txn_id", LargeBinary, primary_key=True),
    Column("expires_ms", BigInteger, nullable=False, index=True),
)

# Envelope ids released per origin, kept until the envelope's ``expires_ms``.
fed_seen_envelopes = Table(
    "fed_seen_envelopes", metadata,
    Column("origin", String(255), primary_key=True),
    Column("envelope_id", LargeBinary, primary_key=True),
    Column("expires_ms", BigInteger, nullable=False, index=True),
)

# Other domains' users' signed device lists (a cache; the newest version wins).
fed_remote_device_lists = Table(
    "fed_remote_device_lists", metadata,
    Column("user", String(320), primary_key=True),
    Column("domain", String(255), nullable=False),
    Column("version", BigInteger, nullable=False),
    Column("body", LargeBinary, nullable=False),
    Column("sig", LargeBinary, nullable=False),
    Column("fetched_ms", BigInteger, nullable=False),
    Column("master_key", LargeBinary, nullable=False),
    Index("ix_fed_remote_device_lists_domain", "domain", "user"),
)

# Remote domains that fetched a local user's list (pushed its changes); refreshed
# by every fetch, dropped when not refreshed within the subscription TTL.
fed_subscriptions = Table(
    "fed_subscriptions", metadata,
    Column("user", String(320), primary_key=True),
    Column("domain", String(255), primary_key=True),
    Column("last_seen_ms", BigInteger, nullable=False, index=True),
    Index("ix_fed_subscriptions_domain", "domain", "user"),
)

V2_TABLES = [fed_outbound, fed_destinations, fed_outbound_seqs, fed_inbound_seqs, fed_inbound,
             fed_inbound_txns, fed_seen_envelopes, fed_remote_device_lists, fed_subscriptions]


def _v1(conn: Connection) -> None:
    """Version 1: every table.  Later migrations must spell out their own DDL."""
    metadata.create_all(conn, tables=V1_TABLES)


def _v2(conn: Connection) -> None:
    """Version 2: the federation tables (new tables only; v1 tables are untouched).

    A later migration that changes one of them must first freeze the version-2
    shape here, as ``_v1`` must for its tables.
    """
    metadata.create_all(conn, tables=V2_TABLES)


MIGRATIONS: list[Callable[[Connection], None]] = [_v1, _v2]


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
