"""Inbound ordering: dedupe by txn id, envelope id and seq; hold-back until gaps fill."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from conformance.rng import counter_rng
from federation.inbound import TXN_ID_TTL_MS, CorruptState, HoldBackFull, InboundState
from federation.outbound import EnvelopeDraft, OutboundConfig, OutboundQueue
from federation.s2s import EnvelopeClass, EnvelopeKind, Transaction
from federation.s2s_frame import UnsupportedVersion

ORIGIN, DEST = "example.org", "example.net"
T0 = 1_700_000_000_000
TTL = 30 * 86_400_000
CONTROL, MESSAGE = EnvelopeClass.CONTROL, EnvelopeClass.MESSAGE


def make_queue(n_control, n_message, rng, *, batch=3):
    queue = OutboundQueue(ORIGIN, DEST, OutboundConfig(max_batch_envelopes=batch, max_wait_ms=0, max_in_flight=1000))
    for i in range(n_control + n_message):
        cls = CONTROL if i < n_control else MESSAGE
        kind = EnvelopeKind.DEVICE_LIST if cls is CONTROL else EnvelopeKind.MESSAGE
        queue.enqueue(EnvelopeDraft(rng(16), kind, "alice@example.org", ("bob@example.net",), b"p%d" % i,
                                    T0 + TTL), cls, T0)
    return queue


def txn_of(batch, ts=T0):
    return Transaction(ORIGIN, DEST, ts, batch.txn_id, tuple(batch.envelopes))


def drain(queue, rng, now=T0):
    out = []
    while (batch := queue.next_batch(now, rng)) is not None:
        out.append(txn_of(batch))
    return out


def released_seqs(results):
    seqs = {CONTROL: [], MESSAGE: []}
    for result in results:
        for env in result.release:
            seqs[env.cls].append(env.seq)
    return seqs


@settings(max_examples=60, deadline=None)
@given(st.integers(0, 8), st.integers(1, 15), st.integers(1, 4), st.randoms(use_true_random=False),
       st.lists(st.integers(0, 100), max_size=10), st.integers(0, 3))
def test_any_delivery_order_with_duplicates_and_retries_releases_each_once_in_order(
        n_control, n_message, batch, random, dup_picks, n_retries):
    rng = counter_rng(b"inbound-%d" % random.getrandbits(32))
    queue = make_queue(n_control, n_message, rng, batch=batch)
    txns = drain(queue, rng)
    # Some attempts "fail" at the origin although they arrive later: retried under new ids.
    for txn in random.sample(txns, min(n_retries, len(txns))):
        queue.on_failure(txn.txn_id, T0, rng)
    retries = drain(queue, rng, now=T0 + 10 * 60_000)
    deliveries = txns + retries + [txns[i % len(txns)] for i in dup_picks]
    random.shuffle(deliveries)
    state = InboundState(ORIGIN)
    results = [state.accept(t, T0 + 1) for t in deliveries]
    seqs = released_seqs(results)
    assert seqs[CONTROL] == list(range(1, n_control + 1))
    assert seqs[MESSAGE] == list(range(1, n_message + 1))
    assert state.held_count() == 0
    assert sum(r.duplicate for r in results) == len(deliveries) - len({t.txn_id for t in deliveries})


def test_retried_transaction_arriving_after_a_later_one_is_released_in_order():
    rng = counter_rng("retry")
    queue = make_queue(0, 6, rng)
    first, second = drain(queue, rng)                     # seqs 1-3 and 4-6
    queue.on_failure(first.txn_id, T0, rng)               # the origin times out on the first
    (retry,) = drain(queue, rng, now=T0 + 60_000)         # same envelopes, new txn id
    assert retry.txn_id != first.txn_id and retry.envelopes == first.envelopes
    state = InboundState(ORIGIN)
    held = state.accept(second, T0)
    assert (held.duplicate, held.release, state.held_count()) == (False, [], 3)
    filled = state.accept(retry, T0)
    assert [e.seq for e in filled.release] == [1, 2, 3, 4, 5, 6]
    late = state.accept(first, T0)                        # the original finally arrives
    assert (late.duplicate, late.release) == (False, [])


def test_control_released_independently_of_a_message_gap():
    rng = counter_rng("classes")
    queue = make_queue(2, 4, rng, batch=2)
    control, m12, m34 = drain(queue, rng)
    state = InboundState(ORIGIN)
    assert state.accept(m34, T0).release == []
    assert [e.cls for e in state.accept(control, T0).release] == [CONTROL, CONTROL]
    assert [e.seq for e in state.accept(m12, T0).release] == [1, 2, 3, 4]


def test_hold_back_is_bounded_and_refusal_leaves_state_unchanged():
    rng = counter_rng("bound")
    queue = make_queue(0, 9, rng)
    a, b, c = drain(queue, rng)
    state = InboundState(ORIGIN, max_held=4)
    state.accept(b, T0)
    before = state.to_bytes()
    with pytest.raises(HoldBackFull):
        state.accept(c, T0)
    assert state.to_bytes() == before
    assert [e.seq for e in state.accept(a, T0).release] == [1, 2, 3, 4, 5, 6]
    assert [e.seq for e in state.accept(c, T0).release] == [7, 8, 9]


def test_envelope_id_dedupe_across_transactions_and_expiry():
    rng = counter_rng("ids")
    queue = make_queue(0, 2, rng, batch=2)
    (txn,) = drain(queue, rng)
    state = InboundState(ORIGIN)
    state.accept(Transaction(ORIGIN, DEST, T0, b"A" * 16, txn.envelopes[1:]), T0)    # seq 2 held
    result = state.accept(Transaction(ORIGIN, DEST, T0, b"B" * 16, txn.envelopes), T0)
    assert [e.seq for e in result.release] == [1, 2]
    state.expire(T0 + TXN_ID_TTL_MS - 1)
    assert state.accept(Transaction(ORIGIN, DEST, T0, b"A" * 16, ()), T0).duplicate
    state.expire(T0 + TXN_ID_TTL_MS + 1)
    assert not state.accept(Transaction(ORIGIN, DEST, T0, b"A" * 16, ()), T0).duplicate
    state.expire(T0 + TTL + 1)
    assert state.to_bytes() == InboundState.from_bytes(state.to_bytes()).to_bytes()


def test_expired_envelopes_advance_seq_but_are_not_released():
    rng = counter_rng("expired")
    queue = make_queue(0, 3, rng)
    (txn,) = drain(queue, rng)
    result = InboundState(ORIGIN).accept(txn, T0 + TTL)
    assert result.release == []


def test_state_round_trip_mid_gap_and_version_check():
    rng = counter_rng("persist")
    queue = make_queue(1, 6, rng)
    t1, t2, t3 = drain(queue, rng)                        # [c1, m1, m2], [m3, m4, m5], [m6]
    state = InboundState(ORIGIN)
    state.accept(t2, T0)
    restored = InboundState.from_bytes(state.to_bytes())
    assert restored.accept(t2, T0).duplicate
    assert [e.seq for e in restored.accept(t1, T0).release] == [1, 1, 2, 3, 4, 5]
    assert [e.seq for e in restored.accept(t3, T0).release] == [6]
    from federation import codec
    obj = codec.decode(state.to_bytes(), codec.Limits(max_bytes=1 << 24))
    with pytest.raises(UnsupportedVersion):
        InboundState.from_bytes(codec.encode({**obj, "v": 2}))
    with pytest.raises(CorruptState):
        InboundState.from_bytes(codec.encode({**obj, "held": [{"x": 1}]}))


def test_misuse_is_a_local_error():
    with pytest.raises(ValueError):
        InboundState("example.com").accept(Transaction(ORIGIN, DEST, T0, b"A" * 16, ()), T0)
    with pytest.raises(ValueError):
        InboundState(ORIGIN, txn_ttl_ms=1000)
