"""The homeserver's own Ed25519 signing keys, with key ids and validity windows (DESIGN §3).

Stored as a small TOML file readable only by the server's user.  The newest key
that is valid now signs; every key whose window has not ended is published in
the discovery document so peers can verify envelopes signed before a rotation.
"""

from __future__ import annotations

import base64
import os
import secrets
import tomllib
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from homeserver.config import ConfigError

YEAR_MS = 365 * 86_400_000
KEY_GRACE_MS = 7 * 86_400_000   # an expired key stays in the key file this long after its window ends


@dataclass(frozen=True, slots=True)
class ServerKey:
    key_id: str
    private_key: Ed25519PrivateKey
    valid_from_ms: int
    valid_until_ms: int

    @property
    def public_key(self) -> bytes:
        return self.private_key.public_key().public_bytes_raw()

    def describe(self) -> dict[str, object]:
        """The public part, as published in ``/.well-known/securechat``."""
        return {
            "key_id": self.key_id,
            "public_key": base64.b64encode(self.public_key).decode(),
            "valid_from_ms": self.valid_from_ms,
            "valid_until_ms": self.valid_until_ms,
        }


def new_server_key(now_ms: int, lifetime_ms: int = YEAR_MS) -> ServerKey:
    key_id = "ed25519:" + secrets.token_urlsafe(6)
    return ServerKey(key_id, Ed25519PrivateKey.generate(), now_ms, now_ms + lifetime_ms)


def write_keys(path: Path, keys: list[ServerKey]) -> None:
    lines = ["# Server signing keys. Keep this file secret (mode 0600).\n"]
    for key in keys:
        seed = key.private_key.private_bytes_raw().hex()
        lines.append(f'[[keys]]\nkey_id = "{key.key_id}"\nseed = "{seed}"\n'
                     f"valid_from_ms = {key.valid_from_ms}\nvalid_until_ms = {key.valid_until_ms}\n\n")
    tmp = path.with_suffix(".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        fh.write("".join(lines))
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def load_keys(path: Path) -> list[ServerKey]:
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"server signing key file {path} not found") from None
    except tomllib.TOMLDecodeError:
        raise ConfigError(f"server signing key file {path} is not valid TOML") from None
    keys = []
    for entry in raw.get("keys", []):
        try:
            private = Ed25519PrivateKey.from_private_bytes(bytes.fromhex(entry["seed"]))
            keys.append(ServerKey(str(entry["key_id"]), private, int(entry["valid_from_ms"]),
                                  int(entry["valid_until_ms"])))
        except (KeyError, ValueError):
            raise ConfigError(f"server signing key file {path} has a malformed entry") from None
    if not keys:
        raise ConfigError(f"server signing key file {path} holds no key")
    return keys


def current_key(keys: list[ServerKey], now_ms: int) -> ServerKey:
    valid = [k for k in keys if k.valid_from_ms <= now_ms < k.valid_until_ms]
    if not valid:
        raise ConfigError("no server signing key is valid now: rotate keys")
    return max(valid, key=lambda k: k.valid_from_ms)


def rotate_keys(keys: list[ServerKey], now_ms: int, lifetime_ms: int = YEAR_MS,
                overlap_ms: int = KEY_GRACE_MS) -> list[ServerKey]:
    """Add a key valid from ``now_ms``; keep the others with their windows unchanged.

    Old keys stay published (and verifiable) until their own windows end, so envelopes
    signed before the rotation still verify.  Keys whose window ended more than
    ``overlap_ms`` ago are dropped from the file.  The new key signs from now on
    (``current_key`` picks the newest valid key).
    """
    if lifetime_ms <= 0 or overlap_ms < 0:
        raise ConfigError("key lifetime must be positive and the overlap not negative")
    kept = [k for k in keys if k.valid_until_ms + overlap_ms > now_ms]
    taken = {k.key_id for k in keys}
    new = new_server_key(now_ms, lifetime_ms)
    while new.key_id in taken:
        new = new_server_key(now_ms, lifetime_ms)
    return [*kept, new]
