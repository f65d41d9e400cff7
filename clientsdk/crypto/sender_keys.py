"""Sender Keys for groups (DESIGN §4, parameters normative).

Each (group, sender device) has a *chain*: a 32-byte chain key, an iteration
counter and an Ed25519 signing key, named by a random 8-byte key id (never the
group id, which is never sent in the clear).  The sender hands the chain to the
other members once, as a *distribution message* carried over pairwise sessions;
afterwards each group message is encrypted **once**, signed once, and fanned out
by the server to every member device.

Bytes (normative):

* KDF_CK as in the Double Ratchet: ``MK = HMAC-SHA-256(CK, 0x01)``,
  ``CK' = HMAC-SHA-256(CK, 0x02)``.
* Per message: ``HKDF-SHA-256(salt = 32 zero bytes, IKM = MK,
  info = "SecureChat_SenderKey_v1", 44 bytes) -> AES-256 key (32) ‖ GCM nonce (12)``.
* AEAD associated data: ``canonical [version, key_id, iteration]``.
* Encrypted content: ``canonical {body: bin, epoch: int, group_id: bin}``, so the
  receiver checks the message belongs to the chain's group and learns its epoch.
* Group message: ``canonical {v, key_id, iteration, ciphertext, signature}``; the
  signature is ``federation.signing.sign(signing_key, Purpose.SENDER_KEY,
  {v, key_id, iteration, ciphertext})``.
* Distribution message: ``canonical {v, group_id, epoch, key_id, iteration,
  chain_key, signing_key}`` (``signing_key`` is the 32-byte public key).

Receivers accept out-of-order messages: at most ``MAX_SKIP`` keys are skipped in
one step, at most ``MAX_STORED_SKIPPED`` are kept per chain (oldest evicted), each
for at most ``SKIPPED_KEY_TTL_MS``.  A message that fails verification or
authentication leaves the state untouched (everything is computed first and
committed only on success); a replay raises ``ReplayedMessage``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from clientsdk.crypto.errors import (
    CryptoError,
    DecryptionFailed,
    MalformedMessage,
    ReplayedMessage,
    TooManySkipped,
    UnsupportedVersion,
)
from clientsdk.crypto.primitives import ZERO_SALT, Rng, ct_equal, hkdf_sha256, hmac_sha256
from federation import codec, signing
from federation.errors import InvalidSignature, ProtocolError
from federation.signing import Purpose
from federation.validate import field, require_map

VERSION = 1
MAX_SKIP = 1_000
MAX_STORED_SKIPPED = 2_000
SKIPPED_KEY_TTL_MS = 30 * 24 * 3600 * 1000
MAX_ITERATION = 2**32 - 1
KEY_ID_LEN = 8
CHAIN_KEY_LEN = 32
GROUP_ID_LEN = 32
INFO = b"SecureChat_SenderKey_v1"
MAX_BODY = 256 * 1024
_MAX_MESSAGE = MAX_BODY + 1024

_MESSAGE_KEY_SEED = b"\x01"
_CHAIN_KEY_SEED = b"\x02"


class UnknownSenderKey(DecryptionFailed):
    """A group message under a key id this state does not hold (e.g. a rotated-away chain)."""

    code = "unknown_sender_key"


class ChainExhausted(CryptoError):
    """The sending chain reached its last iteration; rotate before sending again."""

    code = "chain_exhausted"


# --- KDFs ---------------------------------------------------------------------------


def kdf_ck(chain_key: bytes) -> tuple[bytes, bytes]:
    """``(message key, next chain key)`` of one chain step."""
    return hmac_sha256(chain_key, _MESSAGE_KEY_SEED), hmac_sha256(chain_key, _CHAIN_KEY_SEED)


def message_aead_key(message_key: bytes) -> tuple[bytes, bytes]:
    """``(AES-256 key, 12-byte nonce)`` for one message key."""
    okm = hkdf_sha256(message_key, ZERO_SALT, INFO, 44)
    return okm[:32], okm[32:]


def associated_data(key_id: bytes, iteration: int) -> bytes:
    return codec.encode([VERSION, key_id, iteration])


def encode_content(group_id: bytes, epoch: int, body: bytes) -> bytes:
    return codec.encode({"body": body, "epoch": epoch, "group_id": group_id})


# --- wire types ---------------------------------------------------------------------


def _decode_map(data: bytes, what: str) -> dict[str, Any]:
    """Decode a versioned map; malformed bytes -> ``MalformedMessage``, other versions -> ``UnsupportedVersion``."""
    if not isinstance(data, (bytes, bytearray)) or len(data) > _MAX_MESSAGE:
        raise MalformedMessage(f"{what} is not bytes of an acceptable size")
    try:
        obj = require_map(codec.decode(bytes(data)), what)
        version = field(obj, "v", int)
    except ProtocolError:
        raise MalformedMessage(f"{what} does not parse") from None
    if version != VERSION:
        raise UnsupportedVersion(f"{what} version {version} is not supported")
    return obj


def _fields(obj: dict[str, Any], what: str, spec: dict[str, tuple[type, int | None]]) -> dict[str, Any]:
    """Exactly the keys of ``spec`` (plus ``v``), each of the right type and length."""
    if set(obj) != set(spec) | {"v"}:
        raise MalformedMessage(f"{what} has unexpected or missing fields")
    out: dict[str, Any] = {}
    try:
        for name, (kind, length) in spec.items():
            out[name] = field(obj, name, kind, length=length)
    except ProtocolError:
        raise MalformedMessage(f"{what} has a field of the wrong type or length") from None
    for name, value in out.items():
        if isinstance(value, int) and not 0 <= value <= MAX_ITERATION:
            raise MalformedMessage(f"{what} field {name!r} is out of range")
    return out


@dataclass(frozen=True, slots=True)
class GroupMessage:
    """One sender-key group message as it travels (encrypted once, signed once)."""

    key_id: bytes
    iteration: int
    ciphertext: bytes
    signature: bytes

    def signed_fields(self) -> dict[str, Any]:
        return {"v": VERSION, "key_id": self.key_id, "iteration": self.iteration,
                "ciphertext": self.ciphertext}

    def to_bytes(self) -> bytes:
        return codec.encode({**self.signed_fields(), "signature": self.signature})

    @classmethod
    def from_bytes(cls, data: bytes) -> GroupMessage:
        """Parse only; lets the SDK route a message by key id before decrypting."""
        obj = _decode_map(data, "group message")
        f = _fields(obj, "group message", {
            "key_id": (bytes, KEY_ID_LEN), "iteration": (int, None),
            "ciphertext": (bytes, None), "signature": (bytes, signing.SIGNATURE_LEN)})
        if len(f["ciphertext"]) < 16:
            raise MalformedMessage("group message ciphertext is too short")
        return cls(f["key_id"], f["iteration"], f["ciphertext"], f["signature"])


@dataclass(frozen=True, slots=True)
class Distribution:
    """A chain handed to one member over a pairwise session (never sent in the clear)."""

    group_id: bytes
    epoch: int
    key_id: bytes
    iteration: int
    chain_key: bytes
    signing_key: bytes

    def __repr__(self) -> str:
        return f"Distribution(key_id={self.key_id.hex()}, epoch={self.epoch}, iteration={self.iteration})"

    def to_bytes(self) -> bytes:
        return codec.encode({"v": VERSION, "group_id": self.group_id, "epoch": self.epoch,
                             "key_id": self.key_id, "iteration": self.iteration,
                             "chain_key": self.chain_key, "signing_key": self.signing_key})

    @classmethod
    def from_bytes(cls, data: bytes) -> Distribution:
        obj = _decode_map(data, "sender-key distribution")
        f = _fields(obj, "sender-key distribution", {
            "group_id": (bytes, GROUP_ID_LEN), "epoch": (int, None), "key_id": (bytes, KEY_ID_LEN),
            "iteration": (int, None), "chain_key": (bytes, CHAIN_KEY_LEN),
            "signing_key": (bytes, signing.PUBLIC_KEY_LEN)})
        return cls(**f)


@dataclass(frozen=True, slots=True)
class GroupPlaintext:
    """What a receiver learns from one group message."""

    group_id: bytes
    epoch: int
    iteration: int
    body: bytes


# --- sending chain ------------------------------------------------------------------


class OutboundSenderKey:
    """My sending chain for one group.  ``encrypt`` advances it; never reuse an older copy."""

    __slots__ = ("group_id", "epoch", "key_id", "iteration", "_chain_key", "_signing_key")

    def __init__(self, group_id: bytes, epoch: int, key_id: bytes, iteration: int,
                 chain_key: bytes, signing_key: Ed25519PrivateKey) -> None:
        if len(group_id) != GROUP_ID_LEN or len(key_id) != KEY_ID_LEN or len(chain_key) != CHAIN_KEY_LEN:
            raise MalformedMessage("group id, key id or chain key has the wrong length")
        if not 0 <= iteration <= MAX_ITERATION + 1 or epoch < 0:
            raise MalformedMessage("iteration or epoch out of range")
        self.group_id = group_id
        self.epoch = epoch
        self.key_id = key_id
        self.iteration = iteration
        self._chain_key = chain_key
        self._signing_key = signing_key

    def __repr__(self) -> str:
        return f"OutboundSenderKey(key_id={self.key_id.hex()}, epoch={self.epoch}, iteration={self.iteration})"

    @classmethod
    def create(cls, group_id: bytes, epoch: int, rng: Rng) -> OutboundSenderKey:
        """A fresh chain (new key id, chain key and signing key) for ``epoch``."""
        key_id = rng(KEY_ID_LEN)
        chain_key = rng(CHAIN_KEY_LEN)
        signing_key = Ed25519PrivateKey.from_private_bytes(rng(32))
        return cls(group_id, epoch, key_id, 0, chain_key, signing_key)

    def rotate(self, epoch: int, rng: Rng) -> OutboundSenderKey:
        """A fresh chain and signing key with a new key id; the old chain must be discarded."""
        while True:
            fresh = OutboundSenderKey.create(self.group_id, epoch, rng)
            if fresh.key_id != self.key_id:
                return fresh

    @property
    def signing_public_key(self) -> bytes:
        return signing.public_bytes(self._signing_key)

    def distribution(self) -> Distribution:
        """The chain from the *next* iteration on: a new recipient cannot read earlier messages."""
        if self.iteration > MAX_ITERATION:
            raise ChainExhausted("sending chain exhausted; rotate")
        return Distribution(self.group_id, self.epoch, self.key_id, self.iteration,
                            self._chain_key, self.signing_public_key)

    def encrypt(self, body: bytes, epoch: int) -> bytes:
        """Encrypt and sign ``body`` once for every member; ``epoch`` is the group's current epoch."""
        if not isinstance(body, bytes) or len(body) > MAX_BODY:
            raise CryptoError("group message body must be bytes of at most MAX_BODY")
        if epoch < self.epoch:
            raise CryptoError("cannot send for an epoch older than the sender key's")
        if self.iteration > MAX_ITERATION:
            raise ChainExhausted("sending chain exhausted; rotate")
        message_key, next_chain_key = kdf_ck(self._chain_key)
        key, nonce = message_aead_key(message_key)
        ciphertext = AESGCM(key).encrypt(nonce, encode_content(self.group_id, epoch, body),
                                         associated_data(self.key_id, self.iteration))
        unsigned = GroupMessage(self.key_id, self.iteration, ciphertext, b"")
        signature = signing.sign(self._signing_key, Purpose.SENDER_KEY, unsigned.signed_fields())
        message = GroupMessage(self.key_id, self.iteration, ciphertext, signature).to_bytes()
        self._chain_key = next_chain_key
        self.iteration += 1
        return message

    def to_bytes(self) -> bytes:
        """Versioned local state (client store only; never in backups)."""
        return codec.encode({"v": VERSION, "kind": "outbound", "group_id": self.group_id,
                             "epoch": self.epoch, "key_id": self.key_id, "iteration": self.iteration,
                             "chain_key": self._chain_key,
                             "signing_seed": self._signing_key.private_bytes_raw()})

    @classmethod
    def from_bytes(cls, data: bytes) -> OutboundSenderKey:
        obj = _decode_map(data, "outbound sender-key state")
        if obj.get("kind") != "outbound":
            raise MalformedMessage("not an outbound sender-key state")
        obj = {k: v for k, v in obj.items() if k != "kind"}
        f = _fields(obj, "outbound sender-key state", {
            "group_id": (bytes, GROUP_ID_LEN), "epoch": (int, None), "key_id": (bytes, KEY_ID_LEN),
            "iteration": (int, None), "chain_key": (bytes, CHAIN_KEY_LEN), "signing_seed": (bytes, 32)})
        return cls(f["group_id"], f["epoch"], f["key_id"], f["iteration"], f["chain_key"],
                   Ed25519PrivateKey.from_private_bytes(f["signing_seed"]))


# --- receiving chain ----------------------------------------------------------------


class InboundSenderKey:
    """Another member's chain as I received it, with its skipped message keys."""

    __slots__ = ("group_id", "epoch", "key_id", "signing_key", "iteration", "_chain_key", "_skipped")

    def __init__(self, group_id: bytes, epoch: int, key_id: bytes, signing_key: bytes,
                 iteration: int, chain_key: bytes,
                 skipped: dict[int, tuple[bytes, int]] | None = None) -> None:
        self.group_id = group_id
        self.epoch = epoch
        self.key_id = key_id
        self.signing_key = signing_key
        self.iteration = iteration          # next iteration the chain key derives
        self._chain_key = chain_key
        # iteration -> (message key, stored_ms), in increasing iteration order
        self._skipped: dict[int, tuple[bytes, int]] = dict(skipped or {})

    def __repr__(self) -> str:
        return (f"InboundSenderKey(key_id={self.key_id.hex()}, epoch={self.epoch}, "
                f"iteration={self.iteration}, skipped={len(self._skipped)})")

    @classmethod
    def from_distribution(cls, distribution: Distribution | bytes) -> InboundSenderKey:
        if isinstance(distribution, (bytes, bytearray)):
            distribution = Distribution.from_bytes(bytes(distribution))
        return cls(distribution.group_id, distribution.epoch, distribution.key_id,
                   distribution.signing_key, distribution.iteration, distribution.chain_key)

    @property
    def skipped_count(self) -> int:
        return len(self._skipped)

    def decrypt(self, message: GroupMessage | bytes, now_ms: int) -> GroupPlaintext:
        """Verify, decrypt and commit; on any failure the state is unchanged.

        Raises ``UnknownSenderKey`` (other key id), ``DecryptionFailed`` (bad signature,
        bad tag, content of another group or an impossible epoch), ``ReplayedMessage``
        (key already used, expired or evicted), ``TooManySkipped`` (gap over MAX_SKIP),
        ``MalformedMessage`` / ``UnsupportedVersion`` (bytes that do not parse).
        """
        if not isinstance(message, GroupMessage):
            message = GroupMessage.from_bytes(message)
        if not ct_equal(message.key_id, self.key_id):
            raise UnknownSenderKey("no sender key with this key id")
        try:
            signing.verify(self.signing_key, Purpose.SENDER_KEY, message.signed_fields(), message.signature)
        except InvalidSignature:
            raise DecryptionFailed("group message signature does not verify") from None

        skipped = {i: entry for i, entry in self._skipped.items() if now_ms - entry[1] <= SKIPPED_KEY_TTL_MS}
        chain_key, next_iteration = self._chain_key, self.iteration
        n = message.iteration
        if n < next_iteration:
            entry = skipped.pop(n, None)
            if entry is None:
                raise ReplayedMessage("message key already used or no longer held")
            message_key = entry[0]
        else:
            if n - next_iteration > MAX_SKIP:
                raise TooManySkipped("gap larger than MAX_SKIP")
            while next_iteration < n:
                skipped_key, chain_key = kdf_ck(chain_key)
                skipped[next_iteration] = (skipped_key, now_ms)
                next_iteration += 1
            message_key, chain_key = kdf_ck(chain_key)
            next_iteration += 1
        while len(skipped) > MAX_STORED_SKIPPED:
            del skipped[next(iter(skipped))]

        key, nonce = message_aead_key(message_key)
        try:
            content = AESGCM(key).decrypt(nonce, message.ciphertext, associated_data(message.key_id, n))
        except InvalidTag:
            raise DecryptionFailed("group message does not authenticate") from None
        plaintext = self._check_content(content, n)
        self._chain_key, self.iteration, self._skipped = chain_key, next_iteration, skipped
        return plaintext

    def _check_content(self, content: bytes, iteration: int) -> GroupPlaintext:
        """The authenticated content must name this chain's group and a plausible epoch."""
        try:
            obj = require_map(codec.decode(content), "group content")
            if set(obj) != {"body", "epoch", "group_id"}:
                raise MalformedMessage("group content fields")
            group_id = field(obj, "group_id", bytes, length=GROUP_ID_LEN)
            epoch = field(obj, "epoch", int)
            body = field(obj, "body", bytes)
        except (ProtocolError, MalformedMessage):
            raise DecryptionFailed("group content does not parse") from None
        if not ct_equal(group_id, self.group_id) or epoch < self.epoch:
            raise DecryptionFailed("group content does not match the sender key's group")
        return GroupPlaintext(group_id, epoch, iteration, body)

    def to_bytes(self) -> bytes:
        """Versioned local state (client store only; never in backups)."""
        return codec.encode({"v": VERSION, "kind": "inbound", "group_id": self.group_id,
                             "epoch": self.epoch, "key_id": self.key_id, "signing_key": self.signing_key,
                             "iteration": self.iteration, "chain_key": self._chain_key,
                             "skipped": [[i, mk, ms] for i, (mk, ms) in self._skipped.items()]})

    @classmethod
    def from_bytes(cls, data: bytes) -> InboundSenderKey:
        obj = _decode_map(data, "inbound sender-key state")
        if obj.get("kind") != "inbound":
            raise MalformedMessage("not an inbound sender-key state")
        raw_skipped = obj.get("skipped")
        obj = {k: v for k, v in obj.items() if k not in ("kind", "skipped")}
        f = _fields(obj, "inbound sender-key state", {
            "group_id": (bytes, GROUP_ID_LEN), "epoch": (int, None), "key_id": (bytes, KEY_ID_LEN),
            "signing_key": (bytes, signing.PUBLIC_KEY_LEN), "iteration": (int, None),
            "chain_key": (bytes, CHAIN_KEY_LEN)})
        skipped = _parse_skipped(raw_skipped, f["iteration"])
        return cls(f["group_id"], f["epoch"], f["key_id"], f["signing_key"], f["iteration"],
                   f["chain_key"], skipped)


def _parse_skipped(raw: Any, next_iteration: int) -> dict[int, tuple[bytes, int]]:
    if not isinstance(raw, list) or len(raw) > MAX_STORED_SKIPPED:
        raise MalformedMessage("skipped keys must be a list of at most MAX_STORED_SKIPPED")
    out: dict[int, tuple[bytes, int]] = {}
    previous = -1
    for entry in raw:
        if (not isinstance(entry, list) or len(entry) != 3 or type(entry[0]) is not int
                or not isinstance(entry[1], bytes) or len(entry[1]) != 32 or type(entry[2]) is not int):
            raise MalformedMessage("skipped key entry is malformed")
        iteration, message_key, stored_ms = entry
        if not previous < iteration < next_iteration:
            raise MalformedMessage("skipped keys must be in increasing order below the chain")
        previous = iteration
        out[iteration] = (message_key, stored_ms)
    return out

