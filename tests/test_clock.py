"""The suite's ``autojump_clock`` (tests/conftest.py) holds still while a thread works."""

from __future__ import annotations

import time

import trio


async def test_a_mock_timeout_does_not_fire_while_a_thread_works(autojump_clock):
    with trio.move_on_after(1) as scope:
        await trio.to_thread.run_sync(time.sleep, 0.2)     # 0.2 real seconds, 0 mock seconds
    assert not scope.cancelled_caught
    assert trio.current_time() < 1


async def test_the_clock_still_jumps_when_only_tasks_wait(autojump_clock):
    started = time.monotonic()
    await trio.sleep(3600)
    assert time.monotonic() - started < 1
