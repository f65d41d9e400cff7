"""Homeserver PROCESSES on loopback that federate over real sockets (issue 5, item 7).

Each org is a ``securechat-server`` process with its own SQLite file and signing key;
the orgs find each other through ``[federation] static`` (domain -> base URL of the
peer's HTTP listener, plain HTTP being allowed for loopback).  Ports are fixed in the
config at init, so an org restarted after SIGKILL listens where its peer expects it.
The process plumbing (init, start, wait for /healthz, stop) is ``tests.serverproc``.
"""

from __future__ import annotations

import re
import signal
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import trio

from conformance.client import ProtocolDevice, authenticate, register, throwaway_user
from federation.rpc import RpcClient, open_rpc
from federation.transport import connect_websocket
from tests.serverproc import ServerProcess, init_server, start_server, stop

# Fast retries, so a peer that comes back is reached within a second or two.
BACKOFF = "backoff_base_ms = 100\nbackoff_cap_ms = 1000\n"


@dataclass
class Org:
    """One homeserver process; ``start``/``kill``/``terminate`` it as often as a test needs."""

    domain: str
    config: Path
    ws_port: int
    http_port: int
    process: ServerProcess | None = None

    @property
    def c2s_url(self) -> str:
        return f"ws://127.0.0.1:{self.ws_port}/c2s"

    @property
    def http_base(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    async def start(self) -> None:
        """Start the process and wait until its /healthz answers."""
        assert self.process is None or self.process.process.poll() is not None, "already running"
        self.process = await trio.to_thread.run_sync(start_server, self.config)

    async def kill(self) -> None:
        """SIGKILL: no flush, no goodbye; only what was fsynced survives."""
        assert self.process is not None
        self.process.signal(signal.SIGKILL)
        await trio.to_thread.run_sync(self.process.wait)

    async def terminate(self) -> None:
        """SIGTERM (graceful shutdown), or kill after 20 s."""
        if self.process is not None:
            await trio.to_thread.run_sync(stop, self.process)

    async def health(self) -> dict[str, Any]:
        async with httpx.AsyncClient() as client:
            return (await client.get(f"{self.http_base}/healthz", timeout=5)).json()

    async def outbound_depth(self, destination: str) -> int:
        """Envelopes queued for ``destination`` and not yet acknowledged by it (0 if none ever)."""
        stats = (await self.health()).get("federation", {}).get("outbound", {})
        return int(stats.get(destination, {}).get("depth", 0))

    async def wait_drained(self, destination: str, timeout_s: float = 60, poll_s: float = 0.05) -> None:
        """Until the peer has acknowledged everything queued for it."""
        with trio.fail_after(timeout_s):
            while await self.outbound_depth(destination):
                await trio.sleep(poll_s)

    def log(self) -> str:
        """Logs of every run of this org (one file per start)."""
        return "".join(p.read_text(errors="replace") for p in sorted(self.config.parent.glob("server-*.log")))


def _ports(config: Path) -> tuple[int, int]:
    text = config.read_text()
    ws = re.search(r"^websocket_port = (\d+)$", text, re.MULTILINE)
    http = re.search(r"^http_port = (\d+)$", text, re.MULTILINE)
    assert ws is not None and http is not None
    return int(ws.group(1)), int(http.group(1))


def init_orgs(root: Path, domains: tuple[str, ...], *, transport: str = "websocket") -> dict[str, Org]:
    """Init one data dir per domain; each names every other domain in its ``static`` map."""
    orgs: dict[str, Org] = {}
    for domain in domains:
        config = init_server(root / domain, domain)
        orgs[domain] = Org(domain, config, *_ports(config))
    for org in orgs.values():
        static = ", ".join(f'"{o.domain}" = "{o.http_base}"' for o in orgs.values() if o is not org)
        settings = f'transport = "{transport}"\nstatic = {{ {static} }}\n{BACKOFF}'
        text, count = re.subn(r"^transport = .*\n", settings, org.config.read_text(), flags=re.MULTILINE)
        assert count == 1, "the [federation] section of the config template changed"
        org.config.write_text(text)
    return orgs


@asynccontextmanager
async def running_orgs(root: Path, domains: tuple[str, ...], *, transport: str = "websocket"
                       ) -> AsyncIterator[dict[str, Org]]:
    """Init and start every org; every process still running is stopped on the way out."""
    orgs = init_orgs(root, domains, transport=transport)
    try:
        for org in orgs.values():
            await org.start()
        yield orgs
    finally:
        with trio.CancelScope(shield=True):
            async with trio.open_nursery() as nursery:
                for org in orgs.values():
                    nursery.start_soon(org.terminate)


@asynccontextmanager
async def ws_rpc(url: str, device: ProtocolDevice | None = None, domain: str = "") -> AsyncIterator[RpcClient]:
    """A raw protocol connection over a real WebSocket, authenticated as ``device`` if given."""
    transport = await connect_websocket(url)
    try:
        async with open_rpc(transport) as rpc:
            if device is not None:
                await authenticate(rpc, device, domain)
            yield rpc
    finally:
        with trio.CancelScope(shield=True):
            await transport.aclose()


# --- raw protocol devices (opaque payloads) ------------------------------------------------


async def register_on(org: Org, prefix: str) -> ProtocolDevice:
    """A throwaway user on ``org`` with one device (real keys, no end-to-end crypto)."""
    async with ws_rpc(org.c2s_url) as rpc:
        return await register(rpc, throwaway_user(org.domain, prefix))


async def send_opaque(rpc: RpcClient, to: ProtocolDevice, message_id: str) -> None:
    """One ``send`` to ``to``'s only device; returns once the sender's server acknowledged it."""
    await rpc.request("send", message_id=message_id,
                      payloads=[{"devices": [to.address], "ciphertext": message_id.encode()}])


async def receive_all(org: Org, device: ProtocolDevice, count: int, *, quiet_s: float = 0.5,
                      timeout_s: float = 60) -> list[str]:
    """Connect ``device`` and take ``count`` envelope pushes (acking each), then listen ``quiet_s``
    longer: every message id pushed is returned, duplicates included."""
    got: list[str] = []
    async with ws_rpc(org.c2s_url, device, org.domain) as rpc:
        async def take() -> None:
            push = await rpc.next_push("envelope")
            got.append(push.fields["message_id"])
            await rpc.request("ack", seqs=[push.fields["seq"]])

        with trio.fail_after(timeout_s):
            while len(got) < count:
                await take()
        with trio.move_on_after(quiet_s):
            while True:
                await take()
    return got
