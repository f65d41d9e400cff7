"""Two organisations, one conversation: federated, end-to-end encrypted, on loopback.

    .venv/bin/python examples/two_orgs.py [DATA_DIR]          # or: make demo

Starts two homeserver processes, example.org and example.net, each with its own
SQLite file on free loopback ports, and tells each where the other one is (a
``[federation] static`` entry in its ``homeserver.toml``).  Then, with the client SDK:

1. alice@example.org and bob@example.net exchange messages both ways;
2. alice creates a group with bob and carol@example.net, and each of them posts to it;
3. example.net goes down: alice's next messages wait in example.org's federation
   queue, then in bob's and carol's mailboxes once example.net is back, until they
   come online.

On the way it prints what each server stores (ciphertext only); at the end it checks
that no message text, nor the group's name, appears in either server's files or logs.
DATA_DIR keeps the servers' data for inspection (default: a temporary directory).
"""

import secrets
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import trio

from clientsdk.client import Client
from clientsdk.connection import websocket_connector
from clientsdk.events import MessageReceived
from clientsdk.groups import GroupMessageReceived
from federation import codec

SERVER_COMMAND = [sys.executable, "-m", "homeserver"]   # the `securechat-server` command
ALICE, BOB, CAROL = "alice@example.org", "bob@example.net", "carol@example.net"
GROUP_NAME = "Launch plan"
SENT_TEXTS: list[str] = [GROUP_NAME]                    # everything a server must never see


# --- the two homeservers --------------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Org:
    """One organisation: a `securechat-server` process with its own directory, ports and SQLite file."""

    def __init__(self, domain: str, root: Path) -> None:
        self.domain = domain
        self.dir = root / domain
        self.ws_port, self.http_port = free_port(), free_port()
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def c2s_url(self) -> str:
        return f"ws://127.0.0.1:{self.ws_port}/c2s"

    @property
    def base_url(self) -> str:           # its HTTP listener: /.well-known/securechat, /healthz
        return f"http://127.0.0.1:{self.http_port}"

    def init(self, peers: list["Org"]) -> None:
        """`securechat-server init`, then name the peers' base URLs under [federation] static."""
        subprocess.run([*SERVER_COMMAND, "init", str(self.dir), "--domain", self.domain,
                        "--port", str(self.ws_port), "--http-port", str(self.http_port)],
                       check=True, stdout=subprocess.DEVNULL)
        static = ", ".join(f'"{peer.domain}" = "{peer.base_url}"' for peer in peers)
        config = self.dir / "homeserver.toml"
        text = config.read_text()
        if "[federation]\n" not in text:
            raise SystemExit(f"{config} has no [federation] section to extend")
        config.write_text(text.replace("[federation]\n", (
            "[federation]\n"
            f"static = {{ {static} }}\n"
            "backoff_cap_ms = 2000    # demo: retry a peer that was down within 2 s\n"), 1))

    def launch(self) -> None:
        """`securechat-server run`, logging to server.log in its directory."""
        with (self.dir / "server.log").open("ab") as log:
            self.process = subprocess.Popen([*SERVER_COMMAND, "run", "--config", str(self.dir / "homeserver.toml")],
                                            stdout=log, stderr=subprocess.STDOUT)

    async def start(self) -> None:
        """Launch and wait until /healthz answers."""
        await trio.to_thread.run_sync(self.launch)
        with trio.fail_after(20):
            while True:
                if self.process.poll() is not None:
                    raise SystemExit(f"{self.domain} exited; see {self.dir / 'server.log'}")
                try:
                    await self.health()
                    return
                except httpx.HTTPError:
                    await trio.sleep(0.1)

    def stop(self) -> None:
        """SIGTERM: the server finishes what it acknowledged, closes connections and exits."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process = None

    async def health(self) -> dict:
        async with httpx.AsyncClient() as http:
            response = await http.get(f"{self.base_url}/healthz", timeout=2)
            response.raise_for_status()
            return response.json()

    async def wait_until(self, done: Callable[[dict], bool]) -> dict:
        """Poll /healthz until ``done(health)`` holds; returns that health document."""
        with trio.fail_after(20):
            while not done(health := await self.health()):
                await trio.sleep(0.1)
        return health


def queued(health: dict) -> int:
    """Envelopes a server holds for its peers that they have not acknowledged yet."""
    return sum(queue["depth"] for queue in health["federation"]["outbound"].values())


def show_storage(org: Org, moment: str) -> None:
    """Print the rows that carry messages: per-device mailboxes and the federation queue."""
    print(f"\n  {org.domain} stores ({moment}):")
    db = sqlite3.connect(f"file:{org.dir / 'homeserver.sqlite3'}?mode=ro", uri=True)
    try:
        accounts = [user for (user,) in db.execute("SELECT user FROM accounts ORDER BY user")]
        print(f"    accounts: {', '.join(accounts)} (public keys and password hashes only)")
        rows = db.execute("SELECT m.device, m.sender, m.blob_id, b.ciphertext FROM mailbox m "
                          "JOIN blobs b ON b.id = m.blob_id ORDER BY m.seq").fetchall()
        print(f"    mailbox entries: {len(rows)}")
        for device, sender, blob_id, ciphertext in rows:
            print(f"      for {device} from {sender}: blob {blob_id}, {len(ciphertext)} bytes "
                  f"{ciphertext[:20].hex()}...")
        rows = db.execute("SELECT destination, seq, kind, sender, payload FROM fed_outbound "
                          "WHERE cls = 'message' ORDER BY destination, seq").fetchall()
        print(f"    federation queue: {len(rows)} message envelope(s) waiting for a peer")
        for destination, seq, kind, sender, payload in rows:
            for part in codec.decode(payload)["payloads"]:
                print(f"      to {destination} #{seq} {kind} from {sender}: one ciphertext for "
                      f"{len(part['devices'])} device(s), {len(part['ciphertext'])} bytes "
                      f"{part['ciphertext'][:20].hex()}...")
    finally:
        db.close()


def check_no_plaintext(org: Org) -> None:
    """Every file the server wrote (SQLite database, WAL, log) must be free of what was said."""
    files = [path for path in org.dir.rglob("*") if path.is_file()]
    for path in files:
        data = path.read_bytes()
        for text in SENT_TEXTS:
            if text.encode() in data:
                raise SystemExit(f"PLAINTEXT FOUND: {text!r} in {path}")
    print(f"  {org.domain}: none of the {len(SENT_TEXTS)} texts appear in "
          f"{', '.join(sorted(path.name for path in files))}")


# --- the people ---------------------------------------------------------------------------

async def register(user: str, org: Org, stores: Path) -> Client:
    # A real app asks for the password and a store passphrase; the demo throws both away.
    client = await Client.register(stores / f"{user}.db", user, secrets.token_urlsafe(16),
                                   connect=websocket_connector(org.c2s_url), store_key=secrets.token_bytes(32))
    print(f"  registered {client.address} on {org.domain}")
    return client


async def received(client: Client, kind: type = MessageReceived) -> MessageReceived | GroupMessageReceived:
    """The next message of ``kind`` that someone else sent to ``client`` (decrypted on its device)."""
    with trio.fail_after(30):
        async for event in client.events():
            if isinstance(event, kind) and not event.outgoing:
                print(f"      {client.user} decrypted: {event.text!r}")
                return event
    raise SystemExit(f"{client.user}'s event stream ended")


def check(got: MessageReceived | GroupMessageReceived, sender: Client, text: str) -> None:
    if (got.sender, got.text) != (sender.user, text):
        raise SystemExit(f"expected {text!r} from {sender.user}, got {got.text!r} from {got.sender}")


async def send(sender: Client, to: Client, text: str, *, online: bool = True) -> None:
    SENT_TEXTS.append(text)
    print(f"  {sender.user} -> {to.user}: {text!r}")
    await sender.send(to.user, text)
    if online:
        check(await received(to), sender, text)


async def post(sender: Client, group: str, text: str, members: list[Client]) -> None:
    SENT_TEXTS.append(text)
    print(f"  {sender.user} -> group {GROUP_NAME!r}: {text!r}")
    await sender.send_group(group, text)
    for member in members:
        check(await received(member, GroupMessageReceived), sender, text)


# --- the story ----------------------------------------------------------------------------

async def demo(org: Org, net: Org, root: Path) -> None:
    print("== two organisations on loopback ==")
    for server in (org, net):
        await server.start()
        print(f"  {server.domain}: clients at {server.c2s_url}, discovery at "
              f"{server.base_url}/.well-known/securechat, data in {server.dir}")

    print("\n== accounts, one per person, each on their own organisation's server ==")
    stores = root / "clients"
    stores.mkdir()
    alice = await register(ALICE, org, stores)
    bob = await register(BOB, net, stores)
    carol = await register(CAROL, net, stores)

    async with alice, bob, carol, alice.connect():
        async with bob.connect(), carol.connect():
            print("\n== 1:1 across domains, both ways ==")
            await send(alice, bob, "Hi Bob, Alice from example.org here.")
            await send(bob, alice, "Hi Alice! Bob at example.net, reading you loud and clear.")

            print("\n== a group spanning both organisations ==")
            group = await alice.create_group(GROUP_NAME, [BOB, CAROL])
            print(f"  {ALICE} created {GROUP_NAME!r} with {BOB} and {CAROL} (the servers never see it)")
            await post(alice, group, "Launch is on Thursday.", [bob, carol])
            await post(bob, group, "Servers at example.net are ready.", [alice, carol])
            await post(carol, group, "Docs are done, see you Thursday.", [alice, bob])
        print(f"\n  {BOB} and {CAROL} go offline")

        print("\n== example.net goes down for maintenance; alice writes anyway ==")
        await trio.to_thread.run_sync(net.stop)
        await send(alice, bob, "Call me when you are back online.", online=False)
        await post(alice, group, "Reminder: launch at 10:00.", [])
        show_storage(org, "example.net is down, so the envelopes wait in the federation queue")

        await net.start()
        print("\n  example.net is back")
        await org.wait_until(lambda health: queued(health) == 0)
        print("  example.org's federation queue is empty: example.net acknowledged every envelope")
        await net.wait_until(lambda health: health["mailbox"]["entries"] >= 3)
        show_storage(net, "bob and carol still offline: one mailbox entry per device")

        print("\n== bob and carol come back online ==")
        async with bob.connect(), carol.connect():
            await received(bob)
            await received(bob, GroupMessageReceived)
            await received(carol, GroupMessageReceived)

            print("\n== after delivery: acknowledged messages are deleted ==")
            for server in (org, net):          # delivery receipts may still be crossing over
                health = await server.wait_until(lambda health: queued(health) == 0
                                                 and health["mailbox"]["entries"] == 0)
                print(f"  {server.domain}: {health['mailbox']['entries']} mailbox entries, "
                      f"{queued(health)} envelopes queued for peers")


async def until_interrupted(org: Org, net: Org, root: Path) -> bool:
    """Run the demo; Ctrl-C or SIGTERM cancels it cleanly.  True if it ran to the end."""
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async with trio.open_nursery() as nursery:
            async def cancel_on_signal() -> None:
                async for _ in signals:
                    nursery.cancel_scope.cancel()
            nursery.start_soon(cancel_on_signal)
            await demo(org, net, root)
            nursery.cancel_scope.cancel()
            return True
    return False


def main() -> int:
    signal.signal(signal.SIGTERM, signal.default_int_handler)   # outside trio, SIGTERM acts like Ctrl-C
    with tempfile.TemporaryDirectory(prefix="securechat-demo-") as scratch:
        root = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(scratch)
        org, net = Org("example.org", root), Org("example.net", root)
        if org.dir.exists() or net.dir.exists():
            print(f"{root} already holds a demo; give an empty or new directory", file=sys.stderr)
            return 2
        started = time.monotonic()
        finished = False
        try:
            org.init(peers=[net])
            net.init(peers=[org])
            finished = trio.run(until_interrupted, org, net, root)
        except KeyboardInterrupt:
            pass
        finally:
            org.stop()                  # on every way out: no server outlives the demo
            net.stop()
        if not finished:
            print("\ninterrupted; both servers stopped", file=sys.stderr)
            return 130
        print("\n== no plaintext on either server ==")
        for server in (org, net):
            check_no_plaintext(server)
        print(f"\ndemo finished in {time.monotonic() - started:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
