"""Homeserver configuration: a TOML file over embedded defaults (frozen dataclasses).

Relative paths in the file are relative to the file's directory, so a data
directory can be moved as a whole.
"""

from __future__ import annotations

import dataclasses
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from federation.addresses import parse_domain
from federation.errors import AddressError

DAY_MS = 86_400_000


class ConfigError(Exception):
    """The configuration file is missing, unreadable or has a bad value."""


@dataclass(frozen=True, slots=True)
class Rate:
    """A token bucket: ``per_second`` refill, ``burst`` capacity."""

    per_second: float
    burst: int


@dataclass(frozen=True, slots=True)
class Limits:
    max_frame_bytes: int = 1 << 20
    max_payloads_per_send: int = 1_000
    max_one_time_prekeys: int = 500            # stored per device
    max_upload_batch: int = 200                # keys per upload request
    prekeys_low_threshold: int = 10
    messages_per_device: Rate = Rate(50, 200)
    messages_per_user: Rate = Rate(100, 400)
    messages_per_address: Rate = Rate(1_000, 4_000)
    connections_per_address: Rate = Rate(10, 50)
    claims_per_device: Rate = Rate(5, 100)
    logins_per_address: Rate = Rate(1, 10)
    max_connections: int = 10_000


@dataclass(frozen=True, slots=True)
class FederationConfig:
    """Server-to-server settings (issue 5): who we talk to, how, and how much we accept."""

    enabled: bool = True
    transport: str = "websocket"                 # websocket | http
    static: dict[str, str] = field(default_factory=dict)   # domain -> base URL of its HTTP listener
    insecure_domains: frozenset[str] = frozenset()         # may be discovered over plain HTTP
    allow: frozenset[str] = frozenset()          # empty: every domain not denied
    deny: frozenset[str] = frozenset()
    transactions_per_origin: Rate = Rate(200, 1_000)
    requests_per_origin: Rate = Rate(100, 500)
    max_held_per_origin: int = 10_000            # envelopes held back behind a seq gap
    max_in_flight: int = 4                       # transactions per destination
    max_batch_envelopes: int = 100
    batch_wait_ms: int = 0                       # batches form while the window is full; no extra wait
    backoff_base_ms: int = 1_000
    backoff_cap_ms: int = 10 * 60 * 1000
    digest_interval_s: float = 600.0             # device-list digest comparison per peer
    request_timeout_s: float = 30.0

    def permits(self, domain: str) -> bool:
        """Whether we federate with ``domain`` at all (deny wins over allow)."""
        if domain in self.deny:
            return False
        return not self.allow or domain in self.allow


@dataclass(frozen=True, slots=True)
class Config:
    domain: str
    data_dir: Path
    websocket_host: str = "127.0.0.1"
    websocket_port: int = 8448
    http_host: str = "127.0.0.1"
    http_port: int = 8449
    public_base: str = ""                        # e.g. "wss://chat.example.org"; default from listeners
    database_url: str = ""                       # default: SQLite file in data_dir
    signing_key_file: Path = Path("server_signing_key.toml")
    registration: str = "open"                   # open | invite | closed
    password_opslimit: int = 2                   # Argon2id (pynacl INTERACTIVE)
    password_memlimit: int = 64 * 1024 * 1024
    mailbox_ttl_ms: int = 30 * DAY_MS
    housekeeping_interval_s: float = 300.0
    shutdown_grace_s: float = 10.0
    log_level: str = "info"
    limits: Limits = field(default_factory=Limits)
    federation: FederationConfig = field(default_factory=FederationConfig)

    @property
    def sqlite_path(self) -> Path:
        return self.data_dir / "homeserver.sqlite3"

    @property
    def storage_url(self) -> str:
        return self.database_url or f"sqlite:///{self.sqlite_path}"

    def c2s_url(self) -> str:
        base = self.public_base or f"ws://{self.websocket_host}:{self.websocket_port}"
        return f"{base}/c2s"

    def replace(self, **changes: Any) -> Config:
        return dataclasses.replace(self, **changes)


def _rate(value: Any, name: str) -> Rate:
    if not isinstance(value, dict) or set(value) != {"per_second", "burst"}:
        raise ConfigError(f"limits.{name} must be a table with per_second and burst")
    return Rate(float(value["per_second"]), int(value["burst"]))


def load_config(path: str | Path) -> Config:
    path = Path(path)
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"config file {path} not found (create one with 'securechat-server init')") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {path} is not valid TOML: {exc}") from None
    base = path.resolve().parent
    server = raw.get("server", {})
    listen = raw.get("listen", {})
    accounts = raw.get("accounts", {})
    storage = raw.get("storage", {})
    mailbox = raw.get("mailbox", {})
    limits_raw = raw.get("limits", {})
    federation_raw = raw.get("federation", {})
    try:
        domain = parse_domain(server["domain"])
    except KeyError:
        raise ConfigError("server.domain is required") from None
    except AddressError as exc:
        raise ConfigError(f"server.domain: {exc.message}") from None
    limit_fields = {f.name: f for f in dataclasses.fields(Limits)}
    limit_values: dict[str, Any] = {}
    for key, value in limits_raw.items():
        if key not in limit_fields:
            raise ConfigError(f"unknown setting limits.{key}")
        limit_values[key] = _rate(value, key) if isinstance(value, dict) else int(value)
    registration = accounts.get("registration", "open")
    if registration not in ("open", "invite", "closed"):
        raise ConfigError("accounts.registration must be open, invite or closed")
    data_dir = (base / server.get("data_dir", ".")).resolve()
    return Config(
        domain=domain,
        data_dir=data_dir,
        websocket_host=listen.get("websocket_host", "127.0.0.1"),
        websocket_port=int(listen.get("websocket_port", 8448)),
        http_host=listen.get("http_host", "127.0.0.1"),
        http_port=int(listen.get("http_port", 8449)),
        public_base=listen.get("public_base", ""),
        database_url=storage.get("url", ""),
        signing_key_file=(base / server.get("signing_key", "server_signing_key.toml")).resolve(),
        registration=registration,
        password_opslimit=int(accounts.get("password_opslimit", 2)),
        password_memlimit=int(accounts.get("password_memlimit", 64 * 1024 * 1024)),
        mailbox_ttl_ms=int(mailbox.get("ttl_days", 30)) * DAY_MS,
        housekeeping_interval_s=float(mailbox.get("housekeeping_interval_s", 300)),
        shutdown_grace_s=float(server.get("shutdown_grace_s", 10)),
        log_level=server.get("log_level", "info"),
        limits=Limits(**limit_values),
        federation=_federation(federation_raw),
    )


def _domains(value: Any, name: str) -> frozenset[str]:
    if not isinstance(value, list):
        raise ConfigError(f"federation.{name} must be a list of domains")
    try:
        return frozenset(parse_domain(str(d)) for d in value)
    except AddressError as exc:
        raise ConfigError(f"federation.{name}: {exc.message}") from None


def _federation(raw: dict[str, Any]) -> FederationConfig:
    known = {f.name for f in dataclasses.fields(FederationConfig)}
    values: dict[str, Any] = {}
    for key, value in raw.items():
        if key not in known:
            raise ConfigError(f"unknown setting federation.{key}")
        if key in ("allow", "deny", "insecure_domains"):
            values[key] = _domains(value, key)
        elif key == "static":
            if not isinstance(value, dict):
                raise ConfigError("federation.static must be a table of domain = base URL")
            values[key] = {parse_domain(d): str(u) for d, u in value.items()}
        elif key in ("transactions_per_origin", "requests_per_origin"):
            values[key] = _rate(value, key)
        elif key == "transport":
            if value not in ("websocket", "http"):
                raise ConfigError("federation.transport must be websocket or http")
            values[key] = value
        elif key == "enabled":
            values[key] = bool(value)
        elif key in ("digest_interval_s", "request_timeout_s"):
            values[key] = float(value)
        else:
            values[key] = int(value)
    return FederationConfig(**values)


CONFIG_TEMPLATE = """\
# SecureChat homeserver configuration.  Relative paths are relative to this file.
[server]
domain = "{domain}"
data_dir = "."
signing_key = "server_signing_key.toml"
log_level = "info"
shutdown_grace_s = 10

[listen]
# WebSocket listener: clients connect to ws://HOST:PORT/c2s
websocket_host = "127.0.0.1"
websocket_port = {port}
# HTTP listener: /healthz and /.well-known/securechat
http_host = "127.0.0.1"
http_port = {http_port}
# public_base = "wss://chat.{domain}"   # what the discovery document advertises behind a proxy

[storage]
# Default: SQLite file homeserver.sqlite3 next to this file (WAL, synchronous=FULL).
# url = "sqlite:////var/lib/securechat/homeserver.sqlite3"

[accounts]
registration = "{registration}"   # open | invite | closed
password_opslimit = 2            # Argon2id cost (pynacl INTERACTIVE)
password_memlimit = 67108864

[mailbox]
ttl_days = 30
housekeeping_interval_s = 300

[federation]
enabled = true
transport = "websocket"          # websocket (default, persistent link) | http (POST per transaction)
# allow = ["example.net"]        # empty: federate with every domain that is not denied
# deny = ["spam.example"]
# static = {{ "example.net" = "https://chat.example.net" }}   # discovery without DNS (private networks)
# insecure_domains = ["test.internal"]   # plain-HTTP discovery (loopback is always allowed)

[limits]
max_frame_bytes = 1048576
messages_per_device = {{ per_second = 50, burst = 200 }}
messages_per_user = {{ per_second = 100, burst = 400 }}
messages_per_address = {{ per_second = 1000, burst = 4000 }}
connections_per_address = {{ per_second = 10, burst = 50 }}
claims_per_device = {{ per_second = 5, burst = 100 }}
logins_per_address = {{ per_second = 1, burst = 10 }}
"""


def render_config(domain: str, port: int, http_port: int, registration: str = "open") -> str:
    return CONFIG_TEMPLATE.format(domain=domain, port=port, http_port=http_port, registration=registration)
