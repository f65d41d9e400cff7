"""The client's local store: SQLite via SQLAlchemy Core, every secret and plaintext encrypted at rest.

Why: a bot or client restarted from its store must be the same device with the
same sessions (LESSONS #11), and a stolen store file must reveal nothing.

* The store key (32 bytes) is supplied by the application or derived from a
  passphrase with Argon2id; the KDF parameters and salt live in the ``meta`` table.
  A known value encrypted under the key (``key_check``) tells a wrong key apart
  from a damaged file.
* Every value row is XChaCha20-Poly1305 with a fresh 24-byte nonce and the row's
  identity (store id, table, row key) as associated data, so rows cannot be
  swapped between tables, keys or stores.  Row keys that would reveal metadata
  (contact names, device addresses, message ids) are keyed hashes.
* The engine is synchronous; the trio client calls it through ``trio.to_thread``
  once per batch (``apply``), never per message.

Tables: ``meta`` (plaintext: schema version, KDF, store id, key check),
``kv`` (account, identity, master key, prekey store), ``sessions``, ``contacts``,
``processed`` (message ids seen, for de-duplication) and ``messages`` (history).
"""

from __future__ import annotations

import hmac
import os
import sqlite3
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nacl.bindings
import nacl.exceptions
import nacl.pwhash
import sqlalchemy as sa
from sqlalchemy.exc import SQLAlchemyError

from clientsdk.errors import (
    StoreCorrupted,
    StoreError,
    StoreExists,
    StoreKeyInvalid,
    StoreMissing,
    StoreVersionUnsupported,
)
from federation import codec
from federation.errors import CodecError, ProtocolError

SCHEMA_VERSION = 1
ROW_VERSION = 1
KEY_LEN = 32
NONCE_LEN = 24
_KEY_CHECK = b"securechat client store key check v1"
_VALUE_LIMITS = codec.Limits(max_bytes=64 << 20, max_items=1_000_000, max_container=200_000)

metadata = sa.MetaData()
meta_table = sa.Table("meta", metadata, sa.Column("name", sa.String, primary_key=True),
                      sa.Column("value", sa.LargeBinary, nullable=False))
kv_table = sa.Table("kv", metadata, sa.Column("name", sa.String, primary_key=True),
                    sa.Column("value", sa.LargeBinary, nullable=False))
sessions_table = sa.Table("sessions", metadata, sa.Column("rid", sa.LargeBinary, primary_key=True),
                          sa.Column("value", sa.LargeBinary, nullable=False))
contacts_table = sa.Table("contacts", metadata, sa.Column("rid", sa.LargeBinary, primary_key=True),
                          sa.Column("value", sa.LargeBinary, nullable=False))
processed_table = sa.Table("processed", metadata, sa.Column("rid", sa.LargeBinary, primary_key=True),
                           sa.Column("seen_ms", sa.BigInteger, nullable=False))
messages_table = sa.Table("messages", metadata,
                          sa.Column("seq", sa.Integer, primary_key=True, autoincrement=True),
                          sa.Column("conversation", sa.LargeBinary, nullable=False, index=True),
                          sa.Column("rid", sa.LargeBinary, nullable=False, unique=True),
                          sa.Column("value", sa.LargeBinary, nullable=False))


@dataclass(frozen=True, slots=True)
class KdfParams:
    """Argon2id cost for passphrase-derived store keys (stored in the file, read back on open)."""

    opslimit: int = 3
    memlimit: int = 64 * 1024 * 1024


@dataclass(frozen=True, slots=True)
class HistoryEntry:
    conversation: str
    sender_device: str
    message_id: str
    text: str
    sent_ms: int
    received_ms: int
    outgoing: bool
    kind: str = "text"        # "text", or "notice" for what the SDK itself recorded (e.g. a session reset)


@dataclass(slots=True)
class Batch:
    """Writes applied in one transaction: what one decrypt or send round changed."""

    kv: dict[str, bytes] = field(default_factory=dict)
    sessions: dict[str, bytes] = field(default_factory=dict)          # device address -> session bytes
    deleted_sessions: set[str] = field(default_factory=set)
    contacts: dict[str, dict[str, Any]] = field(default_factory=dict)  # user -> contact record
    processed: set[str] = field(default_factory=set)                  # dedupe keys
    messages: list[HistoryEntry] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.kv or self.sessions or self.deleted_sessions or self.contacts or self.processed
                    or self.messages)


@dataclass(frozen=True, slots=True)
class Snapshot:
    """Everything the client keeps in memory, read in one hop at open."""

    kv: dict[str, bytes]
    sessions: dict[str, bytes]
    contacts: dict[str, dict[str, Any]]


def _fail_db(exc: Exception) -> StoreError:
    return StoreCorrupted(f"store file is unreadable ({type(exc).__name__})")


class Store:
    """An open client store.  Synchronous; not safe for concurrent calls (the client serialises them)."""

    def __init__(self, engine: sa.Engine, key: bytes, store_id: bytes) -> None:
        self._engine = engine
        self._key = key
        self._store_id = store_id
        self._index_key = hmac.digest(key, b"securechat store row ids", "sha256")

    def __repr__(self) -> str:
        return "Store(<open>)"

    # -- opening --

    @classmethod
    def create(cls, path: str | os.PathLike[str], *, store_key: bytes | None = None,
               passphrase: str | None = None, kdf: KdfParams | None = None) -> Store:
        """Create a new store file; refuses to overwrite an existing one (``StoreExists``)."""
        path = Path(path)
        if path.exists():
            raise StoreExists("a store already exists at this path")
        salt = os.urandom(nacl.pwhash.argon2id.SALTBYTES)
        if store_key is not None:
            kdf_record: dict[str, Any] = {"alg": "none"}
        else:
            kdf = kdf or KdfParams()
            kdf_record = {"alg": "argon2id", "ops": kdf.opslimit, "mem": kdf.memlimit, "salt": salt}
        key = _derive_key(kdf_record, store_key, passphrase)
        engine = _engine(path)
        store_id = os.urandom(16)
        store = cls(engine, key, store_id)
        try:
            metadata.create_all(engine)
            with engine.begin() as conn:
                conn.execute(meta_table.insert(), [
                    {"name": "schema_version", "value": str(SCHEMA_VERSION).encode()},
                    {"name": "kdf", "value": codec.encode(kdf_record)},
                    {"name": "store_id", "value": store_id},
                    {"name": "key_check", "value": store._seal("meta", b"key_check", _KEY_CHECK)},
                ])
        except SQLAlchemyError as exc:
            engine.dispose()
            raise _fail_db(exc) from None
        return store

    @classmethod
    def open(cls, path: str | os.PathLike[str], *, store_key: bytes | None = None,
             passphrase: str | None = None) -> Store:
        """Open an existing store; ``StoreKeyInvalid`` on a wrong key, ``StoreCorrupted`` on damage."""
        path = Path(path)
        if not path.is_file():
            raise StoreMissing("no store at this path")
        engine = _engine(path)
        try:
            with engine.connect() as conn:
                rows = {r.name: r.value for r in conn.execute(sa.select(meta_table))}
        except SQLAlchemyError as exc:
            engine.dispose()
            raise _fail_db(exc) from None
        try:
            if rows.get("schema_version") != str(SCHEMA_VERSION).encode():
                if "schema_version" in rows:
                    raise StoreVersionUnsupported("store schema version is not supported by this SDK")
                raise StoreCorrupted("store has no schema version")
            try:
                kdf_record = codec.decode(rows["kdf"])
                store_id = rows["store_id"]
                check = rows["key_check"]
            except (KeyError, CodecError):
                raise StoreCorrupted("store metadata is damaged") from None
            if not isinstance(kdf_record, dict):
                raise StoreCorrupted("store metadata is damaged")
            key = _derive_key(kdf_record, store_key, passphrase)
            store = cls(engine, key, store_id)
            try:
                plain = store._open("meta", b"key_check", check)
            except StoreCorrupted:
                raise StoreKeyInvalid("wrong store key or passphrase") from None
            if not hmac.compare_digest(plain, _KEY_CHECK):
                raise StoreKeyInvalid("wrong store key or passphrase")
        except StoreError:
            engine.dispose()
            raise
        return store

    def close(self) -> None:
        self._engine.dispose()

    # -- row encryption --

    def _ad(self, table: str, rid: bytes) -> bytes:
        return b"securechat-store-v1\x00" + self._store_id + b"\x00" + table.encode() + b"\x00" + rid

    def _seal(self, table: str, rid: bytes, plaintext: bytes) -> bytes:
        nonce = os.urandom(NONCE_LEN)
        ct = nacl.bindings.crypto_aead_xchacha20poly1305_ietf_encrypt(plaintext, self._ad(table, rid), nonce,
                                                                       self._key)
        return bytes([ROW_VERSION]) + nonce + ct

    def _open(self, table: str, rid: bytes, sealed: bytes) -> bytes:
        if len(sealed) < 1 + NONCE_LEN + 16:
            raise StoreCorrupted(f"a {table} row is damaged")
        if sealed[0] != ROW_VERSION:
            raise StoreVersionUnsupported(f"a {table} row has an unknown format version")
        try:
            return nacl.bindings.crypto_aead_xchacha20poly1305_ietf_decrypt(
                sealed[1 + NONCE_LEN:], self._ad(table, rid), sealed[1:1 + NONCE_LEN], self._key)
        except nacl.exceptions.CryptoError:
            raise StoreCorrupted(f"a {table} row failed authentication") from None

    def row_id(self, kind: str, name: str) -> bytes:
        """Keyed hash naming a row without revealing the address or id it is about."""
        return hmac.digest(self._index_key, kind.encode() + b"\x00" + name.encode(), "sha256")

    def _decode(self, table: str, rid: bytes, sealed: bytes) -> Any:
        try:
            return codec.decode(self._open(table, rid, sealed), _VALUE_LIMITS)
        except (CodecError, ProtocolError):
            raise StoreCorrupted(f"a {table} row does not parse") from None

    # -- reads --

    def load(self) -> Snapshot:
        """Everything but history and dedupe keys: small, and needed in memory anyway."""
        try:
            with self._engine.connect() as conn:
                kv = {r.name: self._open("kv", r.name.encode(), r.value) for r in conn.execute(sa.select(kv_table))}
                sessions: dict[str, bytes] = {}
                for r in conn.execute(sa.select(sessions_table)):
                    obj = self._decode("sessions", r.rid, r.value)
                    if not isinstance(obj, dict) or not isinstance(obj.get("device"), str) \
                            or not isinstance(obj.get("state"), bytes):
                        raise StoreCorrupted("a sessions row does not parse")
                    sessions[obj["device"]] = obj["state"]
                contacts: dict[str, dict[str, Any]] = {}
                for r in conn.execute(sa.select(contacts_table)):
                    obj = self._decode("contacts", r.rid, r.value)
                    if not isinstance(obj, dict) or not isinstance(obj.get("user"), str):
                        raise StoreCorrupted("a contacts row does not parse")
                    contacts[obj["user"]] = obj
        except SQLAlchemyError as exc:
            raise _fail_db(exc) from None
        return Snapshot(kv, sessions, contacts)

    def processed(self, keys: Iterable[str]) -> set[str]:
        """Which of these dedupe keys were already processed."""
        wanted = {self.row_id("processed", k): k for k in keys}
        if not wanted:
            return set()
        try:
            with self._engine.connect() as conn:
                found = conn.execute(sa.select(processed_table.c.rid)
                                     .where(processed_table.c.rid.in_(list(wanted)))).scalars().all()
        except SQLAlchemyError as exc:
            raise _fail_db(exc) from None
        return {wanted[rid] for rid in found}

    def history(self, conversation: str, limit: int = 100) -> list[HistoryEntry]:
        """The last ``limit`` messages of a conversation, oldest first."""
        conv = self.row_id("conversation", conversation)
        try:
            with self._engine.connect() as conn:
                rows = conn.execute(sa.select(messages_table).where(messages_table.c.conversation == conv)
                                    .order_by(messages_table.c.seq.desc()).limit(limit)).all()
        except SQLAlchemyError as exc:
            raise _fail_db(exc) from None
        return [self._entry(r.rid, conv, r.value) for r in reversed(rows)]

    def _entry(self, rid: bytes, conv: bytes, sealed: bytes) -> HistoryEntry:
        obj = self._decode("messages", rid + conv, sealed)
        try:
            return HistoryEntry(**obj)
        except TypeError:
            raise StoreCorrupted("a messages row does not parse") from None

    def find_message(self, message_id: str) -> HistoryEntry | None:
        """The stored message with this id (the first one, if a peer reused an id), or None."""
        try:
            with self._engine.connect() as conn:
                row = conn.execute(sa.select(messages_table).where(
                    messages_table.c.rid == self.row_id("message", message_id))).first()
        except SQLAlchemyError as exc:
            raise _fail_db(exc) from None
        return None if row is None else self._entry(row.rid, row.conversation, row.value)

    def all_history(self) -> list[HistoryEntry]:
        """Every stored message of every conversation, in storage order (for backups)."""
        try:
            with self._engine.connect() as conn:
                rows = conn.execute(sa.select(messages_table).order_by(messages_table.c.seq)).all()
        except SQLAlchemyError as exc:
            raise _fail_db(exc) from None
        return [self._entry(r.rid, r.conversation, r.value) for r in rows]

    # -- writes --

    def apply(self, batch: Batch, now_ms: int = 0) -> None:
        """Apply a batch in one transaction (fsynced: ``synchronous=FULL``)."""
        if not batch:
            return
        try:
            with self._engine.begin() as conn:
                for name, value in batch.kv.items():
                    _upsert(conn, kv_table, "name", name, self._seal("kv", name.encode(), value))
                for device in batch.deleted_sessions:
                    conn.execute(sessions_table.delete().where(
                        sessions_table.c.rid == self.row_id("session", device)))
                for device, state in batch.sessions.items():
                    rid = self.row_id("session", device)
                    _upsert(conn, sessions_table, "rid", rid,
                            self._seal("sessions", rid, codec.encode({"device": device, "state": state},
                                                                     _VALUE_LIMITS)))
                for user, record in batch.contacts.items():
                    rid = self.row_id("contact", user)
                    _upsert(conn, contacts_table, "rid", rid,
                            self._seal("contacts", rid, codec.encode({**record, "user": user}, _VALUE_LIMITS)))
                for key in batch.processed:
                    conn.execute(sa.insert(processed_table).prefix_with("OR IGNORE"),
                                 {"rid": self.row_id("processed", key), "seen_ms": now_ms})
                for entry in batch.messages:
                    conv = self.row_id("conversation", entry.conversation)
                    # The row id is a keyed hash of the message id, so ``find_message`` needs no
                    # extra index; a repeated id (only a misbehaving peer) falls back to a random one.
                    rid = self.row_id("message", entry.message_id)
                    if conn.execute(sa.select(messages_table.c.seq).where(messages_table.c.rid == rid)).first():
                        rid = os.urandom(32)
                    record = {"conversation": entry.conversation, "sender_device": entry.sender_device,
                              "message_id": entry.message_id, "text": entry.text, "sent_ms": entry.sent_ms,
                              "received_ms": entry.received_ms, "outgoing": entry.outgoing}
                    if entry.kind != "text":
                        record["kind"] = entry.kind
                    conn.execute(messages_table.insert(), {
                        "conversation": conv, "rid": rid,
                        "value": self._seal("messages", rid + conv, codec.encode(record, _VALUE_LIMITS))})
        except SQLAlchemyError as exc:
            raise _fail_db(exc) from None

    def prune_processed(self, older_than_ms: int) -> int:
        """Dedupe keys are only needed while the server may redeliver (mailbox TTL)."""
        try:
            with self._engine.begin() as conn:
                return conn.execute(processed_table.delete().where(
                    processed_table.c.seen_ms < older_than_ms)).rowcount
        except SQLAlchemyError as exc:
            raise _fail_db(exc) from None


def _upsert(conn: sa.Connection, table: sa.Table, key_col: str, key: Any, value: bytes) -> None:
    conn.execute(sa.insert(table).prefix_with("OR REPLACE"), {key_col: key, "value": value})


def _engine(path: Path) -> sa.Engine:
    engine = sa.create_engine(f"sqlite:///{path}", connect_args={"check_same_thread": False},
                              poolclass=sa.pool.StaticPool)

    @sa.event.listens_for(engine, "connect")
    def _pragmas(dbapi_conn: sqlite3.Connection, _record: Any) -> None:
        cur = dbapi_conn.cursor()
        cur.execute("PRAGMA journal_mode=WAL")
        cur.execute("PRAGMA synchronous=FULL")
        cur.close()

    return engine


def _derive_key(kdf_record: dict[str, Any], store_key: bytes | None, passphrase: str | None) -> bytes:
    alg = kdf_record.get("alg")
    if alg == "none":
        if store_key is None:
            raise StoreKeyInvalid("this store was created with an application key: pass store_key")
        if not isinstance(store_key, bytes) or len(store_key) != KEY_LEN:
            raise StoreKeyInvalid("store_key must be 32 bytes")
        return store_key
    if alg != "argon2id":
        raise StoreVersionUnsupported("unknown store key derivation")
    if passphrase is None:
        raise StoreKeyInvalid("this store is protected by a passphrase: pass passphrase")
    ops, mem, salt = kdf_record.get("ops"), kdf_record.get("mem"), kdf_record.get("salt")
    if not (isinstance(ops, int) and isinstance(mem, int) and isinstance(salt, bytes)
            and len(salt) == nacl.pwhash.argon2id.SALTBYTES):
        raise StoreCorrupted("store key derivation parameters are damaged")
    if not (nacl.pwhash.argon2id.OPSLIMIT_MIN <= ops <= 16 and nacl.pwhash.argon2id.MEMLIMIT_MIN <= mem <= 4 << 30):
        raise StoreCorrupted("store key derivation parameters are out of range")
    return nacl.pwhash.argon2id.kdf(KEY_LEN, passphrase.encode(), salt, opslimit=ops, memlimit=mem)

