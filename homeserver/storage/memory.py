"""In-memory storage with the SQL repositories' semantics and errors.

Used by handler tests and by the benchmark's "null relay".  Every method does
its whole job synchronously after one checkpoint, so it is atomic under trio;
like a SQL savepoint, a method that raises has changed nothing (all checks run
before the first mutation).  The shared contract suite (tests/storage) runs
against both implementations.  The federation fake is memory_federation.py.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import hmac
import itertools
from dataclasses import dataclass, field, replace

import trio

from homeserver.storage.accounts import invite_id_for
from homeserver.storage.federation_outbound import check_drafts
from homeserver.storage.memory_federation import MemoryFederation
from homeserver.storage.models import (
    OutboundDraft,
    NewAccount,
    Completion,
    Done,
    CLAIMED_PREKEY_TTL_MS,
    Account,
    AccountExists,
    ClaimedBundle,
    DeliverResult,
    Device,
    DeviceExists,
    DeviceListConflict,
    DeviceState,
    DuplicatePrekey,
    Invite,
    InviteExists,
    InviteInvalid,
    MailboxEntry,
    StoredDeviceList,
    UnknownDevice,
    device_address,
)

_DeviceKey = tuple[str, str]


@dataclass(slots=True)
class _Entry:
    sender: str
    message_id: str
    blob_id: int
    ts_ms: int
    expires_ms: int


@dataclass(slots=True)
class _State:
    accounts: dict[str, Account] = field(default_factory=dict)
    invites: dict[str, Invite] = field(default_factory=dict)
    invite_hashes: dict[str, bytes] = field(default_factory=dict)
    devices: dict[_DeviceKey, Device] = field(default_factory=dict)
    device_lists: dict[str, StoredDeviceList] = field(default_factory=dict)
    signed: dict[_DeviceKey, bytes] = field(default_factory=dict)
    # key_id -> encoded; dict order is upload order
    one_time: dict[_DeviceKey, dict[int, bytes]] = field(default_factory=dict)
    pq_one_time: dict[_DeviceKey, dict[int, bytes]] = field(default_factory=dict)
    pq_last_resort: dict[_DeviceKey, bytes] = field(default_factory=dict)
    claimed: dict[tuple[str, str, str, int], int] = field(default_factory=dict)  # -> expires_ms
    message_ids: dict[tuple[str, str], tuple[bytes, int]] = field(default_factory=dict)
    blobs: dict[int, bytes] = field(default_factory=dict)
    blob_refs: dict[int, int] = field(default_factory=dict)
    mailboxes: dict[str, dict[int, _Entry]] = field(default_factory=dict)   # seq order
    seqs: itertools.count[int] = field(default_factory=lambda: itertools.count(1))
    blob_ids: itertools.count[int] = field(default_factory=lambda: itertools.count(1))

    def drop_entry(self, device: str, seq: int) -> bool:
        """Remove one entry; its blob goes with the last pointer."""
        box = self.mailboxes.get(device)
        entry = None if box is None else box.pop(seq, None)
        if entry is None:
            return False
        if not box:
            del self.mailboxes[device]
        self.blob_refs[entry.blob_id] -= 1
        if self.blob_refs[entry.blob_id] == 0:
            del self.blob_refs[entry.blob_id]
            del self.blobs[entry.blob_id]
        return True

    def drop_device_entries(self, device: str) -> int:
        return sum(self.drop_entry(device, seq) for seq in list(self.mailboxes.get(device, ())))

    def live_device(self, user: str, device_id: str) -> _DeviceKey:
        device = self.devices.get((user, device_id))
        if device is None or device.state == DeviceState.REVOKED:
            raise UnknownDevice("unknown device")
        return (user, device_id)

    def reserved(self, key: _DeviceKey, kind: str, stored: dict[int, bytes],
                 ids: list[int], now_ms: int) -> bool:
        return any(i in stored or self.claimed.get((*key, kind, i), now_ms) > now_ms for i in ids)

    def revoke(self, key: _DeviceKey) -> None:
        self.devices[key] = replace(self.devices[key], state=DeviceState.REVOKED)
        for table in (self.signed, self.one_time, self.pq_one_time, self.pq_last_resort):
            table.pop(key, None)
        self.drop_device_entries(device_address(*key))


class MemoryAccountRepository:
    def __init__(self, state: _State) -> None:
        self._s = state

    async def register(self, new: NewAccount, now_ms: int) -> None:
        # create_account is the only step that can fail for a new user; the others
        # follow without a checkpoint in between, so this is atomic too.
        await self.create_account(new.user, new.password_hash, new.master_key, now_ms, new.invite_token_hash)
        self._s.devices[(new.user, new.device_id)] = Device(new.user, new.device_id, new.identity_key,
                                                            DeviceState.ACTIVE, now_ms)
        self._s.device_lists[new.user] = StoredDeviceList(new.user, new.list_version, new.list_body,
                                                          new.list_signature, now_ms)

    async def create_account(self, user: str, password_hash: str, master_key: bytes,
                             now_ms: int, invite_token_hash: bytes | None = None) -> None:
        await trio.lowlevel.checkpoint()
        invite = None
        if invite_token_hash is not None:
            invite = self._s.invites.get(invite_id_for(invite_token_hash))
            if (invite is None or invite.revoked or invite.uses_left <= 0
                    or invite.expires_ms <= now_ms
                    or self._s.invite_hashes[invite.invite_id] != invite_token_hash):
                raise InviteInvalid("invalid or expired invite")
        if user in self._s.accounts:
            raise AccountExists("user name is taken")
        if invite is not None:
            self._s.invites[invite.invite_id] = replace(invite, uses_left=invite.uses_left - 1)
        self._s.accounts[user] = Account(user, password_hash, master_key, False, now_ms)

    async def get_account(self, user: str) -> Account | None:
        await trio.lowlevel.checkpoint()
        return self._s.accounts.get(user)

    async def list_accounts(self) -> list[Account]:
        await trio.lowlevel.checkpoint()
        return [self._s.accounts[user] for user in sorted(self._s.accounts)]

    async def set_disabled(self, user: str, disabled: bool) -> bool:
        await trio.lowlevel.checkpoint()
        account = self._s.accounts.get(user)
        if account is None:
            return False
        self._s.accounts[user] = replace(account, disabled=disabled)
        return True

    async def create_invite(self, token_hash: bytes, now_ms: int, expires_ms: int, uses: int,
                            note: str) -> Invite:
        if uses < 1:
            raise ValueError("an invite needs at least one use")
        if len(token_hash) < 6:
            raise ValueError("token_hash is too short to name an invite")
        await trio.lowlevel.checkpoint()
        invite = Invite(invite_id_for(token_hash), now_ms, expires_ms, uses, note, False)
        if invite.invite_id in self._s.invites:
            raise InviteExists("an invite with this id exists")
        self._s.invites[invite.invite_id] = invite
        self._s.invite_hashes[invite.invite_id] = token_hash
        return invite

    async def list_invites(self) -> list[Invite]:
        await trio.lowlevel.checkpoint()
        return sorted(self._s.invites.values(), key=lambda i: (i.created_ms, i.invite_id))

    async def revoke_invite(self, invite_id: str) -> bool:
        await trio.lowlevel.checkpoint()
        invite = self._s.invites.get(invite_id)
        if invite is None:
            return False
        self._s.invites[invite_id] = replace(invite, revoked=True)
        return True


class MemoryDeviceRepository:
    def __init__(self, state: _State, *, claimed_ttl_ms: int = CLAIMED_PREKEY_TTL_MS) -> None:
        self._s = state
        self._claimed_ttl_ms = claimed_ttl_ms

    async def add_device(self, user: str, device_id: str, identity_key: bytes,
                         state: DeviceState, now_ms: int) -> None:
        await trio.lowlevel.checkpoint()
        if (user, device_id) in self._s.devices:
            raise DeviceExists("device id is taken")
        self._s.devices[(user, device_id)] = Device(user, device_id, identity_key,
                                                    DeviceState(state), now_ms)

    async def get_device(self, user: str, device_id: str) -> Device | None:
        await trio.lowlevel.checkpoint()
        return self._s.devices.get((user, device_id))

    async def list_devices(self, user: str) -> list[Device]:
        await trio.lowlevel.checkpoint()
        mine = [d for (u, _), d in self._s.devices.items() if u == user]
        return sorted(mine, key=lambda d: (d.created_ms, d.device_id))

    async def put_device_list(self, user: str, version: int, body: bytes, signature: bytes,
                              listed_ids: frozenset[str], now_ms: int) -> list[str]:
        await trio.lowlevel.checkpoint()
        stored = self._s.device_lists.get(user)
        if stored is not None and version <= stored.version:
            raise DeviceListConflict("device list version is not higher than the stored one")
        self._s.device_lists[user] = StoredDeviceList(user, version, body, signature, now_ms)
        revoked = []
        for (owner, device_id), device in list(self._s.devices.items()):
            if owner != user:
                continue
            if device.state == DeviceState.PENDING and device_id in listed_ids:
                self._s.devices[(owner, device_id)] = replace(device, state=DeviceState.ACTIVE)
            elif device.state == DeviceState.ACTIVE and device_id not in listed_ids:
                self._s.revoke((owner, device_id))
                revoked.append(device_id)
        return sorted(revoked)

    async def get_device_list(self, user: str) -> StoredDeviceList | None:
        await trio.lowlevel.checkpoint()
        return self._s.device_lists.get(user)

    async def revoke_device(self, user: str, device_id: str, now_ms: int) -> bool:
        await trio.lowlevel.checkpoint()
        device = self._s.devices.get((user, device_id))
        if device is None or device.state == DeviceState.REVOKED:
            return False
        self._s.revoke((user, device_id))
        return True

    async def set_signed_prekey(self, user: str, device_id: str, key_id: int, encoded: bytes,
                                now_ms: int) -> None:
        await trio.lowlevel.checkpoint()
        self._s.signed[self._s.live_device(user, device_id)] = encoded

    async def add_pq_prekeys(self, user: str, device_id: str,
                             items: list[tuple[int, bool, bytes]], now_ms: int) -> None:
        await trio.lowlevel.checkpoint()
        key = self._s.live_device(user, device_id)
        last_resort = [encoded for _, resort, encoded in items if resort]
        one_time = [(key_id, encoded) for key_id, resort, encoded in items if not resort]
        if len(last_resort) > 1:
            raise DuplicatePrekey("more than one last-resort PQ prekey in one upload")
        ids = [key_id for key_id, _ in one_time]
        if len(set(ids)) != len(ids):
            raise DuplicatePrekey("repeated PQ prekey id in one upload")
        stored = self._s.pq_one_time.setdefault(key, {})
        if self._s.reserved(key, "pq", stored, ids, now_ms):
            raise DuplicatePrekey("PQ prekey id already used")
        if last_resort:
            self._s.pq_last_resort[key] = last_resort[0]
        stored.update(one_time)

    async def add_one_time_prekeys(self, user: str, device_id: str,
                                   items: list[tuple[int, bytes]], now_ms: int) -> int:
        await trio.lowlevel.checkpoint()
        key = self._s.live_device(user, device_id)
        ids = [key_id for key_id, _ in items]
        if len(set(ids)) != len(ids):
            raise DuplicatePrekey("repeated one-time prekey id in one upload")
        stored = self._s.one_time.setdefault(key, {})
        if self._s.reserved(key, "x25519", stored, ids, now_ms):
            raise DuplicatePrekey("one-time prekey id already used")
        stored.update(items)
        return len(stored)

    async def claim_prekeys(self, user: str, device_id: str, now_ms: int) -> ClaimedBundle | None:
        await trio.lowlevel.checkpoint()
        key = (user, device_id)
        device = self._s.devices.get(key)
        if device is None or device.state == DeviceState.REVOKED or key not in self._s.signed:
            return None
        pq_one_time = self._s.pq_one_time.get(key)
        if not pq_one_time and key not in self._s.pq_last_resort:
            return None
        expires_ms = now_ms + self._claimed_ttl_ms
        if pq_one_time:
            pq_id = next(iter(pq_one_time))
            pq = pq_one_time.pop(pq_id)
            self._s.claimed[(user, device_id, "pq", pq_id)] = expires_ms
        else:
            pq = self._s.pq_last_resort[key]
        one_time = self._s.one_time.get(key)
        encoded = None
        if one_time:
            key_id = next(iter(one_time))
            encoded = one_time.pop(key_id)
            self._s.claimed[(user, device_id, "x25519", key_id)] = expires_ms
        return ClaimedBundle(device.identity_key, self._s.signed[key], pq, encoded)

    async def count_prekeys(self, user: str, device_id: str) -> tuple[int, int]:
        await trio.lowlevel.checkpoint()
        key = (user, device_id)
        return len(self._s.one_time.get(key, ())), len(self._s.pq_one_time.get(key, ()))


class MemoryMailboxRepository:
    def __init__(self, state: _State, federation: MemoryFederation | None = None) -> None:
        self._s = state
        self._federation = federation or MemoryFederation()

    async def deliver(self, sender: str, message_id: str, digest: bytes,
                      payloads: list[tuple[list[str], bytes]], now_ms: int,
                      ttl_ms: int, outbound: Sequence[OutboundDraft] = ()) -> DeliverResult:
        drafts = list(outbound)
        check_drafts(drafts, now_ms)
        await trio.lowlevel.checkpoint()
        return self.deliver_now(sender, message_id, digest, payloads, now_ms, ttl_ms, drafts)

    def deliver_now(self, sender: str, message_id: str, digest: bytes, payloads: list[tuple[list[str], bytes]],
                    now_ms: int, ttl_ms: int, drafts: Sequence[OutboundDraft] = ()) -> DeliverResult:
        """The mailbox write without a checkpoint (also applied inside a federation receive)."""
        seen = self._s.message_ids.get((sender, message_id))
        if seen is not None and seen[1] > now_ms:
            same = hmac.compare_digest(seen[0], digest)
            return DeliverResult("duplicate" if same else "conflict", ())
        self._federation.check_not_queued(drafts)
        expires_ms = now_ms + ttl_ms
        self._s.message_ids[(sender, message_id)] = (digest, expires_ms)
        entries = []
        for devices, ciphertext in payloads:
            if not devices:
                continue
            blob_id = next(self._s.blob_ids)
            self._s.blobs[blob_id] = ciphertext
            self._s.blob_refs[blob_id] = len(devices)
            for device in devices:
                seq = next(self._s.seqs)
                self._s.mailboxes.setdefault(device, {})[seq] = _Entry(
                    sender, message_id, blob_id, now_ms, expires_ms)
                entries.append(MailboxEntry(seq, device, sender, message_id, ciphertext, now_ms))
        queued = tuple(self._federation.insert_outbound(drafts, now_ms)) if drafts else ()
        return DeliverResult("new", tuple(entries), queued)

    async def queue_deliver(self, sender: str, message_id: str, digest: bytes,
                            payloads: list[tuple[list[str], bytes]], now_ms: int, ttl_ms: int,
                            on_commit: Callable[[DeliverResult], None] | None = None,
                            outbound: Sequence[OutboundDraft] = ()
                            ) -> Completion[DeliverResult]:
        result = await self.deliver(sender, message_id, digest, payloads, now_ms, ttl_ms, outbound)
        if on_commit is not None:
            on_commit(result)
        return Done(result)

    async def queue_ack(self, device: str, seqs: list[int]) -> Completion[int]:
        return Done(await self.ack(device, seqs))

    async def pending(self, device: str, after_seq: int, limit: int) -> list[MailboxEntry]:
        await trio.lowlevel.checkpoint()
        if limit <= 0:
            return []
        box = self._s.mailboxes.get(device, {})
        later = ((seq, e) for seq, e in box.items() if seq > after_seq)
        return [MailboxEntry(seq, device, e.sender, e.message_id, self._s.blobs[e.blob_id], e.ts_ms)
                for seq, e in itertools.islice(later, limit)]

    async def ack(self, device: str, seqs: list[int]) -> int:
        await trio.lowlevel.checkpoint()
        return sum(self._s.drop_entry(device, seq) for seq in set(seqs))

    async def expire(self, now_ms: int) -> dict[str, int]:
        await trio.lowlevel.checkpoint()
        s = self._s
        blobs_before = len(s.blobs)
        expired = [(device, seq) for device, box in s.mailboxes.items()
                   for seq, e in box.items() if e.expires_ms <= now_ms]
        for device, seq in expired:
            s.drop_entry(device, seq)
        counts = {"entries": len(expired), "blobs": blobs_before - len(s.blobs)}
        old_ids = [k for k, (_, expires_ms) in s.message_ids.items() if expires_ms <= now_ms]
        for message_key in old_ids:
            del s.message_ids[message_key]
        old_claims = [k for k, expires_ms in s.claimed.items() if expires_ms <= now_ms]
        for claim_key in old_claims:
            del s.claimed[claim_key]
        old_invites = [k for k, invite in s.invites.items() if invite.expires_ms <= now_ms]
        for invite_id in old_invites:
            del s.invites[invite_id]
            del s.invite_hashes[invite_id]
        counts.update(message_ids=len(old_ids), claimed_prekeys=len(old_claims),
                      invites=len(old_invites))
        return counts

    async def purge_device(self, device: str) -> int:
        await trio.lowlevel.checkpoint()
        return self._s.drop_device_entries(device)

    async def counts(self) -> dict[str, int]:
        await trio.lowlevel.checkpoint()
        return {"entries": sum(len(box) for box in self._s.mailboxes.values()),
                "blobs": len(self._s.blobs)}


class MemoryStorage:
    """The repositories over one set of dicts (so revocation reaches mailboxes)."""

    def __init__(self, *, claimed_ttl_ms: int = CLAIMED_PREKEY_TTL_MS) -> None:
        state = _State()
        self.accounts = MemoryAccountRepository(state)
        self.devices = MemoryDeviceRepository(state, claimed_ttl_ms=claimed_ttl_ms)
        self.federation = MemoryFederation()
        self.mailboxes = MemoryMailboxRepository(state, self.federation)
        self.federation.deliver = self.mailboxes.deliver_now

    async def aclose(self) -> None:
        await trio.lowlevel.checkpoint()
