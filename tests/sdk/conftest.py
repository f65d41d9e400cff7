"""An in-process homeserver over the memory network, and helpers to make SDK clients against it."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
import trio

from clientsdk.account import ClientOptions
from clientsdk.client import Client
from clientsdk.connection import Backoff
from clientsdk.connection import memory_connector
from clientsdk.events import Event, MessageReceived, SecurityEvent
from clientsdk.store import KdfParams
from federation.transport import MemoryNetwork
from homeserver.app import RunningServer, serve
from homeserver.config import Config
from homeserver.server_keys import new_server_key
from homeserver.storage import MemoryStorage

DOMAIN = "example.org"
PASSWORD = "correct horse battery"
FAST_KDF = KdfParams(opslimit=1, memlimit=8 * 1024)
BASE_MS = 1_800_000_000_000


def mock_ms() -> int:
    """Milliseconds from trio's clock (a MockClock in tests), shared by server and clients."""
    return BASE_MS + int(trio.current_time() * 1000)


OPTIONS = ClientOptions(clock=mock_ms, one_time_prekeys=20, kdf=FAST_KDF,
                        backoff=Backoff(initial_s=0.01, maximum_s=0.05))


@asynccontextmanager
async def homeserver(tmp_path: Path, network: MemoryNetwork, storage: MemoryStorage | None = None
                     ) -> AsyncIterator[RunningServer]:
    config = Config(domain=DOMAIN, data_dir=tmp_path / "server", websocket_port=0, http_port=0,
                    password_opslimit=1, password_memlimit=8 * 1024 * 1024)
    async with trio.open_nursery() as nursery:
        running = await nursery.start(lambda task_status: serve(
            config, [new_server_key(0, 10**15)], storage=storage or MemoryStorage(), memory_network=network,
            clock=mock_ms, task_status=task_status))
        yield running
        running.stop.set()


class World:
    """A server plus helpers to create clients with fast settings."""

    def __init__(self, tmp_path: Path, network: MemoryNetwork, storage: MemoryStorage | None = None) -> None:
        self.tmp_path = tmp_path
        self.network = network
        self.storage = storage
        self.connector = memory_connector(network, DOMAIN)

    def path(self, name: str) -> Path:
        return self.tmp_path / f"{name}.db"

    async def register(self, name: str) -> Client:
        return await Client.register(self.path(name), f"{name}@{DOMAIN}", PASSWORD, connect=self.connector,
                                     store_key=name.encode().ljust(32, b"k"), options=OPTIONS)

    async def login(self, user: str, name: str) -> Client:
        return await Client.login(self.path(name), f"{user}@{DOMAIN}", PASSWORD, connect=self.connector,
                                  store_key=name.encode().ljust(32, b"k"), options=OPTIONS)

    async def reopen(self, name: str) -> Client:
        return await Client.open(self.path(name), store_key=name.encode().ljust(32, b"k"), connect=self.connector,
                                 options=OPTIONS)


@pytest.fixture
async def world(tmp_path) -> AsyncIterator[World]:
    network = MemoryNetwork()
    storage = MemoryStorage()
    async with homeserver(tmp_path, network, storage):
        yield World(tmp_path, network, storage)


async def collect(client: Client, count: int, others: list[Event] | None = None) -> list[MessageReceived]:
    """The next ``count`` messages this client receives (other events go to ``others``)."""
    out: list[MessageReceived] = []
    async for event in client.events():
        if not isinstance(event, MessageReceived):
            if others is not None:
                others.append(event)
        else:
            out.append(event)
            if len(out) == count:
                break
    return out


def pending_security_events(client: Client) -> list[SecurityEvent]:
    """Every security event already queued for ``client``, without waiting."""
    out = []
    while True:
        try:
            event = client.events().receive_nowait()
        except trio.WouldBlock:
            return out
        if isinstance(event, SecurityEvent):
            out.append(event)
