"""Devices, signed device lists and prekeys: one aggregate, because a device list
changes device states and a revocation drops keys and mailbox entries atomically.

Prekeys are stored as the canonical wire encodings the handler verified; this
layer never parses them.  A one-time prekey is handed out exactly once, oldest
upload first: a claim is ONE write op, and the single writer serialises claims.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from sqlalchemy import Connection, bindparam, delete, func, insert, select, update
from sqlalchemy.sql.expression import BindParameter

from homeserver.storage.db import Database
from homeserver.storage.mailboxes import chunks, delete_device_entries
from homeserver.storage.models import (
    CLAIMED_PREKEY_TTL_MS,
    ClaimedBundle,
    Device,
    DeviceExists,
    DeviceListConflict,
    DeviceState,
    DuplicatePrekey,
    StoredDeviceList,
    UnknownDevice,
    device_address,
)
from homeserver.storage.schema import (
    claimed_prekeys,
    device_lists,
    devices,
    one_time_prekeys,
    pq_prekeys,
    signed_prekeys,
)

X25519 = "x25519"
PQ = "pq"

_device_columns = (devices.c.user, devices.c.device_id, devices.c.identity_key,
                   devices.c.state, devices.c.created_ms)


def _require_live_device(conn: Connection, user: str, device_id: str) -> None:
    state = conn.execute(select(devices.c.state).where(
        devices.c.user == user, devices.c.device_id == device_id)).scalar()
    if state is None or state == DeviceState.REVOKED:
        raise UnknownDevice("unknown device")


def _reserved_ids(conn: Connection, user: str, device_id: str, kind: str,
                  key_ids: Sequence[int], now_ms: int) -> bool:
    """Whether any of ``key_ids`` is stored now or was claimed within the TTL."""
    table = one_time_prekeys if kind == X25519 else pq_prekeys
    for part in chunks(sorted(key_ids)):
        stored = select(table.c.key_id).where(
            table.c.user == user, table.c.device_id == device_id, table.c.key_id.in_(part))
        if kind == PQ:
            stored = stored.where(pq_prekeys.c.last_resort.is_(False))
        if conn.execute(stored.limit(1)).first() is not None:
            return True
        claimed = select(claimed_prekeys.c.key_id).where(
            claimed_prekeys.c.user == user, claimed_prekeys.c.device_id == device_id,
            claimed_prekeys.c.kind == kind, claimed_prekeys.c.key_id.in_(part),
            claimed_prekeys.c.expires_ms > now_ms)
        if conn.execute(claimed.limit(1)).first() is not None:
            return True
    return False


# Claims are hot (one per recipient device of a first message): their statements
# are built once, with bind parameters, so SQLAlchemy reuses the compiled form.
_USER: BindParameter[str] = bindparam("user")
_DEVICE: BindParameter[str] = bindparam("device_id")
_forget_claim = delete(claimed_prekeys).where(
    claimed_prekeys.c.user == _USER, claimed_prekeys.c.device_id == _DEVICE,
    claimed_prekeys.c.kind == bindparam("kind"), claimed_prekeys.c.key_id == bindparam("key_id"))
_insert_claim = insert(claimed_prekeys)
_claim_device = select(devices.c.identity_key, devices.c.state).where(
    devices.c.user == _USER, devices.c.device_id == _DEVICE)
_claim_signed = select(signed_prekeys.c.encoded).where(
    signed_prekeys.c.user == _USER, signed_prekeys.c.device_id == _DEVICE)
_pq_of_device = select(pq_prekeys.c.id, pq_prekeys.c.key_id, pq_prekeys.c.encoded).where(
    pq_prekeys.c.user == _USER, pq_prekeys.c.device_id == _DEVICE)
_oldest_pq_one_time = (_pq_of_device.where(pq_prekeys.c.last_resort.is_(False))
                       .order_by(pq_prekeys.c.id).limit(1))
_pq_last_resort = (_pq_of_device.where(pq_prekeys.c.last_resort.is_(True))
                   .order_by(pq_prekeys.c.id.desc()).limit(1))
_delete_pq = delete(pq_prekeys).where(pq_prekeys.c.id == bindparam("id"))
_oldest_one_time = (
    select(one_time_prekeys.c.id, one_time_prekeys.c.key_id, one_time_prekeys.c.encoded)
    .where(one_time_prekeys.c.user == _USER, one_time_prekeys.c.device_id == _DEVICE)
    .order_by(one_time_prekeys.c.id).limit(1))
_delete_one_time = delete(one_time_prekeys).where(one_time_prekeys.c.id == bindparam("id"))


def _record_claim(conn: Connection, user: str, device_id: str, kind: str, key_id: int,
                  expires_ms: int) -> None:
    row = {"user": user, "device_id": device_id, "kind": kind, "key_id": key_id}
    conn.execute(_forget_claim, row)      # a stale record past its TTL
    conn.execute(_insert_claim, {**row, "expires_ms": expires_ms})


def _revoke(conn: Connection, user: str, device_id: str) -> None:
    conn.execute(update(devices).where(devices.c.user == user, devices.c.device_id == device_id)
                 .values(state=DeviceState.REVOKED.value))
    for table in (signed_prekeys, one_time_prekeys, pq_prekeys):
        conn.execute(delete(table).where(table.c.user == user, table.c.device_id == device_id))
    delete_device_entries(conn, device_address(user, device_id))


def _add_device(conn: Connection, user: str, device_id: str, identity_key: bytes,
                state: DeviceState, now_ms: int) -> None:
    taken = conn.execute(select(devices.c.device_id).where(
        devices.c.user == user, devices.c.device_id == device_id)).first()
    if taken is not None:
        raise DeviceExists("device id is taken")
    conn.execute(insert(devices).values(user=user, device_id=device_id, identity_key=identity_key,
                                        state=DeviceState(state).value, created_ms=now_ms))


def _put_device_list(conn: Connection, user: str, version: int, body: bytes, signature: bytes,
                     listed_ids: frozenset[str], now_ms: int) -> list[str]:
    stored = conn.execute(select(device_lists.c.version).where(device_lists.c.user == user)).scalar()
    if stored is not None and version <= stored:
        raise DeviceListConflict("device list version is not higher than the stored one")
    values = {"version": version, "body": body, "signature": signature, "updated_ms": now_ms}
    if stored is None:
        conn.execute(insert(device_lists).values(user=user, **values))
    else:
        conn.execute(update(device_lists).where(device_lists.c.user == user).values(**values))
    states = conn.execute(select(devices.c.device_id, devices.c.state)
                          .where(devices.c.user == user)).all()
    activate = [d for d, s in states if s == DeviceState.PENDING and d in listed_ids]
    revoke = sorted(d for d, s in states if s == DeviceState.ACTIVE and d not in listed_ids)
    for part in chunks(activate):
        conn.execute(update(devices).where(devices.c.user == user, devices.c.device_id.in_(part))
                     .values(state=DeviceState.ACTIVE.value))
    for device_id in revoke:
        _revoke(conn, user, device_id)
    return revoke


def _set_signed_prekey(conn: Connection, user: str, device_id: str, key_id: int,
                       encoded: bytes, now_ms: int) -> None:
    _require_live_device(conn, user, device_id)
    mine = (signed_prekeys.c.user == user) & (signed_prekeys.c.device_id == device_id)
    values = {"key_id": key_id, "encoded": encoded, "updated_ms": now_ms}
    if conn.execute(update(signed_prekeys).where(mine).values(**values)).rowcount == 0:
        conn.execute(insert(signed_prekeys).values(user=user, device_id=device_id, **values))


def _add_pq_prekeys(conn: Connection, user: str, device_id: str,
                    items: list[tuple[int, bool, bytes]], now_ms: int) -> None:
    _require_live_device(conn, user, device_id)
    last_resort = [item for item in items if item[1]]
    one_time = [item for item in items if not item[1]]
    if len(last_resort) > 1:
        raise DuplicatePrekey("more than one last-resort PQ prekey in one upload")
    ids = [key_id for key_id, _, _ in one_time]
    if len(set(ids)) != len(ids):
        raise DuplicatePrekey("repeated PQ prekey id in one upload")
    if ids and _reserved_ids(conn, user, device_id, PQ, ids, now_ms):
        raise DuplicatePrekey("PQ prekey id already used")
    if last_resort:
        conn.execute(delete(pq_prekeys).where(
            pq_prekeys.c.user == user, pq_prekeys.c.device_id == device_id,
            pq_prekeys.c.last_resort.is_(True)))
    rows = [{"user": user, "device_id": device_id, "key_id": key_id, "last_resort": resort,
             "encoded": encoded, "uploaded_ms": now_ms} for key_id, resort, encoded in
            last_resort + one_time]
    if rows:
        conn.execute(insert(pq_prekeys), rows)


def _count(conn: Connection, user: str, device_id: str) -> tuple[int, int]:
    x25519 = conn.execute(select(func.count()).select_from(one_time_prekeys).where(
        one_time_prekeys.c.user == user, one_time_prekeys.c.device_id == device_id)).scalar_one()
    pq = conn.execute(select(func.count()).select_from(pq_prekeys).where(
        pq_prekeys.c.user == user, pq_prekeys.c.device_id == device_id,
        pq_prekeys.c.last_resort.is_(False))).scalar_one()
    return int(x25519), int(pq)


def _add_one_time_prekeys(conn: Connection, user: str, device_id: str,
                          items: list[tuple[int, bytes]], now_ms: int) -> int:
    _require_live_device(conn, user, device_id)
    ids = [key_id for key_id, _ in items]
    if len(set(ids)) != len(ids):
        raise DuplicatePrekey("repeated one-time prekey id in one upload")
    if ids and _reserved_ids(conn, user, device_id, X25519, ids, now_ms):
        raise DuplicatePrekey("one-time prekey id already used")
    if items:   # executemany keeps the order: ids grow in upload order
        conn.execute(insert(one_time_prekeys), [
            {"user": user, "device_id": device_id, "key_id": key_id, "encoded": encoded,
             "uploaded_ms": now_ms} for key_id, encoded in items])
    return _count(conn, user, device_id)[0]


def _claim(conn: Connection, user: str, device_id: str, now_ms: int,
           claimed_ttl_ms: int) -> ClaimedBundle | None:
    key = {"user": user, "device_id": device_id}
    device = conn.execute(_claim_device, key).first()
    # Pending devices are claimable too: the handler lets only their own user claim
    # them (the master device opens a session with a device it is linking).
    if device is None or device.state == DeviceState.REVOKED:
        return None
    signed = conn.execute(_claim_signed, key).scalar()
    if signed is None:
        return None
    pq_one_time = conn.execute(_oldest_pq_one_time, key).first()
    pq = pq_one_time or conn.execute(_pq_last_resort, key).first()
    if pq is None:
        return None
    expires_ms = now_ms + claimed_ttl_ms
    if pq_one_time is not None:
        conn.execute(_delete_pq, {"id": pq_one_time.id})
        _record_claim(conn, user, device_id, PQ, pq_one_time.key_id, expires_ms)
    one_time = conn.execute(_oldest_one_time, key).first()
    if one_time is not None:
        conn.execute(_delete_one_time, {"id": one_time.id})
        _record_claim(conn, user, device_id, X25519, one_time.key_id, expires_ms)
    return ClaimedBundle(bytes(device.identity_key), bytes(signed), bytes(pq.encoded),
                         None if one_time is None else bytes(one_time.encoded))


def _device(row: Any) -> Device:
    return Device(row.user, row.device_id, bytes(row.identity_key), DeviceState(row.state),
                  int(row.created_ms))


class DeviceRepository:
    """Devices, the user's signed device list, and the device's prekeys."""

    def __init__(self, db: Database, *, claimed_ttl_ms: int = CLAIMED_PREKEY_TTL_MS) -> None:
        self._db = db
        self._claimed_ttl_ms = claimed_ttl_ms

    async def add_device(self, user: str, device_id: str, identity_key: bytes,
                         state: DeviceState, now_ms: int) -> None:
        """Register a device; ``DeviceExists`` if the id was ever used by ``user``."""
        await self._db.write(lambda conn: _add_device(
            conn, user, device_id, identity_key, state, now_ms))

    async def get_device(self, user: str, device_id: str) -> Device | None:
        def fn(conn: Connection) -> Device | None:
            row = conn.execute(select(*_device_columns).where(
                devices.c.user == user, devices.c.device_id == device_id)).first()
            return None if row is None else _device(row)
        return await self._db.read(fn)

    async def list_devices(self, user: str) -> list[Device]:
        """Every device of ``user`` (revoked ones too), oldest first."""
        def fn(conn: Connection) -> list[Device]:
            return [_device(r) for r in conn.execute(
                select(*_device_columns).where(devices.c.user == user)
                .order_by(devices.c.created_ms, devices.c.device_id))]
        return await self._db.read(fn)

    async def put_device_list(self, user: str, version: int, body: bytes, signature: bytes,
                              listed_ids: frozenset[str], now_ms: int) -> list[str]:
        """Store a (verified) list and apply it atomically; returns the ids revoked.

        ``DeviceListConflict`` unless ``version`` is higher than the stored one.
        Listed pending devices become active; active devices not listed are
        revoked with their keys and mailbox entries.
        """
        return await self._db.write(lambda conn: _put_device_list(
            conn, user, version, body, signature, listed_ids, now_ms))

    async def get_device_list(self, user: str) -> StoredDeviceList | None:
        def fn(conn: Connection) -> StoredDeviceList | None:
            row = conn.execute(select(device_lists).where(device_lists.c.user == user)).first()
            if row is None:
                return None
            return StoredDeviceList(row.user, int(row.version), bytes(row.body),
                                    bytes(row.signature), int(row.updated_ms))
        return await self._db.read(fn)

    async def revoke_device(self, user: str, device_id: str, now_ms: int) -> bool:
        """Revoke a device, dropping its prekeys and mailbox; False if unknown or already revoked."""
        def op(conn: Connection) -> bool:
            state = conn.execute(select(devices.c.state).where(
                devices.c.user == user, devices.c.device_id == device_id)).scalar()
            if state is None or state == DeviceState.REVOKED:
                return False
            _revoke(conn, user, device_id)
            return True
        return await self._db.write(op)

    async def set_signed_prekey(self, user: str, device_id: str, key_id: int, encoded: bytes,
                                now_ms: int) -> None:
        """Replace the device's signed prekey (only the latest is kept)."""
        await self._db.write(lambda conn: _set_signed_prekey(
            conn, user, device_id, key_id, encoded, now_ms))

    async def add_pq_prekeys(self, user: str, device_id: str,
                             items: list[tuple[int, bool, bytes]], now_ms: int) -> None:
        """Add ``(key_id, last_resort, encoded)`` ML-KEM prekeys.

        A last-resort key replaces the previous one; one-time keys accumulate
        and, like X25519 ones, refuse ids present or recently claimed (``DuplicatePrekey``).
        """
        await self._db.write(lambda conn: _add_pq_prekeys(conn, user, device_id, items, now_ms))

    async def add_one_time_prekeys(self, user: str, device_id: str,
                                   items: list[tuple[int, bytes]], now_ms: int) -> int:
        """Add ``(key_id, encoded)`` one-time prekeys, all or none; returns the count available."""
        return await self._db.write(lambda conn: _add_one_time_prekeys(
            conn, user, device_id, items, now_ms))

    async def claim_prekeys(self, user: str, device_id: str, now_ms: int) -> ClaimedBundle | None:
        """Hand out a bundle: the oldest one-time prekeys, each exactly once.

        None if the device is not active or lacks a signed or PQ prekey.
        """
        ttl = self._claimed_ttl_ms
        return await self._db.write(lambda conn: _claim(conn, user, device_id, now_ms, ttl))

    async def count_prekeys(self, user: str, device_id: str) -> tuple[int, int]:
        """(one-time X25519 available, one-time PQ available)."""
        return await self._db.read(lambda conn: _count(conn, user, device_id))
