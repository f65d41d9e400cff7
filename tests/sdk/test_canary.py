"""The plaintext canary (issue 4, item 10): the server never sees message text or a client's private key.

Real encrypted traffic between SDK clients (alice with two devices, bob) carries a
canary text; afterwards the server's SQLite file (with its -wal/-shm), its log and
every frame it received (and sent) must contain neither the canary nor any private
key of the clients, read back from their own stores.  Once against a real
homeserver process over WebSocket (database and log), once in-process over the
memory network with a recording wrapper around ``Homeserver.handle_connection``
(every frame).  Positive controls show the searches can find public keys, so an
empty result means something.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable
from dataclasses import dataclass, field
from pathlib import Path

import trio

from clientsdk.account import Account, ClientOptions
from clientsdk.client import Client
from clientsdk.connection import (
    Backoff,
    Connector,
    memory_connector,
    websocket_connector,
)
from clientsdk.store import Snapshot, Store
from federation.transport import CLOSE_NORMAL, MemoryNetwork, Transport
from homeserver.app import Homeserver
from homeserver.config import Config
from homeserver.server_keys import new_server_key
from homeserver.storage import open_storage
from tests.sdk.conftest import FAST_KDF, collect
from tests.serverproc import init_server, start_server, stop

DOMAIN = "example.org"
ALICE, BOB = f"alice@{DOMAIN}", f"bob@{DOMAIN}"
PASSWORDS = {"alice": "alice-password-1", "bob": "bob-password-22"}
CANARY = "CANARY-7f3a9c kanarienvogel"
OPTIONS = ClientOptions(one_time_prekeys=10, kdf=FAST_KDF, backoff=Backoff(initial_s=0.05, maximum_s=0.2))


def store_key(name: str) -> bytes:
    return name.encode().ljust(32, b"s")


def stored_snapshot(path: Path, key: bytes) -> Snapshot:
    """A closed device's store, read (a running client holds its file: read ``client._store`` then)."""
    store = Store.open(path, store_key=key)
    try:
        return store.load()
    finally:
        store.close()


def client_secrets(snapshot: Snapshot, key: bytes) -> set[bytes]:
    """Every private key a device's store holds: identity (both forms), master, prekey private halves."""
    account, prekeys = Account.from_kv(snapshot.kv)
    secrets = {account.identity.private_bytes(), account.identity.dh_private.private_bytes_raw(), key}
    if account.master is not None:
        secrets.add(account.master.private_bytes())
    secrets.update(s.private for s in prekeys.signed.values())
    secrets.update(prekeys.one_time.values())
    secrets.update(p.seed for p in prekeys.pq.values())
    return secrets


def leaks(blob: bytes, secrets: set[bytes]) -> list[str]:
    """What of the canary or the secrets occurs in ``blob`` (raw, hex, or UTF-16 for the text)."""
    found = []
    for needle in (CANARY.encode(), CANARY.encode("utf-16-le"), CANARY.encode().hex().encode()):
        if needle in blob:
            found.append("canary")
    found += [f"secret {s[:2].hex()}.." for s in secrets if s in blob or s.hex().encode() in blob]
    return found


@dataclass
class Devices:
    alice: Client
    phone: Client
    bob: Client
    secrets: set[bytes] = field(default_factory=set)


async def exchange_canaries(tmp_path: Path, connector: Connector) -> Devices:
    """alice (2 devices) and bob exchange canary messages; returns the devices' secrets, read from their stores."""
    def make(name: str, user: str, login: bool = False) -> Awaitable[Client]:
        factory = Client.login if login else Client.register
        return factory(tmp_path / f"{name}.db", user, PASSWORDS[user.split("@")[0]], connect=connector,
                       store_key=store_key(name), options=OPTIONS)

    alice = await make("alice", ALICE)
    bob = await make("bob", BOB)
    phone = await make("phone", ALICE, login=True)
    devices = Devices(alice, phone, bob)
    # Private keys as enrolled (before any one-time prekey is used up and deleted), read through
    # each idle client's own open store.
    for name in ("alice", "bob", "phone"):
        devices.secrets |= client_secrets(getattr(devices, name)._store.load(), store_key(name))
    with trio.fail_after(30):
        async with alice.connect(), bob.connect():
            await alice.approve_device(phone.device_id, phone.identity_key)
            async with phone.connect():
                for i in range(3):
                    await alice.send(BOB, f"{CANARY} from alice #{i}")
                got = await collect(bob, 3)
                assert [m.text for m in got] == [f"{CANARY} from alice #{i}" for i in range(3)]
                assert [m.text for m in await collect(phone, 3)] == [m.text for m in got]   # own-device copies
                await bob.send(ALICE, f"{CANARY} from bob")
                for device in (alice, phone):
                    [reply] = await collect(device, 1)
                    assert reply.text == f"{CANARY} from bob"
                await phone.send(BOB, f"{CANARY} from alice's phone")
                [last] = await collect(bob, 1)
                assert last.text == f"{CANARY} from alice's phone"
    for client in (alice, bob, phone):
        await client.aclose()
    for name in ("alice", "bob", "phone"):
        devices.secrets |= client_secrets(stored_snapshot(tmp_path / f"{name}.db", store_key(name)), store_key(name))
    assert len(devices.secrets) > 3 * OPTIONS.one_time_prekeys      # the search covers every prekey too
    return devices


def database_files(sqlite_path: Path) -> dict[str, bytes]:
    files = {}
    for suffix in ("", "-wal", "-shm", "-journal"):
        path = Path(str(sqlite_path) + suffix)
        if path.is_file():
            files[path.name] = path.read_bytes()
    return files


async def test_server_process_database_and_log_hold_no_plaintext_or_private_key(tmp_path) -> None:
    config = init_server(tmp_path / "server", DOMAIN)
    server = start_server(config)
    try:
        devices = await exchange_canaries(tmp_path, websocket_connector(server.url))
        sqlite_path = config.parent / "homeserver.sqlite3"
        running_files = database_files(sqlite_path)       # while running, the WAL holds recent writes
    finally:
        stop(server)
    assert server.process.returncode == 0
    files = {**{f"running {k}": v for k, v in running_files.items()},
             **{f"stopped {k}": v for k, v in database_files(sqlite_path).items()}}
    assert any(name.endswith("homeserver.sqlite3") for name in files)
    log = server.log().encode()
    assert log.strip(), "the server wrote no log at all"
    for name, blob in {**files, "log": log}.items():
        assert not leaks(blob, devices.secrets), name
        for password in PASSWORDS.values():
            assert password.encode() not in blob, name
    # Positive control: public identity keys and the users are in the database, so the search works.
    everything = b"".join(files.values())
    assert devices.alice.identity_key in everything and devices.bob.identity_key in everything
    assert ALICE.encode() in everything


class RecordingTransport(Transport):
    """Wraps the server's side of one connection and keeps a copy of every frame."""

    def __init__(self, inner: Transport, received: list[bytes], sent: list[bytes]) -> None:
        self._inner = inner
        self._received = received
        self._sent = sent
        self.remote = inner.remote

    async def send(self, frame: bytes) -> None:
        self._sent.append(bytes(frame))
        await self._inner.send(frame)

    async def receive(self) -> bytes:
        frame = await self._inner.receive()
        self._received.append(bytes(frame))
        return frame

    async def aclose(self, code: int = CLOSE_NORMAL, reason: str = "") -> None:
        await self._inner.aclose(code, reason)

    @property
    def close_code(self) -> int | None:
        return self._inner.close_code


async def test_every_frame_the_server_received_holds_no_plaintext_or_private_key(tmp_path, caplog) -> None:
    caplog.set_level(logging.DEBUG)
    config = Config(domain=DOMAIN, data_dir=tmp_path / "server", websocket_port=0, http_port=0,
                    password_opslimit=1, password_memlimit=8 * 1024 * 1024)
    config.data_dir.mkdir()
    received: list[bytes] = []
    sent: list[bytes] = []
    network = MemoryNetwork()
    async with trio.open_nursery() as nursery:
        storage = await open_storage(config.storage_url, nursery)
        homeserver = Homeserver(config, storage, [new_server_key(0, 10**15)])

        async def recording_handler(transport: Transport) -> None:
            await homeserver.handle_connection(RecordingTransport(transport, received, sent))

        await nursery.start(lambda task_status: network.serve(DOMAIN, recording_handler, task_status=task_status))
        devices = await exchange_canaries(tmp_path, memory_connector(network, DOMAIN))
        await storage.aclose()
        nursery.cancel_scope.cancel()

    assert len(received) > 20 and sent
    for i, frame in enumerate(received):
        assert not leaks(frame, devices.secrets), f"received frame {i}"
    for i, frame in enumerate(sent):
        assert not leaks(frame, devices.secrets), f"sent frame {i}"
    log = "\n".join(r.getMessage() for r in caplog.records).encode() + caplog.text.encode()
    assert not leaks(log, devices.secrets)
    for name, blob in database_files(config.sqlite_path).items():
        assert not leaks(blob, devices.secrets), name
    # Positive controls: the frames carry the public keys and the ciphertexts of 5 sends.
    everything = b"".join(received)
    assert devices.alice.identity_key in everything and devices.phone.identity_key in everything
    assert everything.count(b"ciphertext") >= 5
