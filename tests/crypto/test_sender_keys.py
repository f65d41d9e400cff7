
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from clientsdk.crypto import sender_keys as sk
from clientsdk.crypto.errors import (
    DecryptionFailed,
    MalformedMessage,
    ReplayedMessage,
    TooManySkipped,
    UnsupportedVersion,
)
from clientsdk.crypto.sender_keys import (
    Distribution,
    GroupMessage,
    InboundSenderKey,
    OutboundSenderKey,
    UnknownSenderKey,
)
from federation import codec, signing
from federation.signing import Purpose
from conformance.rng import counter_rng as seeded_rng

NOW = 1_700_000_000_000
DAY = 24 * 3600 * 1000
GROUP = bytes(range(32))


def pair(seed=b"pair", epoch=0):
    sender = OutboundSenderKey.create(GROUP, epoch, seeded_rng(seed))
    receiver = InboundSenderKey.from_distribution(sender.distribution().to_bytes())
    return sender, receiver


def test_round_trip_and_content():
    sender, receiver = pair()
    for i in range(5):
        msg = sender.encrypt(b"hello %d" % i, epoch=0)
        out = receiver.decrypt(msg, NOW)
        assert (out.body, out.epoch, out.iteration, out.group_id) == (b"hello %d" % i, 0, i, GROUP)


def test_message_carries_no_group_id_in_the_clear():
    sender, _ = pair()
    msg = sender.encrypt(b"x", epoch=0)
    assert GROUP not in msg
    assert set(codec.decode(msg)) == {"v", "key_id", "iteration", "ciphertext", "signature"}


def test_signature_is_purpose_bound_and_over_the_header():
    sender, receiver = pair()
    msg = GroupMessage.from_bytes(sender.encrypt(b"x", epoch=0))
    signing.verify(sender.signing_public_key, Purpose.SENDER_KEY, msg.signed_fields(), msg.signature)
    seed = sender.to_bytes()
    key = sk.Ed25519PrivateKey.from_private_bytes(codec.decode(seed)["signing_seed"])
    for purpose in Purpose:
        if purpose is Purpose.SENDER_KEY:
            continue
        forged = GroupMessage(msg.key_id, msg.iteration, msg.ciphertext,
                              signing.sign(key, purpose, msg.signed_fields()))
        with pytest.raises(DecryptionFailed):
            receiver.decrypt(forged.to_bytes(), NOW)
    assert receiver.decrypt(msg, NOW).body == b"x"


def test_every_flipped_byte_is_rejected_and_state_untouched():
    sender, receiver = pair()
    msg = sender.encrypt(b"payload", epoch=0)
    before = receiver.to_bytes()
    for i in range(len(msg)):
        for bit in (0x01, 0x80):
            bad = msg[:i] + bytes([msg[i] ^ bit]) + msg[i + 1:]
            with pytest.raises((DecryptionFailed, MalformedMessage, UnsupportedVersion, ReplayedMessage,
                                TooManySkipped)):
                receiver.decrypt(bad, NOW)
            assert receiver.to_bytes() == before
    assert receiver.decrypt(msg, NOW).body == b"payload"


def test_replay_rejected_in_order_and_out_of_order():
    sender, receiver = pair()
    m0, m1, m2 = (sender.encrypt(b"%d" % i, epoch=0) for i in range(3))
    receiver.decrypt(m0, NOW)
    with pytest.raises(ReplayedMessage):
        receiver.decrypt(m0, NOW)
    receiver.decrypt(m2, NOW)
    receiver.decrypt(m1, NOW)
    for m in (m0, m1, m2):
        with pytest.raises(ReplayedMessage):
            receiver.decrypt(m, NOW)


@settings(max_examples=30, deadline=None)
@given(st.permutations(range(12)), st.lists(st.integers(0, 11), max_size=6))
def test_any_delivery_order_decrypts_each_message_exactly_once(order, replays):
    sender, receiver = pair(b"hyp")
    messages = [sender.encrypt(b"m%d" % i, epoch=0) for i in range(12)]
    seen = []
    delivered = set()
    for position, index in enumerate(order):
        seen.append(receiver.decrypt(messages[index], NOW + position).body)
        delivered.add(index)
        for r in replays:
            if r in delivered:
                with pytest.raises(ReplayedMessage):
                    receiver.decrypt(messages[r], NOW)
        state = InboundSenderKey.from_bytes(receiver.to_bytes())
        assert state.to_bytes() == receiver.to_bytes()
        receiver = state
    assert sorted(seen) == sorted(b"m%d" % i for i in range(12))
    assert receiver.skipped_count == 0


def test_gap_over_max_skip_rejected_and_state_untouched():
    sender, receiver = pair()
    for _ in range(sk.MAX_SKIP + 1):
        sender.encrypt(b"", epoch=0)
    far = sender.encrypt(b"far", epoch=0)
    before = receiver.to_bytes()
    with pytest.raises(TooManySkipped):
        receiver.decrypt(far, NOW)
    assert receiver.to_bytes() == before


def test_gap_of_exactly_max_skip_accepted():
    sender, receiver = pair()
    early = [sender.encrypt(b"e%d" % i, epoch=0) for i in range(sk.MAX_SKIP)]
    assert receiver.decrypt(sender.encrypt(b"last", epoch=0), NOW).body == b"last"
    assert receiver.skipped_count == sk.MAX_SKIP
    assert receiver.decrypt(early[0], NOW).body == b"e0"


def test_stored_skipped_keys_bounded_oldest_evicted():
    sender, receiver = pair()
    messages = [sender.encrypt(b"%d" % i, epoch=0) for i in range(2 * sk.MAX_SKIP + 3)]
    receiver.decrypt(messages[1000], NOW)      # skips 0..999
    receiver.decrypt(messages[2001], NOW)      # skips 1001..2000 -> 2000 stored
    assert receiver.skipped_count == sk.MAX_STORED_SKIPPED
    receiver.decrypt(messages[2002 + 0], NOW)  # no skip
    assert receiver.skipped_count == sk.MAX_STORED_SKIPPED
    assert receiver.decrypt(messages[0], NOW).body == b"0"
    # once full, skipping more evicts the oldest
    sender2, receiver2 = pair(b"evict")
    msgs2 = [sender2.encrypt(b"%d" % i, epoch=0) for i in range(3 * sk.MAX_SKIP + 3)]
    receiver2.decrypt(msgs2[1000], NOW)
    receiver2.decrypt(msgs2[2001], NOW)
    receiver2.decrypt(msgs2[2010], NOW)        # 9 more skipped -> 9 oldest evicted
    assert receiver2.skipped_count == sk.MAX_STORED_SKIPPED
    with pytest.raises(ReplayedMessage):
        receiver2.decrypt(msgs2[0], NOW)
    assert receiver2.decrypt(msgs2[9], NOW).body == b"9"


def test_skipped_keys_expire_after_30_days():
    sender, receiver = pair()
    m0, m1 = sender.encrypt(b"0", epoch=0), sender.encrypt(b"1", epoch=0)
    receiver.decrypt(m1, NOW)
    with pytest.raises(ReplayedMessage):
        InboundSenderKey.from_bytes(receiver.to_bytes()).decrypt(m0, NOW + 30 * DAY + 1)
    assert receiver.decrypt(m0, NOW + 30 * DAY).body == b"0"


def test_rotation_new_key_id_and_old_receiver_cannot_read():
    sender, receiver = pair()
    receiver.decrypt(sender.encrypt(b"old", epoch=0), NOW)
    rotated = sender.rotate(1, seeded_rng(b"rot"))
    assert rotated.key_id != sender.key_id
    assert rotated.signing_public_key != sender.signing_public_key
    assert rotated.epoch == 1 and rotated.iteration == 0
    fresh = InboundSenderKey.from_distribution(rotated.distribution())
    new_msg = rotated.encrypt(b"new", epoch=1)
    with pytest.raises(UnknownSenderKey):
        receiver.decrypt(new_msg, NOW)
    assert fresh.decrypt(new_msg, NOW).body == b"new"


def test_late_joiner_cannot_read_earlier_messages():
    sender, _ = pair()
    early = sender.encrypt(b"before you joined", epoch=0)
    joiner = InboundSenderKey.from_distribution(sender.distribution())
    with pytest.raises(ReplayedMessage):
        joiner.decrypt(early, NOW)
    assert joiner.decrypt(sender.encrypt(b"after", epoch=1), NOW).epoch == 1


def test_content_of_another_group_or_older_epoch_rejected():
    sender, receiver = pair(epoch=3)
    # a chain whose distribution lies about the group: content check fails
    liar = InboundSenderKey.from_distribution(
        Distribution(bytes(32), 3, sender.key_id, 0, codec.decode(sender.to_bytes())["chain_key"],
                     sender.signing_public_key))
    msg = sender.encrypt(b"x", epoch=3)
    with pytest.raises(DecryptionFailed):
        liar.decrypt(msg, NOW)
    with pytest.raises(sk.CryptoError):
        sender.encrypt(b"x", epoch=2)
    assert receiver.decrypt(msg, NOW).epoch == 3


def test_state_serialisation_round_trip_and_versions():
    sender, receiver = pair()
    msgs = [sender.encrypt(b"%d" % i, epoch=0) for i in range(4)]
    receiver.decrypt(msgs[3], NOW)
    sender2 = OutboundSenderKey.from_bytes(sender.to_bytes())
    receiver2 = InboundSenderKey.from_bytes(receiver.to_bytes())
    assert receiver2.decrypt(sender2.encrypt(b"next", epoch=0), NOW).body == b"next"
    assert receiver2.decrypt(msgs[1], NOW).body == b"1"
    for state, cls in ((sender.to_bytes(), OutboundSenderKey), (receiver.to_bytes(), InboundSenderKey)):
        obj = codec.decode(state)
        with pytest.raises(UnsupportedVersion):
            cls.from_bytes(codec.encode({**obj, "v": 2}))
        with pytest.raises(MalformedMessage):
            cls.from_bytes(state[:-1])
    with pytest.raises(MalformedMessage):
        OutboundSenderKey.from_bytes(receiver.to_bytes())
    with pytest.raises(MalformedMessage):
        InboundSenderKey.from_bytes(sender.to_bytes())


def test_distribution_parsing_rejects_bad_input():
    sender, _ = pair()
    good = sender.distribution().to_bytes()
    assert Distribution.from_bytes(good) == sender.distribution()
    obj = codec.decode(good)
    with pytest.raises(UnsupportedVersion):
        Distribution.from_bytes(codec.encode({**obj, "v": 9}))
    with pytest.raises(MalformedMessage):
        Distribution.from_bytes(codec.encode({**obj, "chain_key": b"short"}))
    with pytest.raises(MalformedMessage):
        Distribution.from_bytes(codec.encode({**obj, "extra": 1}))
    with pytest.raises(MalformedMessage):
        Distribution.from_bytes(good + b"\x00")
    with pytest.raises(MalformedMessage):
        Distribution.from_bytes(b"")
    assert sender.distribution().chain_key.hex() not in repr(sender.distribution())


def test_errors_carry_no_secret_material():
    sender, receiver = pair()
    msg = sender.encrypt(b"secret plaintext", epoch=0)
    ciphertext = GroupMessage.from_bytes(msg).ciphertext
    bad = msg.replace(ciphertext, ciphertext[:-1] + bytes([ciphertext[-1] ^ 1]))
    with pytest.raises(DecryptionFailed) as info:
        receiver.decrypt(bad, NOW)
    text = str(info.value)
    assert "secret" not in text and sender.distribution().chain_key.hex() not in text
