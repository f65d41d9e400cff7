"""Canonical msgpack: round trips under hypothesis, every rejection rule by example."""

import msgpack
import pytest
from hypothesis import given, settings, strategies as st

from federation import codec
from federation.errors import CodecError, ErrorCode

scalars = st.none() | st.booleans() | st.integers(min_value=codec.INT_MIN, max_value=codec.UINT_MAX) \
    | st.binary(max_size=64) | st.text(max_size=32)
values = st.recursive(
    scalars,
    lambda children: st.lists(children, max_size=5) | st.dictionaries(st.text(max_size=8), children, max_size=5),
    max_leaves=30,
)


@given(values)
def test_round_trip_is_identity_and_canonical(value):
    data = codec.encode(value)
    assert codec.decode(data) == value
    assert codec.encode(codec.decode(data)) == data


@given(st.dictionaries(st.text(max_size=8), st.integers(0, 10), min_size=2, max_size=8))
def test_key_order_does_not_change_bytes(mapping):
    reversed_map = dict(reversed(list(mapping.items())))
    assert codec.encode(mapping) == codec.encode(reversed_map)


def test_keys_sorted_by_utf8_bytes_not_code_points():
    # U+FF5E sorts after U+1F600 by UTF-16 but before it by UTF-8 bytes: check both keys' order.
    data = codec.encode({"\U0001F600": 1, "\uFF5E": 2})
    assert data.index("\uFF5E".encode()) < data.index("\U0001F600".encode())


@given(st.binary(max_size=200))
@settings(max_examples=500)
def test_arbitrary_bytes_decode_or_raise_codec_error(data):
    try:
        value = codec.decode(data)
    except CodecError as exc:
        assert exc.code in (ErrorCode.BAD_REQUEST, ErrorCode.TOO_LARGE)
    else:
        assert codec.encode(value) == data


@pytest.mark.parametrize("data, reason", [
    (b"\xcc\x05", "uint8 header for a fixint"),
    (b"\xd9\x01a", "str8 header for a fixstr"),
    (b"\x82\xa1b\x01\xa1a\x02", "unsorted keys"),
    (b"\x82\xa1a\x01\xa1a\x02", "duplicate keys"),
    (b"\x01\x02", "trailing bytes"),
    (b"\xa2\xc3\x28", "invalid utf-8"),
    (b"\xcb\x3f\xf0\x00\x00\x00\x00\x00\x00", "float64"),
    (b"\xd4\x01\x00", "ext type"),
    (b"\x81\x01\x02", "integer key"),
    (b"\x92\x01", "truncated array"),
    (b"", "empty"),
    (b"\xc1", "never-used byte"),
])
def test_invalid_encodings_rejected(data, reason):
    with pytest.raises(CodecError):
        codec.decode(data)


def test_depth_limit():
    nested = 0
    for _ in range(codec.DEFAULT_LIMITS.max_depth + 1):
        nested = [nested]
    with pytest.raises(CodecError, match="deep"):
        codec.decode(msgpack.packb(nested))
    with pytest.raises(CodecError, match="deep"):
        codec.encode(nested)


def test_size_and_item_limits():
    small = codec.Limits(max_bytes=100, max_items=10, max_container=5)
    with pytest.raises(CodecError) as exc:
        codec.decode(codec.encode(b"x" * 200), small)
    assert exc.value.code == ErrorCode.TOO_LARGE
    with pytest.raises(CodecError):
        codec.decode(codec.encode(list(range(6))), small)
    with pytest.raises(CodecError):
        codec.decode(codec.encode([[1, 2, 3], [1, 2, 3], [1, 2, 3]]), small)


def test_unencodable_values():
    for value in (1.5, {1: 2}, object(), 2**64, -(2**63) - 1):
        with pytest.raises(CodecError):
            codec.encode(value)
