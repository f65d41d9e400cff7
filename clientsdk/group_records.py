"""Group wire formats, stored records and events of the SDK (``clientsdk.groups`` does the I/O).

Why separate: the bytes a group bundle, a group message body and a stored group
record have are small, versioned and testable on their own; the mixin in
``clientsdk.groups`` is about ordering and sending.  Formats are described in the
``clientsdk.groups`` docstring.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from dataclasses import field as dc_field
from typing import Any

from clientsdk.crypto.errors import MalformedMessage, UnsupportedVersion
from clientsdk.crypto.group_session import GroupSession
from clientsdk.crypto.group_state import GROUP_ID_LEN, ControlOutcome, GroupState
from clientsdk.errors import SdkError
from clientsdk.events import Event
from federation import codec
from federation.addresses import DeviceAddress
from federation.errors import CodecError, ProtocolError
from federation.validate import field, require_map

GROUP_CONTENT = "group"
BUNDLE_VERSION = 1
RECORD_VERSION = 1
BODY_VERSION = 1
MAX_CONTROLS_PER_BUNDLE = 64


class GroupError(SdkError):
    code = "group_error"


class UnknownGroup(GroupError):
    code = "unknown_group"


# --- events ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class GroupMessageReceived(Event):
    """A decrypted group message, stored in the group's history before it is yielded.

    ``outgoing`` is True for my own messages sent from my other devices.
    """

    group_id: str             # hex of the random 32-byte group id
    sender: str               # user address
    sender_device: str        # device address
    message_id: str
    text: str
    sent_ms: int
    received_ms: int
    outgoing: bool
    epoch: int


@dataclass(frozen=True, slots=True)
class GroupChanged(Event):
    """The group's state moved (created, joined, members/admins/name changed, or I was removed).

    ``changes`` describes what was applied, e.g. ``("add_member carol@example.org",)``;
    ``("welcome",)`` when this device joined from a welcome.
    """

    group_id: str
    epoch: int
    name: str
    members: tuple[str, ...]
    admins: tuple[str, ...]
    changes: tuple[str, ...]
    removed_me: bool = False


# --- stored per-group record ------------------------------------------------------------------


@dataclass(slots=True)
class OutboxItem:
    """A control send not yet acknowledged: ``bundle`` to ``users``' devices, ``special`` per user."""

    message_id: str
    users: list[str]
    bundle: bytes
    special: dict[str, bytes] = dc_field(default_factory=dict)

    def to_wire(self) -> dict[str, Any]:
        return {"id": self.message_id, "users": list(self.users), "bundle": self.bundle,
                "special": dict(self.special)}

    @classmethod
    def from_wire(cls, obj: Any) -> OutboxItem:
        obj = require_map(obj, "group outbox item")
        special = field(obj, "special", dict)
        users = field(obj, "users", list)
        if not all(isinstance(k, str) and isinstance(v, bytes) for k, v in special.items()) \
                or not all(isinstance(u, str) for u in users):
            raise ProtocolError("group outbox item has fields of the wrong type")
        return cls(field(obj, "id", str), users, field(obj, "bundle", bytes), special)


@dataclass(slots=True)
class LocalGroup:
    """One group as this device keeps it: the crypto session plus who holds my current chain."""

    session: GroupSession
    sent_key: bytes | None = None                 # key id of my chain that ``given`` refers to
    given: set[str] = dc_field(default_factory=set)   # device addresses holding that chain
    outbox: list[OutboxItem] = dc_field(default_factory=list)

    def to_bytes(self) -> bytes:
        return codec.encode({"v": RECORD_VERSION, "session": self.session.to_bytes(), "sent_key": self.sent_key,
                             "given": sorted(self.given), "outbox": [i.to_wire() for i in self.outbox]})

    @classmethod
    def from_bytes(cls, data: bytes, resolver: Callable[[DeviceAddress], bytes | None]) -> LocalGroup:
        try:
            obj = require_map(codec.decode(data), "group record")
            if field(obj, "v", int) != RECORD_VERSION:
                raise UnsupportedVersion("unknown group record version")
            sent_key = obj.get("sent_key")
            given = field(obj, "given", list)
            if sent_key is not None and not isinstance(sent_key, bytes) or not all(isinstance(g, str) for g in given):
                raise ProtocolError("group record has fields of the wrong type")
            return cls(GroupSession.from_bytes(field(obj, "session", bytes), resolver), sent_key, set(given),
                       [OutboxItem.from_wire(i) for i in field(obj, "outbox", list)])
        except (CodecError, ProtocolError):
            raise MalformedMessage("group record does not parse") from None


@dataclass(frozen=True, slots=True)
class GroupBundle:
    group_id: bytes
    welcome: bytes | None = None
    controls: tuple[bytes, ...] = ()
    distribution: bytes | None = None
    message: bytes | None = None

    def to_bytes(self) -> bytes:
        obj: dict[str, Any] = {"v": BUNDLE_VERSION, "group_id": self.group_id}
        if self.welcome is not None:
            obj["welcome"] = self.welcome
        if self.controls:
            obj["controls"] = list(self.controls)
        if self.distribution is not None:
            obj["distribution"] = self.distribution
        if self.message is not None:
            obj["message"] = self.message
        return codec.encode(obj)

    @classmethod
    def from_bytes(cls, data: bytes) -> GroupBundle:
        try:
            obj = require_map(codec.decode(data), "group bundle")
            if field(obj, "v", int) != BUNDLE_VERSION:
                raise UnsupportedVersion("unknown group bundle version")
            controls = field(obj, "controls", list, max_length=MAX_CONTROLS_PER_BUNDLE, default=[])
            if not all(isinstance(c, bytes) for c in controls):
                raise ProtocolError("group bundle controls must be bytes")
            return cls(field(obj, "group_id", bytes, length=GROUP_ID_LEN),
                       field(obj, "welcome", bytes, default=None), tuple(controls),
                       field(obj, "distribution", bytes, default=None), field(obj, "message", bytes, default=None))
        except (CodecError, ProtocolError):
            raise MalformedMessage("group bundle does not parse") from None


def is_group_message(ciphertext: bytes) -> bool:
    """Does an envelope carry a sender-key group message (rather than a pairwise session message)?"""
    try:
        obj = codec.decode(ciphertext)
    except CodecError:
        return False
    return isinstance(obj, dict) and "key_id" in obj and "type" not in obj


def encode_body(message_id: str, text: str, sent_ms: int) -> bytes:
    return codec.encode({"v": BODY_VERSION, "id": message_id, "text": text, "sent_ms": sent_ms})


def decode_body(data: bytes) -> tuple[str, str, int]:
    try:
        obj = require_map(codec.decode(data), "group message body")
        if field(obj, "v", int) != BODY_VERSION:
            raise UnsupportedVersion("unknown group message body version")
        return field(obj, "id", str, max_length=128), field(obj, "text", str), field(obj, "sent_ms", int)
    except (CodecError, ProtocolError):
        raise MalformedMessage("group message body does not parse") from None


def parse_group_id(group_id: str | bytes) -> bytes:
    raw = group_id if isinstance(group_id, bytes) else bytes.fromhex(group_id) if _is_hex(group_id) else b""
    if len(raw) != GROUP_ID_LEN:
        raise UnknownGroup("a group id is 64 hex characters")
    return raw


def _is_hex(text: str) -> bool:
    try:
        bytes.fromhex(text)
    except ValueError:
        return False
    return True


def conversation_of(group_id: bytes) -> str:
    """The history conversation name of a group (a keyed hash names it inside the store)."""
    return f"group:{group_id.hex()}"


def changed_event(state: GroupState, changes: tuple[str, ...], removed_me: bool = False) -> GroupChanged:
    return GroupChanged(state.group_id.hex(), state.epoch, state.name, tuple(str(u) for u in state.members),
                        tuple(str(u) for u in state.admins), changes, removed_me)


def describe(outcome: ControlOutcome) -> tuple[str, ...]:
    return tuple(f"{c.change.op.value} {c.change.target}" for c in outcome.applied)
