"""The suite's ``autojump_clock`` (tests/conftest.py) holds still while a thread works; hung tests end inside trio."""

from __future__ import annotations

import time

import pytest
import trio

from tests import conftest


async def test_a_mock_timeout_does_not_fire_while_a_thread_works(autojump_clock):
    with trio.move_on_after(1) as scope:
        await trio.to_thread.run_sync(time.sleep, 0.2)     # 0.2 real seconds, 0 mock seconds
    assert not scope.cancelled_caught
    assert trio.current_time() < 1


async def test_the_clock_still_jumps_when_only_tasks_wait(autojump_clock):
    started = time.monotonic()
    await trio.sleep(3600)
    assert time.monotonic() - started < 1


def test_a_hung_test_fails_at_its_real_time_deadline_and_says_where_it_waited(monkeypatch):
    monkeypatch.setattr(conftest, "TEST_DEADLINE_S", 0.3)
    finished = []

    async def hangs_under_a_mock_clock() -> None:
        try:
            await trio.sleep_forever()
        finally:
            finished.append("cleanup ran inside trio")

    started = time.monotonic()
    with pytest.raises(pytest.fail.Exception, match=r"0 s of real time(.|\n)*tests/test_clock.py:\d+"):
        trio.run(conftest._with_deadline(hangs_under_a_mock_clock), clock=trio.testing.MockClock(autojump_threshold=0))
    assert time.monotonic() - started < 5 and finished == ["cleanup ran inside trio"]


def test_a_test_that_ends_in_time_is_untouched(monkeypatch):
    monkeypatch.setattr(conftest, "TEST_DEADLINE_S", 5)

    async def quick(x: int) -> int:
        await trio.sleep(3600)               # mock time: the deadline is real time
        return x + 1

    assert trio.run(conftest._with_deadline(quick), 41, clock=trio.testing.MockClock(autojump_threshold=0)) == 42
