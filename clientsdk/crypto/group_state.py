"""Group state kept by clients (DESIGN §4): epochs, admin-signed changes, concurrency, sender keys.

The server stores no group object.  Every member device keeps a ``GroupState``
(random group id, name, members, admins, epoch, hash of the previous state and
``key_epoch``, the epoch of the last removal).  A change is signed by an admin's
device identity key under ``Purpose.GROUP_CONTROL`` and names its base epoch and
base state hash; applying it yields the next epoch.

Bytes (normative):

* state: ``canonical {v, group_id, epoch, name, members: [str], admins: [str],
  prev_hash, key_epoch}`` with members and admins sorted by UTF-8 bytes;
  ``state hash = SHA-256(state bytes)``.
* change: ``body = signing_input(GROUP_CONTROL, {v, group_id, base_epoch, base_hash,
  op, target, author})`` travels as ``canonical {v, body, signature}``;
  ``change hash = SHA-256(body)``.

Concurrency: of two valid changes on the same base, the lower change hash wins.
``GroupReplica`` keeps the last ``MAX_HISTORY`` (base state, winning change) pairs
so that a winner arriving late rolls back the loser (and anything built on it);
the loser's author gets it back in ``displaced_own`` and re-sends it rebased
(``GroupReplica.resend``), re-checked against the new state.  Every member that
receives the same changes ends on the same state, whatever the arrival order.

``clientsdk.crypto.group_session.GroupSession`` ties this state to sender keys.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from clientsdk.crypto.errors import GroupStateError, MalformedMessage, UnsupportedVersion
from clientsdk.crypto.primitives import Rng, ct_equal
from federation import codec, signing
from federation.addresses import DeviceAddress, UserAddress
from federation.errors import InvalidSignature, ProtocolError
from federation.signing import Purpose
from federation.validate import field, require_map

VERSION = 1
GROUP_ID_LEN = 32
HASH_LEN = 32
MAX_MEMBERS = 1_000
MAX_NAME = 128
MAX_HISTORY = 128
MAX_PENDING = 256
MAX_CHAINS_PER_SENDER = 4

Resolver = Callable[[DeviceAddress], bytes | None]
"""Device address -> that device's Ed25519 identity key from its user's verified device list."""


class BadChangeSignature(GroupStateError):
    """A change whose signature does not verify for ``group-control`` under its author's key."""


class NotAdmin(GroupStateError):
    """The signing device is unknown or does not belong to an admin of the base state."""


class WrongBase(GroupStateError):
    """The change names another base epoch or base state hash than the state it is applied to."""


class WrongGroup(GroupStateError):
    """A change, distribution or state for another group."""


class ChangeNotApplicable(GroupStateError):
    """The change makes no sense on its base (already a member, last admin, same name, ...)."""


class NotMember(GroupStateError):
    """Sending or receiving by a user who is not a member of the current state."""


class ChangeOp(StrEnum):
    ADD_MEMBER = "add_member"
    REMOVE_MEMBER = "remove_member"
    RENAME = "rename"
    ADD_ADMIN = "add_admin"
    REMOVE_ADMIN = "remove_admin"


def _sha256(data: bytes) -> bytes:
    return hashlib.sha256(data).digest()


def decode_versioned(data: bytes, what: str) -> dict[str, Any]:
    try:
        obj = require_map(codec.decode(data), what)
        version = field(obj, "v", int)
    except ProtocolError:
        raise MalformedMessage(f"{what} does not parse") from None
    if version != VERSION:
        raise UnsupportedVersion(f"{what} version {version} is not supported")
    return obj


def parse_user(text: Any) -> UserAddress:
    try:
        return UserAddress.parse(text)
    except ProtocolError:
        raise MalformedMessage("invalid user address") from None


def sorted_users(users: Iterable[UserAddress]) -> tuple[UserAddress, ...]:
    return tuple(sorted(set(users), key=lambda u: str(u).encode()))


def _check_name(name: Any) -> str:
    if not isinstance(name, str) or not 0 < len(name) <= MAX_NAME or not name.isprintable():
        raise MalformedMessage(f"group name must be 1-{MAX_NAME} printable characters")
    return name


# --- state ----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class GroupState:
    group_id: bytes
    epoch: int
    name: str
    members: tuple[UserAddress, ...]
    admins: tuple[UserAddress, ...]
    prev_hash: bytes
    key_epoch: int

    def __post_init__(self) -> None:
        if not isinstance(self.group_id, bytes) or len(self.group_id) != GROUP_ID_LEN:
            raise MalformedMessage("group id must be 32 bytes")
        if not isinstance(self.prev_hash, bytes) or len(self.prev_hash) != HASH_LEN:
            raise MalformedMessage("previous state hash must be 32 bytes")
        if not 0 <= self.key_epoch <= self.epoch < 2**63:
            raise MalformedMessage("epochs out of range")
        _check_name(self.name)
        if self.members != sorted_users(self.members) or self.admins != sorted_users(self.admins):
            raise MalformedMessage("members and admins must be sorted and unique")
        if not self.admins or not set(self.admins) <= set(self.members) or len(self.members) > MAX_MEMBERS:
            raise MalformedMessage("admins must be a non-empty subset of at most MAX_MEMBERS members")

    def __repr__(self) -> str:
        return f"GroupState(epoch={self.epoch}, members={len(self.members)}, hash={self.hash().hex()[:16]})"

    @classmethod
    def new(cls, name: str, creator: UserAddress, members: Iterable[UserAddress], rng: Rng) -> GroupState:
        """Epoch 0 of a new group with a random id; the creator is its first admin."""
        return cls(rng(GROUP_ID_LEN), 0, name, sorted_users([creator, *members]), (creator,),
                   bytes(HASH_LEN), 0)

    def to_bytes(self) -> bytes:
        return codec.encode({"v": VERSION, "group_id": self.group_id, "epoch": self.epoch, "name": self.name,
                             "members": [str(u) for u in self.members], "admins": [str(u) for u in self.admins],
                             "prev_hash": self.prev_hash, "key_epoch": self.key_epoch})

    @classmethod
    def from_bytes(cls, data: bytes) -> GroupState:
        obj = decode_versioned(data, "group state")
        if set(obj) != {"v", "group_id", "epoch", "name", "members", "admins", "prev_hash", "key_epoch"}:
            raise MalformedMessage("group state has unexpected or missing fields")
        try:
            members = field(obj, "members", list)
            admins = field(obj, "admins", list)
            state = cls(field(obj, "group_id", bytes), field(obj, "epoch", int), field(obj, "name", str),
                        tuple(parse_user(u) for u in members), tuple(parse_user(u) for u in admins),
                        field(obj, "prev_hash", bytes), field(obj, "key_epoch", int))
        except ProtocolError:
            raise MalformedMessage("group state has a field of the wrong type") from None
        if state.to_bytes() != data:
            raise MalformedMessage("group state is not in canonical form")
        return state

    def hash(self) -> bytes:
        return _sha256(self.to_bytes())


# --- changes --------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Change:
    group_id: bytes
    base_epoch: int
    base_hash: bytes
    op: ChangeOp
    target: str
    author: DeviceAddress

    def fields(self) -> dict[str, Any]:
        return {"v": VERSION, "group_id": self.group_id, "base_epoch": self.base_epoch,
                "base_hash": self.base_hash, "op": self.op.value, "target": self.target,
                "author": str(self.author)}


@dataclass(frozen=True, slots=True)
class SignedChange:
    change: Change
    body: bytes
    signature: bytes

    @property
    def hash(self) -> bytes:
        """SHA-256 of the signed bytes: the tie-breaker between concurrent changes."""
        return _sha256(self.body)

    @classmethod
    def sign(cls, change: Change, signing_key: Ed25519PrivateKey) -> SignedChange:
        fields = change.fields()
        return cls(change, signing.signing_input(Purpose.GROUP_CONTROL, fields),
                   signing.sign(signing_key, Purpose.GROUP_CONTROL, fields))

    def to_bytes(self) -> bytes:
        return codec.encode({"v": VERSION, "body": self.body, "signature": self.signature})

    @classmethod
    def from_bytes(cls, data: bytes) -> SignedChange:
        outer = decode_versioned(data, "group change")
        try:
            if set(outer) != {"v", "body", "signature"}:
                raise MalformedMessage("group change has unexpected or missing fields")
            body = field(outer, "body", bytes)
            signature = field(outer, "signature", bytes, length=signing.SIGNATURE_LEN)
            obj = require_map(codec.decode(body), "group change body")
        except ProtocolError:
            raise MalformedMessage("group change does not parse") from None
        if obj.get("ctx") != Purpose.GROUP_CONTROL.value:
            raise BadChangeSignature("not a group-control object")
        fields = {k: v for k, v in obj.items() if k != "ctx"}
        if set(fields) != {"v", "group_id", "base_epoch", "base_hash", "op", "target", "author"}:
            raise MalformedMessage("group change body has unexpected or missing fields")
        if fields["v"] != VERSION:
            raise UnsupportedVersion("group change body version is not supported")
        try:
            op = ChangeOp(field(fields, "op", str))
            author = DeviceAddress.parse(field(fields, "author", str))
            change = Change(field(fields, "group_id", bytes, length=GROUP_ID_LEN),
                            field(fields, "base_epoch", int), field(fields, "base_hash", bytes, length=HASH_LEN),
                            op, field(fields, "target", str), author)
        except (ProtocolError, ValueError):
            raise MalformedMessage("group change body has an invalid field") from None
        if change.base_epoch < 0:
            raise MalformedMessage("negative base epoch")
        if op is ChangeOp.RENAME:
            _check_name(change.target)
        else:
            parse_user(change.target)
        return cls(change, body, signature)

    def verify(self, resolver: Resolver) -> None:
        """Check the signature under the author device's identity key."""
        key = resolver(self.change.author)
        if key is None:
            raise NotAdmin("the signing device is not in its user's verified device list")
        try:
            signing.verify(key, Purpose.GROUP_CONTROL, self.change.fields(), self.signature)
        except InvalidSignature:
            raise BadChangeSignature("group change signature does not verify") from None


def _apply_op(state: GroupState, op: ChangeOp, target: str) -> GroupState:
    """The next state, or ``ChangeNotApplicable`` if the change makes no sense on ``state``."""
    members, admins, name, key_epoch = set(state.members), set(state.admins), state.name, state.key_epoch
    epoch = state.epoch + 1
    if op is ChangeOp.RENAME:
        if _check_name(target) == state.name:
            raise ChangeNotApplicable("the group already has this name")
        name = target
    else:
        user = parse_user(target)
        if op is ChangeOp.ADD_MEMBER:
            if user in members or len(members) >= MAX_MEMBERS:
                raise ChangeNotApplicable("already a member, or the group is full")
            members.add(user)
        elif op is ChangeOp.REMOVE_MEMBER:
            if user not in members or admins == {user}:
                raise ChangeNotApplicable("not a member, or the last admin")
            members.discard(user)
            admins.discard(user)
            key_epoch = epoch
        elif op is ChangeOp.ADD_ADMIN:
            if user not in members or user in admins:
                raise ChangeNotApplicable("not a member, or already an admin")
            admins.add(user)
        elif op is ChangeOp.REMOVE_ADMIN:
            if user not in admins or len(admins) == 1:
                raise ChangeNotApplicable("not an admin, or the last admin")
            admins.discard(user)
    return GroupState(state.group_id, epoch, name, sorted_users(members), sorted_users(admins),
                      state.hash(), key_epoch)


def create_change(state: GroupState, op: ChangeOp, target: str, author: DeviceAddress,
                  signing_key: Ed25519PrivateKey) -> SignedChange:
    """Sign a change on ``state``; refuses changes that would not apply."""
    if author.user not in state.admins:
        raise NotAdmin("only an admin's device can change the group")
    _apply_op(state, ChangeOp(op), target)
    return SignedChange.sign(Change(state.group_id, state.epoch, state.hash(), ChangeOp(op), target, author),
                             signing_key)


def apply_change(state: GroupState, signed: SignedChange, resolver: Resolver) -> GroupState:
    """Check ``signed`` against ``state`` (group, base, signature, admin, sense) and return the next state."""
    change = signed.change
    if not ct_equal(change.group_id, state.group_id):
        raise WrongGroup("change for another group")
    if change.base_epoch != state.epoch or not ct_equal(change.base_hash, state.hash()):
        raise WrongBase("change names another base epoch or state")
    signed.verify(resolver)
    if change.author.user not in state.admins:
        raise NotAdmin("the signing device does not belong to an admin")
    return _apply_op(state, change.op, change.target)


# --- replica: concurrency and convergence -------------------------------------------------


class ControlStatus(StrEnum):
    APPLIED = "applied"          # the change (and possibly pending ones) now forms the state
    DUPLICATE = "duplicate"      # already applied
    SUPERSEDED = "superseded"    # a lower-hash change on the same base won; its author rebases it
    PENDING = "pending"          # its base is not (yet) on our chain; kept for later


@dataclass(frozen=True, slots=True)
class ControlOutcome:
    status: ControlStatus
    applied: tuple[SignedChange, ...] = ()
    undone: tuple[SignedChange, ...] = ()
    displaced_own: tuple[Change, ...] = ()   # my changes that lost: pass each to ``resend``
    rotate_sender_key: bool = False          # a member was removed: every remaining member rotates
    removed_me: bool = False


class GroupReplica:
    """One device's copy of a group's state, with enough history to settle concurrent changes."""

    def __init__(self, state: GroupState, me: DeviceAddress,
                 history: Iterable[tuple[GroupState, SignedChange]] = (),
                 pending: Iterable[SignedChange] = ()) -> None:
        self.me = me
        self.state = state
        self._history = list(history)[-MAX_HISTORY:]
        self._pending = {p.hash: p for p in pending}

    @classmethod
    def from_welcome(cls, state_bytes: bytes, sender: DeviceAddress, me: DeviceAddress) -> GroupReplica:
        """Join from a state sent over an authenticated pairwise session by an admin's device."""
        state = GroupState.from_bytes(state_bytes)
        if sender.user not in state.admins:
            raise NotAdmin("a group welcome must come from an admin")
        if me.user not in state.members:
            raise NotMember("the welcome does not list me as a member")
        return cls(state, me)

    def _base_at(self, epoch: int) -> GroupState | None:
        if epoch == self.state.epoch:
            return self.state
        start = self.state.epoch - len(self._history)
        return self._history[epoch - start][0] if start <= epoch < self.state.epoch else None

    def _is_known(self, change_hash: bytes) -> bool:
        return change_hash in self._pending or any(c.hash == change_hash for _, c in self._history)

    def propose(self, op: ChangeOp, target: str, signing_key: Ed25519PrivateKey) -> SignedChange:
        """Sign a change on the current state and apply it locally; send the returned bytes to all members."""
        signed = create_change(self.state, op, target, self.me, signing_key)
        self._push(signed, _apply_op(self.state, signed.change.op, signed.change.target))
        return signed

    def resend(self, change: Change, signing_key: Ed25519PrivateKey) -> SignedChange | None:
        """Rebase one of my displaced changes onto the current state; ``None`` if it no longer makes sense."""
        try:
            return self.propose(change.op, change.target, signing_key)
        except (NotAdmin, ChangeNotApplicable):
            return None

    def _push(self, signed: SignedChange, new_state: GroupState) -> None:
        self._history.append((self.state, signed))
        del self._history[:-MAX_HISTORY]
        self.state = new_state

    def receive(self, data: bytes | SignedChange, resolver: Resolver) -> ControlOutcome:
        """Apply a control message (and any pending ones it unblocks).

        Raises ``MalformedMessage``/``UnsupportedVersion``, ``WrongGroup``,
        ``BadChangeSignature``, ``NotAdmin``, ``WrongBase`` (base older than the kept
        history) or ``ChangeNotApplicable``; the replica is unchanged then.
        """
        signed = data if isinstance(data, SignedChange) else SignedChange.from_bytes(data)
        if not ct_equal(signed.change.group_id, self.state.group_id):
            raise WrongGroup("change for another group")
        if self._is_known(signed.hash):
            return ControlOutcome(ControlStatus.DUPLICATE)
        signed.verify(resolver)
        if signed.change.base_epoch < self.state.epoch - len(self._history):
            raise WrongBase("change is based on an epoch older than the kept history")
        base = self._base_at(signed.change.base_epoch)
        if base is None or not ct_equal(base.hash(), signed.change.base_hash):
            self._add_pending(signed)
            return ControlOutcome(ControlStatus.PENDING)
        was_member = self.me.user in self.state.members
        applied: list[SignedChange] = []
        undone: list[SignedChange] = []
        superseded: list[SignedChange] = []
        self._settle(signed, resolver, applied, undone, superseded)   # raises before any mutation
        self._drain(resolver, applied, undone, superseded)
        chain = {c.hash for _, c in self._history}
        displaced: dict[bytes, Change] = {}
        for lost in (*undone, *superseded):
            if lost.hash not in chain and lost.change.author == self.me:
                displaced[lost.hash] = lost.change
                self._pending.pop(lost.hash, None)   # never applied twice: its author re-sends it rebased
        kept = tuple(c for c in applied if c.hash in chain)
        return ControlOutcome(
            ControlStatus.APPLIED if signed.hash in chain else ControlStatus.SUPERSEDED,
            kept, tuple(dict.fromkeys(c for c in undone if c.hash not in chain)), tuple(displaced.values()),
            rotate_sender_key=any(c.change.op is ChangeOp.REMOVE_MEMBER for c in kept),
            removed_me=was_member and self.me.user not in self.state.members)

    def _settle(self, signed: SignedChange, resolver: Resolver, applied: list[SignedChange],
                undone: list[SignedChange], superseded: list[SignedChange]) -> None:
        """Apply ``signed`` (its base is on our chain); a lower hash than the change that
        followed its base rolls that change and everything after it back into pending."""
        change = signed.change
        if change.base_epoch == self.state.epoch:
            self._push(signed, apply_change(self.state, signed, resolver))
            applied.append(signed)
            return
        index = len(self._history) - (self.state.epoch - change.base_epoch)
        base, current = self._history[index]
        new_state = apply_change(base, signed, resolver)
        if signed.hash >= current.hash:
            superseded.append(signed)
            return
        rolled_back = [c for _, c in self._history[index:]]
        del self._history[index:]
        self.state = base
        self._push(signed, new_state)
        applied.append(signed)
        undone.extend(rolled_back)
        for c in rolled_back:            # a change built on an identical state may still apply
            self._add_pending(c)

    def _add_pending(self, signed: SignedChange) -> None:
        self._pending[signed.hash] = signed
        if len(self._pending) > MAX_PENDING:
            oldest = min(self._pending.values(), key=lambda p: (p.change.base_epoch, p.hash))
            del self._pending[oldest.hash]

    def _drain(self, resolver: Resolver, applied: list[SignedChange], undone: list[SignedChange],
               superseded: list[SignedChange]) -> None:
        """Settle pending changes whose base is now on our chain, lowest base epoch and hash first."""
        progress = True
        while progress:
            progress = False
            floor = self.state.epoch - len(self._history)
            for stale in [h for h, p in self._pending.items() if p.change.base_epoch < floor]:
                del self._pending[stale]
            for p in sorted(self._pending.values(), key=lambda p: (p.change.base_epoch, p.hash)):
                base = self._base_at(p.change.base_epoch)
                if base is None or not ct_equal(base.hash(), p.change.base_hash):
                    continue
                del self._pending[p.hash]
                try:
                    self._settle(p, resolver, applied, undone, superseded)
                except GroupStateError:
                    pass            # authenticated but invalid on its base: dropped
                progress = True
                break

    def to_bytes(self) -> bytes:
        """Versioned bytes (client store, backups): states and signed changes only, no keys."""
        return codec.encode({"v": VERSION, "me": str(self.me), "state": self.state.to_bytes(),
                             "history": [[s.to_bytes(), c.to_bytes()] for s, c in self._history],
                             "pending": [p.to_bytes() for p in self._pending.values()]})

    @classmethod
    def from_bytes(cls, data: bytes) -> GroupReplica:
        obj = decode_versioned(data, "group replica")
        try:
            me = DeviceAddress.parse(field(obj, "me", str))
            state = GroupState.from_bytes(field(obj, "state", bytes))
            raw_history = field(obj, "history", list)
            raw_pending = field(obj, "pending", list)
            history = [(GroupState.from_bytes(s), SignedChange.from_bytes(c)) for s, c in raw_history]
            pending = [SignedChange.from_bytes(p) for p in raw_pending]
        except (ProtocolError, TypeError, ValueError):
            raise MalformedMessage("group replica does not parse") from None
        for offset, (base, change) in enumerate(history):
            if base.epoch != state.epoch - len(history) + offset or change.change.base_epoch != base.epoch:
                raise MalformedMessage("group replica history is not contiguous")
        return cls(state, me, history, pending)
