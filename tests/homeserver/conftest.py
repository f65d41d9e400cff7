"""In-process homeservers over the memory network (fast), optionally on a real SQLite file."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
import trio

from federation.rpc import RpcClient, open_rpc
from federation.transport import MemoryNetwork
from homeserver.app import RunningServer, serve
from homeserver.config import Config
from homeserver.server_keys import new_server_key
from homeserver.storage import MemoryStorage

DOMAIN = "example.org"


def make_config(tmp_path: Path, **overrides) -> Config:
    base = Config(domain=DOMAIN, data_dir=tmp_path, websocket_port=0, http_port=0,
                  password_opslimit=1, password_memlimit=8 * 1024 * 1024)
    return base.replace(**overrides)


@asynccontextmanager
async def running_server(config: Config, *, sqlite: bool = False, clock=None,
                         network: MemoryNetwork | None = None) -> AsyncIterator[tuple[RunningServer, MemoryNetwork]]:
    network = network or MemoryNetwork()
    kwargs = {} if clock is None else {"clock": clock}
    storage = None if sqlite else MemoryStorage()
    async with trio.open_nursery() as nursery:
        running = await nursery.start(lambda task_status: serve(
            config, [new_server_key(0, 10**15)], storage=storage, memory_network=network,
            task_status=task_status, **kwargs))
        yield running, network
        running.stop.set()


@asynccontextmanager
async def connect(network: MemoryNetwork, domain: str = DOMAIN, source: str | None = None) -> AsyncIterator[RpcClient]:
    transport = await network.connect(domain, source=source)
    async with open_rpc(transport) as rpc:
        yield rpc


@pytest.fixture
def config(tmp_path):
    return make_config(tmp_path)
