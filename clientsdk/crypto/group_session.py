"""A device's group session: group state plus sender keys (DESIGN §4).

``GroupSession`` applies pending control messages before every send, never sends
under a sender key older than the last removal (``key_epoch``) — so a removal
rotates every remaining member's key — and hands its chain to members that do
not have it yet.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from clientsdk.crypto.errors import GroupStateError, MalformedMessage, UnsupportedVersion
from clientsdk.crypto.group_state import (
    MAX_CHAINS_PER_SENDER,
    VERSION,
    ControlOutcome,
    GroupReplica,
    GroupState,
    NotMember,
    Resolver,
    WrongGroup,
    decode_versioned,
    sorted_users,
    parse_user,
)
from clientsdk.crypto.primitives import Rng, ct_equal
from clientsdk.crypto.sender_keys import (
    Distribution,
    GroupMessage,
    GroupPlaintext,
    InboundSenderKey,
    OutboundSenderKey,
    UnknownSenderKey,
)
from federation import codec
from federation.addresses import DeviceAddress, UserAddress
from federation.errors import ProtocolError
from federation.validate import field

@dataclass(frozen=True, slots=True)
class GroupSend:
    """What one send produces: deliver ``distribution`` pairwise first, then ``message`` to all members."""

    message: bytes
    epoch: int
    recipients: tuple[UserAddress, ...]
    distribution: bytes | None
    distribute_to: tuple[UserAddress, ...]
    rotated: bool
    control: tuple[ControlOutcome, ...]


class GroupSession:
    """A device's group: its replica, its sending chain and the chains of the other member devices."""

    def __init__(self, replica: GroupReplica, resolver: Resolver,
                 outbound: OutboundSenderKey | None = None,
                 distributed_to: Iterable[UserAddress] = (),
                 inbound: dict[DeviceAddress, list[InboundSenderKey]] | None = None,
                 inbox: Iterable[bytes] = ()) -> None:
        self.replica = replica
        self.resolver = resolver
        self.outbound = outbound
        self._distributed_to = set(distributed_to)
        self._inbound: dict[DeviceAddress, list[InboundSenderKey]] = {k: list(v) for k, v in (inbound or {}).items()}
        self._inbox = list(inbox)

    @property
    def state(self) -> GroupState:
        return self.replica.state

    def queue_control(self, data: bytes) -> None:
        """Keep a control message for ``apply_pending`` (always run before a send)."""
        self._inbox.append(data)

    def apply_pending(self) -> tuple[ControlOutcome, ...]:
        """Apply queued control messages in arrival order; invalid ones are dropped."""
        outcomes = []
        inbox, self._inbox = self._inbox, []
        for data in inbox:
            try:
                outcomes.append(self.replica.receive(data, self.resolver))
            except (GroupStateError, MalformedMessage, UnsupportedVersion):
                continue
        members = set(self.state.members)
        for device in [d for d in self._inbound if d.user not in members]:
            del self._inbound[device]
        return tuple(outcomes)

    def _sender_key_is_current(self) -> bool:
        key = self.outbound
        return key is not None and self.state.key_epoch <= key.epoch <= self.state.epoch

    def encrypt(self, body: bytes, rng: Rng) -> GroupSend:
        """Apply pending control messages, rotate if a removal requires it, then encrypt once."""
        control = self.apply_pending()
        state = self.state
        if self.replica.me.user not in state.members:
            raise NotMember("I am not a member of this group")
        rotated = False
        if not self._sender_key_is_current():
            self.outbound = (OutboundSenderKey.create(state.group_id, state.epoch, rng) if self.outbound is None
                             else self.outbound.rotate(state.epoch, rng))
            self._distributed_to = set()
            rotated = True
        outbound = self.outbound
        if outbound is None:
            raise GroupStateError("no sending chain")
        need = sorted_users(u for u in state.members if u not in self._distributed_to)
        distribution = outbound.distribution().to_bytes() if need else None
        message = outbound.encrypt(body, state.epoch)
        self._distributed_to.update(need)
        return GroupSend(message, state.epoch, state.members, distribution, need, rotated, control)

    def add_sender_key(self, sender: DeviceAddress, distribution: bytes) -> None:
        """Store a member device's chain received over our pairwise session with it."""
        parsed = Distribution.from_bytes(distribution)
        if not ct_equal(parsed.group_id, self.state.group_id):
            raise WrongGroup("distribution for another group")
        if sender.user not in self.state.members:
            raise NotMember("distribution from a non-member")
        chains = self._inbound.setdefault(sender, [])
        if any(c.key_id == parsed.key_id for c in chains):
            return                   # never let a re-sent distribution rewind a chain
        chains.append(InboundSenderKey.from_distribution(parsed))
        del chains[:-MAX_CHAINS_PER_SENDER]

    def decrypt(self, sender: DeviceAddress, message: bytes, now_ms: int) -> GroupPlaintext:
        """Decrypt a group message from ``sender`` (the envelope's device), a current member."""
        if sender.user not in self.state.members:
            raise NotMember("group message from a non-member")
        parsed = GroupMessage.from_bytes(message)
        for chain in self._inbound.get(sender, []):
            if ct_equal(chain.key_id, parsed.key_id):
                return chain.decrypt(parsed, now_ms)
        raise UnknownSenderKey("no sender key with this key id for this device")

    def to_bytes(self) -> bytes:
        """Versioned local state (client store only: it holds sender-key chains, never back it up)."""
        return codec.encode({
            "v": VERSION, "replica": self.replica.to_bytes(),
            "outbound": self.outbound.to_bytes() if self.outbound else None,
            "distributed_to": [str(u) for u in sorted_users(self._distributed_to)],
            "inbound": [[str(d), [c.to_bytes() for c in chains]] for d, chains in sorted(self._inbound.items())],
            "inbox": list(self._inbox)})

    @classmethod
    def from_bytes(cls, data: bytes, resolver: Resolver) -> GroupSession:
        obj = decode_versioned(data, "group session")
        try:
            replica = GroupReplica.from_bytes(field(obj, "replica", bytes))
            raw_out = obj.get("outbound")
            outbound = OutboundSenderKey.from_bytes(raw_out) if raw_out is not None else None
            distributed = [parse_user(u) for u in field(obj, "distributed_to", list)]
            inbound = {DeviceAddress.parse(d): [InboundSenderKey.from_bytes(c) for c in chains]
                       for d, chains in field(obj, "inbound", list)}
            inbox = field(obj, "inbox", list)
        except (ProtocolError, TypeError, ValueError):
            raise MalformedMessage("group session does not parse") from None
        if not all(isinstance(b, bytes) for b in inbox):
            raise MalformedMessage("group session inbox must hold bytes")
        return cls(replica, resolver, outbound, distributed, inbound, inbox)

