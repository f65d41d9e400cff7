"""Pluggable connectors and the reconnect policy of the trio client.

A ``Connector`` opens one ``federation.transport.Transport`` to the homeserver;
a transport that needs background tasks runs them in the nursery it is given, which
lives as long as that connection (the memory and WebSocket transports need none).  Tests use ``memory_connector``; real clients
``websocket_connector("wss://host/c2s")``.
"""

from __future__ import annotations

import random
import ssl
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import trio

from federation.transport import MemoryNetwork, Transport, connect_websocket

Connector = Callable[[trio.Nursery], Awaitable[Transport]]

CLOSE_REPLACED = 4000
CLOSE_REVOKED = 4001


def memory_connector(network: MemoryNetwork, domain: str) -> Connector:
    """Connect over an in-process ``MemoryNetwork`` (tests, several servers in one process)."""

    async def connect(nursery: trio.Nursery) -> Transport:
        return await network.connect(domain)

    return connect


def websocket_connector(url: str, *, ssl_context: ssl.SSLContext | None = None) -> Connector:
    """Connect to ``ws://`` or ``wss://`` ``url`` (the homeserver's ``/c2s`` endpoint)."""

    async def connect(nursery: trio.Nursery) -> Transport:
        return await connect_websocket(url, ssl_context=ssl_context)

    return connect


@dataclass(frozen=True, slots=True)
class Backoff:
    """Exponential backoff with jitter: many clients of a restarted server do not reconnect in lockstep."""

    initial_s: float = 0.5
    maximum_s: float = 60.0
    factor: float = 2.0

    def delay(self, attempt: int, rand: Callable[[], float] = random.random) -> float:
        """Seconds to wait before reconnect attempt ``attempt`` (0-based): a uniform draw in [d/2, d]."""
        base = min(self.maximum_s, self.initial_s * self.factor ** min(attempt, 32))
        return base * (0.5 + 0.5 * rand())
