"""``Batch.merge`` (group commit): one merged batch stores exactly what the batches store one by one."""

from __future__ import annotations

import random

from clientsdk.store import Batch, HistoryEntry, Store

KEY = b"m" * 32
DEVICES = [f"bob@example.org/{c * 10}" for c in "BCD"]


def _state(store: Store, keys: list[str]) -> tuple:
    snapshot = store.load()
    history = [(h.message_id, h.text) for conv in ("bob@example.org", "carol@example.org")
               for h in store.history(conv, 1000)]
    return snapshot.kv, snapshot.sessions, snapshot.contacts, store.processed(keys), history


def _random_batch(rng: random.Random, n: int) -> Batch:
    batch = Batch()
    for _ in range(rng.randint(0, 3)):
        batch.kv[rng.choice(["prekeys", "resets", "account"])] = rng.randbytes(4)
    for device in rng.sample(DEVICES, rng.randint(0, 2)):
        batch.sessions[device] = rng.randbytes(6)
    for device in rng.sample(DEVICES, rng.randint(0, 1)):
        batch.deleted_sessions.add(device)
    for user in rng.sample(["bob@example.org", "carol@example.org"], rng.randint(0, 1)):
        batch.contacts[user] = {"trust": rng.choice(["verified", "unverified"]), "n": n}
    batch.processed |= {f"k{rng.randint(0, 9)}" for _ in range(rng.randint(0, 2))}
    for i in range(rng.randint(0, 2)):
        conv = rng.choice(["bob@example.org", "carol@example.org"])
        message_id = rng.choice([f"id{n}-{i}", "reused-id"])        # a reused id takes the fallback row id
        batch.messages.append(HistoryEntry(conv, f"{conv}/BBBBBBBBBB", message_id, f"text {n}.{i}", n, n, False))
    return batch


def test_merged_batches_store_what_sequential_batches_store(tmp_path):
    keys = [f"k{i}" for i in range(10)]
    for seed in range(25):
        rng = random.Random(seed)
        batches = [_random_batch(rng, n) for n in range(rng.randint(1, 6))]
        one_by_one = Store.create(tmp_path / f"seq{seed}.db", store_key=KEY)
        merged_store = Store.create(tmp_path / f"merged{seed}.db", store_key=KEY)
        try:
            for batch in batches:
                one_by_one.apply(batch, 5)
            merged = Batch()
            for batch in batches:
                merged.merge(batch)
            merged_store.apply(merged, 5)
            assert _state(merged_store, keys) == _state(one_by_one, keys), seed
        finally:
            one_by_one.close()
            merged_store.close()


def test_a_later_deletion_drops_an_earlier_write_and_a_later_write_survives_a_deletion(tmp_path):
    a, b = DEVICES[:2]
    merged = Batch(sessions={a: b"a1", b: b"b1"})
    merged.merge(Batch(deleted_sessions={a, b}))
    merged.merge(Batch(sessions={b: b"b2"}))
    assert merged.sessions == {b: b"b2"} and merged.deleted_sessions == {a, b}
    store = Store.create(tmp_path / "s.db", store_key=KEY)
    try:
        store.apply(Batch(sessions={a: b"old", b: b"old"}))
        store.apply(merged)
        assert store.load().sessions == {b: b"b2"}
    finally:
        store.close()


def test_merge_leaves_the_later_batch_alone():
    later = Batch(kv={"x": b"1"}, processed={"k"}, messages=[])
    merged = Batch()
    merged.merge(later)
    merged.processed.add("other")
    merged.kv["y"] = b"2"
    assert later.processed == {"k"} and later.kv == {"x": b"1"}
