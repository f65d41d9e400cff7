import hashlib

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import given, settings
from hypothesis import strategies as st

from clientsdk.crypto import group_state as gs
from clientsdk.crypto.errors import GroupStateError, MalformedMessage, UnsupportedVersion
from clientsdk.crypto.group_session import GroupSession
from clientsdk.crypto.group_state import (
    BadChangeSignature,
    ChangeNotApplicable,
    ChangeOp,
    ControlStatus,
    GroupReplica,
    GroupState,
    NotAdmin,
    NotMember,
    SignedChange,
    WrongBase,
    WrongGroup,
    apply_change,
    create_change,
)
from clientsdk.crypto.sender_keys import OutboundSenderKey, UnknownSenderKey
from federation import codec, signing
from federation.addresses import DeviceAddress, UserAddress
from federation.signing import Purpose
from conformance.rng import counter_rng as seeded_rng

NOW = 1_700_000_000_000
NAMES = ["alice", "bob", "carol", "dave", "erin"]
USERS = {n: UserAddress.parse(f"{n}@example.org") for n in NAMES}
DEVICES = {n: USERS[n].device("AAAAAAAAA" + "BCDEF"[i]) for i, n in enumerate(NAMES)}
KEYS = {n: Ed25519PrivateKey.from_private_bytes(hashlib.sha256(n.encode()).digest()) for n in NAMES}
DIRECTORY = {DEVICES[n]: signing.public_bytes(KEYS[n]) for n in NAMES}


def resolver(device: DeviceAddress) -> bytes | None:
    return DIRECTORY.get(device)


def genesis() -> GroupState:
    state = GroupState.new("friends", USERS["alice"], [USERS["bob"], USERS["carol"]], seeded_rng(b"group"))
    # make bob an admin at epoch 1 so two admins exist
    change = create_change(state, ChangeOp.ADD_ADMIN, "bob@example.org", DEVICES["alice"], KEYS["alice"])
    return apply_change(state, change, resolver)


def replicas(state, names=("alice", "bob", "carol")):
    return {n: GroupReplica(state, DEVICES[n]) for n in names}


def test_state_bytes_hash_and_round_trip():
    state = genesis()
    assert state.epoch == 1 and state.admins == (USERS["alice"], USERS["bob"])
    assert GroupState.from_bytes(state.to_bytes()) == state
    assert state.hash() == hashlib.sha256(state.to_bytes()).digest()
    assert state.prev_hash != bytes(32)
    obj = codec.decode(state.to_bytes())
    with pytest.raises(UnsupportedVersion):
        GroupState.from_bytes(codec.encode({**obj, "v": 2}))
    with pytest.raises(MalformedMessage):
        GroupState.from_bytes(codec.encode({**obj, "admins": ["zed@example.org"]}))
    with pytest.raises(MalformedMessage):
        GroupState.from_bytes(codec.encode({**obj, "members": list(reversed(obj["members"]))}))
    assert state.group_id.hex() not in repr(state)


def test_each_change_kind_applies_and_chains_hashes():
    state = genesis()
    steps = [(ChangeOp.ADD_MEMBER, "dave@example.org"), (ChangeOp.RENAME, "best friends"),
             (ChangeOp.ADD_ADMIN, "dave@example.org"), (ChangeOp.REMOVE_ADMIN, "alice@example.org"),
             (ChangeOp.REMOVE_MEMBER, "carol@example.org")]
    for op, target in steps:
        change = create_change(state, op, target, DEVICES["bob"], KEYS["bob"])
        nxt = apply_change(state, change, resolver)
        assert nxt.epoch == state.epoch + 1 and nxt.prev_hash == state.hash()
        assert SignedChange.from_bytes(change.to_bytes()) == change
        state = nxt
    assert state.name == "best friends"
    assert state.members == (USERS["alice"], USERS["bob"], USERS["dave"])
    assert state.admins == (USERS["bob"], USERS["dave"])
    assert state.key_epoch == state.epoch          # the removal moved the key epoch


def test_change_by_non_admin_rejected():
    state = genesis()
    with pytest.raises(NotAdmin):
        create_change(state, ChangeOp.RENAME, "mine", DEVICES["carol"], KEYS["carol"])
    forged = SignedChange.sign(gs.Change(state.group_id, state.epoch, state.hash(), ChangeOp.RENAME, "mine",
                                         DEVICES["carol"]), KEYS["carol"])
    with pytest.raises(NotAdmin):
        apply_change(state, forged, resolver)


def test_signing_device_must_be_in_the_admins_device_list():
    state = genesis()
    rogue = USERS["alice"].device("ZZZZZZZZZZ")        # not in alice's verified device list
    change = SignedChange.sign(gs.Change(state.group_id, state.epoch, state.hash(), ChangeOp.RENAME, "x",
                                         rogue), KEYS["alice"])
    with pytest.raises(NotAdmin):
        apply_change(state, change, resolver)


def test_bad_signature_and_wrong_purpose_rejected():
    state = genesis()
    change = create_change(state, ChangeOp.RENAME, "x", DEVICES["alice"], KEYS["alice"])
    tampered = SignedChange(change.change, change.body, bytes([change.signature[0] ^ 1]) + change.signature[1:])
    with pytest.raises(BadChangeSignature):
        apply_change(state, tampered, resolver)
    by_bob_key = SignedChange.sign(change.change, KEYS["bob"])
    with pytest.raises(BadChangeSignature):
        apply_change(state, by_bob_key, resolver)
    for purpose in Purpose:
        if purpose is Purpose.GROUP_CONTROL:
            continue
        sig = signing.sign(KEYS["alice"], purpose, change.change.fields())
        with pytest.raises(BadChangeSignature):
            apply_change(state, SignedChange(change.change, change.body, sig), resolver)
        other_body = codec.encode({"v": 1, "body": signing.signing_input(purpose, change.change.fields()),
                                   "signature": sig})
        with pytest.raises(BadChangeSignature):
            SignedChange.from_bytes(other_body)


def test_wrong_base_epoch_hash_or_group_rejected():
    state = genesis()
    change = create_change(state, ChangeOp.RENAME, "x", DEVICES["alice"], KEYS["alice"])
    nxt = apply_change(state, change, resolver)
    with pytest.raises(WrongBase):
        apply_change(nxt, change, resolver)           # replayed onto the next epoch
    other = GroupState(state.group_id, state.epoch, "other", state.members, state.admins, state.prev_hash, 0)
    with pytest.raises(WrongBase):
        apply_change(other, change, resolver)         # same epoch, other state
    foreign = GroupState(bytes(32), state.epoch, state.name, state.members, state.admins, state.prev_hash, 0)
    with pytest.raises(WrongGroup):
        apply_change(foreign, change, resolver)


@pytest.mark.parametrize(("op", "target"), [
    (ChangeOp.ADD_MEMBER, "bob@example.org"), (ChangeOp.REMOVE_MEMBER, "dave@example.org"),
    (ChangeOp.RENAME, "friends"), (ChangeOp.ADD_ADMIN, "dave@example.org"),
    (ChangeOp.ADD_ADMIN, "bob@example.org"), (ChangeOp.REMOVE_ADMIN, "carol@example.org"),
])
def test_changes_that_make_no_sense_are_refused(op, target):
    with pytest.raises(ChangeNotApplicable):
        create_change(genesis(), op, target, DEVICES["alice"], KEYS["alice"])


def test_last_admin_cannot_be_removed():
    state = GroupState.new("g", USERS["alice"], [USERS["bob"]], seeded_rng(b"x"))
    for op in (ChangeOp.REMOVE_ADMIN, ChangeOp.REMOVE_MEMBER):
        with pytest.raises(ChangeNotApplicable):
            create_change(state, op, "alice@example.org", DEVICES["alice"], KEYS["alice"])


def test_malformed_change_bytes():
    state = genesis()
    good = create_change(state, ChangeOp.RENAME, "x", DEVICES["alice"], KEYS["alice"]).to_bytes()
    for bad in (b"", good[:-3], good + b"\x00", codec.encode({"v": 1})):
        with pytest.raises(MalformedMessage):
            SignedChange.from_bytes(bad)
    with pytest.raises(UnsupportedVersion):
        SignedChange.from_bytes(codec.encode({**codec.decode(good), "v": 7}))


def test_replica_pending_until_base_arrives_and_duplicates():
    state = genesis()
    alice, carol = GroupReplica(state, DEVICES["alice"]), GroupReplica(state, DEVICES["carol"])
    c1 = alice.propose(ChangeOp.RENAME, "one", KEYS["alice"])
    c2 = alice.propose(ChangeOp.RENAME, "two", KEYS["alice"])
    assert carol.receive(c2.to_bytes(), resolver).status is ControlStatus.PENDING
    outcome = carol.receive(c1.to_bytes(), resolver)
    assert outcome.status is ControlStatus.APPLIED and outcome.applied == (c1, c2)
    assert carol.state == alice.state
    assert carol.receive(c1.to_bytes(), resolver).status is ControlStatus.DUPLICATE


def test_concurrent_changes_lower_hash_wins_and_loser_rebases():
    state = genesis()
    reps = replicas(state)
    a = reps["alice"].propose(ChangeOp.RENAME, "alice's", KEYS["alice"])
    b = reps["bob"].propose(ChangeOp.RENAME, "bob's", KEYS["bob"])
    winner, loser = sorted([a, b], key=lambda c: c.hash)
    loser_name = "alice" if loser is a else "bob"
    winner_name = "bob" if loser is a else "alice"
    out = reps[loser_name].receive(winner.to_bytes(), resolver)
    assert out.undone == (loser,) and out.displaced_own == (loser.change,)
    out = reps[winner_name].receive(loser.to_bytes(), resolver)
    assert out.status is ControlStatus.SUPERSEDED and out.displaced_own == ()
    resent = reps[loser_name].resend(loser.change, KEYS[loser_name])
    assert resent is not None and resent.change.base_epoch == state.epoch + 1
    for n in ("alice", "bob", "carol"):
        for msg in (loser, winner, resent):
            if n not in (loser_name,) or msg is not loser and msg is not resent:
                try:
                    reps[n].receive(msg.to_bytes(), resolver)
                except GroupStateError:
                    pass
    assert len({r.state.hash() for r in reps.values()}) == 1
    assert reps["carol"].state.name == loser.change.target
    assert reps["carol"].state.epoch == state.epoch + 2


CONCURRENT_OPS = {
    "alice": [(ChangeOp.RENAME, "A"), (ChangeOp.ADD_MEMBER, "dave@example.org"),
              (ChangeOp.ADD_ADMIN, "carol@example.org"), (ChangeOp.REMOVE_MEMBER, "carol@example.org"),
              (ChangeOp.REMOVE_ADMIN, "bob@example.org")],
    "bob": [(ChangeOp.RENAME, "B"), (ChangeOp.ADD_MEMBER, "dave@example.org"),
            (ChangeOp.REMOVE_MEMBER, "carol@example.org"), (ChangeOp.ADD_MEMBER, "erin@example.org"),
            (ChangeOp.REMOVE_ADMIN, "alice@example.org")],
}


@settings(max_examples=40, deadline=None)
@given(st.data())
def test_concurrent_changes_by_two_admins_converge_on_every_member(data):
    """Two admins change the same base; every delivery interleaving (re-sent changes included)
    ends with the same state on every member, including a member that applies nothing itself."""
    state = genesis()
    reps = replicas(state, ("alice", "bob", "carol", "erin"))
    pool = []                    # (author, change) ever sent
    for author in ("alice", "bob"):
        for _ in range(data.draw(st.integers(1, 3), label=f"{author} changes")):
            op, target = data.draw(st.sampled_from(CONCURRENT_OPS[author]), label=author)
            try:
                pool.append((author, reps[author].propose(op, target, KEYS[author])))
            except GroupStateError:
                pass
    delivered = set()
    for _step in range(400):
        todo = [(name, i) for i, (author, _) in enumerate(pool) for name in reps
                if name != author and (name, i) not in delivered]
        if not todo:
            break
        name, i = todo[data.draw(st.integers(0, len(todo) - 1), label="deliver")]
        delivered.add((name, i))
        try:
            outcome = reps[name].receive(pool[i][1].to_bytes(), resolver)
        except GroupStateError:
            continue
        for change in outcome.displaced_own:
            again = reps[name].resend(change, KEYS[name])
            if again is not None:
                pool.append((name, again))
    else:
        raise AssertionError("did not settle")
    assert len({rep.state.hash() for rep in reps.values()}) == 1, {n: r.state for n, r in reps.items()}
    assert reps["erin"].state.epoch > state.epoch


def test_late_winner_rolls_back_a_chain_built_on_the_loser():
    state = genesis()
    reps = replicas(state, ("alice", "bob", "carol", "erin"))
    a = reps["alice"].propose(ChangeOp.RENAME, "alice's", KEYS["alice"])
    b = reps["bob"].propose(ChangeOp.RENAME, "bob's", KEYS["bob"])
    winner, loser = sorted([a, b], key=lambda c: c.hash)
    loser_author = "alice" if loser is a else "bob"
    winner_author = "bob" if loser is a else "alice"
    on_loser = reps[loser_author].propose(ChangeOp.ADD_MEMBER, "dave@example.org", KEYS[loser_author])
    # carol sees the loser branch first; erin sees the winner, then the loser branch
    for msg in (loser, on_loser, winner):
        reps["carol"].receive(msg.to_bytes(), resolver)
    erin_outcomes = [reps["erin"].receive(m.to_bytes(), resolver) for m in (winner, loser, on_loser)]
    assert [o.status for o in erin_outcomes] == [ControlStatus.APPLIED, ControlStatus.SUPERSEDED,
                                                 ControlStatus.PENDING]
    out = reps[loser_author].receive(winner.to_bytes(), resolver)
    assert out.undone == (loser, on_loser)
    assert out.displaced_own == (loser.change, on_loser.change)
    resent = [reps[loser_author].resend(c, KEYS[loser_author]) for c in out.displaced_own]
    reps[winner_author].receive(loser.to_bytes(), resolver)
    for name in ("carol", "erin", winner_author):
        for msg in resent:
            reps[name].receive(msg.to_bytes(), resolver)
    assert len({rep.state.hash() for rep in reps.values()}) == 1
    final = reps["carol"].state
    assert final.name == loser.change.target and USERS["dave"] in final.members
    assert final.epoch == state.epoch + 3


def test_removed_member_learns_it_and_cannot_send():
    state = genesis()
    reps = replicas(state)
    removal = reps["alice"].propose(ChangeOp.REMOVE_MEMBER, "carol@example.org", KEYS["alice"])
    out = reps["carol"].receive(removal.to_bytes(), resolver)
    assert out.removed_me and out.rotate_sender_key
    session = GroupSession(reps["carol"], resolver)
    with pytest.raises(NotMember):
        session.encrypt(b"hi", seeded_rng(b"c"))


def test_history_bound():
    state = genesis()
    alice, bob = GroupReplica(state, DEVICES["alice"]), GroupReplica(state, DEVICES["bob"])
    stale = bob.propose(ChangeOp.RENAME, "stale", KEYS["bob"])
    for i in range(gs.MAX_HISTORY + 1):
        alice.propose(ChangeOp.RENAME, f"n{i}", KEYS["alice"])
    with pytest.raises(WrongBase):
        alice.receive(stale.to_bytes(), resolver)


def test_replica_serialisation_round_trip():
    state = genesis()
    alice, carol = GroupReplica(state, DEVICES["alice"]), GroupReplica(state, DEVICES["carol"])
    c1 = alice.propose(ChangeOp.RENAME, "one", KEYS["alice"])
    c2 = alice.propose(ChangeOp.ADD_MEMBER, "dave@example.org", KEYS["alice"])
    carol.receive(c2.to_bytes(), resolver)
    restored = GroupReplica.from_bytes(carol.to_bytes())
    assert restored.to_bytes() == carol.to_bytes()
    restored.receive(c1.to_bytes(), resolver)
    assert restored.state == alice.state
    assert GroupReplica.from_bytes(alice.to_bytes()).state == alice.state
    with pytest.raises(UnsupportedVersion):
        GroupReplica.from_bytes(codec.encode({**codec.decode(alice.to_bytes()), "v": 3}))


# --- sessions: sender keys driven by group state -------------------------------------------


class Net:
    """Delivers distributions pairwise and group messages to members' sessions (a fake, no I/O)."""

    def __init__(self, sessions):
        self.sessions = sessions

    def send(self, name, body, rng):
        out = self.sessions[name].encrypt(body, rng)
        if out.distribution is not None:
            for user in out.distribute_to:
                peer = user.local
                if peer != name and peer in self.sessions:
                    self.sessions[peer].add_sender_key(DEVICES[name], out.distribution)
        return out


def test_session_round_trip_and_join_without_history():
    state = genesis()
    sessions = {n: GroupSession(GroupReplica(state, DEVICES[n]), resolver) for n in ("alice", "bob", "carol")}
    net = Net(sessions)
    first = net.send("alice", b"hello", seeded_rng(b"a"))
    assert first.rotated and first.distribute_to == state.members
    for n in ("bob", "carol"):
        assert sessions[n].decrypt(DEVICES["alice"], first.message, NOW).body == b"hello"
    second = net.send("alice", b"again", seeded_rng(b"a2"))
    assert not second.rotated and second.distribution is None
    # dave joins: alice's existing chain is handed to him from the next message on
    add = sessions["alice"].replica.propose(ChangeOp.ADD_MEMBER, "dave@example.org", KEYS["alice"])
    sessions["dave"] = GroupSession(GroupReplica.from_welcome(sessions["alice"].state.to_bytes(),
                                                               DEVICES["alice"], DEVICES["dave"]), resolver)
    for n in ("bob", "carol"):
        sessions[n].queue_control(add.to_bytes())
    third = net.send("alice", b"welcome dave", seeded_rng(b"a3"))
    assert third.distribute_to == (USERS["dave"],) and not third.rotated
    assert sessions["dave"].decrypt(DEVICES["alice"], third.message, NOW).body == b"welcome dave"
    with pytest.raises(Exception):
        sessions["dave"].decrypt(DEVICES["alice"], second.message, NOW)
    restored = GroupSession.from_bytes(sessions["dave"].to_bytes(), resolver)
    assert restored.to_bytes() == sessions["dave"].to_bytes()


def test_offline_member_sends_after_removal_and_removed_member_cannot_read():
    state = genesis()
    sessions = {n: GroupSession(GroupReplica(state, DEVICES[n]), resolver) for n in ("alice", "bob", "carol")}
    net = Net(sessions)
    for n in ("alice", "bob", "carol"):     # everyone has everyone's epoch-1 chain
        out = net.send(n, b"hi from " + n.encode(), seeded_rng(n.encode()))
        for peer in sessions:
            if peer != n:
                sessions[peer].decrypt(DEVICES[n], out.message, NOW)
    # bob goes offline; alice removes carol; carol and alice apply it at once
    removal = sessions["alice"].replica.propose(ChangeOp.REMOVE_MEMBER, "carol@example.org", KEYS["alice"])
    sessions["carol"].replica.receive(removal.to_bytes(), resolver)
    alice_send = net.send("alice", b"carol is gone", seeded_rng(b"a-rot"))
    assert alice_send.rotated and USERS["carol"] not in alice_send.distribute_to
    # bob comes back: the removal is pending in his inbox; he sends before anything else
    sessions["bob"].queue_control(removal.to_bytes())
    old_bob_key = sessions["bob"].outbound
    bob_send = net.send("bob", b"secret after removal", seeded_rng(b"b-rot"))
    assert bob_send.control[0].rotate_sender_key and bob_send.rotated
    assert sessions["bob"].outbound.key_id != old_bob_key.key_id
    assert bob_send.epoch == sessions["bob"].state.epoch == sessions["bob"].outbound.epoch
    assert USERS["carol"] not in bob_send.recipients and USERS["carol"] not in bob_send.distribute_to
    # carol (removed) holds bob's old chain only: she cannot read it
    carol_view = GroupSession(GroupReplica(state, DEVICES["carol"]), resolver)
    carol_view.add_sender_key(DEVICES["bob"], old_bob_key.distribution().to_bytes())
    with pytest.raises(UnknownSenderKey):
        carol_view.decrypt(DEVICES["bob"], bob_send.message, NOW)
    # and none of carol's chains (even a freshly made one with bob's old key) match the new key id
    assert all(c.key_id != sessions["bob"].outbound.key_id
               for c in sessions["carol"]._inbound.get(DEVICES["bob"], []))
    assert sessions["alice"].decrypt(DEVICES["bob"], bob_send.message, NOW).body == b"secret after removal"
    assert sessions["bob"].decrypt(DEVICES["alice"], alice_send.message, NOW).body == b"carol is gone"
    # carol's own messages are refused by the remaining members
    with pytest.raises(NotMember):
        sessions["alice"].decrypt(DEVICES["carol"], b"anything", NOW)


def test_distribution_for_other_group_or_from_non_member_refused():
    state = genesis()
    alice = GroupSession(GroupReplica(state, DEVICES["alice"]), resolver)
    from_dave = OutboundSenderKey.create(state.group_id, state.epoch, seeded_rng(b"d")).distribution()
    with pytest.raises(NotMember):
        alice.add_sender_key(DEVICES["dave"], from_dave.to_bytes())
    other = GroupState.new("other", USERS["bob"], [USERS["alice"]], seeded_rng(b"other"))
    foreign = GroupSession(GroupReplica(other, DEVICES["bob"]), resolver).encrypt(b"y", seeded_rng(b"e"))
    with pytest.raises(WrongGroup):
        alice.add_sender_key(DEVICES["bob"], foreign.distribution)
