"""Canonical msgpack: the only encoder and decoder of wire bytes (DESIGN §2, normative).

Canonical form: maps have ``str`` keys sorted by their UTF-8 bytes, no duplicates;
integers and length headers in their shortest form; integers within int64/uint64;
bytes as bin, text as str (valid UTF-8); no floats, no ext types; nothing after
the object.  ``decode`` accepts only canonical input: it decodes, re-encodes and
compares, so any second encoding of the same value (non-shortest headers,
unsorted keys, ...) is rejected with ``bad_request``.  Hard limits on total size,
nesting depth and item counts protect the decoder from hostile input.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import msgpack

from federation.errors import CodecError, ErrorCode

INT_MIN = -(2**63)
UINT_MAX = 2**64 - 1


@dataclass(frozen=True, slots=True)
class Limits:
    """Hard decoder limits; the defaults suit client-server frames."""

    max_bytes: int = 1 << 20          # whole frame
    max_depth: int = 16               # nesting of arrays/maps
    max_items: int = 20_000           # array elements + map pairs, summed over the frame
    max_container: int = 10_000       # elements of any one array or map


DEFAULT_LIMITS = Limits()


def _reject(message: str, code: ErrorCode = ErrorCode.BAD_REQUEST) -> CodecError:
    return CodecError(message, code=code)


def _canonical(obj: Any, depth: int, budget: list[int], limits: Limits) -> Any:
    """Validate types and return ``obj`` with every map's keys in canonical order."""
    if depth > limits.max_depth:
        raise _reject("nesting too deep")
    if obj is None or isinstance(obj, (bool, bytes, str)):
        return obj
    if isinstance(obj, int):
        if obj < INT_MIN or obj > UINT_MAX:
            raise _reject("integer out of range")
        return obj
    if isinstance(obj, (bytearray, memoryview)):
        return bytes(obj)
    if isinstance(obj, (list, tuple)):
        if len(obj) > limits.max_container:
            raise _reject("array too long", ErrorCode.TOO_LARGE)
        budget[0] -= len(obj)
        if budget[0] < 0:
            raise _reject("too many items", ErrorCode.TOO_LARGE)
        return [_canonical(item, depth + 1, budget, limits) for item in obj]
    if isinstance(obj, dict):
        if len(obj) > limits.max_container:
            raise _reject("map too long", ErrorCode.TOO_LARGE)
        budget[0] -= len(obj)
        if budget[0] < 0:
            raise _reject("too many items", ErrorCode.TOO_LARGE)
        keyed = []
        for key, value in obj.items():
            if not isinstance(key, str):
                raise _reject("map key is not a string")
            keyed.append((key.encode("utf-8"), key, value))
        keyed.sort(key=lambda item: item[0])
        return {key: _canonical(value, depth + 1, budget, limits) for _, key, value in keyed}
    if isinstance(obj, float):
        raise _reject("floats are not allowed")
    raise _reject(f"type {type(obj).__name__} cannot be encoded")


class _NotPlain(Exception):
    """Raised inside ``_plain`` for anything it does not handle: ``_canonical`` decides instead."""


_LEAVES = frozenset([str, bytes, bool, type(None)])


def _plain(obj: Any, depth: int, budget: list[int], limits: Limits) -> Any:
    """The fast path of ``_canonical`` for the common shapes; the same result, or ``_NotPlain``.

    Handles only exact ``dict`` (``str`` keys), ``list``, ``str``, ``bytes``, ``bool``,
    ``None`` and in-range ``int`` within the limits; everything else (subclasses,
    tuples, bytearrays, floats, errors of any kind) goes to ``_canonical``, which
    stays the reference.  Maps are sorted with ``sorted``: for valid Unicode, code
    point order is UTF-8 byte order, and a key that does not encode fails in msgpack
    as it does in ``_canonical``.  A container already in canonical form is returned
    as it is, not copied (what ``decode`` re-encodes to check its input always is).
    """
    kind = type(obj)
    if kind is dict:
        if len(obj) > limits.max_container:
            raise _NotPlain
        budget[0] -= len(obj)
        if budget[0] < 0 or (obj and depth >= limits.max_depth):
            raise _NotPlain
        keys = list(obj)
        for key in keys:
            if type(key) is not str:
                raise _NotPlain
        rewritten: dict[str, Any] | None = None
        for key, value in obj.items():
            kind = type(value)
            if kind in _LEAVES:
                continue
            if kind is int:
                if value < INT_MIN or value > UINT_MAX:
                    raise _NotPlain
                continue
            item = _plain(value, depth + 1, budget, limits)
            if item is not value:
                if rewritten is None:
                    rewritten = {}
                rewritten[key] = item
        ordered = sorted(keys)
        if rewritten is None:
            return obj if ordered == keys else {key: obj[key] for key in ordered}
        return {key: rewritten[key] if key in rewritten else obj[key] for key in ordered}
    if kind is list:
        if len(obj) > limits.max_container:
            raise _NotPlain
        budget[0] -= len(obj)
        if budget[0] < 0 or (obj and depth >= limits.max_depth):
            raise _NotPlain
        out = obj
        for i, value in enumerate(obj):
            kind = type(value)
            if kind in _LEAVES:
                continue
            if kind is int:
                if value < INT_MIN or value > UINT_MAX:
                    raise _NotPlain
                continue
            item = _plain(value, depth + 1, budget, limits)
            if item is not value:
                if out is obj:
                    out = list(obj)
                out[i] = item
        return out
    if kind in _LEAVES:
        return obj
    if kind is int and INT_MIN <= obj <= UINT_MAX:
        return obj
    raise _NotPlain


def encode(obj: Any, limits: Limits = DEFAULT_LIMITS) -> bytes:
    """Encode ``obj`` canonically.  Raises ``CodecError`` for unencodable values."""
    try:
        canonical = _plain(obj, 0, [limits.max_items], limits)
    except _NotPlain:
        canonical = _canonical(obj, 0, [limits.max_items], limits)
    data: bytes = msgpack.packb(canonical, use_bin_type=True)
    if len(data) > limits.max_bytes:
        raise _reject("encoded object too large", ErrorCode.TOO_LARGE)
    return data


def _pairs(pairs: list[tuple[Any, Any]]) -> dict[str, Any]:
    out = dict(pairs)
    if len(out) != len(pairs):
        raise _reject("duplicate map key")
    return out


def _no_ext(code: int, data: bytes) -> Any:
    raise _reject("ext types are not allowed")


def decode(data: bytes, limits: Limits = DEFAULT_LIMITS) -> Any:
    """Decode canonical msgpack, rejecting anything that is not the one canonical form."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise _reject("frame is not bytes")
    data = bytes(data)
    if len(data) > limits.max_bytes:
        raise _reject("frame too large", ErrorCode.TOO_LARGE)
    try:
        obj = msgpack.unpackb(
            data,
            raw=False,
            strict_map_key=True,
            use_list=True,
            object_pairs_hook=_pairs,
            ext_hook=_no_ext,
            max_array_len=limits.max_container,
            max_map_len=limits.max_container,
        )
    except CodecError:
        raise
    except msgpack.ExtraData:
        raise _reject("trailing bytes after object") from None
    except UnicodeDecodeError:
        raise _reject("invalid UTF-8 in string") from None
    except (ValueError, TypeError, msgpack.FormatError, msgpack.StackError) as exc:
        raise _reject(f"malformed msgpack ({type(exc).__name__})") from None
    if encode(obj, limits) != data:
        raise _reject("not canonical msgpack")
    return obj
