"""The send lease: sends inside a durable reservation need no fsync, and no message key is reused.

A power cut rolls the sender's store back to its last fsynced write.  These tests keep
that write as ``synced`` (updated only where the SDK fsyncs: a renewed lease, a
received message, a clean close) and restart from it.
"""

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from clientsdk.crypto.errors import MalformedMessage, TooManySkipped
from clientsdk.crypto.ratchet import MAX_SKIP, RatchetMessage
from clientsdk.crypto.session import SEND_LEASE, Session, parse_message
from federation import codec
from tests.crypto.test_session import T0, accept, start


def header(wire: bytes) -> tuple[bytes, int]:
    message = RatchetMessage.from_bytes(parse_message(wire).body)
    return message.ratchet_key, message.number


class Sender:
    """Alice as the SDK drives her: what she has sent, and the state a power cut returns to."""

    def __init__(self, session: Session) -> None:
        self.session = session
        self.synced = session.to_bytes()
        self.used: set[tuple[bytes, int]] = set()

    def send(self, text: bytes) -> bytes:
        durable = self.session.renew_send_lease()
        wire = self.session.encrypt(text)
        if durable:                       # fsynced before the ciphertext leaves
            self.synced = self.session.to_bytes()
        key = header(wire)
        assert key not in self.used, "a message key was used twice"
        self.used.add(key)
        return wire

    def receive(self, wire: bytes, rng) -> bytes:
        plaintext = self.session.decrypt(wire, T0, rng)
        self.synced = self.session.to_bytes()          # received: stored durably before the ack
        return plaintext

    def power_cut(self) -> bool:
        self.session = Session.from_bytes(self.synced)
        return self.session.recover_send_lease()

    def clean_restart(self) -> bool:
        self.session.release_send_lease()
        self.synced = self.session.to_bytes()
        return self.power_cut()


def test_one_durable_write_per_lease_of_sends():
    alice, _, _ = start()
    renewed = []
    for _ in range(3 * SEND_LEASE):
        renewed.append(alice.renew_send_lease())
        alice.encrypt(b"x")
    assert [i for i, r in enumerate(renewed) if r] == [0, SEND_LEASE, 2 * SEND_LEASE]


def test_a_power_cut_skips_the_reservation_and_the_receiver_reads_on():
    session, bob, rng = start()
    alice = Sender(session)
    sent = [alice.send(b"m%d" % i) for i in range(5)]
    bob_session, first = accept(bob, sent[0], rng)
    assert alice.power_cut()                        # the store only knew message 0's reservation
    assert alice.session.ratchet.counters[0] == SEND_LEASE
    after = alice.send(b"after")
    assert header(after)[1] == SEND_LEASE
    assert [first] + [bob_session.decrypt(w, T0, rng) for w in sent[1:] + [after]] \
        == [b"m0", b"m1", b"m2", b"m3", b"m4", b"after"]
    assert bob_session.ratchet.skipped_count == SEND_LEASE - 5      # the reserved keys that never left


def test_a_clean_restart_skips_nothing():
    session, bob, rng = start()
    alice = Sender(session)
    bob_session, _ = accept(bob, alice.send(b"m0"), rng)
    alice.send(b"m1")
    assert not alice.clean_restart()
    assert header(alice.send(b"m2"))[1] == 2


def test_a_dh_step_starts_a_new_chain_with_a_fresh_reservation():
    session, bob, rng = start()
    alice = Sender(session)
    bob_session, _ = accept(bob, alice.send(b"m0"), rng)
    for _ in range(2 * SEND_LEASE):                        # a long first chain: its lease is far ahead
        alice.send(b"more")
    alice.receive(bob_session.encrypt(b"reply"), rng)      # a new sending chain, stored durably
    assert not alice.session.renew_send_lease()           # its first send needs no fsync of its own
    assert alice.power_cut()
    assert alice.session.ratchet.counters[0] == SEND_LEASE  # not the old chain's 3 × SEND_LEASE
    assert Session.from_bytes(alice.session.to_bytes()).to_bytes() == alice.session.to_bytes()


def test_stored_lease_is_checked():
    alice, _, _ = start()
    state = codec.decode(alice.to_bytes())
    del state["send_lease"]                         # written before leases existed: nothing reserved
    old = Session.from_bytes(codec.encode(state))
    assert not old.recover_send_lease() and old.renew_send_lease()
    for bad in (-1, 2**32, "7"):
        with pytest.raises(MalformedMessage):
            Session.from_bytes(codec.encode({**state, "send_lease": bad}))


def test_a_reservation_beyond_max_skip_cannot_be_skipped():
    alice, _, _ = start()
    state = codec.decode(alice.to_bytes())
    damaged = Session.from_bytes(codec.encode({**state, "send_lease": MAX_SKIP + 1}))
    with pytest.raises(TooManySkipped):
        damaged.recover_send_lease()


@settings(max_examples=60, deadline=None)
@given(st.lists(st.sampled_from(["send", "send", "send", "deliver", "reply", "power_cut", "clean_restart"]),
                max_size=120), st.integers(0, 2**32))
def test_no_key_is_reused_and_every_sent_message_is_read(ops, seed):
    """Any mix of sends, replies, deliveries in any order, power cuts and restarts."""
    session, bob, rng = start()
    alice = Sender(session)
    first = alice.send(b"0")
    bob_session, plaintext = accept(bob, first, rng)
    assert plaintext == b"0"
    shuffle = random.Random(seed)
    in_flight: list[tuple[bytes, bytes]] = []
    count = 1
    for op in ops:
        if op == "send":
            text = b"%d" % count
            count += 1
            in_flight.append((alice.send(text), text))
        elif op == "deliver" and in_flight:
            wire, text = in_flight.pop(shuffle.randrange(len(in_flight)))
            assert bob_session.decrypt(wire, T0, rng) == text
        elif op == "reply":
            assert alice.receive(bob_session.encrypt(b"r"), rng) == b"r"
        elif op == "power_cut":
            alice.power_cut()
        elif op == "clean_restart":
            assert not alice.clean_restart()
    for wire, text in in_flight:
        assert bob_session.decrypt(wire, T0, rng) == text
