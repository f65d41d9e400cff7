import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from clientsdk.crypto import primitives, ratchet
from clientsdk.crypto.errors import (
    CryptoError, DecryptionFailed, InvalidKey, MalformedMessage, ReplayedMessage, TooManySkipped,
    UnsupportedVersion,
)
from clientsdk.crypto.ratchet import MAX_SKIP, RatchetMessage, RatchetState
from federation import codec
from tests.crypto.test_identity import counter_rng

AD = b"associated data"
T0 = 1_700_000_000_000
DAY = 86_400_000


def make_pair(seed=b"pair"):
    rng = counter_rng(seed)
    shared = rng(32)
    bob_spk = primitives.x25519_from_seed(rng(32))
    alice = RatchetState.initiator(shared, primitives.x25519_public_bytes(bob_spk), rng)
    bob = RatchetState.responder(shared, bob_spk)
    return alice, bob, rng


def test_round_trip_both_directions_with_dh_steps():
    alice, bob, rng = make_pair()
    for i in range(5):
        for j in range(3):
            m = f"a{i}.{j}".encode()
            assert bob.decrypt(alice.encrypt(m, AD), AD, T0, rng) == m
        for j in range(2):
            m = f"b{i}.{j}".encode()
            assert alice.decrypt(bob.encrypt(m, AD), AD, T0, rng) == m
    assert alice.skipped_count == bob.skipped_count == 0


def test_header_layout_and_tag_are_normative():
    alice, bob, rng = make_pair()
    ck_before = alice.sending_chain_key
    msg = alice.encrypt(b"x" * 300, AD)
    assert msg.header == alice.ratchet_public_key + (0).to_bytes(4, "big") + (0).to_bytes(4, "big")
    assert len(msg.tag) == 32 and len(msg.ciphertext) == 304
    mk = primitives.hmac_sha256(ck_before, b"\x01")
    assert alice.sending_chain_key == primitives.hmac_sha256(ck_before, b"\x02")
    keys = primitives.hkdf_sha256(mk, bytes(32), b"SecureChat_MessageKeys_v1", 80)
    assert msg.ciphertext == primitives.aes256_cbc_encrypt(keys[:32], keys[64:], b"x" * 300)
    assert msg.tag == primitives.hmac_sha256(keys[32:64], AD + msg.header + msg.ciphertext)
    rk, ck = ratchet.kdf_rk(b"r" * 32, b"d" * 32)
    assert rk + ck == primitives.hkdf_sha256(b"d" * 32, b"r" * 32, b"SecureChat_Ratchet_v1", 64)


def test_responder_cannot_send_first():
    _, bob, _ = make_pair()
    with pytest.raises(CryptoError):
        bob.encrypt(b"x", AD)


@settings(max_examples=40, deadline=None)
@given(st.data())
def test_random_delivery_orders_each_message_decrypts_once(data):
    alice, bob, rng = make_pair()
    parties = {"a": alice, "b": bob}
    pending = {"a": [], "b": []}        # messages in flight *to* a / b
    expected = {}
    first = alice.encrypt(b"m0", AD)
    assert bob.decrypt(first, AD, T0, rng) == b"m0"
    delivered = [first]
    counter = 1
    for _ in range(data.draw(st.integers(5, 40), label="steps")):
        action = data.draw(st.sampled_from(["send_a", "send_b", "deliver_a", "deliver_b"]))
        if action.startswith("send"):
            sender = action[-1]
            to = "b" if sender == "a" else "a"
            plaintext = f"m{counter}".encode()
            counter += 1
            msg = parties[sender].encrypt(plaintext, AD)
            expected[msg.to_bytes()] = plaintext
            pending[to].append(msg)
        else:
            to = action[-1]
            if pending[to]:
                index = data.draw(st.integers(0, len(pending[to]) - 1))
                msg = pending[to].pop(index)
                assert parties[to].decrypt(msg, AD, T0, rng) == expected[msg.to_bytes()]
                delivered.append((to, msg))
    for to in ("a", "b"):
        order = data.draw(st.permutations(pending[to]))
        for msg in order:
            assert parties[to].decrypt(msg, AD, T0, rng) == expected[msg.to_bytes()]
            delivered.append((to, msg))
    assert alice.skipped_count == 0 and bob.skipped_count == 0
    for to, msg in delivered[1:]:
        with pytest.raises((ReplayedMessage, DecryptionFailed)):
            parties[to].decrypt(msg, AD, T0, rng)


def test_every_flipped_byte_rejected_and_state_untouched():
    alice, bob, rng = make_pair()
    bob.decrypt(alice.encrypt(b"hello", AD), AD, T0, rng)
    alice.decrypt(bob.encrypt(b"reply", AD), AD, T0, rng)
    msg = alice.encrypt(b"secret payload" * 3, AD).to_bytes()
    before = bob.to_bytes()
    for i in range(len(msg)):
        for bit in (0x01, 0x80):
            forged = bytearray(msg)
            forged[i] ^= bit
            with pytest.raises((DecryptionFailed, TooManySkipped, InvalidKey, MalformedMessage)):
                bob.decrypt(RatchetMessage.from_bytes(bytes(forged)), AD, T0, rng)
            assert bob.to_bytes() == before
    with pytest.raises(DecryptionFailed):
        bob.decrypt(RatchetMessage.from_bytes(msg), b"other ad", T0, rng)
    assert bob.decrypt(RatchetMessage.from_bytes(msg), AD, T0, rng) == b"secret payload" * 3


def test_replay_rejected_current_skipped_and_old_chain():
    alice, bob, rng = make_pair()
    m0, m1, m2 = (alice.encrypt(bytes([i]), AD) for i in range(3))
    bob.decrypt(m2, AD, T0, rng)
    bob.decrypt(m0, AD, T0, rng)
    for m in (m0, m2):
        with pytest.raises(ReplayedMessage):
            bob.decrypt(m, AD, T0, rng)
    alice.decrypt(bob.encrypt(b"r", AD), AD, T0, rng)
    bob.decrypt(alice.encrypt(b"new chain", AD), AD, T0, rng)
    assert bob.decrypt(m1, AD, T0, rng) == b"\x01"      # skipped key of a finished chain
    for m in (m0, m1, m2):
        with pytest.raises(ReplayedMessage):
            bob.decrypt(m, AD, T0, rng)


def test_max_skip_per_chain():
    alice, bob, rng = make_pair()
    msgs = [alice.encrypt(b"%d" % i, AD) for i in range(MAX_SKIP + 2)]
    before = bob.to_bytes()
    with pytest.raises(TooManySkipped):
        bob.decrypt(msgs[MAX_SKIP + 1], AD, T0, rng)        # would skip 1,001 keys
    assert bob.to_bytes() == before
    assert bob.decrypt(msgs[MAX_SKIP], AD, T0, rng) == b"1000"   # exactly 1,000 skipped is allowed
    assert bob.skipped_count == MAX_SKIP
    assert bob.decrypt(msgs[0], AD, T0, rng) == b"0"


def test_max_skip_on_previous_chain_across_dh_step():
    alice, bob, rng = make_pair()
    bob.decrypt(alice.encrypt(b"first", AD), AD, T0, rng)
    alice.decrypt(bob.encrypt(b"r", AD), AD, T0, rng)
    for _ in range(MAX_SKIP + 1):
        alice.encrypt(b"lost", AD)
    alice.decrypt(bob.encrypt(b"r2", AD), AD, T0, rng)     # Alice steps; PN = 1,001
    with pytest.raises(TooManySkipped):
        bob.decrypt(alice.encrypt(b"after", AD), AD, T0, rng)


def test_skipped_store_evicts_oldest_beyond_2000():
    alice, bob, rng = make_pair()
    chains = []
    for round_ in range(3):
        msgs = [alice.encrypt(b"%d-%d" % (round_, i), AD) for i in range(MAX_SKIP + 1)]
        bob.decrypt(msgs[-1], AD, T0 + round_, rng)
        alice.decrypt(bob.encrypt(b"r", AD), AD, T0, rng)
        chains.append(msgs)
    assert bob.skipped_count == ratchet.MAX_SKIPPED_KEYS
    with pytest.raises(ReplayedMessage):
        bob.decrypt(chains[0][0], AD, T0, rng)         # evicted: oldest first
    assert bob.decrypt(chains[1][0], AD, T0, rng) == b"1-0"
    assert bob.decrypt(chains[2][999], AD, T0, rng) == b"2-999"


def test_skipped_keys_expire_after_30_days():
    alice, bob, rng = make_pair()
    m0, m1, m2 = (alice.encrypt(bytes([i]), AD) for i in range(3))
    bob.decrypt(m2, AD, T0, rng)
    assert bob.decrypt(m0, AD, T0 + 30 * DAY, rng) == b"\x00"       # 30 days is still fine
    with pytest.raises(ReplayedMessage):
        bob.decrypt(m1, AD, T0 + 30 * DAY + 1, rng)
    bob.expire(T0 + 30 * DAY + 1)
    assert bob.skipped_count == 0


def test_forward_secrecy_later_snapshot_cannot_decrypt_earlier_message():
    alice, bob, rng = make_pair()
    captured_key = ratchet.kdf_ck(alice.sending_chain_key)[1]
    captured = alice.encrypt(b"captured by the network", AD)
    bob.decrypt(captured, AD, T0, rng)
    for i in range(3):
        alice.decrypt(bob.encrypt(b"x", AD), AD, T0, rng)
        bob.decrypt(alice.encrypt(b"y", AD), AD, T0, rng)
    snapshot = bob.to_bytes()                        # the attacker seizes the device now
    assert captured_key not in snapshot
    stolen = RatchetState.from_bytes(snapshot)
    with pytest.raises((ReplayedMessage, DecryptionFailed)):
        stolen.decrypt(captured, AD, T0, rng)


def test_post_compromise_recovery():
    alice, bob, rng = make_pair()
    bob.decrypt(alice.encrypt(b"hi", AD), AD, T0, rng)
    attacker = RatchetState.from_bytes(bob.to_bytes())      # full state copied
    attacker_rng = counter_rng(b"attacker")
    leaked = alice.encrypt(b"still readable", AD)
    assert attacker.copy().decrypt(leaked, AD, T0, attacker_rng) == b"still readable"
    bob.decrypt(leaked, AD, T0, rng)
    # Bob's reply still uses the ratchet key the attacker copied, so Alice's answer
    # to it is readable too; healing needs one more fresh key from Bob.
    alice.decrypt(bob.encrypt(b"reply", AD), AD, T0, rng)
    exposed = alice.encrypt(b"answer to the copied key", AD)
    assert attacker.copy().decrypt(exposed, AD, T0, attacker_rng) == b"answer to the copied key"
    assert bob.decrypt(exposed, AD, T0, rng) == b"answer to the copied key"   # Bob draws a fresh key here
    alice.decrypt(bob.encrypt(b"again", AD), AD, T0, rng)
    healed = alice.encrypt(b"after healing", AD)
    before = attacker.to_bytes()
    with pytest.raises(DecryptionFailed):
        attacker.decrypt(healed, AD, T0, attacker_rng)
    assert attacker.to_bytes() == before
    assert bob.decrypt(healed, AD, T0, rng) == b"after healing"
    bob_reply = bob.encrypt(b"bob after healing", AD)
    assert alice.decrypt(bob_reply, AD, T0, rng) == b"bob after healing"


def test_state_serialises_mid_conversation():
    alice, bob, rng = make_pair()
    m0, m1, m2 = (alice.encrypt(bytes([i]), AD) for i in range(3))
    bob.decrypt(m2, AD, T0, rng)
    bob2 = RatchetState.from_bytes(bob.to_bytes())
    assert bob2.to_bytes() == bob.to_bytes()
    assert bob2.decrypt(m0, AD, T0, rng) == b"\x00"
    alice2 = RatchetState.from_bytes(alice.to_bytes())
    assert bob2.decrypt(alice2.encrypt(b"z", AD), AD, T0, rng) == b"z"
    assert "rk" not in repr(bob2) and bob2.root_key.hex() not in repr(bob2)


def _state_with_everything():
    """A state with all three chains, old ratchet keys and skipped keys of two chains."""
    alice, bob, rng = make_pair(b"full state")
    for round_ in range(3):
        held = [alice.encrypt(bytes([round_, i]), AD) for i in range(4)]
        bob.decrypt(held[-1], AD, T0 + round_, rng)          # skips 3 keys of this chain
        alice.decrypt(bob.encrypt(b"reply", AD), AD, T0, rng)
    return alice, bob, rng


def _legacy_map(state):
    """The version-1 map of ``state`` (what earlier releases stored), rebuilt from the v2 bytes."""
    raw = state.to_bytes()
    fixed = ratchet._STATE_FIXED
    (_, flags, dhs, dhs_pub, rk, dhr, cks, ckr, ns, nr, pn, n_old, _) = fixed.unpack_from(raw)
    old = [raw[fixed.size + 32 * i:fixed.size + 32 * (i + 1)] for i in range(n_old)]
    skipped = [list(e) for e in ratchet._SKIPPED_ENTRY.iter_unpack(raw[fixed.size + 32 * n_old:])]
    return {"v": 1, "dhs": dhs, "dhs_pub": dhs_pub, "dhr": dhr if flags & 1 else None, "rk": rk,
            "cks": cks if flags & 2 else None, "ckr": ckr if flags & 4 else None, "ns": ns, "nr": nr, "pn": pn,
            "skipped": skipped, "old_dhr": old}


def test_state_layout_round_trips_exactly():
    _, bob, _ = _state_with_everything()
    raw = bob.to_bytes()
    assert raw[0] == ratchet.STATE_VERSION == 2
    assert bob.skipped_count == 9
    assert len(raw) == ratchet._STATE_FIXED.size + 32 * 2 + ratchet._SKIPPED_ENTRY.size * 9
    again = RatchetState.from_bytes(raw)
    assert again.to_bytes() == raw
    assert (again.root_key, again.counters, again.skipped_count) == (bob.root_key, bob.counters, 9)
    assert RatchetState.from_wire(bob.to_wire()).to_bytes() == raw
    # a fresh responder has no chains and no remote key: all three flags clear
    _, fresh_bob, _ = make_pair()
    fresh = fresh_bob.to_bytes()
    assert fresh[1] == 0 and len(fresh) == ratchet._STATE_FIXED.size
    assert RatchetState.from_bytes(fresh).to_bytes() == fresh


def test_legacy_version_1_map_still_loads():
    alice, bob, rng = _state_with_everything()
    legacy = codec.encode(_legacy_map(bob))
    for loaded in (RatchetState.from_bytes(legacy), RatchetState.from_wire(_legacy_map(bob))):
        assert loaded.to_bytes() == bob.to_bytes()              # migrates to version 2 on the next write
    held = alice.encrypt(b"after migration", AD)
    assert RatchetState.from_bytes(legacy).decrypt(held, AD, T0, rng) == b"after migration"
    with pytest.raises(UnsupportedVersion):
        RatchetState.from_bytes(codec.encode({**_legacy_map(bob), "v": 3}))
    for bad in ({"rk": b"short"}, {"dhr": b"x" * 31}, {"skipped": [[b"x" * 32, -1, b"k" * 32, 0]]},
                {"ns": -1}, {"ns": 2**33}, {"old_dhr": [b"short"]}):
        with pytest.raises(MalformedMessage):
            RatchetState.from_bytes(codec.encode({**_legacy_map(bob), **bad}))
    with pytest.raises(MalformedMessage):
        RatchetState.from_bytes(b"\x81\xc1")                     # a map marker, then garbage
    with pytest.raises(MalformedMessage):
        RatchetState.from_wire("not a state")


def test_state_bad_bytes():
    _, bob, _ = _state_with_everything()
    raw = bob.to_bytes()
    fixed = ratchet._STATE_FIXED.size
    for bad in (b"", bytearray(raw), raw[:1], raw[:fixed - 1], raw[:-1], raw + b"\x00"):
        with pytest.raises(MalformedMessage):
            RatchetState.from_bytes(bad)
    for version in (0, 1, 3, 0x7F, 0xC1, 0xFF):
        with pytest.raises(UnsupportedVersion):
            RatchetState.from_bytes(bytes([version]) + raw[1:])

    def patched(offset, value):
        return raw[:offset] + value + raw[offset + len(value):]

    counters_at = 2 + 6 * 32
    bad_states = [
        patched(1, b"\x08"),                                  # unknown flag bit
        patched(1, b"\x06"),                                  # DHr flagged absent, but its filler is not zero
        patched(counters_at, (2**32 + 1).to_bytes(8, "big")),  # Ns beyond an exhausted chain
        patched(counters_at + 25, (2_001).to_bytes(2, "big")),  # too many skipped keys
        patched(counters_at + 25, (8).to_bytes(2, "big")),     # count disagrees with the length
    ]
    first_skipped = fixed + 32 * 2
    entry = ratchet._SKIPPED_ENTRY.size
    # 17 old ratchet keys, with the length to match
    bad_states.append(patched(counters_at + 24, b"\x11")[:first_skipped] + bytes(32 * 15) + raw[first_skipped:])
    bad_states.append(raw[:first_skipped + entry] + raw[first_skipped:first_skipped + entry]
                      + raw[first_skipped + 2 * entry:])     # the same skipped key twice
    for bad in bad_states:
        with pytest.raises(MalformedMessage):
            RatchetState.from_bytes(bad)


@settings(max_examples=60, deadline=None)
@given(st.data())
def test_any_truncation_or_extension_is_rejected(data):
    _, bob, _ = _state_with_everything()
    raw = bob.to_bytes()
    cut = data.draw(st.integers(0, len(raw) - 1))
    with pytest.raises(MalformedMessage):
        RatchetState.from_bytes(raw[:cut] if cut else b"")
    extra = data.draw(st.binary(min_size=1, max_size=100))
    with pytest.raises(MalformedMessage):
        RatchetState.from_bytes(raw + extra)


@pytest.mark.parametrize("length", [0, 10, 40, 87, 88 + 1, 88 + 15, 88 + 17])
def test_truncated_or_misaligned_frames(length):
    with pytest.raises(MalformedMessage):
        RatchetMessage.from_bytes(b"\x00" * length)
    RatchetMessage.from_bytes(b"\x00" * 88)   # header + one block + tag parses (and would fail auth)


def test_small_order_ratchet_key_in_header():
    alice, bob, rng = make_pair()
    bob.decrypt(alice.encrypt(b"a", AD), AD, T0, rng)
    msg = alice.encrypt(b"b", AD)
    forged = RatchetMessage(ratchet.encode_header(bytes(32), 0, 0), msg.ciphertext, msg.tag)
    with pytest.raises(InvalidKey):
        bob.decrypt(forged, AD, T0, rng)


def test_initiator_rejects_message_on_bobs_prekey_chain():
    alice, bob, rng = make_pair()
    msg = alice.encrypt(b"a", AD)
    forged = RatchetMessage(ratchet.encode_header(alice.remote_ratchet_key, 0, 0), msg.ciphertext, msg.tag)
    with pytest.raises(DecryptionFailed):
        alice.decrypt(forged, AD, T0, rng)
