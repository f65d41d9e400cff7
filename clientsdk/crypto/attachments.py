"""Attachments: streaming AEAD with bounded memory (DESIGN §4).

A file is encrypted under its own random 32-byte key with AES-256-GCM, 64 KiB of
plaintext per segment, so neither side ever holds more than about one segment:

    ciphertext = header ‖ segment_0 ‖ … ‖ segment_n
    header     = version (u8, 1) ‖ segment size (u32 BE, 65,536) ‖ nonce prefix (7 random bytes)
    segment_i  = AES-256-GCM(key, nonce_i, plaintext_i, AD = header)  (ciphertext ‖ 16-byte tag)
    nonce_i    = nonce prefix ‖ i (u32 BE) ‖ last flag (0x00, or 0x01 for segment_n only)

Every segment but the last holds exactly 64 KiB of plaintext; the last holds 0..64 KiB
(0 only for an empty file; a file of an exact multiple of 64 KiB ends with a full,
flagged segment).  Why this resists the stream attacks:

* reordering or dropping a segment changes its counter → the tag fails;
* truncation at a segment boundary leaves a segment sealed with flag 0 that must be
  opened as the last one (flag 1) → the tag fails; so does a stream ending mid-segment;
* trailing data makes the flagged segment a non-last one → the tag fails;
* splicing between files fails on the key (random per file) and, under a shared key,
  on the nonce prefix and the header in the AD.

The ciphertext's SHA-256 and size are computed in the same pass and travel, with the
key, inside the carrying (end-to-end encrypted) message as an ``AttachmentPointer``;
the decryptor checks them too.  Every failure is one ``AttachmentInvalid`` without
detail.  Plaintext released by ``AttachmentDecryptor.update`` is authentic segment by
segment, but only a stream whose ``finalize`` returns is complete: on
``AttachmentInvalid`` the caller discards everything it wrote.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, BinaryIO

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from clientsdk.crypto.errors import AttachmentInvalid, MalformedMessage, UnsupportedVersion
from clientsdk.crypto.primitives import Rng, ct_equal, system_rng
from federation import codec
from federation.errors import ProtocolError
from federation.validate import field as wire_field
from federation.validate import non_negative, require_map

FORMAT_VERSION = 1
POINTER_VERSION = 1
SEGMENT_SIZE = 64 * 1024
TAG_SIZE = 16
KEY_SIZE = 32
NONCE_PREFIX_SIZE = 7
HEADER_SIZE = 1 + 4 + NONCE_PREFIX_SIZE
MAX_SEGMENTS = 2**32
MAX_CONTENT_TYPE_LEN = 255
DEFAULT_CONTENT_TYPE = "application/octet-stream"

_SEGMENT_CT_SIZE = SEGMENT_SIZE + TAG_SIZE
_NOT_LAST = b"\x00"
_LAST = b"\x01"
_POINTER_FIELDS = frozenset({"v", "key", "sha256", "size", "content_type", "plaintext_size"})

Sink = Callable[[bytes], object]
Source = BinaryIO | Iterable[bytes]


def _invalid() -> AttachmentInvalid:
    return AttachmentInvalid("attachment invalid")


def segment_count(plaintext_size: int) -> int:
    """Number of segments for ``plaintext_size`` bytes (an empty file has one empty segment)."""
    return max(1, -(-plaintext_size // SEGMENT_SIZE))


def ciphertext_size(plaintext_size: int) -> int:
    """Exact ciphertext size for ``plaintext_size`` bytes of plaintext."""
    return HEADER_SIZE + plaintext_size + TAG_SIZE * segment_count(plaintext_size)


def _check_content_type(content_type: object) -> str:
    if (not isinstance(content_type, str) or not 0 < len(content_type) <= MAX_CONTENT_TYPE_LEN
            or not content_type.isascii() or not content_type.isprintable()):
        raise ValueError("content type must be 1-255 printable ASCII characters")
    return content_type


@dataclass(frozen=True, slots=True)
class AttachmentPointer:
    """What the carrying message holds about an attachment: enough to fetch, check and decrypt it.

    It is itself secret (it holds the key): it travels only inside end-to-end encrypted
    messages, and its ``repr`` leaves the key out.
    """

    key: bytes = field(repr=False)
    sha256: bytes
    size: int
    content_type: str
    plaintext_size: int

    def __post_init__(self) -> None:
        if not isinstance(self.key, bytes) or len(self.key) != KEY_SIZE:
            raise ValueError("attachment key must be 32 bytes")
        if not isinstance(self.sha256, bytes) or len(self.sha256) != 32:
            raise ValueError("attachment sha256 must be 32 bytes")
        for value in (self.size, self.plaintext_size):
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ValueError("attachment sizes must be non-negative integers")
        _check_content_type(self.content_type)

    def to_map(self) -> dict[str, Any]:
        """The canonical-msgpack map to embed in the carrying message."""
        return {"v": POINTER_VERSION, "key": self.key, "sha256": self.sha256, "size": self.size,
                "content_type": self.content_type, "plaintext_size": self.plaintext_size}

    def encode(self) -> bytes:
        return codec.encode(self.to_map())

    @classmethod
    def from_map(cls, obj: Any) -> AttachmentPointer:
        """Parse a pointer map; ``MalformedMessage`` unless every field is exactly right."""
        try:
            obj = require_map(obj, "attachment pointer")
            version = wire_field(obj, "v", int)
            if version != POINTER_VERSION:
                raise UnsupportedVersion(f"attachment pointer version {version} is not supported")
            if set(obj) != _POINTER_FIELDS:
                raise MalformedMessage("attachment pointer has missing or unknown fields")
            plaintext_size = non_negative(wire_field(obj, "plaintext_size", int), "plaintext_size")
            size = non_negative(wire_field(obj, "size", int), "size")
            if size != ciphertext_size(plaintext_size):
                raise MalformedMessage("attachment pointer sizes are inconsistent")
            return cls(wire_field(obj, "key", bytes, length=KEY_SIZE),
                       wire_field(obj, "sha256", bytes, length=32), size,
                       wire_field(obj, "content_type", str), plaintext_size)
        except ProtocolError as exc:
            raise MalformedMessage(f"malformed attachment pointer: {exc.message}") from None
        except ValueError as exc:
            raise MalformedMessage(f"malformed attachment pointer: {exc}") from None

    @classmethod
    def decode(cls, data: bytes) -> AttachmentPointer:
        try:
            obj = codec.decode(data)
        except ProtocolError:
            raise MalformedMessage("attachment pointer is not canonical msgpack") from None
        return cls.from_map(obj)


def _header(nonce_prefix: bytes) -> bytes:
    return FORMAT_VERSION.to_bytes(1, "big") + SEGMENT_SIZE.to_bytes(4, "big") + nonce_prefix


class _Segmenter:
    """Cuts a byte stream into units of ``unit`` bytes, holding back the latest unit until
    more data (or the end) shows whether it is the last one.

    Zero-copy on the hot path: a chunk of immutable ``bytes`` that is exactly one unit is
    held by reference, and whole units inside a larger chunk are passed on as views.
    """

    def __init__(self, unit: int) -> None:
        self._unit = unit
        self._pending = b""

    def feed(self, data: bytes | bytearray | memoryview) -> list[bytes | memoryview]:
        """Add data; returns the units now known not to be the last one (valid during this call)."""
        unit = self._unit
        view = memoryview(data).cast("B")
        pending = self._pending
        if pending and len(pending) < unit:
            take = unit - len(pending)
            pending = pending + view[:take]
            view = view[take:]
        if not view:
            self._pending = pending
            return []
        units: list[bytes | memoryview] = [pending] if pending else []
        while len(view) > unit:
            units.append(view[:unit])
            view = view[unit:]
        whole = type(data) is bytes and len(view) == len(data)
        self._pending = data if whole else view.tobytes()  # type: ignore[assignment]
        return units

    def rest(self) -> bytes:
        """The held-back (last) unit: 0..unit bytes."""
        rest, self._pending = self._pending, b""
        return rest


class AttachmentEncryptor:
    """Incremental encryptor: feed plaintext with ``update``, then call ``finalize`` once.

    The key (32 bytes) and nonce prefix (7 bytes) are drawn from ``rng`` in that order,
    so vectors can fix both.  Memory held: at most one segment beyond the chunk being fed.
    """

    def __init__(self, content_type: str = DEFAULT_CONTENT_TYPE, rng: Rng = system_rng) -> None:
        self._content_type = _check_content_type(content_type)
        self._key = rng(KEY_SIZE)
        nonce_prefix = rng(NONCE_PREFIX_SIZE)
        if len(self._key) != KEY_SIZE or len(nonce_prefix) != NONCE_PREFIX_SIZE:
            raise ValueError("rng returned the wrong number of bytes")
        self._aead = AESGCM(self._key)
        self._prefix = nonce_prefix
        self._header = _header(nonce_prefix)
        self._hash = hashlib.sha256()
        self._segments = _Segmenter(SEGMENT_SIZE)
        self._counter = 0
        self._size = 0
        self._plaintext_size = 0
        self._header_sent = False
        self._done = False

    def _seal(self, data: bytes | memoryview, flag: bytes) -> bytes:
        if self._counter >= MAX_SEGMENTS:
            raise ValueError("attachment too large for one stream")
        nonce = self._prefix + self._counter.to_bytes(4, "big") + flag
        self._counter += 1
        return self._aead.encrypt(nonce, data, self._header)

    def _account(self, parts: list[bytes]) -> list[bytes]:
        for part in parts:
            self._hash.update(part)
            self._size += len(part)
        return parts

    def _update_parts(self, data: bytes | bytearray | memoryview) -> list[bytes]:
        if self._done:
            raise RuntimeError("encryptor already finalized")
        self._plaintext_size += memoryview(data).nbytes
        parts: list[bytes] = []
        if not self._header_sent:
            parts.append(self._header)
            self._header_sent = True
        # A full segment is sealed only once a byte after it is known to exist:
        # the last segment must carry the last flag.
        for segment in self._segments.feed(data):
            parts.append(self._seal(segment, _NOT_LAST))
        return self._account(parts)

    def update(self, data: bytes | bytearray | memoryview) -> bytes:
        """Add plaintext; returns the ciphertext that is ready (possibly empty)."""
        return b"".join(self._update_parts(data))

    def finalize(self) -> tuple[bytes, AttachmentPointer]:
        """Seal the last segment; returns the remaining ciphertext and the pointer."""
        if self._done:
            raise RuntimeError("encryptor already finalized")
        self._done = True
        parts = [] if self._header_sent else [self._header]
        parts.append(self._seal(self._segments.rest(), _LAST))
        tail = b"".join(self._account(parts))
        pointer = AttachmentPointer(self._key, self._hash.digest(), self._size, self._content_type,
                                    self._plaintext_size)
        return tail, pointer


class AttachmentDecryptor:
    """Incremental decryptor checked against the pointer; ``AttachmentInvalid`` on anything wrong.

    After a failure the decryptor is poisoned: every later call raises too.  Feeding the
    header (12 bytes) and then chunks of exactly one ciphertext segment (65,552 bytes)
    avoids every copy, as ``decrypt_stream`` does.
    """

    def __init__(self, pointer: AttachmentPointer) -> None:
        self._pointer = pointer
        self._aead = AESGCM(pointer.key)
        self._hash = hashlib.sha256()
        self._segments = _Segmenter(_SEGMENT_CT_SIZE)
        self._header_buffer = bytearray()
        self._header: bytes | None = None
        self._prefix = b""
        self._counter = 0
        self._received = 0
        self._plaintext_size = 0
        self._done = False
        self._failed = False

    def _open(self, data: bytes | memoryview, flag: bytes) -> bytes:
        if self._header is None or self._counter >= MAX_SEGMENTS:
            raise _invalid()
        nonce = self._prefix + self._counter.to_bytes(4, "big") + flag
        self._counter += 1
        try:
            plaintext = self._aead.decrypt(nonce, data, self._header)
        except InvalidTag:
            raise _invalid() from None
        self._plaintext_size += len(plaintext)
        return plaintext

    def update(self, data: bytes | bytearray | memoryview) -> bytes:
        """Add ciphertext; returns the authenticated plaintext that is ready (possibly empty)."""
        return b"".join(self._update_parts(data))

    def _update_parts(self, data: bytes | bytearray | memoryview) -> list[bytes]:
        self._check_usable()
        try:
            return self._update(data)
        except AttachmentInvalid:
            self._failed = True
            raise

    def _update(self, data: bytes | bytearray | memoryview) -> list[bytes]:
        view = memoryview(data).cast("B")
        self._received += len(view)
        if self._received > self._pointer.size:
            raise _invalid()
        if self._header is None:
            need = HEADER_SIZE - len(self._header_buffer)
            self._hash.update(view[:need])
            self._header_buffer += view[:need]
            if len(self._header_buffer) < HEADER_SIZE:
                return []
            header = bytes(self._header_buffer)
            if header[0] != FORMAT_VERSION or int.from_bytes(header[1:5], "big") != SEGMENT_SIZE:
                raise _invalid()
            self._header, self._prefix = header, header[5:]
            if len(view) == need:
                return []
            data = view[need:]
        # Only a segment known to be followed by more bytes is opened as a non-last one.
        # Each byte is hashed once, right before it is decrypted (while it is in cache).
        parts = []
        for segment in self._segments.feed(data):
            self._hash.update(segment)
            parts.append(self._open(segment, _NOT_LAST))
        return parts

    def finalize(self) -> bytes:
        """Open the last segment and check size and SHA-256 against the pointer."""
        self._check_usable()
        self._done = True
        self._failed = True  # until proven otherwise
        last = self._segments.rest()
        self._hash.update(last)
        if self._header is None or len(last) < TAG_SIZE:
            raise _invalid()
        plaintext = self._open(last, _LAST)
        pointer = self._pointer
        same_hash = ct_equal(self._hash.digest(), pointer.sha256)
        if not same_hash or self._received != pointer.size or self._plaintext_size != pointer.plaintext_size:
            raise _invalid()
        self._failed = False
        return plaintext

    def _check_usable(self) -> None:
        if self._failed:
            raise _invalid()
        if self._done:
            raise RuntimeError("decryptor already finalized")


def _chunks(source: Source, size: int, first: int | None = None) -> Iterable[bytes]:
    read = getattr(source, "read", None)
    if read is None:
        yield from source
        return
    if first is not None and (chunk := read(first)):
        yield chunk
    while chunk := read(size):
        yield chunk


def encrypt_stream(source: Source, sink: Sink, content_type: str = DEFAULT_CONTENT_TYPE,
                   rng: Rng = system_rng) -> AttachmentPointer:
    """Encrypt a file-like object (read in 64 KiB chunks) or an iterable of chunks into ``sink``.

    ``sink`` is called with ciphertext pieces (e.g. ``file.write``); returns the pointer.
    """
    encryptor = AttachmentEncryptor(content_type, rng)
    for chunk in _chunks(source, SEGMENT_SIZE):
        for part in encryptor._update_parts(chunk):
            sink(part)
    tail, pointer = encryptor.finalize()
    sink(tail)
    return pointer


def decrypt_stream(source: Source, sink: Sink, pointer: AttachmentPointer) -> int:
    """Decrypt into ``sink``; returns the plaintext size.  On ``AttachmentInvalid``, discard the output."""
    decryptor = AttachmentDecryptor(pointer)
    written = 0
    for chunk in _chunks(source, _SEGMENT_CT_SIZE, first=HEADER_SIZE):
        out = decryptor.update(chunk)
        if out:
            sink(out)
            written += len(out)
    tail = decryptor.finalize()
    if tail:
        sink(tail)
    return written + len(tail)


def encrypt_attachment(plaintext: bytes, content_type: str = DEFAULT_CONTENT_TYPE,
                       rng: Rng = system_rng) -> tuple[bytes, AttachmentPointer]:
    """Whole-buffer convenience for small attachments (and vectors)."""
    encryptor = AttachmentEncryptor(content_type, rng)
    parts = encryptor._update_parts(plaintext)
    tail, pointer = encryptor.finalize()
    parts.append(tail)
    return b"".join(parts), pointer


def decrypt_attachment(ciphertext: bytes, pointer: AttachmentPointer) -> bytes:
    """Whole-buffer convenience; ``AttachmentInvalid`` on any mismatch."""
    if len(ciphertext) != pointer.size:
        raise _invalid()
    decryptor = AttachmentDecryptor(pointer)
    parts = decryptor._update_parts(ciphertext)
    parts.append(decryptor.finalize())
    return b"".join(parts)
