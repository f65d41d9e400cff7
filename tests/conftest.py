"""Suite-wide fixtures.

``autojump_clock`` is replaced by a clock that does not jump while a worker thread is
running.  pytest-trio's own autojump clock jumps to the next deadline as soon as every
task is blocked, and a task waiting for a thread (SQLite, argon2, the client store) *is*
blocked: the clock then fired client timeouts (RPC, keepalive, backlog wait) in the
middle of a 1 ms database call.  How often depended on how busy the machine was, so a
loaded CI machine saw failures, and a ``while not received: await sleep()`` loop whose
message a spurious timeout had dropped spun for ever in mock time.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

import pytest
import trio
import trio.testing

from homeserver.storage.db import _WriterThread


class ThreadCounter:
    """Counts thread calls in flight, and makes a ``MockClock`` hold still while any is.

    ``MockClock`` cannot be subclassed, so the counter replaces the clock's ``_autojump``
    (what trio's run loop calls once every task is blocked) on the instance.
    """

    def __init__(self, clock: trio.testing.MockClock) -> None:
        self.in_flight = 0
        self._jump = clock._autojump
        clock._autojump = self._autojump  # type: ignore[method-assign]

    def _autojump(self) -> None:
        if self.in_flight:
            # The loop is idle only because it waits for a thread: give the thread the GIL
            # for a moment instead of spinning, and let the loop look again.
            time.sleep(0.0002)
            return
        self._jump()

    def counted(self, run: Callable[..., Awaitable[Any]]) -> Callable[..., Awaitable[Any]]:
        """Wrap an async "run this in a thread" function so the clock knows while it runs."""

        @functools.wraps(run)
        async def wrapper(*args: Any, **kwargs: Any) -> Any:
            self.in_flight += 1
            try:
                return await run(*args, **kwargs)
            finally:
                self.in_flight -= 1

        return wrapper


@pytest.fixture
def autojump_clock(monkeypatch: pytest.MonkeyPatch) -> Iterator[trio.testing.MockClock]:
    """pytest-trio's ``autojump_clock``, but it never jumps while a worker thread runs."""
    clock = trio.testing.MockClock(autojump_threshold=0)
    threads = ThreadCounter(clock)
    monkeypatch.setattr(trio.to_thread, "run_sync", threads.counted(trio.to_thread.run_sync))
    monkeypatch.setattr(_WriterThread, "run", threads.counted(_WriterThread.run))
    yield clock
