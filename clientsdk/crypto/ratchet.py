"""Double Ratchet (Signal specification) with DESIGN §4's normative parameters.

    KDF_RK(rk, dh) = HKDF-SHA-256(salt = rk, IKM = dh, info = "SecureChat_Ratchet_v1", 64) -> rk' ‖ ck
    KDF_CK(ck)     = MK = HMAC-SHA-256(ck, 0x01), ck' = HMAC-SHA-256(ck, 0x02)
    ENCRYPT(mk)    = HKDF-SHA-256(salt = 32×0x00, IKM = mk, info = "SecureChat_MessageKeys_v1", 80)
                     -> enc 32 ‖ mac 32 ‖ iv 16; AES-256-CBC/PKCS#7;
                     tag = HMAC-SHA-256(mac, AD ‖ header ‖ ciphertext) (all 32 bytes)
    header         = DH public key (32) ‖ PN (u32 BE) ‖ N (u32 BE)
    message bytes  = header ‖ ciphertext ‖ tag

Decryption computes every new value in locals and commits only after the tag
verifies, so a forged or corrupted message leaves the state exactly as it was.
Skipped message keys: at most ``MAX_SKIP`` per chain (a larger gap raises
``TooManySkipped``), at most ``MAX_SKIPPED_KEYS`` per session (oldest evicted),
each kept at most ``SKIPPED_KEY_MAX_AGE_MS``.  A message whose key was used, evicted
or expired raises ``ReplayedMessage``.

State bytes (local storage, not normative; big-endian, the exact length is checked)::

    version u8 = 2 ‖ flags u8 (bit 0 DHr, bit 1 CKs, bit 2 CKr present; others 0)
    ‖ DHs private 32 ‖ DHs public 32 ‖ RK 32 ‖ DHr 32 ‖ CKs 32 ‖ CKr 32 (absent = 32 zero bytes)
    ‖ Ns u64 ‖ Nr u64 ‖ PN u64 ‖ old-key count u8 ‖ skipped count u16
    ‖ old ratchet keys (32 each) ‖ skipped keys (DH 32 ‖ N u32 ‖ MK 32 ‖ stored_ms i64 each, oldest first)

A struct layout because the state is stored after every message: a canonical-msgpack
map (version 1, still read, never written) cost ~50 µs per round trip, as much as
the message's own crypto.
"""

from __future__ import annotations

import struct

from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from clientsdk.crypto import primitives
from clientsdk.crypto.errors import (
    CryptoError, DecryptionFailed, MalformedMessage, ReplayedMessage, TooManySkipped,
    UnsupportedVersion,
)
from clientsdk.crypto.primitives import Rng
from federation import codec
from federation.errors import CodecError, ProtocolError
from federation.validate import field, non_negative, require_map

RATCHET_INFO = b"SecureChat_Ratchet_v1"
MESSAGE_KEYS_INFO = b"SecureChat_MessageKeys_v1"
MAX_SKIP = 1_000
MAX_SKIPPED_KEYS = 2_000
SKIPPED_KEY_MAX_AGE_MS = 30 * 24 * 3600 * 1000
MAX_OLD_RATCHET_KEYS = 16          # remembered to report replays from finished chains
HEADER_LEN = 40
MAC_LEN = 32
MIN_MESSAGE_LEN = HEADER_LEN + 16 + MAC_LEN
U32_MAX = 2**32 - 1
STATE_VERSION = 2
LEGACY_STATE_VERSION = 1           # the msgpack map of before: read, never written
_HEADER = struct.Struct(">32sII")
# version, flags, DHs private, DHs public, RK, DHr, CKs, CKr, Ns, Nr, PN, #old keys, #skipped keys
_STATE_FIXED = struct.Struct(">BB32s32s32s32s32s32sQQQBH")
_SKIPPED_ENTRY = struct.Struct(">32sI32sq")      # DH, N, message key, stored_ms
_HAS_DHR, _HAS_CKS, _HAS_CKR = 1, 2, 4
_ALL_FLAGS = _HAS_DHR | _HAS_CKS | _HAS_CKR
_ABSENT = bytes(32)
_MAX_COUNTER = U32_MAX + 1         # Ns reaches 2**32 when the sending chain is exhausted
_MSGPACK_MAP_MARKERS = frozenset([*range(0x80, 0x90), 0xDE, 0xDF])
_STATE_LIMITS = codec.Limits(max_bytes=4 << 20, max_items=40_000, max_container=10_000)


# --- KDFs (public so vectors can check every intermediate value) ---------------------


def kdf_rk(root_key: bytes, dh_output: bytes) -> tuple[bytes, bytes]:
    """(new root key, chain key)."""
    out = primitives.hkdf_sha256(dh_output, root_key, RATCHET_INFO, 64)
    return out[:32], out[32:]


def kdf_ck(chain_key: bytes) -> tuple[bytes, bytes]:
    """(next chain key, message key)."""
    return primitives.hmac_sha256(chain_key, b"\x02"), primitives.hmac_sha256(chain_key, b"\x01")


def message_keys(message_key: bytes) -> tuple[bytes, bytes, bytes]:
    """(AES key, HMAC key, IV) of one message key."""
    out = primitives.hkdf_sha256(message_key, primitives.ZERO_SALT, MESSAGE_KEYS_INFO, 80)
    return out[:32], out[32:64], out[64:]


def seal(message_key: bytes, associated_data: bytes, header: bytes, plaintext: bytes) -> tuple[bytes, bytes]:
    """(ciphertext, tag) of one message."""
    enc, mac, iv = message_keys(message_key)
    ciphertext = primitives.aes256_cbc_encrypt(enc, iv, plaintext)
    return ciphertext, primitives.hmac_sha256(mac, associated_data + header + ciphertext)


def unseal(message_key: bytes, associated_data: bytes, header: bytes, ciphertext: bytes, tag: bytes) -> bytes:
    """Check the tag, then decrypt; any failure is ``DecryptionFailed``."""
    enc, mac, iv = message_keys(message_key)
    if not primitives.ct_equal(primitives.hmac_sha256(mac, associated_data + header + ciphertext), tag):
        raise DecryptionFailed("decryption failed")
    return primitives.aes256_cbc_decrypt(enc, iv, ciphertext)


# --- wire form ---------------------------------------------------------------------------


class RatchetMessage:
    """header ‖ ciphertext ‖ tag, with the parsed header fields."""

    __slots__ = ("header", "ratchet_key", "previous_count", "number", "ciphertext", "tag")

    def __init__(self, header: bytes, ciphertext: bytes, tag: bytes) -> None:
        self.header = header
        self.ratchet_key, self.previous_count, self.number = _HEADER.unpack(header)
        self.ciphertext = ciphertext
        self.tag = tag

    def to_bytes(self) -> bytes:
        return self.header + self.ciphertext + self.tag

    @classmethod
    def from_bytes(cls, data: bytes) -> RatchetMessage:
        """Parse; wrong lengths (truncated frames) raise ``MalformedMessage``."""
        if not isinstance(data, bytes) or len(data) < MIN_MESSAGE_LEN or (len(data) - HEADER_LEN - MAC_LEN) % 16:
            raise MalformedMessage("ratchet message has an invalid length")
        return cls(data[:HEADER_LEN], data[HEADER_LEN:-MAC_LEN], data[-MAC_LEN:])


def encode_header(ratchet_key: bytes, previous_count: int, number: int) -> bytes:
    return _HEADER.pack(ratchet_key, previous_count, number)


# --- state -------------------------------------------------------------------------------


class RatchetState:
    """One side of a Double Ratchet session (mutable; ``decrypt`` commits only on success)."""

    __slots__ = ("_dhs_private", "_dhs_public", "_dhr", "_rk", "_cks", "_ckr", "_ns", "_nr", "_pn",
                 "_skipped", "_old_dhr")

    def __init__(self, dhs_private: bytes, dhs_public: bytes, dhr: bytes | None, root_key: bytes,
                 sending_chain: bytes | None, receiving_chain: bytes | None, ns: int, nr: int, pn: int,
                 skipped: dict[tuple[bytes, int], tuple[bytes, int]] | None = None,
                 old_ratchet_keys: list[bytes] | None = None) -> None:
        self._dhs_private = dhs_private      # key object built only for a DH step (loading costs ~60 µs)
        self._dhs_public = dhs_public
        self._dhr = dhr
        self._rk = root_key
        self._cks = sending_chain
        self._ckr = receiving_chain
        self._ns, self._nr, self._pn = ns, nr, pn
        self._skipped: dict[tuple[bytes, int], tuple[bytes, int]] = skipped or {}
        self._old_dhr: list[bytes] = old_ratchet_keys or []

    def __repr__(self) -> str:
        return f"RatchetState(ns={self._ns}, nr={self._nr}, pn={self._pn}, skipped={len(self._skipped)})"

    @classmethod
    def initiator(cls, shared_key: bytes, their_ratchet_key: bytes, rng: Rng) -> RatchetState:
        """RatchetInitAlice: the responder's signed prekey is its first ratchet key."""
        dhs = primitives.x25519_from_seed(rng(32))
        root_key, sending = kdf_rk(shared_key, primitives.x25519(dhs, their_ratchet_key))
        return cls(dhs.private_bytes_raw(), primitives.x25519_public_bytes(dhs), their_ratchet_key,
                   root_key, sending, None, 0, 0, 0)

    @classmethod
    def responder(cls, shared_key: bytes, my_ratchet_key: X25519PrivateKey) -> RatchetState:
        """RatchetInitBob: starts with the signed prekey pair and no chains."""
        return cls(my_ratchet_key.private_bytes_raw(), primitives.x25519_public_bytes(my_ratchet_key),
                   None, shared_key, None, None, 0, 0, 0)

    # -- read-only views (vectors and tests check every intermediate key) --

    @property
    def root_key(self) -> bytes:
        return self._rk

    @property
    def sending_chain_key(self) -> bytes | None:
        return self._cks

    @property
    def receiving_chain_key(self) -> bytes | None:
        return self._ckr

    @property
    def ratchet_public_key(self) -> bytes:
        return self._dhs_public

    @property
    def remote_ratchet_key(self) -> bytes | None:
        return self._dhr

    @property
    def counters(self) -> tuple[int, int, int]:
        """(Ns, Nr, PN)."""
        return self._ns, self._nr, self._pn

    @property
    def skipped_count(self) -> int:
        return len(self._skipped)

    def has_skipped_key(self, ratchet_key: bytes, number: int) -> bool:
        return (ratchet_key, number) in self._skipped

    # -- operations --

    def encrypt(self, plaintext: bytes, associated_data: bytes) -> RatchetMessage:
        if self._cks is None:
            raise CryptoError("this session cannot send before it has received a message")
        if self._ns > U32_MAX:
            raise TooManySkipped("sending chain exhausted")
        self._cks, message_key = kdf_ck(self._cks)
        header = _HEADER.pack(self._dhs_public, self._pn, self._ns)
        self._ns += 1
        ciphertext, tag = seal(message_key, associated_data, header, plaintext)
        return RatchetMessage(header, ciphertext, tag)

    def skip_sending_to(self, number: int) -> None:
        """Advance the sending chain to ``number``, dropping the keys in between unused.

        After a restart from a store that may be older than what was sent (see
        ``Session.recover_send_lease``): the next message then uses a key that never
        left.  The receiver keeps the skipped ones (``MAX_SKIP`` bounds the gap).
        """
        if self._cks is None or number <= self._ns:
            return
        if number - self._ns > MAX_SKIP or number > U32_MAX:
            raise TooManySkipped("sending gap larger than MAX_SKIP")
        chain = self._cks
        for _ in range(number - self._ns):
            chain, _key = kdf_ck(chain)
        self._cks, self._ns = chain, number

    def decrypt(self, message: RatchetMessage, associated_data: bytes, now_ms: int, rng: Rng) -> bytes:
        """Decrypt and advance; on any error the state is unchanged.

        Raises ``DecryptionFailed``, ``ReplayedMessage``, ``TooManySkipped`` or ``InvalidKey``.
        """
        dh, pn, n = message.ratchet_key, message.previous_count, message.number
        entry = self._skipped.get((dh, n))
        if entry is not None:
            message_key, stored_ms = entry
            if now_ms - stored_ms > SKIPPED_KEY_MAX_AGE_MS:
                raise ReplayedMessage("message key expired")
            plaintext = unseal(message_key, associated_data, message.header, message.ciphertext, message.tag)
            del self._skipped[(dh, n)]
            self.expire(now_ms)
            return plaintext

        if dh == self._dhr:
            if self._ckr is None:   # the initiator's first remote key (SPK_B) never sends
                raise DecryptionFailed("decryption failed")
            if n < self._nr:
                raise ReplayedMessage("message key already used")
            if n - self._nr > MAX_SKIP:
                raise TooManySkipped("gap larger than MAX_SKIP")
            new_skipped, chain, message_key = _walk(self._ckr, self._nr, n, dh)
            plaintext = unseal(message_key, associated_data, message.header, message.ciphertext, message.tag)
            self._ckr, self._nr = chain, n + 1
            self._store_skipped(new_skipped, now_ms)
            return plaintext

        if dh in self._old_dhr:
            raise ReplayedMessage("message key already used or dropped")
        old_skipped: list[tuple[tuple[bytes, int], bytes]] = []
        if self._ckr is not None:
            if pn < self._nr:
                pn = self._nr   # nothing to skip in the finished chain
            if pn - self._nr > MAX_SKIP:
                raise TooManySkipped("gap larger than MAX_SKIP")
            old_skipped = _walk_only(self._ckr, self._nr, pn, self._dhr)  # type: ignore[arg-type]
        if n > MAX_SKIP:
            raise TooManySkipped("gap larger than MAX_SKIP")
        root_key, receiving = kdf_rk(self._rk, primitives.x25519(primitives.x25519_from_seed(self._dhs_private), dh))
        new_dhs = primitives.x25519_from_seed(rng(32))
        root_key, sending = kdf_rk(root_key, primitives.x25519(new_dhs, dh))
        new_skipped, receiving, message_key = _walk(receiving, 0, n, dh)
        plaintext = unseal(message_key, associated_data, message.header, message.ciphertext, message.tag)
        # commit
        if self._dhr is not None:
            self._old_dhr.append(self._dhr)
            del self._old_dhr[:-MAX_OLD_RATCHET_KEYS]
        self._pn, self._ns, self._nr = self._ns, 0, n + 1
        self._dhs_private = new_dhs.private_bytes_raw()
        self._dhs_public = primitives.x25519_public_bytes(new_dhs)
        self._dhr, self._rk, self._cks, self._ckr = dh, root_key, sending, receiving
        self._store_skipped(old_skipped + new_skipped, now_ms)
        return plaintext

    def expire(self, now_ms: int) -> None:
        """Drop skipped keys older than 30 days (insertion order is storage order)."""
        skipped = self._skipped
        while skipped:
            key = next(iter(skipped))
            if now_ms - skipped[key][1] <= SKIPPED_KEY_MAX_AGE_MS:
                break
            del skipped[key]

    def _store_skipped(self, keys: list[tuple[tuple[bytes, int], bytes]], now_ms: int) -> None:
        skipped = self._skipped
        for key, message_key in keys:
            skipped[key] = (message_key, now_ms)
        excess = len(skipped) - MAX_SKIPPED_KEYS
        if excess > 0:
            for key in list(skipped)[:excess]:
                del skipped[key]
        self.expire(now_ms)

    # -- serialisation --

    def to_bytes(self) -> bytes:
        """The compact version-2 layout (module docstring): a few µs, where a msgpack map cost ~50."""
        if len(self._rk) != 32:
            raise CryptoError("ratchet root key must be 32 bytes")
        dhr, cks, ckr = self._dhr, self._cks, self._ckr
        flags = (0 if dhr is None else _HAS_DHR) | (0 if cks is None else _HAS_CKS) | (0 if ckr is None else _HAS_CKR)
        parts = [_STATE_FIXED.pack(
            STATE_VERSION, flags, self._dhs_private, self._dhs_public, self._rk,
            _ABSENT if dhr is None else dhr, _ABSENT if cks is None else cks, _ABSENT if ckr is None else ckr,
            self._ns, self._nr, self._pn, len(self._old_dhr), len(self._skipped))]
        parts += self._old_dhr
        if self._skipped:
            pack = _SKIPPED_ENTRY.pack
            parts += [pack(dh, n, mk, ms) for (dh, n), (mk, ms) in self._skipped.items()]
        return b"".join(parts)

    @classmethod
    def from_bytes(cls, data: bytes) -> RatchetState:
        """Parse version 2 (or a legacy version-1 map).

        Another version byte raises ``UnsupportedVersion``; truncated, padded or
        inconsistent bytes raise ``MalformedMessage``.
        """
        if not isinstance(data, bytes) or not data:
            raise MalformedMessage("malformed ratchet state: not bytes")
        version = data[0]
        if version != STATE_VERSION:
            if version in _MSGPACK_MAP_MARKERS:
                return cls._from_legacy_bytes(data)
            raise UnsupportedVersion("unknown ratchet state version")
        fixed_len = _STATE_FIXED.size
        if len(data) < fixed_len:
            raise MalformedMessage("malformed ratchet state: truncated")
        (_, flags, dhs, dhs_pub, rk, dhr, cks, ckr, ns, nr, pn,
         old_count, skipped_count) = _STATE_FIXED.unpack_from(data)
        skipped_at = fixed_len + 32 * old_count
        if len(data) != skipped_at + _SKIPPED_ENTRY.size * skipped_count:
            raise MalformedMessage("malformed ratchet state: wrong length")
        if (flags & ~_ALL_FLAGS or old_count > MAX_OLD_RATCHET_KEYS or skipped_count > MAX_SKIPPED_KEYS
                or ns > _MAX_COUNTER or nr > _MAX_COUNTER or pn > _MAX_COUNTER):
            raise MalformedMessage("malformed ratchet state: field out of range")
        # the private ratchet key is checked when it is next used (a DH step)
        if flags != _ALL_FLAGS:        # an absent key is None, and its filler must be zero
            dhr = _present(dhr, flags & _HAS_DHR)
            cks = _present(cks, flags & _HAS_CKS)
            ckr = _present(ckr, flags & _HAS_CKR)
        old = [data[at:at + 32] for at in range(fixed_len, skipped_at, 32)] if old_count else []
        skipped: dict[tuple[bytes, int], tuple[bytes, int]] = {}
        if skipped_count:
            skipped = {(dh, n): (mk, ms) for dh, n, mk, ms in _SKIPPED_ENTRY.iter_unpack(data[skipped_at:])}
            if len(skipped) != skipped_count:
                raise MalformedMessage("malformed ratchet state: duplicate skipped key")
        return cls(dhs, dhs_pub, dhr, rk, cks, ckr, ns, nr, pn, skipped, old)

    def to_wire(self) -> bytes:
        """What a containing wire map (``Session``) embeds: the same compact bytes, as a bin."""
        return self.to_bytes()

    @classmethod
    def from_wire(cls, obj: object) -> RatchetState:
        """Inverse of ``to_wire``; also takes a legacy version-1 map."""
        if isinstance(obj, bytes):
            return cls.from_bytes(obj)
        return cls._from_legacy_map(obj)

    @classmethod
    def _from_legacy_bytes(cls, data: bytes) -> RatchetState:
        try:
            obj = codec.decode(data, _STATE_LIMITS)
        except CodecError as exc:
            raise MalformedMessage(f"malformed ratchet state: {exc.message}") from None
        return cls._from_legacy_map(obj)

    @classmethod
    def _from_legacy_map(cls, obj: object) -> RatchetState:
        """Version 1, a canonical-msgpack map: still read (stored sessions), never written."""
        try:
            state = require_map(obj, "ratchet state")
            if field(state, "v", int) != LEGACY_STATE_VERSION:
                raise UnsupportedVersion("unknown ratchet state version")
            skipped: dict[tuple[bytes, int], tuple[bytes, int]] = {}
            for item in field(state, "skipped", list):
                if (not isinstance(item, list) or len(item) != 4 or not _is_key(item[0])
                        or not _is_int(item[1]) or item[1] > U32_MAX or not _is_key(item[2])
                        or not _is_int(item[3])):
                    raise MalformedMessage("malformed skipped key")
                skipped[(item[0], item[1])] = (item[2], item[3])
            old = field(state, "old_dhr", list)
            if not all(_is_key(k) for k in old) or len(old) > MAX_OLD_RATCHET_KEYS \
                    or len(skipped) > MAX_SKIPPED_KEYS:
                raise MalformedMessage("malformed ratchet state")
            ns, nr, pn = (non_negative(field(state, name, int), name) for name in ("ns", "nr", "pn"))
            if max(ns, nr, pn) > _MAX_COUNTER:
                raise MalformedMessage("malformed ratchet state: counter out of range")
            return cls(
                field(state, "dhs", bytes, length=32), field(state, "dhs_pub", bytes, length=32),
                _optional_key(state, "dhr"), field(state, "rk", bytes, length=32),
                _optional_key(state, "cks"), _optional_key(state, "ckr"),
                ns, nr, pn, skipped, old)
        except ProtocolError as exc:
            raise MalformedMessage(f"malformed ratchet state: {exc.message}") from None

    def copy(self) -> RatchetState:
        return RatchetState(self._dhs_private, self._dhs_public, self._dhr, self._rk, self._cks, self._ckr,
                            self._ns, self._nr, self._pn, dict(self._skipped), list(self._old_dhr))


def _walk(chain_key: bytes, start: int, target: int,
          ratchet_key: bytes) -> tuple[list[tuple[tuple[bytes, int], bytes]], bytes, bytes]:
    """Keys skipped from ``start`` up to ``target``, then (chain after target, key of target)."""
    skipped = []
    for number in range(start, target):
        chain_key, message_key = kdf_ck(chain_key)
        skipped.append(((ratchet_key, number), message_key))
    chain_key, message_key = kdf_ck(chain_key)
    return skipped, chain_key, message_key


def _walk_only(chain_key: bytes, start: int, until: int, ratchet_key: bytes) -> list[tuple[tuple[bytes, int], bytes]]:
    skipped = []
    for number in range(start, until):
        chain_key, message_key = kdf_ck(chain_key)
        skipped.append(((ratchet_key, number), message_key))
    return skipped


def _is_key(value: object) -> bool:
    return isinstance(value, bytes) and len(value) == 32


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _present(value: bytes, flag: int) -> bytes | None:
    """A 32-byte optional field: the value if flagged, else it must be the all-zero filler."""
    if flag:
        return value
    if value != _ABSENT:
        raise MalformedMessage("malformed ratchet state: filler of an absent key is not zero")
    return None


def _optional_key(state: dict[str, object], name: str) -> bytes | None:
    value = state.get(name)
    if value is None:
        return None
    if not _is_key(value):
        raise MalformedMessage(f"malformed ratchet state field {name!r}")
    return value  # type: ignore[return-value]
