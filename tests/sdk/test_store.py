"""The client store: round trips, encryption at rest, wrong key and tampering give one clear error."""

from __future__ import annotations

import sqlite3

import pytest

from clientsdk.errors import StoreCorrupted, StoreExists, StoreKeyInvalid, StoreMissing, StoreVersionUnsupported
from clientsdk.store import Batch, HistoryEntry, KdfParams, Store

FAST_KDF = KdfParams(opslimit=1, memlimit=8 * 1024)
CANARY = "canary-plaintext-7f3a9"
SECRET = bytes(range(32))


def _fill(store: Store) -> None:
    batch = Batch()
    batch.kv["identity"] = SECRET
    batch.sessions["bob@example.org/BBBBBBBBBB"] = b"session-state-" + SECRET
    batch.contacts["bob@example.org"] = {"master_key": SECRET, "trust": "tofu"}
    batch.processed.add("bob@example.org/BBBBBBBBBB|m1")
    batch.messages.append(HistoryEntry("bob@example.org", "bob@example.org/BBBBBBBBBB", "m1", CANARY, 1, 2, False))
    store.apply(batch, now_ms=5)


def test_round_trip_and_reopen(tmp_path):
    path = tmp_path / "s.db"
    store = Store.create(path, store_key=b"k" * 32)
    _fill(store)
    store.close()
    store = Store.open(path, store_key=b"k" * 32)
    snap = store.load()
    assert snap.kv["identity"] == SECRET
    assert snap.sessions["bob@example.org/BBBBBBBBBB"].endswith(SECRET)
    assert snap.contacts["bob@example.org"]["trust"] == "tofu"
    assert store.processed(["bob@example.org/BBBBBBBBBB|m1", "x|y"]) == {"bob@example.org/BBBBBBBBBB|m1"}
    assert [h.text for h in store.history("bob@example.org")] == [CANARY]
    assert store.history("carol@example.org") == []
    assert store.prune_processed(10) == 1
    store.close()


def test_encrypted_at_rest(tmp_path):
    path = tmp_path / "s.db"
    store = Store.create(path, passphrase="pass phrase", kdf=FAST_KDF)
    _fill(store)
    store.close()
    raw = b"".join(p.read_bytes() for p in tmp_path.iterdir())
    assert CANARY.encode() not in raw
    assert SECRET not in raw
    assert b"bob@example.org" not in raw


def test_passphrase_and_wrong_keys(tmp_path):
    path = tmp_path / "s.db"
    Store.create(path, passphrase="right", kdf=FAST_KDF).close()
    Store.open(path, passphrase="right").close()
    with pytest.raises(StoreKeyInvalid):
        Store.open(path, passphrase="wrong")
    with pytest.raises(StoreKeyInvalid):
        Store.open(path, store_key=b"k" * 32)
    with pytest.raises(StoreExists):
        Store.create(path, passphrase="x", kdf=FAST_KDF)
    with pytest.raises(StoreMissing):
        Store.open(tmp_path / "nothing.db", passphrase="x")
    path2 = tmp_path / "k.db"
    Store.create(path2, store_key=b"a" * 32).close()
    with pytest.raises(StoreKeyInvalid):
        Store.open(path2, store_key=b"b" * 32)


def test_swapped_and_tampered_rows(tmp_path):
    path = tmp_path / "s.db"
    store = Store.create(path, store_key=b"k" * 32)
    _fill(store)
    batch = Batch()
    batch.kv["other"] = b"other value"
    store.apply(batch)
    store.close()
    db = sqlite3.connect(path)
    (a,), (b,) = db.execute("select value from kv order by name").fetchall()
    db.execute("update kv set value=? where name='identity'", (b,))
    db.commit()
    db.close()
    store = Store.open(path, store_key=b"k" * 32)
    with pytest.raises(StoreCorrupted):
        store.load()
    store.close()
    db = sqlite3.connect(path)
    db.execute("update kv set value=? where name='identity'", (a[:-1] + bytes([a[-1] ^ 1]),))
    db.commit()
    db.close()
    store = Store.open(path, store_key=b"k" * 32)
    with pytest.raises(StoreCorrupted):
        store.load()
    store.close()


def test_garbage_file_and_unknown_version(tmp_path):
    path = tmp_path / "g.db"
    path.write_bytes(b"not a database at all" * 100)
    with pytest.raises(StoreCorrupted):
        Store.open(path, store_key=b"k" * 32)
    path = tmp_path / "v.db"
    Store.create(path, store_key=b"k" * 32).close()
    db = sqlite3.connect(path)
    db.execute("update meta set value=? where name='schema_version'", (b"99",))
    db.commit()
    db.close()
    with pytest.raises(StoreVersionUnsupported):
        Store.open(path, store_key=b"k" * 32)
