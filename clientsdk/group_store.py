"""Where the SDK's groups live between runs: loading, store rows and backups (``clientsdk.groups`` mixes it in).

Why its own module: every other group mixin reaches this device's groups through
``_loaded_groups``/``_group`` and persists them through ``_group_batch``, so the row
naming (a keyed hash of the random group id) and the lazy load sit in one place.
The load is lazy because a store hop on every connect would delay everyone's first
sends; it wakes the group background task if a crash left an outbox or held
messages behind.  Backups carry each group's replica (states and admin-signed
changes, never keys).
"""

from __future__ import annotations

import logging

import trio

from clientsdk.client_parts import ClientParts
from clientsdk.crypto.backup import BackupGroup
from clientsdk.crypto.group_session import GroupSession
from clientsdk.group_records import HOLDS_KV, GroupError, KeyRecovery, LocalGroup, UnknownGroup, replica_for
from clientsdk.store import Batch
from federation.addresses import DeviceAddress

log = logging.getLogger(__name__)

KV_PREFIX = "group:"


class GroupStoreMixin(ClientParts):
    """This device's groups (``self._groups``) and held-message book (``self._recovery``), loaded lazily."""

    _groups: dict[bytes, LocalGroup] | None = None
    _recovery: KeyRecovery | None = None

    # --- loading and store rows -------------------------------------------------------------------

    def _resolve(self, device: DeviceAddress) -> bytes | None:
        return self._book.listed_key(str(device))

    async def _loaded_groups(self) -> dict[bytes, LocalGroup]:
        if self._groups is None:
            snapshot = await trio.to_thread.run_sync(self._store.load, limiter=self._store_limiter)
            groups: dict[bytes, LocalGroup] = {}
            for name, value in snapshot.kv.items():
                if name.startswith(KV_PREFIX):
                    group = LocalGroup.from_bytes(value, self._resolve)
                    groups[group.session.state.group_id] = group
            raw = snapshot.kv.get(HOLDS_KV)
            recovery = KeyRecovery.from_bytes(raw) if raw is not None else KeyRecovery()
            if self._groups is None:
                self._groups = groups
                self._recovery = recovery
                if any(g.outbox for g in groups.values()) or recovery.busy:
                    self._wake_group_sends()
        return self._groups

    def _holds(self) -> KeyRecovery:
        if self._recovery is None:
            raise GroupError("groups are not loaded yet")
        return self._recovery

    async def _group(self, gid: bytes) -> LocalGroup:
        group = (await self._loaded_groups()).get(gid)
        if group is None:
            raise UnknownGroup("no such group on this device")
        return group

    def _group_row(self, gid: bytes) -> str:
        return KV_PREFIX + self._store.row_id("group", gid.hex()).hex()

    def _group_batch(self, gid: bytes, batch: Batch | None = None) -> Batch:
        batch = batch if batch is not None else Batch()
        if self._groups is not None and gid in self._groups:
            batch.kv[self._group_row(gid)] = self._groups[gid].to_bytes()
        return batch

    # --- backups ----------------------------------------------------------------------------------

    async def _backup_groups(self) -> tuple[BackupGroup, ...]:
        """Every group this device knows, as backups carry it: state and epoch chain, never keys."""
        out = []
        for gid, group in sorted((await self._loaded_groups()).items()):
            state = group.session.state
            out.append(BackupGroup(gid, state.name, state.epoch, state.prev_hash,
                                   tuple(str(u) for u in state.members), tuple(str(u) for u in state.admins),
                                   group.session.replica.to_bytes()))
        return tuple(out)

    def _restored_group_rows(self, groups: tuple[BackupGroup, ...]) -> dict[str, bytes]:
        """Store rows for a restored (new) device: each group's replica as mine, with no chains."""
        rows = {}
        for backup in groups:
            if backup.chain is None:
                log.info("a group in an old backup has no epoch chain; it is not restored")
                continue
            replica = replica_for(backup.chain, self.address)
            rows[self._group_row(replica.state.group_id)] = LocalGroup(GroupSession(replica, self._resolve)).to_bytes()
        return rows
