"""``securechat``: a line-mode command-line client built only on the public SDK API.

    securechat register alice@example.org --server ws://127.0.0.1:8448/c2s
    securechat send bob@example.org "hello"          # --as alice@example.org when several stores exist
    securechat listen                                # prints events until interrupted
    securechat chat bob@example.org                  # history, then stdin lines out, messages in
    securechat verify bob@example.org --confirm      # after comparing the safety number
    securechat devices / revoke DEVICE_ID / backup export PATH / backup import PATH

Why these choices: secrets (account password, store passphrase) never come from
argv, where ``ps`` and shell history would show them — they come from a prompt,
or one line each from stdin when stdin is not a terminal, so scripts can pipe
them.  Status goes to stderr and messages to stdout, so output can be piped.  The
server URL is remembered next to the store (``<store>.server``; not a secret) so
only ``register``/``login`` need ``--server``.
"""

from __future__ import annotations

import argparse
import getpass
import os
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import NoReturn, TextIO

import trio

from clientsdk.client import Client
from clientsdk.connection import websocket_connector
from clientsdk.errors import SdkError
from clientsdk.group_records import GroupChanged, GroupMessageReceived
from clientsdk.events import (
    ConnectionChanged,
    DeviceListChanged,
    Event,
    MessageReceived,
    SecurityEvent,
)
from federation.addresses import UserAddress
from federation.errors import SecureChatError
from federation.transport import TransportClosed

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_USAGE = 2                # argparse's code for bad usage
EXIT_INTERRUPTED = 130
STORE_ENV = "SECURECHAT_STORE"
SERVER_ENV = "SECURECHAT_SERVER"


class CliError(Exception):
    """A problem to report in one line (no traceback), with exit code 1."""


def default_store_dir() -> Path:
    base = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(base) / "securechat"


def default_store_path(user: str) -> Path:
    return default_store_dir() / f"{user}.db"


def _user(text: str) -> str:
    try:
        return str(UserAddress.parse(text))
    except SecureChatError:
        raise argparse.ArgumentTypeError(f"not a user address (name@domain): {text!r}") from None


# --- secrets: a prompt on a terminal, else one stdin line each ------------------------------

def read_secret(prompt: str, stdin: TextIO | None = None) -> str:
    """A password or passphrase: ``getpass`` on a TTY, else the next stdin line (never argv)."""
    stream = stdin or sys.stdin
    if stream.isatty():
        return getpass.getpass(prompt)
    line = stream.readline()
    if not line:
        raise CliError(f"stdin ended; expected a line for: {prompt.strip().rstrip(':')}")
    return line.rstrip("\r\n")


def read_new_passphrase() -> str:
    """A passphrase for a new store; on a terminal it is typed twice."""
    passphrase = read_secret("New store passphrase: ")
    if sys.stdin.isatty() and getpass.getpass("Repeat store passphrase: ") != passphrase:
        raise CliError("the passphrases differ")
    if not passphrase:
        raise CliError("the store passphrase must not be empty")
    return passphrase


# --- store and server resolution --------------------------------------------------------

def resolve_store(args: argparse.Namespace, user: str | None = None) -> Path:
    """``--store`` > ``$SECURECHAT_STORE`` > the account's default path > the only store in the default dir."""
    if args.store:
        return Path(args.store).expanduser()
    if os.environ.get(STORE_ENV):
        return Path(os.environ[STORE_ENV]).expanduser()
    user = user or getattr(args, "as_user", None)
    if user:
        return default_store_path(user)
    stores = sorted(default_store_dir().glob("*.db"))
    if len(stores) == 1:
        return stores[0]
    raise CliError("cannot tell which account to use: give --as USER or --store PATH")


def _server_file(store: Path) -> Path:
    return store.with_name(store.name + ".server")


def resolve_server(args: argparse.Namespace, store: Path) -> str:
    if args.server:
        return str(args.server)
    if os.environ.get(SERVER_ENV):
        return os.environ[SERVER_ENV]
    remembered = _server_file(store)
    if remembered.is_file():
        return remembered.read_text().strip()
    raise CliError("no server known for this store: give --server ws://HOST:PORT/c2s")


def _remember_server(store: Path, url: str) -> None:
    _server_file(store).write_text(url + "\n")


async def _open(args: argparse.Namespace) -> Client:
    store = resolve_store(args)
    if not store.is_file():
        raise CliError(f"no store at {store} (register or login first)")
    url = resolve_server(args, store)
    passphrase = read_secret("Store passphrase: ")
    return await Client.open(store, passphrase=passphrase, connect=websocket_connector(url))


# --- output -----------------------------------------------------------------------------

def _status(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def format_message(message: MessageReceived) -> str:
    if message.outgoing:
        return f"-> {message.conversation}: {message.text}"
    return f"{message.sender}: {message.text}"


def format_event(event: Event) -> tuple[str, bool]:
    """One line for an event, and whether it belongs on stdout (messages) rather than stderr."""
    if isinstance(event, MessageReceived):
        return format_message(event), True
    if isinstance(event, SecurityEvent):
        where = f" {event.device}" if event.device else ""
        return f"! security: {event.kind} for {event.user}{where}: {event.detail}", False
    if isinstance(event, DeviceListChanged):
        return f"* devices of {event.user} now v{event.version}: {', '.join(event.devices)}", False
    if isinstance(event, GroupMessageReceived):
        return f"[{event.group_id[:12]}] {event.sender}: {event.text}", True
    if isinstance(event, GroupChanged):
        what = "removed from" if event.removed_me else "changed"
        return (f"* group {event.group_id[:12]} ({event.name}) {what} at epoch {event.epoch}: "
                f"{', '.join(event.changes)}"), False
    if isinstance(event, ConnectionChanged):
        return ("* connected" if event.connected else "* disconnected"), False
    return f"* {type(event).__name__}", False


def _emit(event: Event) -> None:
    line, to_stdout = format_event(event)
    print(line, file=sys.stdout if to_stdout else sys.stderr, flush=True)


# --- commands ----------------------------------------------------------------------------

async def cmd_register(args: argparse.Namespace) -> int:
    store = resolve_store(args, args.user)
    store.parent.mkdir(parents=True, exist_ok=True)
    password = read_secret("Account password: ")
    passphrase = read_new_passphrase()
    client = await Client.register(store, args.user, password, connect=websocket_connector(args.server),
                                   passphrase=passphrase)
    async with client:
        _remember_server(store, args.server)
        print(f"registered {client.address} (master device); store {store}", flush=True)
    return EXIT_OK


async def cmd_login(args: argparse.Namespace) -> int:
    store = resolve_store(args, args.user)
    store.parent.mkdir(parents=True, exist_ok=True)
    password = read_secret("Account password: ")
    passphrase = read_new_passphrase()
    client = await Client.login(store, args.user, password, connect=websocket_connector(args.server),
                                passphrase=passphrase)
    async with client:
        _remember_server(store, args.server)
        print(f"new device {client.device_id} of {client.user} is pending; store {store}", flush=True)
        print(f"linking code: {client.device_id}:{client.identity_key.hex()}", flush=True)
        print(f"short linking code: {client.linking_code()}", flush=True)
        print(f"on your master device run: securechat approve {client.device_id}:{client.identity_key.hex()}",
              flush=True)
    return EXIT_OK


def _parse_link(code: str) -> tuple[str, bytes | None]:
    """``DEVICE_ID`` or a linking code ``DEVICE_ID:IDENTITY_KEY_HEX`` (the key pins what the server reports)."""
    device_id, _, key_hex = code.partition(":")
    if not key_hex:
        return device_id, None
    try:
        key = bytes.fromhex(key_hex)
    except ValueError:
        raise CliError("the linking code's key part is not hex") from None
    if len(key) != 32:
        raise CliError("the linking code's key part is not 32 bytes")
    return device_id, key


async def cmd_approve(args: argparse.Namespace) -> int:
    short = ":" not in args.device and len(args.device) > 10
    device_id, key = (args.device, None) if short else _parse_link(args.device)
    async with await _open(args) as client:
        if not client.is_master:
            raise CliError("approve runs on the master device (the first one registered)")
        async with client.connect():
            share = not args.no_history
            if short:
                version = await client.approve_link(args.device, share_history=share)
                device_id = args.device.split("-")[0].upper()
            else:
                version = await client.approve_device(device_id, key, share_history=share)
        print(f"approved device {device_id}; device list v{version}", flush=True)
    return EXIT_OK


async def cmd_devices(args: argparse.Namespace) -> int:
    async with await _open(args) as client:
        role = "master device" if client.is_master else "linked device"
        print(f"this device: {client.address} ({role})", flush=True)
        print(f"identity key: {client.identity_key.hex()}", flush=True)
        async with client.connect():
            infos = await client.devices()
        for info in infos:
            mark = "  (this device)" if info.this_device else ""
            print(f"{info.device_id}  {info.state:<9} {info.linking_code}{mark}", flush=True)
    return EXIT_OK


async def cmd_revoke(args: argparse.Namespace) -> int:
    async with await _open(args) as client:
        if not client.is_master:
            raise CliError("revoke runs on the master device (the first one registered)")
        async with client.connect():
            version = await client.revoke_device(args.device_id.upper())
        where = f"device list v{version}" if version is not None else "it was never listed"
        print(f"revoked device {args.device_id.upper()}; {where}", flush=True)
    return EXIT_OK


async def cmd_verify(args: argparse.Namespace) -> int:
    """Show the safety number; ``--scan`` compares a QR payload (hex, from stdin); ``--confirm`` marks verified."""
    async with await _open(args) as client:
        async with client.connect():
            state = await client.check_contact(args.user)
            if args.accept_change:
                await client.accept_key_change(args.user)
                _status(f"accepted the new master key of {args.user}; it is unverified now")
                state = client.trust(args.user)
        print(f"trust: {state.value}", flush=True)
        print(f"safety number with {args.user}:", flush=True)
        print(client.safety_number(args.user), flush=True)
        print(f"my QR payload for {args.user}: {client.qr_payload(args.user).hex()}", flush=True)
        if args.scan:
            text = read_secret("Scanned QR payload (hex): ").strip()
            try:
                payload = bytes.fromhex(text)
            except ValueError:
                raise CliError("the scanned payload is not hex") from None
            verdict = await client.verify_scanned(args.user, payload)
            print(f"scan: {verdict.value}", flush=True)
            if verdict.value != "match":
                return EXIT_ERROR
            print(f"{args.user} is now verified", flush=True)
        elif args.confirm:
            await client.mark_verified(args.user)
            print(f"{args.user} is now verified", flush=True)
    return EXIT_OK


async def cmd_backup(args: argparse.Namespace) -> int:
    if args.action == "export":
        async with await _open(args) as client:
            if args.protect == "phrase":
                passphrase = read_secret("New backup passphrase: ")
                if sys.stdin.isatty() and getpass.getpass("Repeat backup passphrase: ") != passphrase:
                    raise CliError("the passphrases differ")
                if not passphrase:
                    raise CliError("the backup passphrase must not be empty")
                await client.export_backup(args.path, passphrase=passphrase)
                print(f"backup written to {args.path} (protected by your passphrase)", flush=True)
            else:
                key = await client.export_backup(args.path)
                print(f"backup written to {args.path}", flush=True)
                print(f"recovery key (write it down; it opens the backup): {key.display() if key else ''}",
                      flush=True)
        return EXIT_OK
    if not args.store and not args.as_user and not os.environ.get(STORE_ENV):
        raise CliError("backup import creates a new store: give --as USER or --store PATH")
    store = resolve_store(args)
    if store.exists():
        raise CliError(f"a store already exists at {store}")
    if not args.server and not os.environ.get(SERVER_ENV):
        raise CliError("backup import needs --server ws://HOST:PORT/c2s")
    url = resolve_server(args, store)
    secret = read_secret("Backup passphrase: " if args.protect == "phrase" else "Recovery key: ")
    password = read_secret("Account password: ")
    passphrase = read_new_passphrase()
    store.parent.mkdir(parents=True, exist_ok=True)
    client = await Client.restore_backup(
        args.path, store, password, connect=websocket_connector(url), passphrase=passphrase,
        backup_passphrase=secret if args.protect == "phrase" else None,
        recovery_key=secret if args.protect == "key" else None)
    async with client:
        _remember_server(store, url)
        role = "master device" if client.is_master else "pending device"
        print(f"restored {client.user} as new device {client.device_id} ({role}); store {store}", flush=True)
        if not client.is_master:
            print(f"on your master device run: securechat approve {client.linking_code()}", flush=True)
    return EXIT_OK


async def cmd_group(args: argparse.Namespace) -> int:
    """``group create NAME [USER...]`` | ``list`` | ``add GID USER`` | ``remove GID USER`` | ``send GID TEXT``."""
    async with await _open(args) as client:
        if args.action == "list":
            for group_id in await client.groups():
                info = await client.group_info(group_id)
                print(f"{group_id}  {info.name}  epoch {info.epoch}  members: {', '.join(info.members)}")
            return EXIT_OK
        async with client.connect():
            if args.action == "create":
                members = [str(_user(m)) for m in args.members]
                print(await client.create_group(args.name, members), flush=True)
            elif args.action == "add":
                await client.add_member(args.group_id, str(_user(args.user)))
                _status(f"added {args.user}")
            elif args.action == "remove":
                await client.remove_member(args.group_id, str(_user(args.user)))
                _status(f"removed {args.user}")
            else:
                _status(f"sent {await client.send_group(args.group_id, args.text)}")
    return EXIT_OK


async def cmd_send(args: argparse.Namespace) -> int:
    async with await _open(args) as client:
        async with client.connect():
            message_id = await client.send(args.to, args.text)
        _status(f"sent {message_id}")
    return EXIT_OK


async def _print_events(client: Client, count: int | None) -> None:
    seen = 0
    async for event in client.events():
        _emit(event)
        if isinstance(event, (MessageReceived, GroupMessageReceived)) and not event.outgoing:
            seen += 1
            if count is not None and seen >= count:
                break


async def cmd_listen(args: argparse.Namespace) -> int:
    async with await _open(args) as client, client.connect():
        _status(f"listening as {client.address} (Ctrl-C to stop)")
        await _print_events(client, args.count)
    return EXIT_OK


async def cmd_chat(args: argparse.Namespace) -> int:
    async with await _open(args) as client:
        for entry in await client.history(args.to, args.history):
            arrow = "->" if entry.outgoing else "<-"
            print(f"{arrow} {entry.sender_device}: {entry.text}", flush=True)
        async with client.connect():
            _status(f"chatting with {args.to} as {client.address}; end with Ctrl-D")
            async with trio.open_nursery() as nursery:
                nursery.start_soon(_chat_incoming, client, args.to)
                async for line in _stdin_lines():
                    if line.strip():
                        await client.send(args.to, line)
                nursery.cancel_scope.cancel()
    return EXIT_OK


async def _chat_incoming(client: Client, other: str) -> None:
    async for event in client.events():
        if isinstance(event, MessageReceived) and event.conversation == other:
            print(format_message(event), flush=True)
        elif not isinstance(event, MessageReceived):
            _emit(event)


async def _stdin_lines() -> AsyncIterator[str]:
    while True:
        line = await trio.to_thread.run_sync(sys.stdin.readline, abandon_on_cancel=True)
        if not line:
            return
        yield line.rstrip("\r\n")


# --- argument parsing and the entry point --------------------------------------------------



class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        self.print_usage(sys.stderr)
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="securechat", description="End-to-end encrypted chat from the command line. "
                     "Passwords and passphrases are prompted for, or read one per line from stdin.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    def command(name: str, help_text: str, *, account: bool = False) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_text)
        p.add_argument("--store", help=f"store file (default ${STORE_ENV} or ~/.local/share/securechat/USER.db)")
        p.add_argument("--server", help=f"ws://HOST:PORT/c2s (default ${SERVER_ENV} or the one used at register)")
        if not account:
            p.add_argument("--as", dest="as_user", type=_user, help="the account whose default store to use")
        return p

    for name, help_text in (("register", "create an account; this device holds its master key"),
                            ("login", "add a pending device to an account (approve it from the master device)")):
        p = command(name, help_text, account=True)
        p.add_argument("user", type=_user)
        p.set_defaults(run=cmd_register if name == "register" else cmd_login)
    for name in ("approve", "link"):
        p = command(name, "approve a pending device from the master device")
        p.add_argument("device", help="DEVICE_ID or the linking code DEVICE_ID:KEY that login printed")
        p.add_argument("--no-history", action="store_true",
                       help="do not share contacts, trust and recent messages with the new device")
        p.set_defaults(run=cmd_approve)
    command("devices", "list every device of this account").set_defaults(run=cmd_devices)
    p = command("revoke", "revoke a device of this account (from the master device)")
    p.add_argument("device_id")
    p.set_defaults(run=cmd_revoke)
    p = command("verify", "show the safety number with a contact; --scan or --confirm to verify")
    p.add_argument("user", type=_user)
    flow = p.add_mutually_exclusive_group()
    flow.add_argument("--scan", action="store_true", help="read the QR payload the contact shows (hex) from stdin")
    flow.add_argument("--confirm", action="store_true", help="the safety numbers matched: mark verified")
    p.add_argument("--accept-change", action="store_true", help="trust the contact's new master key (unverified)")
    p.set_defaults(run=cmd_verify)
    p = command("backup", "export a backup file, or import one as a new device")
    p.add_argument("action", choices=["export", "import"])
    p.add_argument("path")
    p.add_argument("--protect", choices=["key", "phrase"], default="key",
                   help="a random recovery key (default) or a passphrase; either is read from stdin/prompt")
    p.set_defaults(run=cmd_backup)
    group_parser = sub.add_parser("group", help="groups: create | list | add | remove | send")
    group_sub = group_parser.add_subparsers(dest="action", required=True, parser_class=_Parser)
    for action, positionals, help_text in (
            ("create", (("name", None), ("members", "*")), "create a group: NAME [USER...]"),
            ("list", (), "list this device's groups"),
            ("add", (("group_id", None), ("user", None)), "add USER to the group"),
            ("remove", (("group_id", None), ("user", None)), "remove USER from the group"),
            ("send", (("group_id", None), ("text", None)), "send TEXT to the group")):
        p = group_sub.add_parser(action, help=help_text)
        p.add_argument("--store", help=f"store file (default ${STORE_ENV} or ~/.local/share/securechat/USER.db)")
        p.add_argument("--server", help=f"ws://HOST:PORT/c2s (default ${SERVER_ENV} or the one used at register)")
        p.add_argument("--as", dest="as_user", type=_user, help="the account whose default store to use")
        for name, nargs in positionals:
            p.add_argument(name, nargs=nargs)
        p.set_defaults(run=cmd_group)
    p = command("send", "send one message")
    p.add_argument("to", type=_user)
    p.add_argument("text")
    p.set_defaults(run=cmd_send)
    p = command("listen", "print events until interrupted")
    p.add_argument("--count", type=int, default=None, help="exit after this many incoming messages")
    p.set_defaults(run=cmd_listen)
    p = command("chat", "interactive line-mode chat: history, then stdin lines out and messages in")
    p.add_argument("to", type=_user)
    p.add_argument("--history", type=int, default=50, help="how many stored messages to show first")
    p.set_defaults(run=cmd_chat)
    return parser


def _leaves(exc: BaseException) -> Iterator[BaseException]:
    if isinstance(exc, BaseExceptionGroup):
        for inner in exc.exceptions:
            yield from _leaves(inner)
    else:
        yield exc


def _describe(exc: BaseException) -> str | None:
    """A one-line message for an expected failure, or None for a bug (shown with its traceback)."""
    for leaf in _leaves(exc):
        if isinstance(leaf, CliError):
            return str(leaf)
        if isinstance(leaf, SdkError):
            return f"{leaf} ({leaf.code})"
        if isinstance(leaf, SecureChatError):
            code = getattr(leaf, "code", "")
            return f"the server refused: {leaf} ({getattr(code, 'value', code)})"
        if isinstance(leaf, (TransportClosed, OSError, trio.BrokenResourceError)):
            return f"cannot reach the server ({type(leaf).__name__})"
    return None


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        run: Callable[[argparse.Namespace], Awaitable[int]] = args.run     # a cmd_* function (set_defaults)
        return trio.run(run, args)
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    except BaseException as exc:
        if isinstance(exc, SystemExit):
            raise
        if any(isinstance(leaf, KeyboardInterrupt) for leaf in _leaves(exc)):
            return EXIT_INTERRUPTED
        message = _describe(exc)
        if message is None:
            raise
        print(f"securechat: error: {message}", file=sys.stderr)
        return EXIT_ERROR


if __name__ == "__main__":
    raise SystemExit(main())
