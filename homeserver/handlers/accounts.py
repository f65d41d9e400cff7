"""Accounts: registration (open or invite-token) and password login, Argon2id hashed.

Registration creates the account, its master key and its first device, which is
active at once because the first signed device list (uploaded in the same
request) names it.  A password login creates a *pending* device: it receives
only from its own user's devices until the master device signs it into the list.
"""

from __future__ import annotations

import hashlib
import logging
from typing import Any

from federation.addresses import UserAddress, check_device_id
from federation.errors import ErrorCode, ProtocolError, RequestRejected
from federation.keys import BadDeviceList, SignedDeviceList, check_not_expired
from federation.validate import field
from homeserver.clock import Clock
from homeserver.config import Config
from homeserver.connection import Session
from homeserver.handlers.directory import DeviceDirectory
from homeserver.passwords import MAX_PASSWORD_BYTES, PasswordHasher
from homeserver.ratelimit import RateLimiter
from homeserver.storage.models import AccountStore, DeviceState, DeviceStore, NewAccount

log = logging.getLogger("securechat.accounts")
MIN_PASSWORD_CHARS = 8


def invite_token_hash(token: str) -> bytes:
    """Invites are stored hashed: a leaked database does not leak usable tokens."""
    return hashlib.sha256(token.encode("utf-8")).digest()


class BadCredentials(RequestRejected):
    code = ErrorCode.UNAUTHORIZED


class AccountsHandler:
    def __init__(self, config: Config, accounts: AccountStore, devices: DeviceStore,
                 directory: DeviceDirectory, hasher: PasswordHasher, limiter: RateLimiter,
                 clock: Clock) -> None:
        self.config = config
        self.accounts = accounts
        self.devices = devices
        self.directory = directory
        self.hasher = hasher
        self.limiter = limiter
        self.clock = clock
        self._dummy_hash: str | None = None

    def _local_user(self, params: dict[str, Any]) -> str:
        user = UserAddress.parse(field(params, "user", str, max_length=330))
        if user.domain != self.config.domain:
            raise RequestRejected(f"this server serves {self.config.domain} only", code=ErrorCode.UNKNOWN_DOMAIN)
        return str(user)

    @staticmethod
    def _password(params: dict[str, Any]) -> str:
        password = field(params, "password", str, max_length=MAX_PASSWORD_BYTES)
        if len(password) < MIN_PASSWORD_CHARS:
            raise ProtocolError(f"password must have at least {MIN_PASSWORD_CHARS} characters")
        return password

    async def register(self, session: Session, params: dict[str, Any]) -> dict[str, Any]:
        self.limiter.take("login", session.remote, self.config.limits.logins_per_address)
        if self.config.registration == "closed":
            raise RequestRejected("registration is closed on this server", code=ErrorCode.FORBIDDEN)
        user = self._local_user(params)
        if user.startswith("="):
            # "=server@domain" and the like are the servers' own addresses in federation.
            raise RequestRejected("user names starting with '=' are reserved", code=ErrorCode.BAD_REQUEST)
        password = self._password(params)
        master_key = field(params, "master_key", bytes, length=32)
        device_id = check_device_id(field(params, "device_id", str))
        identity_key = field(params, "identity_key", bytes, length=32)
        signed = SignedDeviceList.from_wire(params.get("device_list"))
        invite = params.get("invite")
        if self.config.registration == "invite" and not isinstance(invite, str):
            raise BadCredentials("this server requires an invite token to register")
        now = self.clock()
        device_list = signed.open(master_key)
        if device_list.user != user:
            raise BadDeviceList("device list is for another user")
        if device_list.identity_key_of(device_id) != identity_key:
            raise BadDeviceList("the first device list must name the registering device and its key")
        check_not_expired(device_list, now)
        password_hash = await self.hasher.hash(password)
        token_hash = invite_token_hash(invite) if isinstance(invite, str) else None
        if device_list.device_ids() != {device_id}:
            raise BadDeviceList("the first device list must name exactly the registering device")
        await self.accounts.register(NewAccount(
            user, password_hash, master_key, device_id, identity_key, device_list.version, signed.body,
            signed.signature, token_hash if self.config.registration == "invite" else None), now)
        self.directory.invalidate(user)
        log.info("registered %s", user)
        return {"user": user, "device": f"{user}/{device_id}"}

    async def login(self, session: Session, params: dict[str, Any]) -> dict[str, Any]:
        self.limiter.take("login", session.remote, self.config.limits.logins_per_address)
        user = self._local_user(params)
        password = field(params, "password", str, max_length=MAX_PASSWORD_BYTES)
        device_id = check_device_id(field(params, "device_id", str))
        identity_key = field(params, "identity_key", bytes, length=32)
        account = await self.accounts.get_account(user)
        if account is None:
            # Spend the same time as a real check, so unknown names are not revealed by timing.
            if self._dummy_hash is None:
                self._dummy_hash = await self.hasher.hash("not-a-real-password")
            await self.hasher.verify(self._dummy_hash, password)
            raise BadCredentials("invalid user or password")
        if not await self.hasher.verify(account.password_hash, password):
            log.info("failed login for %s from %s", user, session.remote)
            raise BadCredentials("invalid user or password")
        if account.disabled:
            raise RequestRejected("this account is disabled", code=ErrorCode.FORBIDDEN)
        await self.devices.add_device(user, device_id, identity_key, DeviceState.PENDING, self.clock())
        self.directory.invalidate(user)
        log.info("login of %s created pending device %s", user, device_id)
        return {"device": f"{user}/{device_id}", "state": DeviceState.PENDING.value}
