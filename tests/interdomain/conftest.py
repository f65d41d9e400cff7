"""Several homeservers on one memory network, each discovering the others from a static map.

Clocks: every server and client reads ``mock_ms`` (trio's clock), so ``autojump_clock``
can let a simulated day pass in a test.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import trio

from clientsdk.client import Client
from clientsdk.connection import memory_connector
from federation.discovery import Discovery, parse_document
from federation.transport import MemoryNetwork
from homeserver.app import RunningServer, serve
from homeserver.config import Config, FederationConfig
from homeserver.server_keys import ServerKey, new_server_key
from homeserver.storage import MemoryStorage
from tests.sdk.conftest import OPTIONS, PASSWORD, mock_ms

DOMAINS = ("example.org", "example.net", "example.com")


def document(domain: str, keys: list[ServerKey]) -> dict:
    return {"domain": domain, "version": 1,
            "endpoints": {"c2s": f"wss://{domain}/c2s", "http": f"https://{domain}", "fed": f"wss://{domain}/fed"},
            "server_keys": [k.describe() for k in keys]}


@dataclass
class Org:
    domain: str
    keys: list[ServerKey]
    storage: MemoryStorage = field(default_factory=MemoryStorage)
    running: RunningServer | None = None
    scope: trio.CancelScope | None = None

    @property
    def homeserver(self):
        assert self.running is not None
        return self.running.homeserver


class Federation:
    """Orgs on one memory network; start/stop each independently (a peer can be down)."""

    def __init__(self, tmp_path: Path, nursery: trio.Nursery, domains: tuple[str, ...],
                 federation_config: FederationConfig | None = None) -> None:
        self.tmp_path = tmp_path
        self.nursery = nursery
        self.network = MemoryNetwork()
        self.fed_config = federation_config or FederationConfig(backoff_base_ms=200, backoff_cap_ms=60_000)
        self.orgs = {d: Org(d, [new_server_key(0, 10**15)]) for d in domains}

    def discovery(self, domain: str) -> Discovery:
        static = {o.domain: parse_document(document(o.domain, o.keys), o.domain)
                  for o in self.orgs.values() if o.domain != domain}
        return Discovery(static=static)

    async def start(self, domain: str) -> RunningServer:
        org = self.orgs[domain]
        config = Config(domain=domain, data_dir=self.tmp_path / domain, websocket_port=0, http_port=0,
                        password_opslimit=1, password_memlimit=8 * 1024 * 1024, federation=self.fed_config)
        scope = trio.CancelScope()

        async def run(task_status: trio.TaskStatus[RunningServer]) -> None:
            with scope:
                await serve(config, org.keys, storage=org.storage, memory_network=self.network, clock=mock_ms,
                            discovery=self.discovery(domain), task_status=task_status)

        org.running = await self.nursery.start(run)
        org.scope = scope
        return org.running

    async def stop(self, domain: str) -> None:
        """Stop gracefully (like SIGTERM); its storage survives for a restart."""
        org = self.orgs[domain]
        assert org.running is not None
        org.running.stop.set()
        with trio.fail_after(60):
            while domain in self.network._listeners:       # noqa: SLF001 - wait until it is gone
                await trio.sleep(0.01)
        org.running = None

    async def drained(self, timeout_s: float | None = 60) -> None:
        """Wait until every running server's outbound queues are empty (acknowledged by the peer)."""
        with trio.fail_after(timeout_s) if timeout_s is not None else trio.CancelScope():
            while any(stats["depth"] for org in self.orgs.values() if org.running is not None
                      for stats in org.homeserver.federation.outbound.stats().values()):
                await trio.sleep(0.01)

    def path(self, name: str) -> Path:
        return self.tmp_path / f"{name}.client.db"

    async def register(self, user: str) -> Client:
        """``user`` is ``name@domain``; the client's device file is named after it."""
        domain = user.split("@", 1)[1]
        return await Client.register(self.path(user), user, PASSWORD, connect=memory_connector(self.network, domain),
                                     store_key=user.encode()[:32].ljust(32, b"k"), options=OPTIONS)


    async def login(self, user: str, name: str) -> Client:
        """A second device of ``user`` (pending until a device of it approves), stored as ``name``."""
        domain = user.split("@", 1)[1]
        return await Client.login(self.path(name), user, PASSWORD, connect=memory_connector(self.network, domain),
                                  store_key=name.encode()[:32].ljust(32, b"k"), options=OPTIONS)


@asynccontextmanager
async def federation_of(tmp_path: Path, domains: tuple[str, ...] = DOMAINS[:2],
                        federation_config: FederationConfig | None = None) -> AsyncIterator[Federation]:
    async with trio.open_nursery() as nursery:
        fed = Federation(tmp_path, nursery, domains, federation_config)
        for domain in domains:
            await fed.start(domain)
        async with AsyncExitStack():
            yield fed
        for org in fed.orgs.values():
            if org.running is not None:
                org.running.stop.set()


@pytest.fixture
async def two_orgs(tmp_path) -> AsyncIterator[Federation]:
    async with federation_of(tmp_path) as fed:
        yield fed
