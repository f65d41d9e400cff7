"""Devices and keys: prekey uploads, master-signed device lists, bundle claims (DESIGN §3).

The server verifies everything it can without secrets: prekey signatures under
the device identity key, and device lists under the account's master key, with
the version rule (no rollback).  One-time prekeys are handed out exactly once,
oldest first; with none left the signed prekey alone is the last resort.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from federation import codec
from federation.addresses import UserAddress, check_device_id
from federation.errors import ErrorCode, ProtocolError, RequestRejected
from federation.frames import Push, PushKind
from federation.keys import (
    BadBundle, BadDeviceList, OneTimePrekey, PqPrekey, SignedDeviceList, SignedPrekey, check_not_expired,
)
from federation.validate import field
from homeserver.clock import Clock
from homeserver.config import Config
from homeserver.connection import Session
from homeserver.handlers.directory import DeviceDirectory
from homeserver.handlers.federation_common import FederationDisabled
from homeserver.ratelimit import RateLimiter
from homeserver.storage.models import AccountStore, DeviceState, DeviceStore, MailboxStore, device_address
from homeserver.transport_codes import CLOSE_REVOKED

if TYPE_CHECKING:
    from homeserver.handlers.remote_keys import RemoteKeys

log = logging.getLogger("securechat.keys")


class KeysHandler:
    def __init__(self, config: Config, accounts: AccountStore, devices: DeviceStore, mailboxes: MailboxStore,
                 directory: DeviceDirectory, limiter: RateLimiter, clock: Clock) -> None:
        self.config = config
        self.accounts = accounts
        self.devices = devices
        self.mailboxes = mailboxes
        self.directory = directory
        self.limiter = limiter
        self.clock = clock
        self.remote: RemoteKeys | None = None      # set by the composition root when federation is on

    def _remote(self) -> RemoteKeys:
        """Remote keys; only reached for a remote user, which ``_user`` refuses without federation."""
        if self.remote is None:
            raise FederationDisabled("federation is not enabled")
        return self.remote

    def _user(self, text: str) -> tuple[str, bool]:
        """(normalised user address, whether it is served here); remote ones need federation."""
        user = UserAddress.parse(text)
        if user.domain != self.config.domain and self.remote is None:
            raise FederationDisabled(f"{user.domain} is not served here (federation is not enabled)")
        return str(user), user.domain == self.config.domain

    # -- uploads ------------------------------------------------------------------------
    async def upload_keys(self, session: Session, params: dict[str, Any]) -> dict[str, Any]:
        user, device_id = session.user or "", session.device_id or ""
        stored = await self.devices.get_device(user, device_id)
        if stored is None:
            raise RequestRejected("device not found", code=ErrorCode.NOT_FOUND)
        identity = stored.identity_key
        limits = self.config.limits
        now = self.clock()
        spk_raw = params.get("signed_prekey")
        pq_raw = field(params, "pq_prekeys", list, default=[])
        otk_raw = field(params, "one_time_prekeys", list, default=[])
        if len(pq_raw) + len(otk_raw) > limits.max_upload_batch:
            raise RequestRejected(f"at most {limits.max_upload_batch} keys per upload", code=ErrorCode.TOO_LARGE)
        spk = SignedPrekey.from_wire(spk_raw) if spk_raw is not None else None
        pqs = [PqPrekey.from_wire(item) for item in pq_raw]
        otks = [OneTimePrekey.from_wire(item) for item in otk_raw]
        if spk is not None:
            spk.verify(identity)
        for pq in pqs:
            pq.verify(identity)
        if len({k.key_id for k in otks}) != len(otks) or len({k.key_id for k in pqs}) != len(pqs):
            raise BadBundle("duplicate key ids in one upload")
        if otks:
            available, _ = await self.devices.count_prekeys(user, device_id)
            if available + len(otks) > limits.max_one_time_prekeys:
                raise RequestRejected(f"at most {limits.max_one_time_prekeys} one-time prekeys may be stored",
                                      code=ErrorCode.TOO_LARGE)
        if spk is not None:
            await self.devices.set_signed_prekey(user, device_id, spk.key_id, codec.encode(spk.to_wire()), now)
        if pqs:
            await self.devices.add_pq_prekeys(
                user, device_id, [(k.key_id, k.last_resort, codec.encode(k.to_wire())) for k in pqs], now)
        if otks:
            await self.devices.add_one_time_prekeys(
                user, device_id, [(k.key_id, codec.encode(k.to_wire())) for k in otks], now)
        one_time, pq_one_time = await self.devices.count_prekeys(user, device_id)
        return {"one_time": one_time, "pq_one_time": pq_one_time}

    async def key_count(self, session: Session, params: dict[str, Any]) -> dict[str, Any]:
        one_time, pq_one_time = await self.devices.count_prekeys(session.user or "", session.device_id or "")
        return {"one_time": one_time, "pq_one_time": pq_one_time}

    # -- device lists -------------------------------------------------------------------
    async def put_device_list(self, session: Session, params: dict[str, Any]) -> dict[str, Any]:
        user = session.user or ""
        signed = SignedDeviceList.from_wire(params.get("device_list"))
        account = await self.accounts.get_account(user)
        if account is None:
            raise RequestRejected("account not found", code=ErrorCode.NOT_FOUND)
        device_list = signed.open(account.master_key)
        if device_list.user != user:
            raise BadDeviceList("device list is for another user")
        check_not_expired(device_list, self.clock())
        known = {d.device_id: d for d in await self.devices.list_devices(user)}
        for entry in device_list.devices:
            existing = known.get(entry.id)
            if existing is not None and existing.identity_key != entry.identity_key:
                raise BadDeviceList(f"device {entry.id} is listed with a different identity key")
        revoked = await self.devices.put_device_list(user, device_list.version, signed.body, signed.signature,
                                                     device_list.device_ids(), self.clock())
        self.directory.invalidate(user)
        for device_id in revoked:
            await self._disconnect_revoked(device_address(user, device_id))
        self.directory.notify_list_changed(user, device_list.version)
        if self.remote is not None:
            await self.remote.local_list_changed(user, device_list.version, signed.body, signed.signature)
        log.info("device list of %s now version %d", user, device_list.version)
        return {"version": device_list.version, "revoked": list(revoked)}

    async def get_device_list(self, session: Session, params: dict[str, Any]) -> dict[str, Any]:
        user, local = self._user(field(params, "user", str, max_length=330))
        if local:
            answer = await self.local_device_list(user)
        else:
            entry = await self._remote().device_list(user)
            answer = {"user": user, "master_key": entry.master_key, "version": entry.version,
                      "device_list": SignedDeviceList(entry.body, entry.sig).to_wire()}
        self.directory.watch(user, session.device)
        return answer

    async def local_device_list(self, user: str) -> dict[str, Any]:
        """A local user's master key and signed list, as served to clients and to other servers."""
        account = await self.accounts.get_account(user)
        stored = await self.devices.get_device_list(user)
        if account is None or stored is None:
            raise RequestRejected("no such user", code=ErrorCode.NOT_FOUND)
        return {"user": user, "master_key": account.master_key, "version": stored.version,
                "device_list": SignedDeviceList(stored.body, stored.signature).to_wire()}

    async def devices_of_self(self, session: Session, params: dict[str, Any]) -> dict[str, Any]:
        devices = await self.devices.list_devices(session.user or "")
        return {"devices": [{"id": d.device_id, "state": d.state.value, "identity_key": d.identity_key,
                             "created_ms": d.created_ms} for d in devices]}

    async def revoke_device(self, session: Session, params: dict[str, Any]) -> dict[str, Any]:
        """Revoke one of the caller's own devices (the server side of 'log out that device')."""
        user = session.user or ""
        device_id = check_device_id(field(params, "device_id", str))
        if not await self.revoke(user, device_id):
            raise RequestRejected("no such device", code=ErrorCode.NOT_FOUND)
        return {"revoked": device_id}

    async def revoke(self, user: str, device_id: str) -> bool:
        done = await self.devices.revoke_device(user, device_id, self.clock())
        self.directory.invalidate(user)
        if done:
            await self._disconnect_revoked(device_address(user, device_id))
        return done

    async def _disconnect_revoked(self, device: str) -> None:
        session = self.directory.session_of(device)
        self.directory.forget_device(device)
        if session is not None:
            # Tell the device why before closing: the push is flushed, then 4001.
            session.push_nowait(Push(PushKind.DEVICE_REVOKED, {"device": device}))
            session.close_after_flush(CLOSE_REVOKED, "device revoked")

    # -- claims -------------------------------------------------------------------------
    async def claim(self, session: Session, params: dict[str, Any]) -> dict[str, Any]:
        user, local = self._user(field(params, "user", str, max_length=330))
        wanted_raw = params.get("device_ids")
        if wanted_raw is not None:
            if not isinstance(wanted_raw, list) or not all(isinstance(x, str) for x in wanted_raw):
                raise ProtocolError("device_ids must be a list of strings")
            wanted_raw = sorted({check_device_id(x) for x in wanted_raw})
        if not local:
            self.limiter.take("claim", session.device, self.config.limits.claims_per_device,
                              cost=max(1, len(wanted_raw or ())))
            return await self._remote().claim(user, wanted_raw)
        return await self.claim_for(user, wanted_raw, requester=session)

    async def claim_for(self, user: str, wanted_ids: list[str] | None,
                        requester: Session | None = None) -> dict[str, Any]:
        """Claim one bundle per wanted device of a local ``user`` (for a local session or a remote server)."""
        devices = await self.directory.devices_of(user)
        if not devices:
            raise RequestRejected("no such user", code=ErrorCode.NOT_FOUND)
        own_user = requester is not None and user == requester.user
        candidates = [d for d in devices.values()
                      if d.state is DeviceState.ACTIVE or (own_user and d.state is DeviceState.PENDING)]
        candidates = [d for d in candidates
                      if not (own_user and requester is not None and d.device_id == requester.device_id)]
        if wanted_ids is not None:
            wanted = {check_device_id(x) for x in wanted_ids}
            candidates = [d for d in candidates if d.device_id in wanted]
        if requester is not None:
            self.limiter.take("claim", requester.device, self.config.limits.claims_per_device,
                              cost=max(1, len(candidates)))
        bundles, missing = [], []
        now = self.clock()
        for device in sorted(candidates, key=lambda d: d.device_id):
            claimed = await self.devices.claim_prekeys(user, device.device_id, now)
            if claimed is None:
                missing.append(device.device_id)
                continue
            bundle: dict[str, Any] = {
                "device": device_address(user, device.device_id),
                "identity_key": claimed.identity_key,
                "signed_prekey": codec.decode(claimed.signed_prekey),
                "pq_prekey": codec.decode(claimed.pq_prekey),
            }
            if claimed.one_time_prekey is not None:
                bundle["one_time_prekey"] = codec.decode(claimed.one_time_prekey)
            bundles.append(bundle)
            await self._maybe_warn_low(user, device.device_id)
        return {"user": user, "bundles": bundles, "missing": missing}

    async def _maybe_warn_low(self, user: str, device_id: str) -> None:
        target = self.directory.session_of(device_address(user, device_id))
        if target is None:
            return
        one_time, pq_one_time = await self.devices.count_prekeys(user, device_id)
        if one_time < self.config.limits.prekeys_low_threshold:
            target.push_nowait(Push(PushKind.PREKEYS_LOW, {"one_time": one_time, "pq_one_time": pq_one_time}))

    async def low_prekeys_on_connect(self, session: Session) -> dict[str, Any]:
        one_time, pq_one_time = await self.devices.count_prekeys(session.user or "", session.device_id or "")
        if one_time < self.config.limits.prekeys_low_threshold:
            session.push_nowait(Push(PushKind.PREKEYS_LOW, {"one_time": one_time, "pq_one_time": pq_one_time}))
        return {"one_time": one_time, "pq_one_time": pq_one_time}


