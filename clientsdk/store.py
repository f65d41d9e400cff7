"""The client's local store: SQLite via SQLAlchemy Core, every secret and plaintext encrypted at rest.

Why: a bot or client restarted from its store must be the same device with the
same sessions (LESSONS #11), and a stolen store file must reveal nothing.

* The store key (32 bytes) is supplied by the application or derived from a
  passphrase with Argon2id; the KDF parameters and salt live in the ``meta`` table.
  A known value encrypted under the key (``key_check``) tells a wrong key apart
  from a damaged file.
* Every value row is XChaCha20-Poly1305 with a unique 24-byte nonce and the row's
  identity (store id, table, row key) as associated data, so rows cannot be
  swapped between tables, keys or stores.  Row keys that would reveal metadata
  (contact names, device addresses, message ids) are keyed hashes.
* The engine is synchronous.  Writes come once per batch, never per message, and the
  batches queued meanwhile merge into one (``Batch.merge``, ``clientsdk.group_commit.GroupCommit``):
  the client stages the rows on its trio thread and calls only the commit (the fsync)
  through ``trio.to_thread``; a commit without fsync (``stage(durable=False)``) stays
  on the trio thread.  A worker thread shares the GIL with the trio thread,
  and every C call that releases the GIL (``os.urandom``, libsodium through cffi,
  ``hmac.digest``, each SQLite step) costs up to a switch interval (5 ms) to get it
  back while the other thread is busy: the write path makes as few such calls as it
  can (see ``clientsdk.row_sealer``, ``stage``).

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
from typing import Any, cast

import nacl.bindings
import nacl.exceptions
import nacl.pwhash
import sqlalchemy as sa
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.pool import PoolProxiedConnection

from clientsdk.errors import (
    StoreCorrupted,
    StoreError,
    StoreExists,
    StoreKeyInvalid,
    StoreMissing,
    StoreVersionUnsupported,
)
from clientsdk.row_sealer import RowSealer
from clientsdk.store_file import db_error, insert_rows, open_engine, present_rows
from federation import codec
from federation.errors import CodecError, ProtocolError

SCHEMA_VERSION = 1
ROW_VERSION = 1
KEY_LEN = 32
NONCE_LEN = 24
_KEY_CHECK = b"securechat client store key check v1"
_STABLE_KINDS = frozenset({"session", "conversation"})
_STABLE_RIDS = 4096
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

    def merge(self, later: Batch) -> None:
        """Fold ``later`` into this batch: applying the result equals applying both, this one first.

        Group commit (``clientsdk.client``) writes the batches queued behind a running
        commit in one transaction; later values win, a later deletion drops an earlier
        write (``Store.apply`` deletes sessions before it writes them).
        """
        self.kv.update(later.kv)
        for device in later.deleted_sessions:
            self.sessions.pop(device, None)
            self.deleted_sessions.add(device)
        self.sessions.update(later.sessions)
        self.contacts.update(later.contacts)
        self.processed |= later.processed
        self.messages += later.messages


@dataclass(frozen=True, slots=True)
class Snapshot:
    """Everything the client keeps in memory, read in one hop at open."""

    kv: dict[str, bytes]
    sessions: dict[str, bytes]
    contacts: dict[str, dict[str, Any]]


class Store:
    """An open client store.  Synchronous; not safe for concurrent calls (the client serialises them)."""

    def __init__(self, engine: sa.Engine, key: bytes, store_id: bytes) -> None:
        self._engine = engine
        self._key = key
        self._store_id = store_id
        self._index_key = hmac.digest(key, b"securechat store row ids", "sha256")
        # HMAC-SHA-256 under the index key, keyed once: ``row_id`` copies this state, which gives
        # the same bytes as ``hmac.digest`` without re-keying (and without releasing the GIL).
        self._index_mac = hmac.new(self._index_key, digestmod="sha256")
        # kv values as last committed (or loaded): ``apply`` skips rewriting an unchanged one
        # (e.g. the whole prekey store after a received prekey message).
        self._kv_committed: dict[str, bytes] = {}
        self._kv_staged: dict[str, bytes] = {}
        self._sealer = RowSealer(key)
        self._raw: PoolProxiedConnection | None = None      # see ``_writer``
        self._synchronous_full = True       # the connection's mode: set by ``stage`` when it must change
        self._stable_rids: dict[tuple[str, str], bytes] = {}     # ``row_id`` of sessions and conversations

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
        engine = open_engine(path)
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
            raise db_error(exc) from None
        return store

    @classmethod
    def open(cls, path: str | os.PathLike[str], *, store_key: bytes | None = None,
             passphrase: str | None = None) -> Store:
        """Open an existing store; ``StoreKeyInvalid`` on a wrong key, ``StoreCorrupted`` on damage."""
        path = Path(path)
        if not path.is_file():
            raise StoreMissing("no store at this path")
        engine = open_engine(path)
        try:
            with engine.connect() as conn:
                rows = {r.name: r.value for r in conn.execute(sa.select(meta_table))}
        except SQLAlchemyError as exc:
            engine.dispose()
            raise db_error(exc) from None
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
        if self._raw is not None:
            self._raw.close()
            self._raw = None
        self._engine.dispose()

    # -- row encryption --

    def _ad(self, table: str, rid: bytes) -> bytes:
        return b"securechat-store-v1\x00" + self._store_id + b"\x00" + table.encode() + b"\x00" + rid

    def _seal(self, table: str, rid: bytes, plaintext: bytes) -> bytes:
        return bytes([ROW_VERSION]) + self._sealer.seal(plaintext, self._ad(table, rid))

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
        """Keyed hash naming a row without revealing the address or id it is about.

        Those of sessions and conversations recur with every message: they are kept
        (up to ``_STABLE_RIDS``, then forgotten all at once).
        """
        if kind in _STABLE_KINDS:
            rid = self._stable_rids.get((kind, name))
            if rid is None:
                if len(self._stable_rids) >= _STABLE_RIDS:
                    self._stable_rids.clear()
                rid = self._stable_rids[(kind, name)] = self._row_id(kind, name)
            return rid
        return self._row_id(kind, name)

    def _row_id(self, kind: str, name: str) -> bytes:
        mac = self._index_mac.copy()
        mac.update(kind.encode() + b"\x00" + name.encode())
        return mac.digest()

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
            raise db_error(exc) from None
        self._kv_committed = dict(kv)
        return Snapshot(kv, sessions, contacts)

    def processed(self, keys: Iterable[str]) -> set[str]:
        """Which of these dedupe keys were already processed."""
        wanted = {self.row_id("processed", k): k for k in keys}
        if not wanted:
            return set()
        try:
            with self._engine.connect() as conn:
                db = cast(sqlite3.Connection, conn.connection.driver_connection)    # a pysqlite engine
                found = present_rows(db, "processed", list(wanted))
        except (SQLAlchemyError, sqlite3.Error) as exc:
            raise db_error(exc) from None
        return {wanted[rid] for rid in found}

    def history(self, conversation: str, limit: int = 100) -> list[HistoryEntry]:
        """The last ``limit`` messages of a conversation, oldest first."""
        conv = self.row_id("conversation", conversation)
        try:
            with self._engine.connect() as conn:
                rows = conn.execute(sa.select(messages_table).where(messages_table.c.conversation == conv)
                                    .order_by(messages_table.c.seq.desc()).limit(limit)).all()
        except SQLAlchemyError as exc:
            raise db_error(exc) from None
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
            raise db_error(exc) from None
        return None if row is None else self._entry(row.rid, row.conversation, row.value)

    def all_history(self) -> list[HistoryEntry]:
        """Every stored message of every conversation, in storage order (for backups)."""
        try:
            with self._engine.connect() as conn:
                rows = conn.execute(sa.select(messages_table).order_by(messages_table.c.seq)).all()
        except SQLAlchemyError as exc:
            raise db_error(exc) from None
        return [self._entry(r.rid, r.conversation, r.value) for r in rows]

    def get_kv(self, name: str) -> bytes | None:
        """One kv value (None if absent), without loading the whole snapshot."""
        try:
            with self._engine.connect() as conn:
                row = conn.execute(sa.select(kv_table.c.value).where(kv_table.c.name == name)).first()
        except SQLAlchemyError as exc:
            raise db_error(exc) from None
        return None if row is None else self._open("kv", name.encode(), row.value)

    def recent_history(self, per_conversation: int) -> tuple[list[HistoryEntry], int, int]:
        """The last ``per_conversation`` messages of every conversation in storage order, the highest
        row seq, and how many messages are stored in all (history transfer to a linked device)."""
        ranked = sa.select(messages_table.c.seq, messages_table.c.rid, messages_table.c.conversation,
                           messages_table.c.value,
                           sa.func.row_number().over(partition_by=messages_table.c.conversation,
                                                     order_by=messages_table.c.seq.desc()).label("rank")
                           ).subquery()
        try:
            with self._engine.connect() as conn:
                rows = conn.execute(sa.select(ranked).where(ranked.c.rank <= per_conversation)
                                    .order_by(ranked.c.seq)).all()
                total, last = conn.execute(sa.select(sa.func.count(), sa.func.max(messages_table.c.seq))).one()
        except SQLAlchemyError as exc:
            raise db_error(exc) from None
        return [self._entry(r.rid, r.conversation, r.value) for r in rows], last or 0, total

    def history_after(self, seq: int, limit: int) -> tuple[list[HistoryEntry], int]:
        """Up to ``limit`` messages stored after row ``seq``, in storage order, and the last row seq read."""
        try:
            with self._engine.connect() as conn:
                rows = conn.execute(sa.select(messages_table).where(messages_table.c.seq > seq)
                                    .order_by(messages_table.c.seq).limit(limit)).all()
        except SQLAlchemyError as exc:
            raise db_error(exc) from None
        return [self._entry(r.rid, r.conversation, r.value) for r in rows], rows[-1].seq if rows else seq

    def known_message_ids(self, message_ids: Iterable[str]) -> set[str]:
        """Which of these message ids are already in the history (keyed-hash lookup, like ``find_message``)."""
        wanted = {self.row_id("message", m): m for m in message_ids}
        if not wanted:
            return set()
        try:
            with self._engine.connect() as conn:
                found = conn.execute(sa.select(messages_table.c.rid)
                                     .where(messages_table.c.rid.in_(list(wanted)))).scalars().all()
        except SQLAlchemyError as exc:
            raise db_error(exc) from None
        return {wanted[rid] for rid in found}

    # -- writes --

    def apply(self, batch: Batch, now_ms: int = 0) -> None:
        """Apply a batch in one transaction (fsynced: ``synchronous=FULL``): ``stage`` + ``commit_staged``."""
        if self.stage(batch, now_ms):
            self.commit_staged()

    def stage(self, batch: Batch, now_ms: int = 0, durable: bool = True) -> bool:
        """Write a batch's rows into an open transaction, not committed yet; False if there is nothing to write.

        The two halves of ``apply``.  Staging is cheap (no fsync; rows sealed, one
        statement per table), so the client runs it on its trio thread and hops to a
        worker thread only for ``commit_staged`` (the fsync): statements in a thread
        each give up and retake the GIL the trio thread is using, ~0.1 ms of scheduler
        work apiece under load.  Talks to the sqlite3 connection directly
        (SQLAlchemy's per-statement overhead was ~40 µs).  A kv value equal to the one
        last committed is not written again.  On an error the transaction is rolled back.

        ``durable=False`` commits this transaction without the fsync
        (``synchronous=NORMAL``: in WAL mode it survives a crash of the process, not a
        power cut, and the next fsynced commit makes it durable too, in order).  Only for
        writes whose loss on a power cut is safe: a sender's own copy of what it sent
        inside its send lease (``clientsdk.crypto.session``).  The connection keeps the
        mode of the last staged transaction (one PRAGMA when it changes, not two per
        commit); the only other write, ``prune_processed``, needs no fsync.
        """
        kv = {name: value for name, value in batch.kv.items() if self._kv_committed.get(name) != value}
        if not (kv or batch.deleted_sessions or batch.sessions or batch.contacts or batch.processed
                or batch.messages):
            return False
        try:
            db = self._writer()
            if durable != self._synchronous_full:    # before the first statement opens the transaction
                db.execute("PRAGMA synchronous=FULL" if durable else "PRAGMA synchronous=NORMAL")
                self._synchronous_full = durable
            try:
                if kv:
                    insert_rows(db, "INSERT OR REPLACE INTO kv (name, value)",
                                 [(name, self._seal("kv", name.encode(), value)) for name, value in kv.items()])
                if batch.deleted_sessions:
                    db.executemany("DELETE FROM sessions WHERE rid = ?",
                                   [(self.row_id("session", device),) for device in batch.deleted_sessions])
                if batch.sessions:
                    insert_rows(db, "INSERT OR REPLACE INTO sessions (rid, value)",
                                 [self._sealed_row("sessions", self.row_id("session", device),
                                                   {"device": device, "state": state})
                                  for device, state in batch.sessions.items()])
                if batch.contacts:
                    insert_rows(db, "INSERT OR REPLACE INTO contacts (rid, value)",
                                 [self._sealed_row("contacts", self.row_id("contact", user), {**record, "user": user})
                                  for user, record in batch.contacts.items()])
                if batch.processed:
                    insert_rows(db, "INSERT OR IGNORE INTO processed (rid, seen_ms)",
                                 [(self.row_id("processed", key), now_ms) for key in batch.processed])
                if batch.messages:
                    self._insert_messages(db, batch.messages)
            except BaseException:
                db.rollback()
                raise
        except (SQLAlchemyError, sqlite3.Error) as exc:
            raise db_error(exc) from None
        self._kv_staged = kv
        return True

    def abort_staged(self) -> None:
        """Roll back what ``stage`` wrote when ``commit_staged`` never ran (e.g. no thread to run it in)."""
        self._kv_staged = {}
        try:
            self._writer().rollback()
        except (SQLAlchemyError, sqlite3.Error) as exc:
            raise db_error(exc) from None

    def commit_staged(self) -> None:
        """Commit what ``stage`` wrote (the fsync); on failure it is rolled back and nothing changed."""
        try:
            db = self._writer()
            try:
                db.commit()
            except BaseException:
                db.rollback()
                raise
        except (SQLAlchemyError, sqlite3.Error) as exc:
            raise db_error(exc) from None
        finally:
            kv, self._kv_staged = self._kv_staged, {}
        self._kv_committed.update(kv)

    def _writer(self) -> sqlite3.Connection:
        """The engine's one sqlite3 connection (``StaticPool``), checked out once for ``apply``.

        sqlite3 opens the transaction at the first write and ``commit`` ends it: the
        same statements as through ``engine.begin()``, without SQLAlchemy's checkout,
        reset and transaction objects (~50 µs per commit, in a thread that holds the
        GIL the trio thread is waiting for).
        """
        if self._raw is None:
            self._raw = self._engine.raw_connection()
        db = self._raw.driver_connection
        if not isinstance(db, sqlite3.Connection):
            raise StoreCorrupted("store file is unreadable (no sqlite3 connection)")
        return db

    def _sealed_row(self, table: str, rid: bytes, obj: dict[str, Any]) -> tuple[bytes, bytes]:
        return rid, self._seal(table, rid, codec.encode(obj, _VALUE_LIMITS))

    def _insert_messages(self, db: sqlite3.Connection, entries: list[HistoryEntry]) -> None:
        """History rows, in order.  The row id is a keyed hash of the message id, so ``find_message``
        needs no extra index; a repeated id (only a misbehaving peer) falls back to a random one."""
        rids = [self.row_id("message", entry.message_id) for entry in entries]
        if len(entries) == 1:                # the usual case: one step, a conflict shows in the rowcount
            if not db.execute("INSERT OR IGNORE INTO messages (conversation, rid, value) VALUES (?, ?, ?)",
                              self._message_row(entries[0], rids[0])).rowcount:
                db.execute("INSERT INTO messages (conversation, rid, value) VALUES (?, ?, ?)",
                           self._message_row(entries[0], os.urandom(32)))
            return
        taken = present_rows(db, "messages", rids)
        rows = []
        for entry, rid in zip(entries, rids):
            if rid in taken:
                rid = os.urandom(32)
            taken.add(rid)
            rows.append(self._message_row(entry, rid))
        insert_rows(db, "INSERT INTO messages (conversation, rid, value)", rows)

    def _message_row(self, entry: HistoryEntry, rid: bytes) -> tuple[bytes, bytes, bytes]:
        conv = self.row_id("conversation", entry.conversation)
        record = {"conversation": entry.conversation, "sender_device": entry.sender_device,
                  "message_id": entry.message_id, "text": entry.text, "sent_ms": entry.sent_ms,
                  "received_ms": entry.received_ms, "outgoing": entry.outgoing}
        if entry.kind != "text":
            record["kind"] = entry.kind
        return conv, rid, self._seal("messages", rid + conv, codec.encode(record, _VALUE_LIMITS))

    def prune_processed(self, older_than_ms: int) -> int:
        """Dedupe keys are only needed while the server may redeliver (mailbox TTL)."""
        try:
            with self._engine.begin() as conn:
                return conn.execute(processed_table.delete().where(
                    processed_table.c.seen_ms < older_than_ms)).rowcount
        except SQLAlchemyError as exc:
            raise db_error(exc) from None


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

