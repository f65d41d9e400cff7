"""Attachments: streaming AES-256-GCM over 64 KiB segments (DESIGN §4)."""

import hashlib
import io
import itertools
import tracemalloc

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from clientsdk.crypto import attachments as att
from clientsdk.crypto.attachments import (
    HEADER_SIZE, SEGMENT_SIZE, TAG_SIZE, AttachmentDecryptor, AttachmentEncryptor, AttachmentPointer,
    ciphertext_size, decrypt_attachment, decrypt_stream, encrypt_attachment, encrypt_stream,
)
from clientsdk.crypto.errors import AttachmentInvalid, MalformedMessage, UnsupportedVersion
from federation import codec
from conformance.rng import counter_rng

SEG_CT = SEGMENT_SIZE + TAG_SIZE


def fixed_rng(*parts: bytes):
    """An rng that hands out exactly ``parts``, in order."""
    queue = list(parts)

    def rng(n: int) -> bytes:
        part = queue.pop(0)
        assert len(part) == n
        return part

    return rng


def pattern(n: int) -> bytes:
    return bytes(i % 251 for i in range(n))


def segments(ciphertext: bytes) -> list[bytes]:
    body = ciphertext[HEADER_SIZE:]
    return [body[i:i + SEG_CT] for i in range(0, len(body), SEG_CT)]


SIZES = [0, 1, 100, SEGMENT_SIZE - 1, SEGMENT_SIZE, SEGMENT_SIZE + 1, 2 * SEGMENT_SIZE, 2 * SEGMENT_SIZE + 7]


@pytest.mark.parametrize("size", SIZES)
def test_round_trip_and_pointer_fields(size):
    plaintext = pattern(size)
    ciphertext, pointer = encrypt_attachment(plaintext, "image/png", counter_rng(b"rt"))
    assert len(ciphertext) == pointer.size == ciphertext_size(size)
    assert pointer.sha256 == hashlib.sha256(ciphertext).digest()
    assert pointer.plaintext_size == size
    assert pointer.content_type == "image/png"
    assert len(pointer.key) == 32
    assert decrypt_attachment(ciphertext, pointer) == plaintext


def test_segment_layout_and_last_flag():
    ciphertext, _ = encrypt_attachment(pattern(2 * SEGMENT_SIZE), "a/b", counter_rng(b"x"))
    assert ciphertext[0] == 1
    assert int.from_bytes(ciphertext[1:5], "big") == SEGMENT_SIZE
    # an exact multiple of the segment size ends with a full, flagged segment: no empty extra one
    assert [len(s) for s in segments(ciphertext)] == [SEG_CT, SEG_CT]
    empty, _ = encrypt_attachment(b"", "a/b", counter_rng(b"x"))
    assert len(empty) == HEADER_SIZE + TAG_SIZE


def test_key_and_nonce_prefix_are_drawn_from_rng_in_order():
    ciphertext, pointer = encrypt_attachment(b"hi", "text/plain", fixed_rng(bytes(range(32)), b"prefix7"))
    assert pointer.key == bytes(range(32))
    assert ciphertext[:HEADER_SIZE] == b"\x01" + SEGMENT_SIZE.to_bytes(4, "big") + b"prefix7"
    assert len(ciphertext) == HEADER_SIZE + 2 + TAG_SIZE


def test_fresh_key_and_prefix_per_file():
    c1, p1 = encrypt_attachment(b"same", "a/b")
    c2, p2 = encrypt_attachment(b"same", "a/b")
    assert p1.key != p2.key and c1[5:12] != c2[5:12]


@given(st.binary(max_size=3 * SEGMENT_SIZE + 10), st.lists(st.integers(1, 70_000), min_size=1, max_size=8))
@settings(max_examples=25, deadline=None)
def test_incremental_chunking_is_irrelevant(plaintext, chunk_sizes):
    expected, pointer = encrypt_attachment(plaintext, "a/b", counter_rng(b"chunks"))
    enc = AttachmentEncryptor("a/b", counter_rng(b"chunks"))
    out, pos = [], 0
    for size in itertools.cycle(chunk_sizes):
        if pos >= len(plaintext):
            break
        out.append(enc.update(plaintext[pos:pos + size]))
        pos += size
    tail, pointer2 = enc.finalize()
    assert b"".join(out) + tail == expected and pointer2 == pointer
    dec = AttachmentDecryptor(pointer)
    got, pos = [], 0
    for size in itertools.cycle(chunk_sizes):
        if pos >= len(expected):
            break
        got.append(dec.update(expected[pos:pos + size]))
        pos += size
    got.append(dec.finalize())
    assert b"".join(got) == plaintext


def test_file_like_and_iterable_sources():
    plaintext = pattern(SEGMENT_SIZE * 2 + 3)
    sink = io.BytesIO()
    pointer = encrypt_stream(io.BytesIO(plaintext), sink.write, "a/b", counter_rng(b"f"))
    chunks: list[bytes] = []
    pointer2 = encrypt_stream([plaintext[:10], plaintext[10:]], chunks.append, "a/b", counter_rng(b"f"))
    assert pointer == pointer2 and b"".join(chunks) == sink.getvalue()
    out = io.BytesIO()
    assert decrypt_stream(io.BytesIO(sink.getvalue()), out.write, pointer) == len(plaintext)
    assert out.getvalue() == plaintext


# --- attacks: every one is AttachmentInvalid ----------------------------------------

@pytest.fixture(scope="module")
def three_segments():
    return encrypt_attachment(pattern(2 * SEGMENT_SIZE + 100), "a/b", counter_rng(b"three"))


def attack(ciphertext: bytes, pointer: AttachmentPointer, *, fix_pointer: bool = True) -> None:
    """Decrypt ``ciphertext``; by default with a pointer whose hash and sizes match it (so only
    the stream format, not the pointer check, can catch the attack)."""
    if fix_pointer:
        body = max(0, len(ciphertext) - HEADER_SIZE)
        plaintext_size = max(0, body - TAG_SIZE * max(1, -(-body // SEG_CT)))
        pointer = AttachmentPointer(pointer.key, hashlib.sha256(ciphertext).digest(), len(ciphertext),
                                    pointer.content_type, plaintext_size)
    with pytest.raises(AttachmentInvalid) as info:
        decrypt_attachment(ciphertext, pointer)
    assert str(info.value) == "attachment invalid"


def test_truncation_missing_last_segment(three_segments):
    ciphertext, pointer = three_segments
    attack(ciphertext[:HEADER_SIZE + 2 * SEG_CT], pointer)
    attack(ciphertext[:HEADER_SIZE + SEG_CT], pointer)
    attack(ciphertext[:HEADER_SIZE], pointer)
    attack(ciphertext[:HEADER_SIZE - 1], pointer)
    attack(b"", pointer)


def test_truncation_inside_a_segment(three_segments):
    ciphertext, pointer = three_segments
    attack(ciphertext[:-1], pointer)
    attack(ciphertext[:HEADER_SIZE + SEG_CT + 5], pointer)
    attack(ciphertext[:HEADER_SIZE + TAG_SIZE - 1], pointer)


def test_reordered_segments(three_segments):
    ciphertext, pointer = three_segments
    s = segments(ciphertext)
    attack(ciphertext[:HEADER_SIZE] + s[1] + s[0] + s[2], pointer)
    attack(ciphertext[:HEADER_SIZE] + s[0] + s[0] + s[2], pointer)


def test_dropped_middle_segment(three_segments):
    ciphertext, pointer = three_segments
    s = segments(ciphertext)
    attack(ciphertext[:HEADER_SIZE] + s[0] + s[2], pointer)


def test_trailing_data(three_segments):
    ciphertext, pointer = three_segments
    attack(ciphertext + b"\x00", pointer)
    attack(ciphertext + segments(ciphertext)[2], pointer)
    attack(ciphertext + bytes(SEG_CT), pointer)


def test_splicing_between_files_under_the_same_key(three_segments):
    ciphertext, pointer = three_segments
    # a second file under the SAME key but another nonce prefix: segments must not mix
    other, _ = encrypt_attachment(pattern(2 * SEGMENT_SIZE + 100), "a/b", fixed_rng(pointer.key, b"\x99" * 7))
    s, o = segments(ciphertext), segments(other)
    attack(ciphertext[:HEADER_SIZE] + s[0] + o[1] + s[2], pointer)
    attack(other[:HEADER_SIZE] + s[0] + s[1] + s[2], pointer)


def test_splicing_between_files_under_other_keys(three_segments):
    ciphertext, pointer = three_segments
    other, _ = encrypt_attachment(pattern(2 * SEGMENT_SIZE + 100), "a/b", counter_rng(b"other"))
    attack(ciphertext[:HEADER_SIZE + SEG_CT] + segments(other)[1] + segments(ciphertext)[2], pointer)


def test_header_tampering(three_segments):
    ciphertext, pointer = three_segments
    for offset in range(HEADER_SIZE):
        tampered = bytearray(ciphertext)
        tampered[offset] ^= 0x01
        attack(bytes(tampered), pointer)


def test_flipped_bytes_everywhere_small():
    ciphertext, pointer = encrypt_attachment(b"a short note", "text/plain", counter_rng(b"flip"))
    for offset in range(len(ciphertext)):
        for mask in (0x01, 0x80):
            tampered = bytearray(ciphertext)
            tampered[offset] ^= mask
            attack(bytes(tampered), pointer)
            attack(bytes(tampered), pointer, fix_pointer=False)


@given(st.data())
@settings(max_examples=30, deadline=None)
def test_any_flipped_byte_rejected(three_segments, data):
    ciphertext, pointer = three_segments
    offset = data.draw(st.integers(0, len(ciphertext) - 1))
    mask = data.draw(st.integers(1, 255))
    tampered = bytearray(ciphertext)
    tampered[offset] ^= mask
    attack(bytes(tampered), pointer)


def test_wrong_key(three_segments):
    ciphertext, pointer = three_segments
    wrong = AttachmentPointer(bytes(32), pointer.sha256, pointer.size, pointer.content_type,
                              pointer.plaintext_size)
    attack(ciphertext, wrong, fix_pointer=False)


def test_pointer_hash_and_size_are_checked(three_segments):
    ciphertext, pointer = three_segments
    bad_hash = AttachmentPointer(pointer.key, bytes(32), pointer.size, pointer.content_type,
                                 pointer.plaintext_size)
    attack(ciphertext, bad_hash, fix_pointer=False)
    # another valid attachment under the same key but a different plaintext size
    shorter = AttachmentPointer(pointer.key, pointer.sha256, ciphertext_size(10), pointer.content_type, 10)
    attack(ciphertext, shorter, fix_pointer=False)


def test_decryptor_refuses_more_bytes_than_the_pointer_announces(three_segments):
    ciphertext, pointer = three_segments
    dec = AttachmentDecryptor(pointer)
    with pytest.raises(AttachmentInvalid):
        dec.update(ciphertext + bytes(SEG_CT * 3))
    with pytest.raises(AttachmentInvalid):  # poisoned after a failure
        dec.finalize()


def test_no_plaintext_or_key_in_repr_or_errors(three_segments):
    ciphertext, pointer = three_segments
    assert pointer.key.hex() not in repr(pointer)
    assert repr(pointer.key) not in repr(pointer)


def test_finalize_twice_is_a_usage_error():
    enc = AttachmentEncryptor("a/b")
    enc.finalize()
    with pytest.raises(RuntimeError):
        enc.finalize()
    with pytest.raises(RuntimeError):
        enc.update(b"x")


# --- the pointer --------------------------------------------------------------------

def test_pointer_canonical_round_trip(three_segments):
    _, pointer = three_segments
    encoded = pointer.encode()
    assert codec.decode(encoded)["v"] == 1
    assert AttachmentPointer.decode(encoded) == pointer
    assert AttachmentPointer.from_map(pointer.to_map()) == pointer


def test_pointer_rejects_bad_fields(three_segments):
    _, pointer = three_segments
    good = pointer.to_map()
    for name, value in [("key", bytes(31)), ("sha256", bytes(33)), ("size", -1), ("size", pointer.size + 1),
                        ("plaintext_size", "3"), ("content_type", ""), ("content_type", "é/x"),
                        ("content_type", "x" * 256), ("extra", 1)]:
        with pytest.raises(MalformedMessage):
            AttachmentPointer.from_map({**good, name: value})
    for name in good:
        with pytest.raises((MalformedMessage, UnsupportedVersion)):
            AttachmentPointer.from_map({k: v for k, v in good.items() if k != name})
    with pytest.raises(UnsupportedVersion):
        AttachmentPointer.from_map({**good, "v": 2})
    with pytest.raises(MalformedMessage):
        AttachmentPointer.decode(b"\xc1")
    with pytest.raises(MalformedMessage):
        AttachmentPointer.decode(codec.encode([1, 2]))


def test_constructor_validates_too():
    with pytest.raises(ValueError):
        AttachmentPointer(bytes(31), bytes(32), ciphertext_size(0), "a/b", 0)
    with pytest.raises(ValueError):
        AttachmentEncryptor("")


# --- memory bound -------------------------------------------------------------------

def test_200_mb_stream_under_a_memory_bound():
    """200 MB encrypted and decrypted chunk by chunk; tracemalloc peak stays under 2 MB.

    The plaintext is generated lazily (one 64 KiB block reused, its first bytes varied),
    so the test measures the library, not the input.
    """
    total = 200 * 1000 * 1000
    block = pattern(SEGMENT_SIZE)

    def source():
        sent = 0
        while sent < total:
            n = min(SEGMENT_SIZE, total - sent)
            yield (sent // SEGMENT_SIZE).to_bytes(8, "big") + block[8:n] if n > 8 else block[:n]
            sent += n

    plain_hash = hashlib.sha256()
    for chunk in source():
        plain_hash.update(chunk)

    tracemalloc.start()
    try:
        counted = [0]

        def discard(chunk: bytes) -> None:
            counted[0] += len(chunk)

        pointer = encrypt_stream(source(), discard, "video/mp4", counter_rng(b"big"))
        assert counted[0] == pointer.size == ciphertext_size(total)

        # second pass: the same deterministic encryption, piped straight into the decryptor
        enc = AttachmentEncryptor("video/mp4", counter_rng(b"big"))
        dec = AttachmentDecryptor(pointer)
        out_hash = hashlib.sha256()
        for chunk in source():
            out_hash.update(dec.update(enc.update(chunk)))
        tail, pointer2 = enc.finalize()
        out_hash.update(dec.update(tail))
        out_hash.update(dec.finalize())
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert pointer2 == pointer
    assert out_hash.digest() == plain_hash.digest()
    assert peak < 2 * 1024 * 1024, peak


def test_module_constants_match_design():
    assert att.SEGMENT_SIZE == 64 * 1024
    assert att.NONCE_PREFIX_SIZE == 7
    assert att.HEADER_SIZE == 1 + 4 + 7


def test_mutable_input_buffers_are_copied_not_referenced():
    """A caller may reuse its buffer (readinto) right after update: the held-back segment must be a copy."""
    plaintext = pattern(SEGMENT_SIZE + 10)
    expected, _ = encrypt_attachment(plaintext, "a/b", counter_rng(b"mut"))
    enc = AttachmentEncryptor("a/b", counter_rng(b"mut"))
    buffer = bytearray(plaintext[:SEGMENT_SIZE])
    out = enc.update(buffer)
    buffer[:] = bytes(SEGMENT_SIZE)  # reused by the caller
    out += enc.update(memoryview(bytearray(plaintext[SEGMENT_SIZE:])))
    tail, _ = enc.finalize()
    assert out + tail == expected
