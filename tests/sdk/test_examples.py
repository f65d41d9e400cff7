"""The examples run for real: ``examples/echo_bot.py`` answers over WebSocket through a homeserver process."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio

from clientsdk.account import ClientOptions
from clientsdk.client import Client
from clientsdk.connection import Backoff, websocket_connector
from tests.sdk.conftest import FAST_KDF, collect
from tests.serverproc import ROOT, ServerProcess, init_server, start_server, stop

DOMAIN = "example.org"
ECHO_BOT = ROOT / "examples" / "echo_bot.py"
OPTIONS = ClientOptions(one_time_prekeys=10, kdf=FAST_KDF, backoff=Backoff(initial_s=0.05, maximum_s=0.2))


def user_code_lines(path: Path) -> int:
    """Lines of code, not counting blank lines, comments and the module docstring."""
    source = path.read_text()
    module = ast.parse(source)
    docstring_lines: set[int] = set()
    first = module.body[0] if module.body else None
    if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant) and isinstance(first.value.value, str):
        docstring_lines = set(range(first.lineno, (first.end_lineno or first.lineno) + 1))
    return sum(1 for number, line in enumerate(source.splitlines(), start=1)
               if line.strip() and not line.strip().startswith("#") and number not in docstring_lines)


def test_echo_bot_is_short() -> None:
    assert user_code_lines(ECHO_BOT) < 30


@pytest.fixture
def server(tmp_path: Path) -> Iterator[ServerProcess]:
    running = start_server(init_server(tmp_path / "server", DOMAIN))
    yield running
    stop(running)


def start_bot(server: ServerProcess, store: Path) -> subprocess.Popen[str]:
    env = dict(os.environ, ECHO_BOT_PASSPHRASE="bot store passphrase", PYTHONUNBUFFERED="1")
    return subprocess.Popen([sys.executable, str(ECHO_BOT), server.url, f"echo@{DOMAIN}", str(store)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT)


async def wait_ready(bot: subprocess.Popen[str]) -> str:
    with trio.fail_after(20):
        line = await trio.to_thread.run_sync(bot.stdout.readline)
    assert "ready" in line, line + bot.stderr.read()
    return line


def end_bot(bot: subprocess.Popen[str]) -> None:
    if bot.poll() is None:
        bot.terminate()
        bot.wait(10)
    bot.stdout.close()
    bot.stderr.close()


async def test_echo_bot_answers_and_restarts_from_its_store(server, tmp_path) -> None:
    store = tmp_path / "bot.db"
    bot = start_bot(server, store)
    try:
        assert f"echo bot echo@{DOMAIN}/" in await wait_ready(bot)
        alice = await Client.register(tmp_path / "alice.db", f"alice@{DOMAIN}", "alice-password-1",
                                      connect=websocket_connector(server.url), store_key=b"a" * 32, options=OPTIONS)
        async with alice:
            with trio.fail_after(20):
                async with alice.connect():
                    await alice.send(f"echo@{DOMAIN}", "ping one")
                    [echoed] = await collect(alice, 1)
                    assert (echoed.text, echoed.sender, echoed.outgoing) == ("ping one", f"echo@{DOMAIN}", False)

                    # Restarted, the bot reopens its store: the same device, still decrypting.
                    end_bot(bot)
                    bot = start_bot(server, store)
                    first_line = await wait_ready(bot)
                    assert first_line.split()[2] == echoed.sender_device
                    await alice.send(f"echo@{DOMAIN}", "ping two")
                    [echoed] = await collect(alice, 1)
                    assert echoed.text == "ping two"
    finally:
        end_bot(bot)
