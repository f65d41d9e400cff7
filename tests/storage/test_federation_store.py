"""Federation storage contract (outbound queues, inbound ordering, remote device lists,
subscriptions), run against the SQL repository on SQLite files and the in-memory fake;
plus the SQLite-only checks: a failed group-commit batch and the v1 -> v2 migration."""

from __future__ import annotations

import sqlite3
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import trio
import trio.testing
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import Connection

from federation.errors import ErrorCode
from federation.outbound import EnvelopeDraft
from federation.s2s import Envelope, EnvelopeClass, EnvelopeKind
from homeserver.storage.models import DeliveryPlan
from homeserver.storage import (
    SCHEMA_VERSION,
    DeviceState,
    FederationRepository,
    HoldBackFull,
    MemoryStorage,
    OutboundDraft,
    OutboundState,
    RemoteDeviceList,
    SqlStorage,
    Storage,
    WriteFailed,
    open_database,
    open_storage,
)

CONTROL, MESSAGE = EnvelopeClass.CONTROL, EnvelopeClass.MESSAGE
HERE, THERE, ELSEWHERE = "here.example", "there.example", "elsewhere.example"
SENDER = f"alice@{HERE}/AAAAAAAAAA"
FAR = 10**12


class Backend:
    """One storage under test; ``reopen`` closes and reopens a SQLite file (memory: same object)."""

    def __init__(self, kind: str, path: Path, nursery: trio.Nursery) -> None:
        self.kind = kind
        self.url = f"sqlite:///{path / 'fed.db'}"
        self.nursery = nursery
        self.store: Storage = MemoryStorage()

    async def open(self) -> Storage:
        if self.kind == "sqlite":
            self.store = await open_storage(self.url, self.nursery)
        return self.store

    async def reopen(self) -> Storage:
        if self.kind == "sqlite":
            await self.store.aclose()
            await self.open()
        return self.store


@pytest.fixture(params=["memory", "sqlite"])
async def backend(request: pytest.FixtureRequest, tmp_path: Path, nursery) -> AsyncIterator[Backend]:
    b = Backend(request.param, tmp_path, nursery)
    await b.open()
    yield b
    await b.store.aclose()


def eid(n: int) -> bytes:
    return n.to_bytes(16, "big")


def out(n: int, destination: str = THERE, cls: EnvelopeClass = MESSAGE, *,
        expires_ms: int = FAR, envelope_id: bytes | None = None) -> OutboundDraft:
    kind = EnvelopeKind.MESSAGE if cls is MESSAGE else EnvelopeKind.DEVICE_LIST
    recipients = (f"bob@{destination}", f"carol@{destination}")
    return OutboundDraft(destination, cls, EnvelopeDraft(
        envelope_id if envelope_id is not None else eid(n), kind, SENDER, recipients,
        b"payload-%d" % n, expires_ms))


def env(seq: int, cls: EnvelopeClass = MESSAGE, *, n: int | None = None, expires_ms: int = FAR,
        origin: str = THERE) -> Envelope:
    """An inbound envelope from ``origin``; its id defaults to one unique per (class, seq)."""
    number = n if n is not None else seq + (1000 if cls is CONTROL else 0)
    kind = EnvelopeKind.MESSAGE if cls is MESSAGE else EnvelopeKind.DEVICE_LIST
    return Envelope(eid(number), kind, cls, seq, f"bob@{origin}/BBBBBBBBBB", (f"alice@{HERE}",),
                    b"in-%d" % number, 5, expires_ms)


async def queue(store: Storage, drafts: list[OutboundDraft], now_ms: int = 100) -> list[Envelope]:
    return await (await store.federation.queue_outbound(drafts, now_ms)).result()


async def receive(store: Storage, txn: int, envelopes: list[Envelope], now_ms: int = 100,
                  **kw: int) -> tuple[bool, list[tuple[str, int]], int]:
    """(duplicate, [(class, seq) released], held) of one transaction."""
    result = await (await store.federation.queue_receive(
        THERE, eid(txn), envelopes, now_ms, **kw)).result()
    return result.duplicate, [(e.cls.value, e.seq) for e in result.released], result.held


# --- outbound -------------------------------------------------------------------------------------


async def test_outbound_seqs_are_consecutive_per_destination_and_class(backend: Backend) -> None:
    store = backend.store
    first = await queue(store, [out(1), out(2, cls=CONTROL), out(3, ELSEWHERE), out(4)], now_ms=7)
    assert [(e.id, e.cls, e.seq, e.ts_ms) for e in first] == [
        (eid(1), MESSAGE, 1, 7), (eid(2), CONTROL, 1, 7), (eid(3), MESSAGE, 1, 7), (eid(4), MESSAGE, 2, 7)]
    assert first[0] == Envelope(eid(1), EnvelopeKind.MESSAGE, MESSAGE, 1, SENDER,
                                (f"bob@{THERE}", f"carol@{THERE}"), b"payload-1", 7, FAR)
    assert [e.seq for e in await queue(store, [out(5), out(6)])] == [3, 4]
    store = await backend.reopen()
    assert [(e.cls, e.seq) for e in await queue(store, [out(7), out(8, cls=CONTROL)])] == [
        (MESSAGE, 5), (CONTROL, 2)]
    pending = await store.federation.outbound_pending(THERE)
    assert [(e.cls, e.seq) for e in pending] == [(CONTROL, 1), (CONTROL, 2)] + [
        (MESSAGE, s) for s in range(1, 6)]
    assert pending[0] == first[1]
    assert await store.federation.outbound_states() == [
        OutboundState(ELSEWHERE, {CONTROL: 1, MESSAGE: 2}, 0, 0, -1),
        OutboundState(THERE, {CONTROL: 3, MESSAGE: 6}, 0, 0, -1)]
    assert await store.federation.outbound_pending("nowhere.example") == []


async def test_on_commit_gets_the_numbered_envelopes(backend: Backend) -> None:
    seen: list[list[Envelope]] = []
    completion = await backend.store.federation.queue_outbound([out(1), out(2)], 3, on_commit=seen.append)
    envelopes = await completion.result()
    assert seen == [envelopes] and [e.seq for e in envelopes] == [1, 2]


async def test_a_failing_batch_leaves_no_seq_gap(backend: Backend) -> None:
    store = backend.store
    await queue(store, [out(1), out(2, ELSEWHERE)])
    states = await store.federation.outbound_states()
    called: list[object] = []
    # the second draft reuses an id still queued for its destination: the op fails after
    # the first draft was numbered, and everything (counters too) rolls back
    with pytest.raises(ValueError, match="already queued"):
        await (await store.federation.queue_outbound(
            [out(3), out(4, ELSEWHERE, envelope_id=eid(2))], 100, on_commit=called.append)).result()
    bad_drafts = [out(5, "bad_domain!"), out(6, expires_ms=100),
                  OutboundDraft(THERE, MESSAGE, EnvelopeDraft(eid(7), EnvelopeKind.MESSAGE, SENDER,
                                                              (f"bob@{ELSEWHERE}",), b"", FAR)),
                  OutboundDraft(THERE, MESSAGE, EnvelopeDraft(b"short", EnvelopeKind.MESSAGE, SENDER,
                                                              (f"bob@{THERE}",), b"", FAR))]
    for bad in bad_drafts:
        with pytest.raises(ValueError):
            await (await store.federation.queue_outbound([out(8), bad], 100)).result()
    with pytest.raises(ValueError, match="repeated"):
        await (await store.federation.queue_outbound([out(9), out(9)], 100)).result()
    assert called == []
    assert await store.federation.outbound_states() == states
    assert [e.id for e in await store.federation.outbound_pending(THERE)] == [eid(1)]
    assert [e.seq for e in await queue(store, [out(10), out(11, ELSEWHERE)])] == [2, 2]


async def test_ack_deletes_only_that_destinations_envelopes(backend: Backend) -> None:
    store = backend.store
    await queue(store, [out(1), out(2), out(3, cls=CONTROL), out(4, ELSEWHERE)])
    acked = await store.federation.queue_outbound_ack(THERE, [eid(1), eid(3), eid(3), eid(4), eid(99)])
    assert await acked.result() == 2
    assert [e.id for e in await store.federation.outbound_pending(THERE)] == [eid(2)]
    assert [e.id for e in await store.federation.outbound_pending(ELSEWHERE)] == [eid(4)]
    assert await (await store.federation.queue_outbound_ack(THERE, [])).result() == 0
    # seq does not go back once a destination's queue is empty
    assert await (await store.federation.queue_outbound_ack(THERE, [eid(2)])).result() == 1
    assert [e.seq for e in await queue(store, [out(5)])] == [3]


async def test_backoff_persists_across_reopen(backend: Backend) -> None:
    store = backend.store
    await queue(store, [out(1)])
    await (await store.federation.queue_backoff(THERE, 3, 9_000, 5_000)).result()
    store = await backend.reopen()
    assert await store.federation.outbound_states() == [
        OutboundState(THERE, {CONTROL: 1, MESSAGE: 2}, 3, 9_000, 5_000)]
    await (await store.federation.queue_backoff(THERE, 0, 0, 5_000)).result()
    assert (await store.federation.outbound_states())[0].failures == 0


async def test_outbound_stats(backend: Backend) -> None:
    store = backend.store
    await queue(store, [out(1), out(2, ELSEWHERE)], now_ms=100)
    await queue(store, [out(3)], now_ms=400)
    assert await store.federation.outbound_stats(1_000) == {ELSEWHERE: (1, 900), THERE: (2, 900)}
    await (await store.federation.queue_outbound_ack(ELSEWHERE, [eid(2)])).result()
    await (await store.federation.queue_outbound_ack(THERE, [eid(1)])).result()
    assert await store.federation.outbound_stats(1_000) == {THERE: (1, 600)}


async def test_outbound_rows_are_never_expired(backend: Backend) -> None:
    store = backend.store
    await queue(store, [out(1, expires_ms=200)], now_ms=100)
    await store.federation.expire(10**13)
    assert [e.id for e in await store.federation.outbound_pending(THERE)] == [eid(1)]


# --- inbound --------------------------------------------------------------------------------------


async def test_in_order_envelopes_are_released_at_once_control_first(backend: Backend) -> None:
    store = backend.store
    result = await (await store.federation.queue_receive(
        THERE, eid(1), [env(1), env(1, CONTROL), env(2)], 100)).result()
    assert result.duplicate is False and result.held == 0
    assert result.released == (env(1, CONTROL), env(1), env(2))
    assert await store.federation.inbound_next_seq(THERE) == {CONTROL: 2, MESSAGE: 3}
    assert await store.federation.inbound_next_seq(ELSEWHERE) == {CONTROL: 1, MESSAGE: 1}


async def test_duplicate_txn_changes_nothing(backend: Backend) -> None:
    store = backend.store
    assert await receive(store, 1, [env(2)]) == (False, [], 1)
    assert await receive(store, 1, [env(1)]) == (True, [], 1)      # same txn id: ignored
    assert await store.federation.inbound_next_seq(THERE) == {CONTROL: 1, MESSAGE: 1}
    # the same txn id from another origin is another transaction
    other = await (await store.federation.queue_receive(ELSEWHERE, eid(1), [env(1, origin=ELSEWHERE)],
                                                        100)).result()
    assert other.duplicate is False and len(other.released) == 1


async def test_gap_holds_back_until_filled_then_releases_in_order(backend: Backend) -> None:
    store = backend.store
    assert await receive(store, 1, [env(3), env(5), env(2, CONTROL)]) == (False, [], 3)
    assert await receive(store, 2, [env(4), env(3)]) == (False, [], 4)   # seq 3 already held
    assert await receive(store, 3, [env(1, CONTROL)]) == (False, [("control", 1), ("control", 2)], 3)
    assert await receive(store, 4, [env(2), env(1)]) == (
        False, [("message", s) for s in range(1, 6)], 0)
    assert await store.federation.inbound_next_seq(THERE) == {CONTROL: 3, MESSAGE: 6}
    released = await store.federation.released()
    assert [(o, e.cls.value, e.seq) for o, e in released] == [
        (THERE, "control", 1), (THERE, "control", 2)] + [(THERE, "message", s) for s in range(1, 6)]
    assert released[-1][1] == env(5)


async def test_duplicate_envelopes_are_ignored(backend: Backend) -> None:
    store = backend.store
    assert await receive(store, 1, [env(1), env(1), env(2)]) == (False, [("message", 1), ("message", 2)], 0)
    # re-delivery under a new txn id: below next_seq, nothing again
    assert await receive(store, 2, [env(1), env(2)]) == (False, [], 0)
    # a held seq sent twice keeps the first copy
    assert await receive(store, 3, [env(4)]) == (False, [], 1)
    assert await receive(store, 4, [env(4, n=77)]) == (False, [], 1)
    assert await receive(store, 5, [env(3)]) == (False, [("message", 3), ("message", 4)], 0)
    assert [e.id for _, e in await store.federation.released()][-1] == eid(4)
    # an envelope id already released, again under a new seq: seq advances, not released
    assert await receive(store, 6, [env(5, n=1), env(6)]) == (False, [("message", 6)], 0)
    assert await store.federation.inbound_next_seq(THERE) == {CONTROL: 1, MESSAGE: 7}


async def test_expired_envelope_advances_seq_but_is_not_released(backend: Backend) -> None:
    store = backend.store
    assert await receive(store, 1, [env(2, expires_ms=150)], now_ms=100) == (False, [], 1)
    # seq 2 expired while held; releasing the gap skips it
    assert await receive(store, 2, [env(1), env(3)], now_ms=200) == (False, [("message", 1), ("message", 3)], 0)
    assert await receive(store, 3, [env(4, expires_ms=200)], now_ms=200) == (False, [], 0)
    assert await store.federation.inbound_next_seq(THERE) == {CONTROL: 1, MESSAGE: 5}
    assert [e.seq for _, e in await store.federation.released()] == [1, 3]


async def test_hold_back_bound_refuses_and_changes_nothing(backend: Backend) -> None:
    store = backend.store
    assert await receive(store, 1, [env(3), env(4)], max_held=3) == (False, [], 2)
    with pytest.raises(HoldBackFull) as info:
        await receive(store, 2, [env(5), env(6)], max_held=3)
    assert info.value.code == ErrorCode.RATE_LIMITED
    # nothing was stored, not even the txn id: the same transaction is accepted later
    assert await receive(store, 2, [env(5)], max_held=3) == (False, [], 3)
    # a transaction that fills the gap may bring more than the bound: it is not held
    assert await receive(store, 3, [env(1), env(2), env(6), env(7)], max_held=3) == (
        False, [("message", s) for s in range(1, 8)], 0)


async def test_long_runs_of_held_envelopes_release_up_to_the_next_gap(backend: Backend) -> None:
    # more held seqs than the SQL walk reads per query (HELD_PAGE), with a second gap after them
    store = backend.store
    assert await receive(store, 1, [env(s) for s in range(2, 601)]) == (False, [], 599)
    assert await receive(store, 2, [env(s) for s in range(602, 700)]) == (False, [], 697)
    duplicate, released, held = await receive(store, 3, [env(1)])
    assert (duplicate, held) == (False, 98)
    assert released == [("message", s) for s in range(1, 601)]
    assert (await receive(store, 4, [env(601), env(700)]))[1:] == (
        [("message", s) for s in range(601, 701)], 0)


async def test_released_survives_reopen_until_processed(backend: Backend) -> None:
    store = backend.store
    await receive(store, 1, [env(1), env(2), env(1, CONTROL), env(5)])
    await (await store.federation.queue_receive(ELSEWHERE, eid(1), [env(1, origin=ELSEWHERE)], 100)).result()
    store = await backend.reopen()
    released = await store.federation.released()
    assert [(o, e.cls.value, e.seq) for o, e in released] == [
        (ELSEWHERE, "message", 1), (THERE, "control", 1), (THERE, "message", 1), (THERE, "message", 2)]
    assert released[2][1] == env(1)
    processed = await store.federation.queue_processed(THERE, [eid(1), eid(1001), eid(5), eid(99)])
    assert await processed.result() == 2              # seq 5 is held, not released: untouched
    assert [(o, e.seq) for o, e in await store.federation.released()] == [(ELSEWHERE, 1), (THERE, 2)]
    # processed ids are still remembered: the same id under a later seq is dropped
    assert await receive(store, 2, [env(3, n=1), env(4)]) == (False, [("message", 4), ("message", 5)], 0)


# --- remote device lists, subscriptions, expiry ---------------------------------------------------


async def test_remote_device_list_only_moves_forward(backend: Backend) -> None:
    fed = backend.store.federation
    key = b"K" * 32
    v2 = RemoteDeviceList(f"bob@{THERE}", 2, b"body-2", b"s" * 64, 10, key)
    assert await fed.get_remote_device_list(v2.user) is None
    assert await fed.put_remote_device_list(v2) is True
    assert await fed.put_remote_device_list(RemoteDeviceList(v2.user, 1, b"old", b"t" * 64, 20, key)) is False
    assert await fed.put_remote_device_list(RemoteDeviceList(v2.user, 2, b"other", b"u" * 64, 30, key)) is False
    assert await fed.get_remote_device_list(v2.user) == v2
    v3 = RemoteDeviceList(v2.user, 3, b"body-3", b"v" * 64, 40, b"L" * 32)
    assert await fed.put_remote_device_list(v3) is True
    assert await fed.get_remote_device_list(v2.user) == v3
    carol = RemoteDeviceList(f"carol@{THERE}", 1, b"c", b"w" * 64, 50, key)
    dave = RemoteDeviceList(f"dave@{ELSEWHERE}", 7, b"d", b"x" * 64, 60, key)
    await fed.put_remote_device_list(dave)
    await fed.put_remote_device_list(carol)
    assert await fed.remote_device_lists(THERE) == [v3, carol]
    assert await fed.remote_device_lists(ELSEWHERE) == [dave]
    assert await fed.remote_device_lists("nowhere.example") == []


async def test_subscriptions(backend: Backend) -> None:
    fed = backend.store.federation
    alice, bob = f"alice@{HERE}", f"bob@{HERE}"
    await fed.subscribe(alice, THERE, 10)
    await fed.subscribe(alice, ELSEWHERE, 10)
    await fed.subscribe(bob, THERE, 10)
    await fed.subscribe(alice, THERE, 20)          # idempotent
    assert await fed.subscribers(alice) == [ELSEWHERE, THERE]
    assert await fed.subscribers("nobody@" + HERE) == []
    assert await fed.subscriptions() == {ELSEWHERE: [alice], THERE: [alice, bob]}


async def test_expire_counts_per_table(backend: Backend) -> None:
    fed = backend.store.federation
    alice = f"alice@{HERE}"
    await fed.subscribe(alice, THERE, 0)
    await fed.subscribe(alice, ELSEWHERE, 500)
    await receive(backend.store, 1, [env(1, expires_ms=1_000), env(2, expires_ms=5_000)],
                  now_ms=100, txn_ttl_ms=400)
    await receive(backend.store, 2, [env(3, expires_ms=5_000)], now_ms=300, txn_ttl_ms=400)
    assert await fed.expire(400, subscription_ttl_ms=1_000) == {
        "txn_ids": 0, "envelope_ids": 0, "subscriptions": 0}
    assert await fed.expire(1_000, subscription_ttl_ms=1_000) == {
        "txn_ids": 2, "envelope_ids": 1, "subscriptions": 1}
    assert await fed.subscriptions() == {ELSEWHERE: [alice]}
    # the txn id is forgotten: a replay of txn 1 is no longer a duplicate, but seq catches it
    assert await receive(backend.store, 1, [env(1), env(2)], now_ms=1_000) == (False, [], 0)
    assert await fed.expire(5_000, subscription_ttl_ms=1_000) == {
        "txn_ids": 0, "envelope_ids": 2, "subscriptions": 1}
    # released rows are not expired: they wait for queue_processed
    assert len(await fed.released()) == 3


# --- mailbox delivery + remote enqueue ------------------------------------------------------------


async def test_deliver_queues_remote_copies_in_the_same_write(backend: Backend) -> None:
    store = backend.store
    local = f"alice@{HERE}/CCCCCCCCCC"
    seen: list[object] = []
    completion = await store.mailboxes.queue_deliver(
        SENDER, "m1", b"d" * 32, [([local], b"ct")], 100, 1_000, on_commit=seen.append,
        outbound=[out(1), out(2, ELSEWHERE)])
    result = await completion.result()
    assert seen == [result]
    assert result.status == "new" and [e.device for e in result.entries] == [local]
    assert [(e.id, e.seq, e.ts_ms) for e in result.outbound] == [(eid(1), 1, 100), (eid(2), 1, 100)]
    assert await store.federation.outbound_pending(THERE) == [result.outbound[0]]
    # a retry of the same message queues nothing; a conflicting one neither
    again = await store.mailboxes.deliver(SENDER, "m1", b"d" * 32, [([local], b"ct")], 101, 1_000,
                                          outbound=[out(3)])
    clash = await store.mailboxes.deliver(SENDER, "m1", b"x" * 32, [([local], b"ct")], 101, 1_000,
                                          outbound=[out(4)])
    assert (again.status, again.outbound, clash.status, clash.outbound) == ("duplicate", (), "conflict", ())
    assert [e.id for e in await store.federation.outbound_pending(THERE)] == [eid(1)]
    # every other device is remote: no local payload, the message id is still recorded
    remote_only = await store.mailboxes.deliver(SENDER, "m2", b"e" * 32, [], 102, 1_000, outbound=[out(5)])
    assert remote_only.status == "new" and remote_only.entries == ()
    assert [e.seq for e in remote_only.outbound] == [2]
    assert (await store.mailboxes.deliver(SENDER, "m2", b"e" * 32, [], 103, 1_000,
                                          outbound=[out(6)])).status == "duplicate"
    assert await store.mailboxes.counts() == {"entries": 1, "blobs": 1}


async def test_deliver_with_a_failing_outbound_stores_nothing(backend: Backend) -> None:
    store = backend.store
    local = f"alice@{HERE}/CCCCCCCCCC"
    await queue(store, [out(1)])
    with pytest.raises(ValueError):        # id already queued: the whole delivery rolls back
        await store.mailboxes.deliver(SENDER, "m1", b"d" * 32, [([local], b"ct")], 100, 1_000,
                                      outbound=[out(2, ELSEWHERE), out(3, envelope_id=eid(1))])
    with pytest.raises(ValueError):        # invalid draft: refused before anything is queued
        await store.mailboxes.deliver(SENDER, "m1", b"d" * 32, [([local], b"ct")], 100, 1_000,
                                      outbound=[out(4, expires_ms=50)])
    assert await store.mailboxes.counts() == {"entries": 0, "blobs": 0}
    assert await store.mailboxes.pending(local, 0, 10) == []
    assert await store.federation.outbound_pending(ELSEWHERE) == []
    retry = await store.mailboxes.deliver(SENDER, "m1", b"d" * 32, [([local], b"ct")], 100, 1_000,
                                          outbound=[out(2, ELSEWHERE)])
    assert retry.status == "new" and [e.seq for e in retry.outbound] == [1]


# --- SQL and memory agree on random inbound histories ---------------------------------------------

_inbound_step = st.tuples(
    st.integers(1, 6),                                          # txn id
    st.lists(st.tuples(st.sampled_from([CONTROL, MESSAGE]), st.integers(1, 8),  # class, seq
                       st.integers(1, 10),                      # envelope number (id)
                       st.sampled_from([50, 150, FAR])),        # expires_ms
             max_size=5),
    st.sampled_from([100, 200]),                                # now_ms
)
_history = st.lists(st.one_of(_inbound_step, st.just("processed"), st.just("expire")), min_size=1, max_size=12)


async def _apply_inbound(store: Storage, history: list[object]) -> list[object]:
    results: list[object] = []
    for step in history:
        try:
            if step == "processed":
                ids = [e.id for _, e in (await store.federation.released())[:2]]
                results.append(await (await store.federation.queue_processed(THERE, ids)).result())
            elif step == "expire":
                results.append(await store.federation.expire(120))
            else:
                txn, items, now = step  # type: ignore[misc]
                envelopes = [env(seq, cls, n=n, expires_ms=exp) for cls, seq, n, exp in items]
                results.append(await (await store.federation.queue_receive(
                    THERE, eid(txn), envelopes, now, txn_ttl_ms=50, max_held=4)).result())
        except HoldBackFull:
            results.append("HoldBackFull")
        results.append(await store.federation.released())
        results.append(await store.federation.inbound_next_seq(THERE))
    return results


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(history=_history)
async def test_sql_and_memory_agree_on_inbound(history: list[object]) -> None:
    expected = await _apply_inbound(MemoryStorage(), history)
    async with trio.open_nursery() as nursery:
        sql = await open_storage("sqlite://", nursery)
        try:
            assert await _apply_inbound(sql, history) == expected
        finally:
            await sql.aclose()


# --- SQLite only ----------------------------------------------------------------------------------


async def test_a_failed_commit_batch_leaves_no_seq_gap(tmp_path: Path, nursery) -> None:
    db = open_database(f"sqlite:///{tmp_path / 'batch.db'}")
    fed = FederationRepository(db)

    def sneaky_rollback(conn: Connection) -> None:
        conn.exec_driver_sql("ROLLBACK")

    # queued before the writer starts, so both ops land in one batch that cannot commit
    queued = await fed.queue_outbound([out(1), out(2)], 100)
    await db.queue(sneaky_rollback)
    await nursery.start(db.run)
    with pytest.raises(WriteFailed):
        await queued.result()
    assert await fed.outbound_states() == []
    assert [e.seq for e in await (await fed.queue_outbound([out(3)], 100)).result()] == [1]
    await db.aclose()


async def test_migration_v1_to_v2_keeps_existing_data(tmp_path: Path, nursery) -> None:
    path = tmp_path / "v1.db"
    raw = sqlite3.connect(path)
    raw.executescript((Path(__file__).parent / "data" / "schema_v1.sql").read_text())
    raw.close()
    storage: SqlStorage = await open_storage(f"sqlite:///{path}", nursery)
    version = await storage.database.read(
        lambda conn: conn.exec_driver_sql("SELECT version FROM schema_version").scalar())
    assert version == SCHEMA_VERSION == 2
    alice = "alice@example.org"
    assert (await storage.accounts.get_account(alice)).master_key == b"M" * 32  # type: ignore[union-attr]
    (device,) = await storage.devices.list_devices(alice)
    assert (device.device_id, device.state) == ("AAAAAAAAAA", DeviceState.ACTIVE)
    assert (await storage.devices.get_device_list(alice)).body == b"list-body"  # type: ignore[union-attr]
    (entry,) = await storage.mailboxes.pending(f"{alice}/AAAAAAAAAA", 0, 10)
    assert (entry.seq, entry.ciphertext) == (1, b"ciphertext-1")
    # the old dedupe row still answers, and new mailbox seqs keep growing
    assert (await storage.mailboxes.deliver("bob@example.org/BBBBBBBBBB", "m1", b"D" * 32,
                                            [([f"{alice}/AAAAAAAAAA"], b"x")], 3000, 10)).status == "duplicate"
    later = await storage.mailboxes.deliver("bob@example.org/BBBBBBBBBB", "m2", b"E" * 32,
                                            [([f"{alice}/AAAAAAAAAA"], b"y")], 3000, 10,
                                            outbound=[out(1)])
    assert later.entries[0].seq == 2 and later.outbound[0].seq == 1
    await storage.aclose()
    # reopening a v2 database runs no migration again
    async with trio.open_nursery() as again:
        reopened = await open_storage(f"sqlite:///{path}", again)
        assert [e.id for e in await reopened.federation.outbound_pending(THERE)] == [eid(1)]
        await reopened.aclose()


# --- receive and deliver in one write ----------------------------------------------------------


def plan_for(e: Envelope) -> DeliveryPlan:
    return DeliveryPlan(e.sender, f"m{e.seq}", bytes(32), [([f"alice@{HERE}/AAAAAAAAAA"], e.payload)], FAR)


async def test_planned_messages_are_stored_in_the_receiving_write_and_keep_their_order(backend: Backend) -> None:
    store = backend.store
    seen: list = []
    e1, e2, e3, e4 = env(1), env(2), env(3), env(4)
    # seq 2 arrives first: held (its plan is not used later: it did not arrive with the releasing write)
    result = await (await store.federation.queue_receive(THERE, eid(900), [e2], 100,
                                                         plans={e2.id: plan_for(e2)})).result()
    assert (result.released, result.delivered, result.held) == ((), (), 1)
    # seq 1 arrives: stored in this write; seq 2 is released the ordinary way, after it
    result = await (await store.federation.queue_receive(
        THERE, eid(901), [e1], 100, plans={e1.id: plan_for(e1)}, on_commit=seen.append)).result()
    assert [(e.seq, d.status) for e, d in result.delivered] == [(1, "new")]
    assert [e.seq for e in result.released] == [2] and seen == [result]
    # seq 2 is still released-but-unprocessed: seq 3 must wait behind it, not jump ahead
    result = await (await store.federation.queue_receive(THERE, eid(902), [e3], 100,
                                                         plans={e3.id: plan_for(e3)})).result()
    assert result.delivered == () and [e.seq for e in result.released] == [3]
    await (await store.federation.queue_processed(THERE, [e2.id, e3.id])).result()
    # nothing waiting any more: stored at once again
    result = await (await store.federation.queue_receive(THERE, eid(903), [e4], 100,
                                                         plans={e4.id: plan_for(e4)})).result()
    assert [e.seq for e, _ in result.delivered] == [4] and result.released == ()
    mailbox = await store.mailboxes.pending(f"alice@{HERE}/AAAAAAAAAA", 0, 10)
    assert [(m.message_id, m.ciphertext) for m in mailbox] == [("m1", e1.payload), ("m4", e4.payload)]
    assert await store.federation.released() == []
