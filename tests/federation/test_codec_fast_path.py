"""The encoder's fast path (``codec._plain``) gives exactly what the reference walk gives.

``encode`` tries a fast walk for the common shapes and falls back to ``_canonical``,
the reference, for anything else.  For every value and every set of limits both must
agree: the same canonical bytes, or a ``CodecError`` with the same code.
"""

from __future__ import annotations

import copy

import msgpack
from hypothesis import given, settings
from hypothesis import strategies as st

from federation import codec
from federation.errors import CodecError, ErrorCode


class Text(str):
    """A ``str`` subclass (an enum member, say): the reference walk's business."""


class Number(int):
    pass


def reference_encode(value: object, limits: codec.Limits) -> bytes:
    """``encode`` as it was before the fast path: the reference walk, then msgpack."""
    data = msgpack.packb(codec._canonical(value, 0, [limits.max_items], limits), use_bin_type=True)
    if len(data) > limits.max_bytes:
        raise CodecError("encoded object too large", code=ErrorCode.TOO_LARGE)
    return data


def result(fn, *args):
    try:
        return "ok", fn(*args)
    except CodecError as exc:
        return "error", exc.code


keys = st.text(max_size=6) | st.sampled_from(["v", "id", "op", "\U0001F600", "\uFF5E", "a", "ab", "B"])
scalars = (st.none() | st.booleans() | st.integers(min_value=-(2**65), max_value=2**65)
           | st.integers(min_value=-300, max_value=300) | st.binary(max_size=40) | st.text(max_size=20)
           | st.floats(allow_nan=False) | st.builds(bytearray, st.binary(max_size=8))
           | st.builds(Text, st.text(max_size=5)) | st.builds(Number, st.integers(-5, 5)))
values = st.recursive(
    scalars,
    lambda children: (st.lists(children, max_size=6) | st.tuples(children, children)
                      | st.dictionaries(keys, children, max_size=6)
                      | st.dictionaries(st.integers(0, 3), children, min_size=1, max_size=2)
                      | st.dictionaries(st.builds(Text, keys), children, max_size=2)),
    max_leaves=40,
)
limits = st.builds(codec.Limits, max_bytes=st.integers(1, 600), max_depth=st.integers(0, 6),
                   max_items=st.integers(0, 40), max_container=st.integers(0, 8))


@given(values, limits)
@settings(max_examples=1500)
def test_fast_path_agrees_with_the_reference_under_any_limits(value, limit):
    assert result(codec.encode, value, limit) == result(reference_encode, value, limit)


@given(values)
@settings(max_examples=500)
def test_fast_path_agrees_with_the_reference_under_default_limits(value):
    assert result(codec.encode, value, codec.DEFAULT_LIMITS) == result(reference_encode, value,
                                                                       codec.DEFAULT_LIMITS)


@given(st.recursive(st.none() | st.integers(0, 9) | st.binary(max_size=4),
                    lambda c: st.lists(c, max_size=4) | st.dictionaries(keys, c, max_size=5), max_leaves=20))
def test_encoding_leaves_the_value_untouched(value):
    before = copy.deepcopy(value)
    codec.encode(value)
    assert value == before
    if isinstance(value, dict):
        assert list(value) == list(before)        # not even re-ordered in place


def test_common_frames_take_the_fast_path_and_keep_their_bytes():
    frame = {"op": "send", "id": 7, "payloads": [{"devices": ["b@example.org/BBBBBBBBBB"], "ciphertext": b"\x01"}],
             "message_id": "ab" * 16, "ephemeral": False}
    fast = codec._plain(frame, 0, [codec.DEFAULT_LIMITS.max_items], codec.DEFAULT_LIMITS)
    assert list(fast) == sorted(frame)
    assert codec.encode(frame) == reference_encode(frame, codec.DEFAULT_LIMITS)
    in_order = codec.decode(codec.encode(frame))
    assert codec._plain(in_order, 0, [100], codec.DEFAULT_LIMITS) is in_order     # canonical input: no copy
