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

from clientsdk.crypto.errors import CryptoError, MalformedMessage, UnsupportedVersion
from clientsdk.crypto.group_session import GroupSession
from clientsdk.crypto.group_state import (
    GROUP_ID_LEN,
    ControlOutcome,
    GroupReplica,
    GroupState,
)
from clientsdk.crypto.sender_keys import KEY_ID_LEN, Distribution, GroupMessage, kdf_ck
from clientsdk.errors import SdkError, StoreCorrupted, StoreVersionUnsupported
from clientsdk.events import Event
from federation import codec
from federation.addresses import DeviceAddress
from federation.errors import CodecError, ProtocolError
from federation.validate import field, require_map

GROUP_CONTENT = "group"
BUNDLE_VERSION = 1
RECORD_VERSION = 2            # v1: ``given`` was a plain list of devices and there was no ``anchor``
BODY_VERSION = 1
MAX_CONTROLS_PER_BUNDLE = 64
ANCHOR_WINDOW = 1_000         # how far back (iterations) my chain can be re-served to a member device


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
    """One group as this device keeps it: the crypto session plus who holds my current chain.

    ``given`` maps each device holding my current chain to the iteration it got it
    from; ``anchor`` is that chain's distribution at the oldest iteration I may still
    hand out again (``ANCHOR_WINDOW``), so a member device that lost my key can ask
    for it and read the messages it is holding — never anything before its own
    ``given`` iteration.
    """

    session: GroupSession
    sent_key: bytes | None = None                 # key id of my chain that ``given`` refers to
    given: dict[str, int] = dc_field(default_factory=dict)
    outbox: list[OutboxItem] = dc_field(default_factory=list)
    anchor: bytes | None = None

    def to_bytes(self) -> bytes:
        return codec.encode({"v": RECORD_VERSION, "session": self.session.to_bytes(), "sent_key": self.sent_key,
                             "given": [[d, i] for d, i in sorted(self.given.items())], "anchor": self.anchor,
                             "outbox": [i.to_wire() for i in self.outbox]})

    @classmethod
    def from_bytes(cls, data: bytes, resolver: Callable[[DeviceAddress], bytes | None]) -> LocalGroup:
        try:
            obj = require_map(codec.decode(data), "group record")
            version = field(obj, "v", int)
            if version not in (1, RECORD_VERSION):
                raise UnsupportedVersion("unknown group record version")
            sent_key = obj.get("sent_key")
            anchor = obj.get("anchor")
            session = GroupSession.from_bytes(field(obj, "session", bytes), resolver)
            raw_given = field(obj, "given", list)
            if version == 1:       # no iterations were kept: re-serve nothing older than the chain is now
                since = session.outbound.iteration if session.outbound is not None else 0
                raw_given = [[g, since] for g in raw_given]
            if not all(isinstance(g, list) and len(g) == 2 and isinstance(g[0], str) and type(g[1]) is int
                       for g in raw_given):
                raise ProtocolError("group record has fields of the wrong type")
            if sent_key is not None and not isinstance(sent_key, bytes) \
                    or anchor is not None and not isinstance(anchor, bytes):
                raise ProtocolError("group record has fields of the wrong type")
            return cls(session, sent_key, {d: i for d, i in raw_given},
                       [OutboxItem.from_wire(i) for i in field(obj, "outbox", list)], anchor)
        except (CodecError, ProtocolError):
            raise MalformedMessage("group record does not parse") from None

    def served_distribution(self, device: str, key_id: bytes, iteration: int) -> bytes | None:
        """My chain ``key_id`` for ``device`` from ``iteration`` on (never before what it was given), or None."""
        start = self.given.get(device)
        if self.anchor is None or start is None or self.sent_key != key_id:
            return None
        anchor = Distribution.from_bytes(self.anchor)
        outbound = self.session.outbound
        target = max(start, iteration, anchor.iteration)
        if anchor.key_id != key_id or outbound is None or outbound.key_id != key_id or target > outbound.iteration:
            return None
        return advance(anchor, target).to_bytes()

    def note_sent(self, iteration: int) -> None:
        """After a send at ``iteration``: keep the anchor within ``ANCHOR_WINDOW`` of it."""
        if self.anchor is not None:
            anchor = Distribution.from_bytes(self.anchor)
            if iteration - anchor.iteration > ANCHOR_WINDOW:
                self.anchor = advance(anchor, iteration - ANCHOR_WINDOW).to_bytes()


def advance(distribution: Distribution, iteration: int) -> Distribution:
    """The same chain from a later ``iteration`` (one KDF step per iteration; the chain is one-way)."""
    chain_key = distribution.chain_key
    for _ in range(iteration - distribution.iteration):
        chain_key = kdf_ck(chain_key)[1]
    return Distribution(distribution.group_id, distribution.epoch, distribution.key_id, iteration, chain_key,
                        distribution.signing_key)


def replica_for(data: bytes, me: DeviceAddress) -> GroupReplica:
    """A replica's bytes (states and signed changes, no keys) as ``me``'s own copy (sync, restore)."""
    try:
        obj = require_map(codec.decode(data), "group replica")
    except (CodecError, ProtocolError):
        raise MalformedMessage("group replica does not parse") from None
    obj["me"] = str(me)
    return GroupReplica.from_bytes(codec.encode(obj))


@dataclass(frozen=True, slots=True)
class GroupBundle:
    """A pairwise group content; ``sync`` (a replica, from my own devices only) and ``reply``
    (the key id a key request asked for) are optional, so older readers ignore them."""

    group_id: bytes
    welcome: bytes | None = None
    controls: tuple[bytes, ...] = ()
    distribution: bytes | None = None
    message: bytes | None = None
    sync: bytes | None = None
    reply: bytes | None = None

    def to_bytes(self) -> bytes:
        obj: dict[str, Any] = {"v": BUNDLE_VERSION, "group_id": self.group_id}
        if self.welcome is not None:
            obj["welcome"] = self.welcome
        if self.sync is not None:
            obj["sync"] = self.sync
        if self.reply is not None:
            obj["reply"] = self.reply
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
            reply = field(obj, "reply", bytes, default=None)
            if reply is not None and len(reply) != KEY_ID_LEN:
                raise ProtocolError("group bundle reply must be a key id")
            return cls(field(obj, "group_id", bytes, length=GROUP_ID_LEN),
                       field(obj, "welcome", bytes, default=None), tuple(controls),
                       field(obj, "distribution", bytes, default=None), field(obj, "message", bytes, default=None),
                       field(obj, "sync", bytes, default=None), reply)
        except (CodecError, ProtocolError):
            raise MalformedMessage("group bundle does not parse") from None


def is_group_message(ciphertext: bytes) -> bool:
    """Does an envelope carry a sender-key group message (rather than a pairwise session message)?"""
    try:
        return is_group_wire(codec.decode(ciphertext))
    except CodecError:
        return False


def is_group_wire(decoded: object) -> bool:
    """``is_group_message`` of an envelope's ciphertext already decoded."""
    return isinstance(decoded, dict) and "key_id" in decoded and "type" not in decoded


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


# --- sender-key recovery (LESSONS #1) ---------------------------------------------------------

HOLDS_KV = "group_holds"
HOLDS_VERSION = 1
HOLD_MS = 10 * 60_000             # how long an undecryptable group message waits for its key
REQUEST_INTERVAL_MS = 60_000      # at most one key request per (group, sender device) per minute
MAX_REQUESTS = 3                  # per (group, sender device) until it answers
MAX_HELD_PER_DEVICE = 16
MAX_HELD = 64
MAX_ANSWERS = 64


@dataclass(frozen=True, slots=True)
class KeyRequest:
    """``sender_key_request`` content: ``refs = [group id hex, device address, key id hex, iteration]``.

    Asks ``device`` (the sender of a message under ``key_id``) for its chain of the
    group from ``iteration`` on; only that device answers.
    """

    group_id: bytes
    device: str
    key_id: bytes
    iteration: int

    def to_refs(self) -> tuple[str, ...]:
        return (self.group_id.hex(), self.device, self.key_id.hex(), str(self.iteration))

    @classmethod
    def from_refs(cls, refs: tuple[str, ...] | list[str]) -> KeyRequest:
        try:
            if len(refs) != 4 or not all(isinstance(r, str) for r in refs) or not refs[3].isdigit() \
                    or len(refs[3]) > 10:
                raise ValueError
            request = cls(bytes.fromhex(refs[0]), str(DeviceAddress.parse(refs[1])), bytes.fromhex(refs[2]),
                          int(refs[3]))
        except (ValueError, ProtocolError):
            raise MalformedMessage("malformed sender key request") from None
        if len(request.group_id) != GROUP_ID_LEN or len(request.key_id) != KEY_ID_LEN:
            raise MalformedMessage("malformed sender key request")
        return request


@dataclass(slots=True)
class Held:
    """A group message waiting for its key: a shared ciphertext (``group_ids`` = the groups it may
    belong to: it names none) or, ``bundle``, a pairwise group content for a group not known yet."""

    sender: str
    group_ids: list[bytes]
    data: bytes
    since_ms: int
    bundle: bool = False

    def key(self) -> tuple[bytes, int] | None:
        """(key id, iteration) of a held shared ciphertext."""
        if self.bundle:
            return None
        try:
            message = GroupMessage.from_bytes(self.data)
        except CryptoError:
            return None
        return message.key_id, message.iteration

    def to_wire(self) -> list[Any]:
        return [self.sender, list(self.group_ids), self.data, self.since_ms, self.bundle]


class KeyRecovery:
    """Sans-I/O book of held group messages, key requests to send and requests to answer.

    Persisted as one store row (``HOLDS_KV``) in the same hop as the batch that
    changed it, so a held message survives a restart and its loss is always reported.
    """

    __slots__ = ("answers", "due", "held", "requests")

    def __init__(self) -> None:
        self.held: list[Held] = []
        self.requests: dict[tuple[bytes, str], tuple[int, int]] = {}   # (gid, device) -> (last ms, count)
        self.due: list[KeyRequest] = []                 # requests of mine not sent yet
        self.answers: list[tuple[str, KeyRequest]] = []  # (requester device, request) not answered yet

    def __repr__(self) -> str:
        return f"KeyRecovery({len(self.held)} held, {len(self.due)} due, {len(self.answers)} to answer)"

    @property
    def busy(self) -> bool:
        return bool(self.held or self.due or self.answers)

    def hold(self, item: Held) -> list[Held]:
        """Keep ``item``; returns what the caps evicted (the oldest), to be reported as lost."""
        self.held.append(item)
        evicted: list[Held] = []
        mine = [h for h in self.held if h.sender == item.sender]
        if len(mine) > MAX_HELD_PER_DEVICE:
            evicted.append(mine[0])
        for old in evicted:
            self.held.remove(old)
        while len(self.held) > MAX_HELD:
            evicted.append(self.held.pop(0))
        return evicted

    def want_request(self, group_id: bytes, device: str, key_id: bytes, iteration: int, now_ms: int) -> bool:
        """Queue a request to ``device`` unless one went out within the interval or too many went unanswered."""
        last, count = self.requests.get((group_id, device), (None, 0))
        if last is not None and now_ms - last < REQUEST_INTERVAL_MS or count >= MAX_REQUESTS:
            return False
        self.requests[(group_id, device)] = (now_ms, count + 1)
        self.due.append(KeyRequest(group_id, device, key_id, iteration))
        return True

    def answered(self, group_id: bytes, device: str) -> None:
        self.requests.pop((group_id, device), None)

    def waiting(self, sender: str, group_id: bytes) -> list[Held]:
        """Held shared ciphertexts of ``sender`` that may belong to ``group_id``."""
        return [h for h in self.held if not h.bundle and h.sender == sender and group_id in h.group_ids]

    def bundles_for(self, group_id: bytes) -> list[Held]:
        """Held pairwise contents for ``group_id`` (now known): removed from the book."""
        out = [h for h in self.held if h.bundle and group_id in h.group_ids]
        for item in out:
            self.held.remove(item)
        return out

    def drop(self, item: Held) -> None:
        if item in self.held:
            self.held.remove(item)

    def expired(self, now_ms: int) -> list[Held]:
        """Held items whose wait is over: removed from the book, to be reported as lost."""
        out = [h for h in self.held if now_ms - h.since_ms >= HOLD_MS]
        for item in out:
            self.held.remove(item)
        for key in [k for k, (last, _) in self.requests.items() if now_ms - last >= HOLD_MS]:
            del self.requests[key]
        return out

    def next_deadline(self) -> int | None:
        return min((h.since_ms + HOLD_MS for h in self.held), default=None)

    def want_answer(self, requester: str, request: KeyRequest) -> bool:
        if any(r == requester and q.group_id == request.group_id for r, q in self.answers) \
                or len(self.answers) >= MAX_ANSWERS:
            return False
        self.answers.append((requester, request))
        return True

    def to_bytes(self) -> bytes:
        return codec.encode({
            "v": HOLDS_VERSION, "held": [h.to_wire() for h in self.held],
            "requests": [[g, d, last, count] for (g, d), (last, count) in sorted(self.requests.items())],
            "due": [list(r.to_refs()) for r in self.due],
            "answers": [[d, list(r.to_refs())] for d, r in self.answers]})

    @classmethod
    def from_bytes(cls, data: bytes) -> KeyRecovery:
        try:
            obj = require_map(codec.decode(data), "group holds")
            if field(obj, "v", int) != HOLDS_VERSION:
                raise StoreVersionUnsupported("the group holds record has an unknown version")
            book = cls()
            for sender, gids, payload, since, bundle in field(obj, "held", list):
                if not (isinstance(sender, str) and isinstance(gids, list) and all(isinstance(g, bytes) for g in gids)
                        and isinstance(payload, bytes) and type(since) is int and isinstance(bundle, bool)):
                    raise ProtocolError("held entry")
                book.held.append(Held(sender, gids, payload, since, bundle))
            for gid, device, last, count in field(obj, "requests", list):
                if not (isinstance(gid, bytes) and isinstance(device, str) and type(last) is int
                        and type(count) is int):
                    raise ProtocolError("request entry")
                book.requests[(gid, device)] = (last, count)
            book.due = [KeyRequest.from_refs(r) for r in field(obj, "due", list)]
            book.answers = [(d, KeyRequest.from_refs(r)) for d, r in field(obj, "answers", list)
                            if isinstance(d, str)]
            return book
        except (CodecError, ProtocolError, MalformedMessage, TypeError, ValueError):
            raise StoreCorrupted("the group holds record does not parse") from None
