"""``securechat-server``: init, run, and the operator's admin commands.

Admin commands open the database directly (SQLite WAL allows it beside a running
server); device-state changes reach a running server's cache within its TTL.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import secrets
import signal
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import trio

from federation.addresses import UserAddress, check_device_id
from federation.errors import SecureChatError
from homeserver.clock import wall_clock_ms
from homeserver.config import Config, ConfigError, load_config, render_config
from homeserver.logs import setup_logging
from homeserver.server_keys import current_key, load_keys, new_server_key, rotate_keys, write_keys

DAY_MS = 86_400_000


def cmd_init(args: argparse.Namespace) -> int:
    directory = Path(args.directory)
    config_path = directory / "homeserver.toml"
    if config_path.exists() and not args.force:
        print(f"{config_path} exists; use --force to overwrite", file=sys.stderr)
        return 1
    directory.mkdir(parents=True, exist_ok=True)
    config_path.write_text(render_config(args.domain, args.port, args.http_port, args.registration),
                           encoding="utf-8")
    key_path = directory / "server_signing_key.toml"
    if not key_path.exists():
        write_keys(key_path, [new_server_key(wall_clock_ms())])
    load_config(config_path)  # prove the file we wrote parses
    print(f"wrote {config_path} and {key_path}")
    print(f"start it with: securechat-server run --config {config_path}")
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    from homeserver.app import RunningServer, serve

    config = load_config(args.config)
    keys = load_keys(config.signing_key_file)
    setup_logging(config.log_level)

    async def main() -> None:
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            async with trio.open_nursery() as nursery:
                running: RunningServer = await nursery.start(lambda task_status: serve(
                    config, keys, task_status=task_status))
                # What start-up built lives as long as the process: keep it out of the
                # collector's full passes, which otherwise stall every connection (bench:
                # 40-60 ms per full pass, 7-15 ms frozen; relay +10-15% msgs/s).
                gc.collect()
                gc.freeze()
                print(f"securechat homeserver for {config.domain}: {running.c2s_url} "
                      f"(http port {running.http_port})", flush=True)
                async for _ in signals:
                    running.stop.set()
                    break

    trio.run(main)
    return 0


def _with_storage(config: Config, work: Callable[[Any], Awaitable[int]]) -> int:
    from homeserver.storage import open_storage

    async def main() -> int:
        async with trio.open_nursery() as nursery:
            storage = await open_storage(config.storage_url, nursery)
            try:
                return await work(storage)
            finally:
                await storage.aclose()
                nursery.cancel_scope.cancel()

    return trio.run(main)


def _ms(ms: int) -> str:
    return datetime.datetime.fromtimestamp(ms / 1000, datetime.UTC).strftime("%Y-%m-%d %H:%M")


def cmd_invite(args: argparse.Namespace) -> int:
    from homeserver.handlers.accounts import invite_token_hash

    config = load_config(args.config)

    async def work(storage: Any) -> int:
        now = wall_clock_ms()
        if args.action == "create":
            token = secrets.token_urlsafe(24)
            invite = await storage.accounts.create_invite(invite_token_hash(token), now,
                                                          now + args.days * DAY_MS, args.uses, args.note)
            print(f"invite {invite.invite_id}: {token}")
            print(f"valid until {_ms(invite.expires_ms)} UTC for {invite.uses_left} registration(s)")
        elif args.action == "list":
            for inv in await storage.accounts.list_invites():
                state = "revoked" if inv.revoked else f"{inv.uses_left} use(s) left"
                print(f"{inv.invite_id}  until {_ms(inv.expires_ms)}  {state}  {inv.note}")
        else:
            if not await storage.accounts.revoke_invite(args.invite_id):
                print(f"no invite {args.invite_id}", file=sys.stderr)
                return 1
            print(f"revoked invite {args.invite_id}")
        return 0

    return _with_storage(config, work)


def cmd_user(args: argparse.Namespace) -> int:
    config = load_config(args.config)

    async def work(storage: Any) -> int:
        if args.action == "list":
            for account in await storage.accounts.list_accounts():
                flag = "  (disabled)" if account.disabled else ""
                print(f"{account.user}  since {_ms(account.created_ms)}{flag}")
            return 0
        user = str(UserAddress.parse(args.user))
        if not await storage.accounts.set_disabled(user, not args.enable):
            print(f"no user {user}", file=sys.stderr)
            return 1
        print(f"{'enabled' if args.enable else 'disabled'} {user}")
        return 0

    return _with_storage(config, work)


def cmd_device(args: argparse.Namespace) -> int:
    config = load_config(args.config)

    async def work(storage: Any) -> int:
        user = str(UserAddress.parse(args.user))
        if args.action == "list":
            for device in await storage.devices.list_devices(user):
                print(f"{device.device_id}  {device.state.value:8}  since {_ms(device.created_ms)}  "
                      f"key {device.identity_key.hex()[:16]}...")
            return 0
        device_id = check_device_id(args.device_id)
        if not await storage.devices.revoke_device(user, device_id, wall_clock_ms()):
            print(f"no device {device_id} for {user}", file=sys.stderr)
            return 1
        print(f"revoked {user}/{device_id}")
        return 0

    return _with_storage(config, work)


def cmd_keys(args: argparse.Namespace) -> int:
    """Rotate or list the server signing keys; a running server picks up a rotation on restart."""
    config = load_config(args.config)
    keys = load_keys(config.signing_key_file)
    now = wall_clock_ms()
    if args.action == "rotate":
        keys = rotate_keys(keys, now, lifetime_ms=args.days * DAY_MS)
        write_keys(config.signing_key_file, keys)
        print(f"new signing key {keys[-1].key_id}, valid until {_ms(keys[-1].valid_until_ms)} UTC")
        print("older keys stay published until they expire; restart the server to sign with the new key")
        return 0
    try:
        signing = current_key(keys, now).key_id
    except ConfigError:
        signing = None
    for key in sorted(keys, key=lambda k: k.valid_from_ms):
        if key.key_id == signing:
            state = "signing"
        elif key.valid_until_ms <= now:
            state = "expired"
        elif key.valid_from_ms > now:
            state = "not yet valid"
        else:
            state = "published"
        print(f"{key.key_id}  {_ms(key.valid_from_ms)} .. {_ms(key.valid_until_ms)} UTC  {state}")
    if signing is None:
        print("no key is valid now: run 'securechat-server keys rotate'", file=sys.stderr)
        return 1
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="securechat-server", description="SecureChat homeserver")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("init", help="write a config file and a server signing key")
    p.add_argument("directory")
    p.add_argument("--domain", required=True)
    p.add_argument("--port", type=int, default=8448, help="WebSocket port (default 8448)")
    p.add_argument("--http-port", type=int, default=8449, help="HTTP port (default 8449)")
    p.add_argument("--registration", choices=["open", "invite", "closed"], default="open")
    p.add_argument("--force", action="store_true", help="overwrite an existing config")
    p.set_defaults(func=cmd_init)

    p = sub.add_parser("run", help="run the homeserver")
    p.add_argument("--config", required=True)
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("invite", help="manage invite tokens")
    p.add_argument("action", choices=["create", "list", "revoke"])
    p.add_argument("invite_id", nargs="?")
    p.add_argument("--config", required=True)
    p.add_argument("--uses", type=int, default=1)
    p.add_argument("--days", type=int, default=7)
    p.add_argument("--note", default="")
    p.set_defaults(func=cmd_invite)

    p = sub.add_parser("user", help="list, disable or enable users")
    p.add_argument("action", choices=["list", "disable", "enable"])
    p.add_argument("user", nargs="?")
    p.add_argument("--config", required=True)
    p.set_defaults(func=cmd_user)

    p = sub.add_parser("device", help="list or revoke a user's devices")
    p.add_argument("action", choices=["list", "revoke"])
    p.add_argument("user")
    p.add_argument("device_id", nargs="?")
    p.add_argument("--config", required=True)
    p.set_defaults(func=cmd_device)

    p = sub.add_parser("keys", help="rotate or list the server signing keys")
    p.add_argument("action", choices=["rotate", "list"])
    p.add_argument("--config", required=True)
    p.add_argument("--days", type=int, default=365, help="lifetime of a new key (default 365)")
    p.set_defaults(func=cmd_keys)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if getattr(args, "action", None) == "revoke" and args.command == "invite" and not args.invite_id:
        print("invite revoke needs an invite id", file=sys.stderr)
        return 2
    if args.command == "user":
        args.enable = args.action == "enable"
        if args.action != "list" and not args.user:
            print(f"user {args.action} needs a user address", file=sys.stderr)
            return 2
    if args.command == "device" and args.action == "revoke" and not args.device_id:
        print("device revoke needs a device id", file=sys.stderr)
        return 2
    try:
        return int(args.func(args))
    except (ConfigError, SecureChatError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
