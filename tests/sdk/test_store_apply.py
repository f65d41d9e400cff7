"""The store's write path: what a batch stores is what a reopened store reads, whatever was skipped or repeated."""

from __future__ import annotations

from clientsdk.store import Batch, HistoryEntry, Store

KEY = b"k" * 32
BOB = "bob@example.org"
BOB_DEVICE = "bob@example.org/BBBBBBBBBB"


def _reopened_kv(path, name: str) -> bytes:
    store = Store.open(path, store_key=KEY)
    try:
        return store.load().kv[name]
    finally:
        store.close()


def test_kv_values_survive_repeats_and_changes(tmp_path):
    path = tmp_path / "s.db"
    store = Store.create(path, store_key=KEY)
    for value in (b"first", b"first", b"second", b"first"):
        store.apply(Batch(kv={"prekeys": value}))
    store.close()
    assert _reopened_kv(path, "prekeys") == b"first"


def test_unchanged_kv_alone_is_a_no_op_and_others_are_still_written(tmp_path):
    path = tmp_path / "s.db"
    store = Store.create(path, store_key=KEY)
    store.apply(Batch(kv={"prekeys": b"keys"}))
    store.apply(Batch(kv={"prekeys": b"keys"}))
    store.apply(Batch(kv={"prekeys": b"keys"}, sessions={BOB_DEVICE: b"state"}, processed={"k1"}))
    store.close()
    store = Store.open(path, store_key=KEY)
    snapshot = store.load()
    assert snapshot.kv["prekeys"] == b"keys"
    assert snapshot.sessions == {BOB_DEVICE: b"state"}
    assert store.processed(["k1", "k2"]) == {"k1"}
    # After a load, a value equal to the stored one is skipped, a different one written.
    store.apply(Batch(kv={"prekeys": b"keys"}))
    store.apply(Batch(kv={"prekeys": b"new keys"}))
    store.close()
    assert _reopened_kv(path, "prekeys") == b"new keys"


def test_sessions_deleted_and_replaced_in_one_batch(tmp_path):
    path = tmp_path / "s.db"
    store = Store.create(path, store_key=KEY)
    store.apply(Batch(sessions={BOB_DEVICE: b"old", "bob@example.org/CCCCCCCCCC": b"other"}))
    store.apply(Batch(sessions={BOB_DEVICE: b"new"}, deleted_sessions={"bob@example.org/CCCCCCCCCC"}))
    store.close()
    store = Store.open(path, store_key=KEY)
    assert store.load().sessions == {BOB_DEVICE: b"new"}
    store.close()


def test_a_repeated_message_id_keeps_both_messages(tmp_path):
    store = Store.create(tmp_path / "s.db", store_key=KEY)
    first = HistoryEntry(BOB, BOB_DEVICE, "m1", "first", 1, 2, False)
    again = HistoryEntry(BOB, BOB_DEVICE, "m1", "again", 3, 4, False)
    store.apply(Batch(messages=[first, again]))
    store.apply(Batch(messages=[HistoryEntry(BOB, BOB_DEVICE, "m1", "third", 5, 6, False)]))
    assert [h.text for h in store.history(BOB)] == ["first", "again", "third"]
    assert store.find_message("m1") == first
    store.close()


def test_many_processed_keys_in_one_lookup(tmp_path):
    store = Store.create(tmp_path / "s.db", store_key=KEY)
    keys = {f"{BOB_DEVICE}|m{i}" for i in range(0, 600, 2)}
    store.apply(Batch(processed=keys), now_ms=7)
    asked = [f"{BOB_DEVICE}|m{i}" for i in range(600)]
    assert store.processed(asked) == keys
    assert store.processed([]) == set()
    store.close()


def test_rows_are_libsodium_xchacha20poly1305(tmp_path):
    """The sealer's shortcut (one HChaCha20 subkey per open store) gives exactly libsodium's construction."""
    import os

    import nacl.bindings

    from clientsdk.row_sealer import RowSealer

    for _ in range(20):
        key, plaintext, ad = os.urandom(32), os.urandom(os.urandom(1)[0]), os.urandom(40)
        sealed = RowSealer(key).seal(plaintext, ad)
        nonce, body = sealed[:24], sealed[24:]
        assert body == nacl.bindings.crypto_aead_xchacha20poly1305_ietf_encrypt(plaintext, ad, nonce, key)
    sealer = RowSealer(key)
    nonces = {sealer.seal(b"x", ad)[:24] for _ in range(100)}
    assert len(nonces) == 100


def test_large_batches_are_split_into_statements(tmp_path):
    path = tmp_path / "s.db"
    store = Store.create(path, store_key=KEY)
    entries = [HistoryEntry(BOB, BOB_DEVICE, f"m{i % 700}", f"text {i}", i, i, False) for i in range(1_200)]
    keys = {f"{BOB_DEVICE}|m{i}" for i in range(1_200)}
    store.apply(Batch(messages=entries, processed=keys))
    assert [h.text for h in store.history(BOB, limit=2_000)] == [e.text for e in entries]
    assert store.processed(sorted(keys) + ["other"]) == keys
    store.close()


def test_each_transaction_is_fsynced_unless_staged_unsynced(tmp_path):
    """``stage(durable=False)`` commits without fsync; the next durable one is fsynced again."""
    store = Store.create(tmp_path / "s.db", store_key=KEY)
    db = store._writer()

    def mode_after(durable: bool, text: str) -> int:
        entry = HistoryEntry(BOB, BOB_DEVICE, text, text, 1, 1, True)
        assert store.stage(Batch(messages=[entry]), 1, durable)
        store.commit_staged()
        return db.execute("PRAGMA synchronous").fetchone()[0]

    assert [mode_after(d, f"m{i}") for i, d in enumerate([True, False, False, True, False])] == [2, 1, 1, 2, 1]
    assert not store.stage(Batch(), 1, True)            # nothing to write: no transaction, no change
    store.apply(Batch(processed={"k"}))                  # apply is always durable
    assert db.execute("PRAGMA synchronous").fetchone()[0] == 2
    assert [h.text for h in store.history(BOB, 10)] == ["m0", "m1", "m2", "m3", "m4"]
    store.close()
