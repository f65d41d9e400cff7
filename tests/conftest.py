"""Suite-wide fixtures.

``autojump_clock`` is replaced by a clock that does not jump while a worker thread is
running.  pytest-trio's own autojump clock jumps to the next deadline as soon as every
task is blocked, and a task waiting for a thread (SQLite, argon2, the client store) *is*
blocked: the clock then fired client timeouts (RPC, keepalive, backlog wait) in the
middle of a 1 ms database call.  How often depended on how busy the machine was, so a
loaded CI machine saw failures, and a ``while not received: await sleep()`` loop whose
message a spurious timeout had dropped spun for ever in mock time.

Every async test also gets a real-time deadline (``TEST_DEADLINE_S``) enforced inside
trio: see ``pytest_collection_modifyitems``.
"""

from __future__ import annotations

import functools
import inspect
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
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


# A hung async test is cancelled inside trio after this much real time (a thread's timer:
# mock clocks do not move it), and fails with where its tasks were waiting.  pytest-timeout's
# 180 s signal, the backstop, raises in the middle of whatever trio was doing: the run is torn
# down half-way, and the debris (a closed epoll object, coroutines finalised outside trio)
# made the tests after it fail too.
TEST_DEADLINE_S = 120.0
_REPO = str(Path(__file__).resolve().parent.parent)


def _project_file(filename: str) -> bool:
    return filename.startswith(_REPO) and "site-packages" not in filename


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        test = getattr(item, "obj", None)
        if inspect.iscoroutinefunction(test):
            item.obj = _with_deadline(test)  # type: ignore[attr-defined]


def _with_deadline(test: Callable[..., Awaitable[Any]]) -> Callable[..., Awaitable[Any]]:
    @functools.wraps(test)
    async def run(*args: Any, **kwargs: Any) -> Any:
        token = trio.lowlevel.current_trio_token()
        stacks: list[str] = []

        def expire() -> None:                  # on the trio thread
            stacks.append(_task_stacks())
            scope.cancel()

        def fire() -> None:                    # on the timer's thread
            try:
                token.run_sync_soon(expire)
            except trio.RunFinishedError:
                pass                           # the test ended meanwhile

        timer = threading.Timer(TEST_DEADLINE_S, fire)
        timer.daemon = True
        with trio.CancelScope() as scope:
            timer.start()
            try:
                return await test(*args, **kwargs)
            finally:
                timer.cancel()
        pytest.fail(f"still running after {TEST_DEADLINE_S:.0f} s of real time; its tasks waited at:\n"
                    + "".join(stacks), pytrace=False)

    return run


def _task_stacks() -> str:
    """Every trio task, indented by nursery, with the project frames it is suspended in."""
    lines: list[str] = []

    def walk(task: trio.lowlevel.Task, depth: int) -> None:
        frames = []
        coro: Any = task.coro
        while coro is not None:
            frame = getattr(coro, "cr_frame", None) or getattr(coro, "gi_frame", None)
            if frame is not None and _project_file(frame.f_code.co_filename):
                frames.append(f"{Path(frame.f_code.co_filename).relative_to(_REPO)}:{frame.f_lineno}")
            coro = getattr(coro, "cr_await", None) or getattr(coro, "gi_yieldfrom", None)
        lines.append(f"{'  ' * depth}{task.name}: {' > '.join(frames) or '(library code only)'}\n")
        for nursery in task.child_nurseries:
            for child in nursery.child_tasks:
                walk(child, depth + 1)

    walk(trio.lowlevel.current_root_task(), 0)
    return "".join(lines)
