"""A raw protocol client with real keys: registers throwaway accounts, authenticates, sends opaque bytes.

Used by the black-box runner (``python -m conformance``), the homeserver tests and
the relay benchmark.  It knows the wire protocol, not the end-to-end crypto:
payloads are opaque bytes here.
"""

from __future__ import annotations

import secrets
import time
from dataclasses import dataclass, field
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.asymmetric.mlkem import MLKEM1024PrivateKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from federation import signing
from federation.addresses import new_device_id
from federation.keys import DeviceEntry, DeviceList, OneTimePrekey, PqPrekey, SignedDeviceList, SignedPrekey
from federation.rpc import RpcClient
from federation.signing import Purpose

WEEK_MS = 7 * 86_400_000


def now_ms() -> int:
    return time.time_ns() // 1_000_000


@dataclass
class ProtocolDevice:
    """One device's keys (identity; master key too if it is the user's first device)."""

    user: str
    device_id: str = field(default_factory=new_device_id)
    identity: Ed25519PrivateKey = field(default_factory=Ed25519PrivateKey.generate)
    master: Ed25519PrivateKey | None = None
    list_version: int = 0

    @property
    def address(self) -> str:
        return f"{self.user}/{self.device_id}"

    @property
    def identity_public(self) -> bytes:
        return signing.public_bytes(self.identity)

    def device_list(self, devices: list[ProtocolDevice], version: int | None = None,
                    issued_ms: int | None = None) -> SignedDeviceList:
        if self.master is None:
            raise ValueError("only the master device signs device lists")
        issued = now_ms() if issued_ms is None else issued_ms
        self.list_version = self.list_version + 1 if version is None else version
        entries = tuple(DeviceEntry(d.device_id, d.identity_public, issued) for d in devices)
        return DeviceList(self.user, self.list_version, issued, issued + WEEK_MS, entries).sign(self.master)

    def auth_params(self, domain: str, nonce: bytes, ts_ms: int | None = None) -> dict[str, Any]:
        ts = now_ms() if ts_ms is None else ts_ms
        fields = {"domain": domain, "device": self.address, "nonce": nonce, "ts_ms": ts}
        return {"device": self.address, "nonce": nonce, "ts_ms": ts,
                "sig": signing.sign(self.identity, Purpose.C2S_AUTH, fields)}

    def prekey_upload(self, one_time: int = 5, first_id: int = 1) -> dict[str, Any]:
        created = now_ms()
        spk = SignedPrekey.create(self.identity, 1, X25519PrivateKey.generate().public_key().public_bytes_raw(),
                                  created)
        pq = PqPrekey.create(self.identity, 1, MLKEM1024PrivateKey.generate().public_key().public_bytes_raw(),
                             True, created)
        otks = [OneTimePrekey(first_id + i, X25519PrivateKey.generate().public_key().public_bytes_raw())
                for i in range(one_time)]
        return {"signed_prekey": spk.to_wire(), "pq_prekeys": [pq.to_wire()],
                "one_time_prekeys": [k.to_wire() for k in otks]}


def throwaway_user(domain: str, prefix: str = "t") -> str:
    return f"{prefix}{secrets.token_hex(6)}@{domain}"


async def register(rpc: RpcClient, user: str, password: str = "correct horse battery",
                   invite: str | None = None) -> ProtocolDevice:
    device = ProtocolDevice(user, master=Ed25519PrivateKey.generate())
    params: dict[str, Any] = {
        "user": user, "password": password, "master_key": signing.public_bytes(device.master),  # type: ignore[arg-type]
        "device_id": device.device_id, "identity_key": device.identity_public,
        "device_list": device.device_list([device]).to_wire(),
    }
    if invite is not None:
        params["invite"] = invite
    await rpc.request("register", **params)
    return device


async def login(rpc: RpcClient, user: str, password: str = "correct horse battery") -> ProtocolDevice:
    device = ProtocolDevice(user)
    await rpc.request("login", user=user, password=password, device_id=device.device_id,
                      identity_key=device.identity_public)
    return device


async def authenticate(rpc: RpcClient, device: ProtocolDevice, domain: str) -> dict[str, Any]:
    challenge = await rpc.request("challenge")
    return await rpc.request("auth", **device.auth_params(domain, challenge["nonce"], challenge["now_ms"]))
