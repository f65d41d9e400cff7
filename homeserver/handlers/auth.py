"""Connection authentication by a signed ``c2s-auth`` challenge (DESIGN §5).

The server hands out a random 32-byte nonce, valid for 60 s and usable once; the
device signs ``{ctx: securechat/v1/c2s-auth, domain, device, nonce, ts_ms}`` with
its identity key.  No reusable secret crosses the wire after login.
"""

from __future__ import annotations

import logging
import secrets
from collections.abc import Awaitable, Callable
from typing import Any

from federation import signing
from federation.addresses import DeviceAddress
from federation.errors import ErrorCode, ProtocolError, RequestRejected
from federation.signing import Purpose
from federation.validate import field
from homeserver.clock import Clock
from homeserver.connection import Session
from homeserver.handlers.directory import DeviceDirectory
from homeserver.storage.models import AccountStore, DeviceState, DeviceStore
from homeserver.transport_codes import CLOSE_REPLACED

log = logging.getLogger("securechat.auth")
NONCE_TTL_MS = 60_000
MAX_CLOCK_SKEW_MS = 60_000
MAX_OUTSTANDING_NONCES = 100_000


class AuthFailed(RequestRejected):
    code = ErrorCode.UNAUTHORIZED


class AuthHandler:
    def __init__(self, domain: str, accounts: AccountStore, devices: DeviceStore, directory: DeviceDirectory,
                 clock: Clock, on_authenticated: Callable[[Session], Awaitable[dict[str, Any]]]) -> None:
        self.domain = domain
        self.accounts = accounts
        self.devices = devices
        self.directory = directory
        self.clock = clock
        self.on_authenticated = on_authenticated
        self._nonces: dict[bytes, int] = {}          # nonce -> expiry (ms)

    async def challenge(self, session: Session, params: dict[str, Any]) -> dict[str, Any]:
        now = self.clock()
        if len(self._nonces) >= MAX_OUTSTANDING_NONCES:
            self.expire_nonces(now)
            if len(self._nonces) >= MAX_OUTSTANDING_NONCES:
                raise RequestRejected("too many pending challenges", code=ErrorCode.RATE_LIMITED)
        nonce = secrets.token_bytes(32)
        self._nonces[nonce] = now + NONCE_TTL_MS
        # The server's time is returned so a client with a skewed clock can sign a
        # timestamp the server accepts; freshness comes from the single-use nonce.
        return {"nonce": nonce, "domain": self.domain, "now_ms": now, "expires_ms": now + NONCE_TTL_MS}

    def expire_nonces(self, now_ms: int) -> int:
        stale = [n for n, expiry in self._nonces.items() if expiry <= now_ms]
        for n in stale:
            del self._nonces[n]
        return len(stale)

    async def auth(self, session: Session, params: dict[str, Any]) -> dict[str, Any]:
        if session.authenticated:
            raise ProtocolError("connection is already authenticated")
        device_text = field(params, "device", str, max_length=400)
        nonce = field(params, "nonce", bytes, length=32)
        ts_ms = field(params, "ts_ms", int)
        signature = field(params, "sig", bytes, length=signing.SIGNATURE_LEN)
        device = DeviceAddress.parse(device_text)
        now = self.clock()
        expiry = self._nonces.pop(nonce, None)          # single use, even when the rest fails
        if expiry is None or expiry <= now:
            raise AuthFailed("unknown, used or expired nonce: request a new challenge")
        if abs(now - ts_ms) > MAX_CLOCK_SKEW_MS:
            raise AuthFailed("timestamp too far from server time")
        if device.domain != self.domain:
            raise AuthFailed("device belongs to another domain")
        user = str(device.user)
        stored = await self.devices.get_device(user, device.device_id)
        account = await self.accounts.get_account(user)
        if stored is None or account is None or stored.state is DeviceState.REVOKED:
            raise AuthFailed("unknown or revoked device")
        if account.disabled:
            raise RequestRejected("this account is disabled", code=ErrorCode.FORBIDDEN)
        signing.verify(stored.identity_key, Purpose.C2S_AUTH,
                       {"domain": self.domain, "device": device_text, "nonce": nonce, "ts_ms": ts_ms}, signature)
        session.user = user
        session.device_id = device.device_id
        previous = self.directory.attach(session.device, session)
        if previous is not None:
            await previous.close(CLOSE_REPLACED, "replaced by a newer connection of this device")
        extra = await self.on_authenticated(session)
        log.info("authenticated %s from %s", session.device, session.remote)
        return {"device": session.device, "state": stored.state.value, **extra}
