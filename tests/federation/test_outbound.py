"""Outbound queue: seq numbering, batching bounds, control first, window, backoff, persistence."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from conformance.rng import counter_rng
from federation import codec
from federation.inbound import CorruptState
from federation.outbound import (
    EnvelopeDraft, EnvelopeTooLarge, OutboundConfig, OutboundQueue, backoff_delay_ms, draft,
)
from federation.s2s import EnvelopeClass, EnvelopeKind
from federation.s2s_frame import ForgedOrigin, UnsupportedVersion

ORIGIN, DEST = "example.org", "example.net"
T0 = 1_700_000_000_000
EXPIRES = T0 + 30 * 86_400_000
CONTROL, MESSAGE = EnvelopeClass.CONTROL, EnvelopeClass.MESSAGE


def add(queue, rng, cls=MESSAGE, now=T0, payload=b"x"):
    kind = EnvelopeKind.MESSAGE if cls is MESSAGE else EnvelopeKind.DEVICE_LIST
    return queue.enqueue(draft(kind, "alice@example.org/ALICEPHON2", ["bob@example.net"], payload, EXPIRES, rng),
                         cls, now)


def test_seqs_consecutive_per_class():
    rng = counter_rng("seq")
    queue = OutboundQueue(ORIGIN, DEST)
    classes = [MESSAGE, CONTROL, MESSAGE, MESSAGE, CONTROL]
    seqs = [(e.cls, e.seq) for e in (add(queue, rng, c) for c in classes)]
    assert seqs == [(MESSAGE, 1), (CONTROL, 1), (MESSAGE, 2), (MESSAGE, 3), (CONTROL, 2)]
    assert queue.depth() == 5


def test_control_goes_before_older_messages():
    rng = counter_rng("control")
    queue = OutboundQueue(ORIGIN, DEST, OutboundConfig(max_batch_envelopes=3, max_wait_ms=0))
    for _ in range(4):
        add(queue, rng, MESSAGE)
    add(queue, rng, CONTROL, now=T0 + 5)
    add(queue, rng, CONTROL, now=T0 + 6)
    batch = queue.next_batch(T0 + 10, rng)
    assert [(e.cls, e.seq) for e in batch.envelopes] == [(CONTROL, 1), (CONTROL, 2), (MESSAGE, 1)]


def test_batch_bounds_count_bytes_and_wait():
    rng = counter_rng("bounds")
    config = OutboundConfig(max_batch_envelopes=4, max_batch_bytes=1000, max_wait_ms=50, max_in_flight=100)
    queue = OutboundQueue(ORIGIN, DEST, config)
    add(queue, rng)
    assert queue.next_batch(T0 + 49, rng) is None          # waiting for the batch to fill
    assert queue.next_wakeup_ms(T0 + 10) == T0 + 50
    assert len(queue.next_batch(T0 + 50, rng).envelopes) == 1
    for _ in range(9):
        add(queue, rng, now=T0 + 100)
    assert [len(queue.next_batch(T0 + 100, rng).envelopes) for _ in range(2)] == [4, 4]   # count bound, no wait
    for _ in range(3):
        add(queue, rng, now=T0 + 200, payload=b"y" * 400)
    sizes = []
    while (batch := queue.next_batch(T0 + 300, rng)) is not None:
        sizes.append(sum(len(codec.encode(e.to_wire())) for e in batch.envelopes))
    assert len(sizes) == 3 and all(s <= 1000 for s in sizes)
    with pytest.raises(EnvelopeTooLarge):
        add(queue, rng, payload=b"z" * 1000)


def test_window_of_batches_in_flight():
    rng = counter_rng("window")
    queue = OutboundQueue(ORIGIN, DEST, OutboundConfig(max_batch_envelopes=1, max_wait_ms=0, max_in_flight=3))
    for _ in range(5):
        add(queue, rng)
    batches = [queue.next_batch(T0, rng) for _ in range(3)]
    assert all(batches) and queue.next_batch(T0, rng) is None and queue.in_flight == 3
    assert queue.next_wakeup_ms(T0) is None
    assert queue.on_ack(batches[1].txn_id)                 # a slow first batch blocks nothing
    assert queue.next_batch(T0, rng).envelopes[0].seq == 4
    assert not queue.on_ack(batches[1].txn_id)
    assert queue.depth() == 4


def test_failure_requeues_same_seqs_under_new_txn_id_with_backoff():
    rng = counter_rng("failure")
    config = OutboundConfig(max_batch_envelopes=2, max_wait_ms=0, backoff_base_ms=1000, backoff_cap_ms=8000)
    queue = OutboundQueue(ORIGIN, DEST, config)
    for _ in range(4):
        add(queue, rng)
    a = queue.next_batch(T0, rng)
    b = queue.next_batch(T0, rng)
    assert queue.on_failure(a.txn_id, T0 + 10, rng)
    first_delay = queue.next_attempt_ms - (T0 + 10)
    assert 500 <= first_delay <= 1000
    assert queue.on_failure(b.txn_id, T0 + 11, rng)       # same outage: exponent not bumped
    assert queue.next_attempt_ms == T0 + 10 + first_delay
    assert queue.next_batch(queue.next_attempt_ms - 1, rng) is None
    retry = queue.next_batch(queue.next_attempt_ms, rng)
    assert retry.txn_id not in (a.txn_id, b.txn_id)
    assert [e.seq for e in retry.envelopes] == [1, 2] and retry.envelopes == a.envelopes
    assert not queue.on_failure(a.txn_id, T0, rng)
    delays = []
    for _ in range(8):                                    # exponential, then capped
        now = queue.next_attempt_ms
        batch = queue.next_batch(now, rng)
        queue.on_failure(batch.txn_id, now + 1, rng)
        delays.append(queue.next_attempt_ms - (now + 1))
    assert delays[0] >= 1000 and max(delays) <= 8000 and delays[-1] >= 4000
    queue.on_ack(queue.next_batch(queue.next_attempt_ms, rng).txn_id)
    assert queue.next_attempt_ms == 0 and queue.depth() == 2


def test_backoff_capped_with_jitter():
    config = OutboundConfig(backoff_base_ms=100, backoff_cap_ms=10_000)
    rng = counter_rng("jitter")
    for failures in (1, 3, 7, 8, 50, 1000):
        ceiling = min(10_000, 100 * 2 ** (failures - 1))
        values = {backoff_delay_ms(failures, config, rng) for _ in range(30)}
        assert all(ceiling // 2 <= v <= ceiling for v in values)
        assert len(values) > 5                            # jittered, not a fixed delay


def test_depth_and_oldest_age():
    rng = counter_rng("age")
    queue = OutboundQueue(ORIGIN, DEST, OutboundConfig(max_wait_ms=0))
    assert (queue.depth(), queue.oldest_age_ms(T0)) == (0, 0)
    add(queue, rng, now=T0)
    add(queue, rng, now=T0 + 500)
    batch = queue.next_batch(T0 + 1000, rng)
    assert (queue.depth(), queue.oldest_age_ms(T0 + 2000)) == (2, 2000)
    queue.on_ack(batch.txn_id)
    assert (queue.depth(), queue.oldest_age_ms(T0 + 2000)) == (0, 0)


def test_enqueue_refuses_foreign_sender_and_bad_envelopes():
    rng = counter_rng("refuse")
    queue = OutboundQueue(ORIGIN, DEST)
    with pytest.raises(ForgedOrigin):
        queue.enqueue(draft(EnvelopeKind.MESSAGE, "eve@example.com", ["bob@example.net"], b"", EXPIRES, rng),
                      MESSAGE, T0)
    with pytest.raises(ValueError):
        queue.enqueue(EnvelopeDraft(b"short", EnvelopeKind.MESSAGE, "a@example.org", ("b@example.net",), b"",
                                    EXPIRES), MESSAGE, T0)
    env = add(queue, rng)
    with pytest.raises(ValueError):
        queue.enqueue(EnvelopeDraft(env.id, env.kind, env.sender, env.recipients, b"", EXPIRES), MESSAGE, T0)
    assert add(queue, rng).seq == 2                        # refusals consumed no seq


@settings(max_examples=40, deadline=None)
@given(st.lists(st.sampled_from(["enqueue_c", "enqueue_m", "batch", "ack", "fail", "restore", "tick"]),
                max_size=60), st.randoms(use_true_random=False))
def test_nothing_lost_or_duplicated_across_restore(ops, random):
    rng = counter_rng(b"ops-%d" % random.getrandbits(32))
    config = OutboundConfig(max_batch_envelopes=3, max_wait_ms=0, max_in_flight=2, backoff_base_ms=10,
                            backoff_cap_ms=100)
    queue = OutboundQueue(ORIGIN, DEST, config)
    now = T0
    enqueued, acked, in_flight = {}, {}, []
    for op in ops:
        now += 7
        if op.startswith("enqueue"):
            env = add(queue, rng, CONTROL if op == "enqueue_c" else MESSAGE, now)
            enqueued[env.id] = env
        elif op == "batch" and (batch := queue.next_batch(now, rng)):
            in_flight.append(batch)
        elif op in ("ack", "fail") and in_flight:
            batch = in_flight.pop(random.randrange(len(in_flight)))
            if op == "ack" and queue.on_ack(batch.txn_id):
                for env in batch.envelopes:
                    assert env.id not in acked
                    acked[env.id] = env
            elif op == "fail":
                queue.on_failure(batch.txn_id, now, rng)
        elif op == "restore":
            queue = OutboundQueue.from_bytes(queue.to_bytes(), config)
            in_flight.clear()                              # outcome unknown: everything is resent
        elif op == "tick":
            now += 1000
        assert queue.depth() == len(enqueued) - len(acked)
    now += 10_000
    for batch in in_flight:                                # the still-outstanding attempts fail
        queue.on_failure(batch.txn_id, now, rng)
    now += 10_000
    while queue.depth():
        batch = queue.next_batch(now, rng)
        assert queue.on_ack(batch.txn_id)
        for env in batch.envelopes:
            assert env.id not in acked
            acked[env.id] = env
    assert acked == enqueued
    for cls in EnvelopeClass:
        assert sorted(e.seq for e in enqueued.values() if e.cls is cls) == \
            list(range(1, 1 + sum(e.cls is cls for e in enqueued.values())))


def test_restore_keeps_seqs_and_backoff_and_checks_version():
    rng = counter_rng("restore")
    queue = OutboundQueue(ORIGIN, DEST, OutboundConfig(max_wait_ms=0))
    add(queue, rng)
    batch = queue.next_batch(T0, rng)
    queue.on_failure(batch.txn_id, T0, rng)
    restored = OutboundQueue.from_bytes(queue.to_bytes())
    assert restored.next_attempt_ms == queue.next_attempt_ms and restored.depth() == 1
    assert add(restored, rng).seq == 2
    obj = codec.decode(queue.to_bytes())
    with pytest.raises(UnsupportedVersion):
        OutboundQueue.from_bytes(codec.encode({**obj, "v": 9}))
    with pytest.raises(CorruptState):
        OutboundQueue.from_bytes(codec.encode({**obj, "unacked": [1]}))


def test_storage_numbered_envelopes_and_restore_from_rows():
    """The homeserver numbers envelopes in its database write; the queue checks and sends them."""
    rng = counter_rng("rows")
    numbering = OutboundQueue(ORIGIN, DEST)            # stands in for storage's counters
    envs = [add(numbering, rng, c) for c in (MESSAGE, CONTROL, MESSAGE)]
    queue = OutboundQueue(ORIGIN, DEST, OutboundConfig(max_wait_ms=0))
    for env in envs:
        queue.add(env)
    with pytest.raises(ValueError):
        queue.add(envs[0])                              # same seq again: numbering diverged
    batch = queue.next_batch(T0, rng)
    assert [(e.cls, e.seq) for e in batch.envelopes] == [(CONTROL, 1), (MESSAGE, 1), (MESSAGE, 2)]
    queue.on_failure(batch.txn_id, T0, rng)
    failures, next_attempt, last_failure = queue.backoff_state
    restored = OutboundQueue.restore(ORIGIN, DEST, next_seq={CONTROL: 2, MESSAGE: 3}, failures=failures,
                                     next_attempt_ms=next_attempt, last_failure_ms=last_failure,
                                     envelopes=envs, config=OutboundConfig(max_wait_ms=0))
    assert restored.depth() == 3 and restored.next_attempt_ms == next_attempt
    assert restored.next_batch(next_attempt - 1, rng) is None
    again = restored.next_batch(next_attempt, rng)
    assert [e.seq for e in again.envelopes] == [1, 1, 2]
    restored.add(add(numbering, rng, MESSAGE))         # numbering continues at MESSAGE 3
