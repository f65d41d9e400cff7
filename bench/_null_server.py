"""The homeserver with the in-memory store: the "null relay" of the benchmark.

Everything but storage is the real server (``homeserver.app.serve``: handlers,
validation, coverage checks, delivery, WebSocket listener); ``MemoryStorage``
replaces SQLite, so ``msgs_per_s / null_relay_msgs_per_s`` isolates the cost of
durable storage.  Signals are handled the way ``securechat-server run`` does.

Run: ``python bench/_null_server.py --config FILE``; prints
``null relay for DOMAIN: ws://HOST:PORT/c2s (http port N)`` once listening.
"""

from __future__ import annotations

import sys
from pathlib import Path

# Run as a script, Python puts bench/ first on sys.path, where bench/federation.py
# would shadow the federation package: the repository root goes first instead.
_BENCH = str(Path(__file__).resolve().parent)
sys.path[:] = [p for p in sys.path if p and str(Path(p).resolve()) != _BENCH]
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import argparse
import signal

import trio

from homeserver.app import RunningServer, serve
from homeserver.config import load_config
from homeserver.logs import setup_logging
from homeserver.server_keys import load_keys
from homeserver.storage import MemoryStorage


def main() -> None:
    parser = argparse.ArgumentParser(description="homeserver over MemoryStorage (benchmark null relay)")
    parser.add_argument("--config", required=True)
    args = parser.parse_args()
    config = load_config(args.config)
    keys = load_keys(config.signing_key_file)
    setup_logging(config.log_level)

    async def run() -> None:
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            async with trio.open_nursery() as nursery:
                running: RunningServer = await nursery.start(lambda task_status: serve(
                    config, keys, storage=MemoryStorage(), task_status=task_status))
                print(f"null relay for {config.domain}: {running.c2s_url} (http port {running.http_port})",
                      flush=True)
                async for _ in signals:
                    running.stop.set()
                    break

    trio.run(run)


if __name__ == "__main__":
    main()
