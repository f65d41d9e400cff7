"""Typed field access for decoded wire maps: wrong or missing fields become ``bad_request``.

Wire input is never checked with ``assert`` (``python -O`` strips it).
"""

from __future__ import annotations

from typing import Any, TypeVar

from federation.errors import ProtocolError

T = TypeVar("T")
_MISSING = object()


def require_map(obj: Any, what: str) -> dict[str, Any]:
    if not isinstance(obj, dict):
        raise ProtocolError(f"{what} must be a map")
    return obj


def field(obj: dict[str, Any], name: str, kind: type[T], *, length: int | None = None,
          max_length: int | None = None, default: Any = _MISSING) -> T:
    """``obj[name]`` checked to be of ``kind`` (bool is not an int here)."""
    value = obj.get(name, _MISSING)
    if value is _MISSING:
        if default is not _MISSING:
            return default  # type: ignore[no-any-return]
        raise ProtocolError(f"missing field {name!r}")
    if kind is int and isinstance(value, bool):
        raise ProtocolError(f"field {name!r} must be an integer")
    if not isinstance(value, kind):
        raise ProtocolError(f"field {name!r} must be {kind.__name__}")
    if length is not None and len(value) != length:  # type: ignore[arg-type]
        raise ProtocolError(f"field {name!r} must have length {length}")
    if max_length is not None and len(value) > max_length:  # type: ignore[arg-type]
        raise ProtocolError(f"field {name!r} is longer than {max_length}")
    return value


def non_negative(value: int, name: str) -> int:
    if value < 0:
        raise ProtocolError(f"field {name!r} must not be negative")
    return value
