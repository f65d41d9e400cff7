"""Token buckets keyed by (kind, key): per user, device and source address (DESIGN §7).

Time comes from ``trio.current_time()`` so tests drive it with ``MockClock``.
"""

from __future__ import annotations

from dataclasses import dataclass

import trio

from federation.errors import ErrorCode, RequestRejected
from homeserver.config import Rate


class RateLimited(RequestRejected):
    code = ErrorCode.RATE_LIMITED


@dataclass(slots=True)
class _Bucket:
    tokens: float
    updated: float


class RateLimiter:
    """Many named buckets; idle buckets are dropped by ``prune`` (housekeeping)."""

    def __init__(self) -> None:
        self._buckets: dict[tuple[str, str], _Bucket] = {}

    def try_take(self, kind: str, key: str, rate: Rate, cost: float = 1.0) -> bool:
        now = trio.current_time()
        bucket = self._buckets.get((kind, key))
        if bucket is None:
            bucket = self._buckets[(kind, key)] = _Bucket(float(rate.burst), now)
        else:
            bucket.tokens = min(float(rate.burst), bucket.tokens + (now - bucket.updated) * rate.per_second)
            bucket.updated = now
        if bucket.tokens < cost:
            return False
        bucket.tokens -= cost
        return True

    def take(self, kind: str, key: str, rate: Rate, cost: float = 1.0) -> None:
        """Take ``cost`` tokens or raise ``RateLimited`` (the request is refused, nothing else)."""
        if not self.try_take(kind, key, rate, cost):
            raise RateLimited(f"too many {kind} requests; slow down")

    def prune(self, idle_s: float = 600.0) -> int:
        now = trio.current_time()
        stale = [k for k, b in self._buckets.items() if now - b.updated > idle_s]
        for k in stale:
            del self._buckets[k]
        return len(stale)

    def __len__(self) -> int:
        return len(self._buckets)
