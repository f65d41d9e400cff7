"""Hypothesis drives the same random mailbox and prekey histories through the SQL
repositories and the in-memory fake; every answer must be identical (seqs included)."""

from __future__ import annotations

import trio
from hypothesis import HealthCheck, given, settings, strategies as st

from homeserver.storage import DeviceState, MemoryStorage, Storage, open_storage

DEVICES = ["a@x/D0", "a@x/D1"]

deliver = st.tuples(
    st.just("deliver"),
    st.sampled_from(["s@x/S", "t@x/T"]),
    st.sampled_from(["m1", "m2", "m3", "m4", "m5"]),
    st.sampled_from([b"d1", b"d2"]),
    st.lists(st.tuples(st.lists(st.sampled_from(DEVICES), max_size=3, unique=True),
                       st.binary(max_size=8)), min_size=1, max_size=3),
    st.integers(0, 50),                 # now_ms
    st.sampled_from([10, 100]),         # ttl_ms
)
ack = st.tuples(st.just("ack"), st.sampled_from(DEVICES), st.lists(st.integers(1, 12), max_size=4))
pending = st.tuples(st.just("pending"), st.sampled_from(DEVICES), st.integers(0, 4),
                    st.integers(1, 3))
expire = st.tuples(st.just("expire"), st.integers(0, 200))
purge = st.tuples(st.just("purge"), st.sampled_from(DEVICES))
upload = st.tuples(st.just("upload"), st.lists(st.integers(1, 6), max_size=3), st.integers(0, 50))
claim = st.tuples(st.just("claim"), st.integers(0, 50))
steps = st.lists(st.one_of(deliver, pending, ack, deliver, pending, expire, purge, upload, claim),
                 min_size=4, max_size=30)


async def apply(storage: Storage, history: list[tuple[object, ...]]) -> list[object]:
    out: list[object] = []
    await storage.devices.add_device("a@x", "D0", b"I" * 32, DeviceState.ACTIVE, 0)
    await storage.devices.set_signed_prekey("a@x", "D0", 1, b"spk", 0)
    await storage.devices.add_pq_prekeys("a@x", "D0", [(1, True, b"pq")], 0)
    mb = storage.mailboxes
    for step in history:
        kind, *args = step
        try:
            if kind == "deliver":
                sender, mid, digest, payloads, now, ttl = args
                out.append(await mb.deliver(sender, mid, digest, payloads, now, ttl))  # type: ignore[arg-type]
            elif kind == "ack":
                out.append(await mb.ack(*args))  # type: ignore[arg-type]
            elif kind == "pending":
                out.append(await mb.pending(*args))  # type: ignore[arg-type]
            elif kind == "expire":
                out.append(await mb.expire(*args))  # type: ignore[arg-type]
            elif kind == "purge":
                out.append(await mb.purge_device(*args))  # type: ignore[arg-type]
            elif kind == "upload":
                ids, now = args
                items = [(i, b"otk%d" % i) for i in ids]  # type: ignore[union-attr]
                out.append(await storage.devices.add_one_time_prekeys("a@x", "D0", items, now))  # type: ignore[arg-type]
            else:
                out.append(await storage.devices.claim_prekeys("a@x", "D0", *args))  # type: ignore[arg-type]
        except Exception as exc:     # the same error class is part of the contract
            out.append(type(exc).__name__)
        out.append(await mb.counts())
    out.append(await storage.devices.count_prekeys("a@x", "D0"))
    return out


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(history=steps)
async def test_sql_and_memory_agree(history: list[tuple[object, ...]]) -> None:
    memory = MemoryStorage(claimed_ttl_ms=20)
    expected = await apply(memory, history)
    async with trio.open_nursery() as nursery:
        sql = await open_storage("sqlite://", nursery, claimed_ttl_ms=20)
        try:
            assert await apply(sql, history) == expected
        finally:
            await sql.aclose()
