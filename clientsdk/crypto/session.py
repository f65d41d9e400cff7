"""A pairwise session between (my device, their device): PQXDH + Double Ratchet.

Wire forms (canonical msgpack, version ``v`` = 1)::

    prekey message  {v, type: "prekey", ik, ek, spk, [otk], pq, kem, body}
    normal message  {v, type: "msg", body}

``body`` is the ratchet message (header ‖ ciphertext ‖ tag).  The initiator sends
prekey messages — carrying the PQXDH fields IK_A, EK_A, the signed/one-time/PQ
prekey ids and the ML-KEM ciphertext — until its first reply decrypts.  Every
PQXDH field is bound by the shared key, so tampering with one fails the tag.

The responder's ``accept_prekey_message`` runs PQXDH without touching the prekey
store, decrypts, and only then records the replay hash and deletes the used
one-time prekeys.  Time and randomness are parameters; nothing here does I/O.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from clientsdk.crypto import primitives
from clientsdk.crypto.errors import InvalidKey, MalformedMessage, UnsupportedVersion
from clientsdk.crypto.identity import DeviceIdentity, PrekeyStore
from clientsdk.crypto.pqxdh import Encapsulate, InitialMessage, initiate, mlkem_encapsulate, respond
from clientsdk.crypto.primitives import Rng, system_rng
from clientsdk.crypto.ratchet import U32_MAX, RatchetMessage, RatchetState
from federation import codec
from federation.addresses import DeviceAddress
from federation.errors import AddressError, CodecError, ProtocolError
from federation.keys import PrekeyBundle
from federation.validate import field, non_negative, require_map

WIRE_VERSION = 1
STATE_VERSION = 1
PREKEY = "prekey"
NORMAL = "msg"
_PREKEY_FIELDS = {"v", "type", "ik", "ek", "spk", "otk", "pq", "kem", "body"}
_NORMAL_FIELDS = {"v", "type", "body"}
SEND_LEASE = 32
"""Message indices a sender reserves per durable store write (``Session.renew_send_lease``)."""
_STATE_LIMITS = codec.Limits(max_bytes=4 << 20, max_items=40_000, max_container=10_000)


# --- wire messages ---------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class PrekeyMessage:
    initial: InitialMessage
    body: bytes

    def to_bytes(self) -> bytes:
        i = self.initial
        out: dict[str, Any] = {"v": WIRE_VERSION, "type": PREKEY, "ik": i.identity_key, "ek": i.ephemeral_key,
                               "spk": i.signed_prekey_id, "pq": i.pq_prekey_id, "kem": i.kem_ciphertext,
                               "body": self.body}
        if i.one_time_prekey_id is not None:
            out["otk"] = i.one_time_prekey_id
        return codec.encode(out)


@dataclass(frozen=True, slots=True)
class NormalMessage:
    body: bytes

    def to_bytes(self) -> bytes:
        return codec.encode({"v": WIRE_VERSION, "type": NORMAL, "body": self.body})


def parse_message(data: bytes) -> PrekeyMessage | NormalMessage:
    """Parse a session message; ``MalformedMessage`` or ``UnsupportedVersion`` on bad input."""
    try:
        decoded = codec.decode(data)
    except ProtocolError as exc:
        raise MalformedMessage(f"malformed session message: {exc.message}") from None
    return message_from_wire(decoded)


def message_from_wire(decoded: object) -> PrekeyMessage | NormalMessage:
    """``parse_message`` of bytes already decoded (the inbox decodes an envelope's once)."""
    try:
        obj = require_map(decoded, "session message")
        if field(obj, "v", int) != WIRE_VERSION:
            raise UnsupportedVersion("unknown session message version")
        kind = field(obj, "type", str)
        body = field(obj, "body", bytes)
        if kind == NORMAL:
            if set(obj) != _NORMAL_FIELDS:
                raise MalformedMessage("unexpected fields in session message")
            return NormalMessage(body)
        if kind != PREKEY:
            raise MalformedMessage("unknown session message type")
        if not set(obj) <= _PREKEY_FIELDS:
            raise MalformedMessage("unexpected fields in prekey message")
        otk = obj.get("otk")
        if otk is not None:
            otk = non_negative(field(obj, "otk", int), "otk")
        initial = InitialMessage(
            field(obj, "ik", bytes), field(obj, "ek", bytes),
            non_negative(field(obj, "spk", int), "spk"), otk,
            non_negative(field(obj, "pq", int), "pq"), field(obj, "kem", bytes))
        return PrekeyMessage(initial, body)
    except ProtocolError as exc:
        raise MalformedMessage(f"malformed session message: {exc.message}") from None


# --- sessions ------------------------------------------------------------------------------


class Session:
    """One ratchet session with one remote device; serialises to versioned bytes."""

    __slots__ = ("my_address", "their_address", "their_identity_key", "associated_data", "initiator",
                 "initial_hash", "_pending", "_ratchet", "_send_lease")

    def __init__(self, my_address: DeviceAddress, their_address: DeviceAddress, their_identity_key: bytes,
                 associated_data: bytes, initiator: bool, initial_hash: bytes,
                 pending: InitialMessage | None, ratchet: RatchetState, send_lease: int = 0) -> None:
        self.my_address = my_address
        self.their_address = their_address
        self.their_identity_key = their_identity_key
        self.associated_data = associated_data
        self.initiator = initiator
        self.initial_hash = initial_hash        # identifies the PQXDH run this session came from
        self._pending = pending                 # PQXDH fields to send until the first reply
        self._ratchet = ratchet
        self._send_lease = send_lease           # sending indices below it may have left unsynced

    def __repr__(self) -> str:
        return f"Session({self.my_address} -> {self.their_address}, awaiting_reply={self.awaiting_reply})"

    @classmethod
    def initiate(cls, me: DeviceIdentity, my_address: DeviceAddress, bundle: PrekeyBundle, *,
                 rng: Rng = system_rng, encapsulate: Encapsulate = mlkem_encapsulate) -> Session:
        """Start a session from a claimed bundle (``BadBundle`` / ``InvalidKey`` on a bad one)."""
        agreement = initiate(me, my_address, bundle, rng, encapsulate)
        ratchet = RatchetState.initiator(agreement.shared_key, agreement.their_ratchet_key, rng)
        return cls(my_address, agreement.their_address, agreement.their_identity_key,
                   agreement.associated_data, True, agreement.initial.replay_hash, agreement.initial, ratchet)

    @property
    def awaiting_reply(self) -> bool:
        """True while outgoing messages are prekey messages."""
        return self._pending is not None

    @property
    def ratchet(self) -> RatchetState:
        return self._ratchet

    def encrypt(self, plaintext: bytes) -> bytes:
        body = self._ratchet.encrypt(plaintext, self.associated_data).to_bytes()
        if self._pending is not None:
            return PrekeyMessage(self._pending, body).to_bytes()
        return NormalMessage(body).to_bytes()

    # -- the send lease: which states must be fsynced before their ciphertext leaves --
    #
    # A sender whose store rolls back (a power cut loses what was written but not yet
    # fsynced) must never encrypt again under a message key that already left.  Rather
    # than fsync every send, a durable write reserves SEND_LEASE indices of the current
    # sending chain: sends inside the reservation are stored without waiting for the
    # disk, and a restart from any older state first skips the whole reservation.

    # A DH step on receipt starts a new chain with a lease already reserved: the receiving
    # client stores that state durably anyway (before its ack).

    def renew_send_lease(self) -> bool:
        """Before ``encrypt``: True if the next index lies beyond the reservation, which then grows.

        On True the state (with the new reservation) must be durable before the
        ciphertext leaves; on False an unsynced write is enough.
        """
        number = self._ratchet.counters[0]
        if number < self._send_lease:
            return False
        self._send_lease = number + SEND_LEASE
        return True

    def recover_send_lease(self) -> bool:
        """After a restart: skip the sending chain past every reserved index; True if it moved.

        The stored state may predate sends that left (unsynced); indices below the
        reservation may have been used, so the next message starts at its end.
        """
        before = self._ratchet.counters[0]
        self._ratchet.skip_sending_to(self._send_lease)
        return self._ratchet.counters[0] != before

    def release_send_lease(self) -> bool:
        """Before a clean close: nothing unsynced will be lost, so a restart need skip nothing.

        True if the reservation changed (the state must be stored again).
        """
        released = min(self._send_lease, self._ratchet.counters[0])
        changed, self._send_lease = released != self._send_lease, released
        return changed

    def belongs_here(self, message: PrekeyMessage) -> bool:
        """True if a prekey message continues this (responder) session rather than starting a new one."""
        return not self.initiator and message.initial.replay_hash == self.initial_hash

    def decrypt(self, data: bytes | PrekeyMessage | NormalMessage, now_ms: int, rng: Rng = system_rng) -> bytes:
        """Decrypt a message of this session; the state changes only on success.

        Raises ``MalformedMessage``, ``DecryptionFailed``, ``ReplayedMessage``,
        ``TooManySkipped`` or ``InvalidKey``.  A prekey message that starts a different
        PQXDH run is ``MalformedMessage``: pass it to ``accept_prekey_message``.
        """
        message = parse_message(data) if isinstance(data, bytes) else data
        if isinstance(message, PrekeyMessage) and not self.belongs_here(message):
            raise MalformedMessage("prekey message does not belong to this session")
        sending_key = self._ratchet.ratchet_public_key
        plaintext = self._ratchet.decrypt(RatchetMessage.from_bytes(message.body), self.associated_data,
                                          now_ms, rng)
        if self._ratchet.ratchet_public_key != sending_key:
            # A DH step: a new sending chain (from fresh randomness, so a state rolled back to
            # before it never meets its keys again).  Its first lease comes with this state.
            self._send_lease = SEND_LEASE
        self._pending = None     # a reply decrypted: the peer has the session
        return plaintext

    # -- serialisation --

    def to_bytes(self) -> bytes:
        obj: dict[str, Any] = {
            "v": STATE_VERSION, "me": str(self.my_address), "them": str(self.their_address),
            "their_ik": self.their_identity_key, "ad": self.associated_data, "initiator": self.initiator,
            "initial_hash": self.initial_hash, "ratchet": self._ratchet.to_wire(), "send_lease": self._send_lease,
        }
        if self._pending is not None:
            obj["pending"] = PrekeyMessage(self._pending, b"").to_bytes()
        return codec.encode(obj, _STATE_LIMITS)

    @classmethod
    def from_bytes(cls, data: bytes) -> Session:
        try:
            obj = require_map(codec.decode(data, _STATE_LIMITS), "session state")
            if field(obj, "v", int) != STATE_VERSION:
                raise UnsupportedVersion("unknown session state version")
            pending = None
            if "pending" in obj:
                parsed = parse_message(field(obj, "pending", bytes))
                if not isinstance(parsed, PrekeyMessage):
                    raise MalformedMessage("malformed session state")
                pending = parsed.initial
            return cls(DeviceAddress.parse(field(obj, "me", str)), DeviceAddress.parse(field(obj, "them", str)),
                       field(obj, "their_ik", bytes, length=32), field(obj, "ad", bytes),
                       field(obj, "initiator", bool), field(obj, "initial_hash", bytes, length=32), pending,
                       RatchetState.from_wire(obj.get("ratchet")),
                       _send_lease(obj))
        except (CodecError, ProtocolError, AddressError) as exc:
            raise MalformedMessage(f"malformed session state: {exc.message}") from None


def _send_lease(state: dict[str, Any]) -> int:
    """The stored reservation (absent in states written before it existed: nothing reserved)."""
    if "send_lease" not in state:
        return 0
    lease = non_negative(field(state, "send_lease", int), "send_lease")
    if lease > U32_MAX:
        raise MalformedMessage("malformed session state: send lease out of range")
    return lease


def accept_prekey_message(me: DeviceIdentity, my_address: DeviceAddress, prekeys: PrekeyStore,
                          their_address: DeviceAddress, their_identity_key: bytes,
                          data: bytes | PrekeyMessage, now_ms: int,
                          rng: Rng = system_rng) -> tuple[Session, bytes]:
    """Create the responder's session from a prekey message and decrypt it.

    ``their_identity_key`` is the sender device's key from its verified device list;
    a prekey message carrying another key raises ``InvalidKey``.  Only after the
    message decrypts are the replay hash recorded and the one-time prekeys deleted,
    so a forged message cannot burn them.  Raises ``ReplayedMessage`` for a replayed
    initial message, ``UnknownPrekey``, ``MalformedMessage``, ``DecryptionFailed``.
    """
    message = parse_message(data) if isinstance(data, bytes) else data
    if not isinstance(message, PrekeyMessage):
        raise MalformedMessage("not a prekey message")
    initial = message.initial
    if not primitives.ct_equal(initial.identity_key, their_identity_key):
        raise InvalidKey("identity key in the prekey message is not the sender's listed key")
    ratchet_message = RatchetMessage.from_bytes(message.body)
    agreement = respond(me, my_address, their_address, prekeys, initial)
    ratchet = RatchetState.responder(agreement.shared_key, agreement.my_ratchet_key)
    plaintext = ratchet.decrypt(ratchet_message, agreement.associated_data, now_ms, rng)
    prekeys.commit_initial(initial.signed_prekey_id, initial.replay_hash, initial.one_time_prekey_id,
                           initial.pq_prekey_id)
    session = Session(my_address, their_address, their_identity_key, agreement.associated_data, False,
                      initial.replay_hash, None, ratchet)
    return session, plaintext
