"""Deterministic randomness for vectors and tests: the one place it is defined.

``counter_rng(seed)``: draw i of 32 bytes is SHA-256(seed ‖ u64 BE i); longer
draws concatenate blocks, shorter ones truncate.  ``parts_rng(*parts)`` hands out
exactly the given byte strings in order (to pin a specific key or nonce).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable

Rng = Callable[[int], bytes]


def counter_rng(seed: bytes | str) -> Rng:
    label = seed.encode() if isinstance(seed, str) else seed
    counter = [0]

    def rng(n: int) -> bytes:
        out = b""
        while len(out) < n:
            out += hashlib.sha256(label + counter[0].to_bytes(8, "big")).digest()
            counter[0] += 1
        return out[:n]

    return rng


def parts_rng(*parts: bytes) -> Rng:
    """An rng that returns ``parts`` in order; a draw of another size is a bug in the caller."""
    queue = list(parts)

    def rng(n: int) -> bytes:
        part = queue.pop(0)
        if len(part) != n:
            raise ValueError("unexpected draw size")
        return part

    return rng
