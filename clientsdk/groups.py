"""Groups in the SDK: the crypto core's group state and sender keys, over the one ``send`` op.

Why it is shaped this way (DESIGN §4 "Groups", LESSONS #1):

* The server stores no group object: every member device keeps a ``GroupSession``
  (``clientsdk.crypto.group_session``) sealed in the client store, under a row name
  that is a keyed hash of the random group id.
* A group message is encrypted **once** under my sender key.  One ``send`` op
  carries it: the shared ciphertext for every member device that already holds my
  current chain (the server fans it out), and for each device that does not, a
  pairwise ciphertext of a *group bundle* holding my chain (distribution) **and**
  the same group message.  The protocol names a device at most once per op, so the
  key travels with the message it unlocks: never a message without its key, over
  the same durable, acknowledged mailbox (LESSONS #1).
* Changes (create = welcome, add, remove, rename, admins) are admin-signed control
  messages sent pairwise to every member device (and welcomes to new members).
  They go through a persisted per-group *outbox* that is flushed before every group
  send, so controls always precede the messages of the epoch they open, and a
  crash between the change and its send loses nothing.  A change of mine that lost
  against a concurrent one is rebased and queued again (``displaced_own``).
* A removal rotates every remaining member's sender key: the crypto core refuses to
  send under a chain older than the last removal, so the next send creates a fresh
  chain and hands it only to the current members.  A removed device drops every
  chain of the group.

Healing (LESSONS #1, #8, #9):

* **Key re-request.**  A shared message under a key id I do not hold is *held*
  (persisted, bounded) and its sender device is asked, over our pairwise session,
  for its chain (``sender_key_request``, at most once a minute per group and device,
  at most ``MAX_REQUESTS`` unanswered).  The sender answers only a listed device of a
  current member, with its chain from the held message's iteration on — never from
  before the iteration that device was first given (``LocalGroup.anchor``/``given``).
  Held messages that still fail, or wait longer than ``HOLD_MS``, become ONE
  ``SecurityEvent("decryption_failed")`` per sender device plus a notice in the
  group's history: never a silent loss.
* **Rotation when a holder leaves.**  If a device that holds my chain is no longer a
  current device of a member (revoked, or its user removed), my next send uses a new
  chain, handed only to current devices.  Devices that do not hold my chain (a newly
  linked one) get it pairwise with my next message.
* **New own devices learn my groups.**  When the master device signs new devices into
  my list it sends them each group's replica (``sync``, accepted from my own user's
  devices only); a group bundle for a group not known yet is held until then.
* **Backlog first.**  Group sends (and control sends) wait until the server's
  ``backlog_done`` push has been processed on this connection (at most
  ``BACKLOG_WAIT_S``), so a removal waiting in my mailbox applies before I encrypt.
* **Backups** carry each group's replica (states and admin-signed changes, no keys);
  a restored device is a new device that members hand their chains to.

Pairwise group bundle (inside the usual content map, ``type = "group"``, field
``group``): ``canonical {v: 1, group_id: bin(32) [, welcome: bin (state bytes)]
[, sync: bin (replica bytes)] [, reply: bin(8) (the key id a request asked for)]
[, controls: [bin]] [, distribution: bin] [, message: bin]}``, processed in that
order.  Group message body (what the sender key encrypts): ``canonical {v: 1, id,
text, sent_ms}``.
"""

from __future__ import annotations

import logging
import secrets
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

import trio

from clientsdk.content import SENDER_KEY_REQUEST, Content
from clientsdk.crypto.backup import BackupGroup
from clientsdk.crypto.errors import CryptoError, MalformedMessage
from clientsdk.crypto.group_session import GroupSession
from clientsdk.crypto.group_state import (
    ChangeOp,
    GroupReplica,
    GroupState,
    NotMember,
    SignedChange,
)
from clientsdk.crypto.identity import DeviceIdentity, VerifiedDeviceList
from clientsdk.crypto.primitives import system_rng
from clientsdk.crypto.sender_keys import GroupMessage, GroupPlaintext, UnknownSenderKey
from clientsdk.devicelists import ContactBook
from clientsdk.errors import SdkError, SendFailed
from clientsdk.events import Event, SecurityEvent
from clientsdk.group_records import (
    GROUP_CONTENT,
    HOLDS_KV,
    GroupBundle,
    GroupChanged,
    GroupError,
    GroupMessageReceived,
    Held,
    KeyRecovery,
    KeyRequest,
    LocalGroup,
    OutboxItem,
    UnknownGroup,
    changed_event,
    conversation_of,
    decode_body,
    describe,
    encode_body,
    is_group_message,
    parse_group_id,
    replica_for,
)
from clientsdk.sessions import SessionBook
from clientsdk.store import Batch, HistoryEntry, Store
from federation import codec
from federation.addresses import DeviceAddress, UserAddress
from federation.errors import CodecError, ErrorCode, ProtocolError
from federation.rpc import RemoteError, RpcClient
from federation.transport import TransportClosed
from federation.validate import require_map

__all__ = ["GROUP_CONTENT", "GroupBundle", "GroupChanged", "GroupError", "GroupMessageReceived", "GroupsMixin",
           "LocalGroup", "UnknownGroup", "is_group_message", "parse_group_id"]

log = logging.getLogger(__name__)

KV_PREFIX = "group:"
MAX_STALE_RETRIES = 4
BACKLOG_WAIT_S = 10.0            # a server that never sends backlog_done delays group sends this long, once
_RECOVERABLE = (SdkError, RemoteError, CryptoError, ProtocolError)


async def _first_of(*events: trio.Event) -> None:
    """Return as soon as any of ``events`` is set."""
    async with trio.open_nursery() as nursery:
        async def wait(event: trio.Event) -> None:
            await event.wait()
            nursery.cancel_scope.cancel()
        for event in events:
            nursery.start_soon(wait, event)


# --- the mixin ----------------------------------------------------------------------------------


class GroupsMixin:
    """Group API of ``Client``; state lives in ``self._groups`` (loaded lazily from the store)."""

    user: str
    address: DeviceAddress
    _identity: DeviceIdentity
    _sessions: SessionBook
    _book: ContactBook
    _store: Store
    _lock: trio.Lock
    _store_limiter: trio.CapacityLimiter
    _clock: Callable[[], int]
    _rpc: RpcClient | None

    _groups: dict[bytes, LocalGroup] | None = None
    _recovery: KeyRecovery | None = None
    _group_send_lock: trio.Lock | None = None
    _group_work: trio.Event | None = None
    _backlog_for: RpcClient | None = None            # the connection whose backlog_done was processed
    _backlog_signal: trio.Event | None = None
    _backlog_wait: tuple[RpcClient, float] | None = None

    if TYPE_CHECKING:   # provided by Client (stubs here would shadow them in the MRO)
        def _emit(self, event: Event) -> None: ...

        async def _persist(self, batch: Batch) -> None: ...

        async def _wait_rpc(self) -> RpcClient: ...

        async def _device_list(self, rpc: RpcClient, user: str, *, force: bool = False,
                               have_lock: bool = False) -> VerifiedDeviceList: ...

        async def _targets(self, rpc: RpcClient, recipients: list[str]) -> list[str]: ...

        async def _ensure_sessions(self, rpc: RpcClient, targets: list[str]) -> None: ...

        async def _send_op(self, message_id: str, payloads: list[dict[str, Any]],
                           ephemeral: bool = False) -> None: ...

        async def _until_replaced(self, rpc: RpcClient) -> None: ...

        def _content_for(self, template: Content, user: str, recipients: list[str]) -> bytes: ...

        def _send_content(self, recipients: list[str], template: Content, *, ephemeral: bool = False,
                          history: HistoryEntry | None = None) -> Awaitable[None]: ...

    # --- public API ---------------------------------------------------------------------------

    async def create_group(self, name: str, members: list[str]) -> str:
        """Create a group with me as its admin and ``members``; returns the group id (hex)."""
        users = sorted({str(UserAddress.parse(m)) for m in members} - {self.user})
        rpc = await self._wait_rpc()
        for user in users:
            await self._device_list(rpc, user)            # refuse unknown users / refused lists up front
        groups = await self._loaded_groups()
        async with self._lock:
            state = GroupState.new(name, UserAddress.parse(self.user), [UserAddress.parse(u) for u in users],
                                   system_rng)
            group = LocalGroup(GroupSession(GroupReplica(state, self.address), self._resolve))
            welcome = GroupBundle(state.group_id, welcome=state.to_bytes()).to_bytes()
            group.outbox.append(OutboxItem(secrets.token_hex(16), [self.user, *users], welcome))
            groups[state.group_id] = group
            await self._persist(self._group_batch(state.group_id))
        self._emit(changed_event(state, ("created",)))
        await self._flush_outbox(state.group_id)
        return state.group_id.hex()

    async def add_member(self, group_id: str, user: str) -> None:
        """Add ``user`` (admins only): members get the signed change, the new member a welcome."""
        user = str(UserAddress.parse(user))
        rpc = await self._wait_rpc()
        await self._device_list(rpc, user)
        await self._change(group_id, ChangeOp.ADD_MEMBER, user)

    async def remove_member(self, group_id: str, user: str) -> None:
        """Remove ``user`` (admins only); every remaining member's next send uses a fresh sender key."""
        await self._change(group_id, ChangeOp.REMOVE_MEMBER, str(UserAddress.parse(user)))

    async def rename_group(self, group_id: str, name: str) -> None:
        await self._change(group_id, ChangeOp.RENAME, name)

    async def add_admin(self, group_id: str, user: str) -> None:
        await self._change(group_id, ChangeOp.ADD_ADMIN, str(UserAddress.parse(user)))

    async def remove_admin(self, group_id: str, user: str) -> None:
        await self._change(group_id, ChangeOp.REMOVE_ADMIN, str(UserAddress.parse(user)))

    async def group_info(self, group_id: str) -> GroupChanged:
        """The group's current state as this device sees it (same shape as the change event)."""
        group = await self._group(parse_group_id(group_id))
        return changed_event(group.session.state, ())

    async def groups(self) -> list[str]:
        """Ids of the groups this device knows (including ones I was removed from)."""
        return sorted(g.hex() for g in await self._loaded_groups())

    async def group_history(self, group_id: str, limit: int = 100) -> list[HistoryEntry]:
        """The stored messages of a group (decrypted from the store), oldest first."""
        return await trio.to_thread.run_sync(self._store.history, conversation_of(parse_group_id(group_id)),
                                             limit, limiter=self._store_limiter)

    async def send_group(self, group_id: str, text: str) -> str:
        """Encrypt ``text`` once under my sender key and send it to every member device; returns the id.

        Waits for this connection's mailbox backlog first, then sends pending control
        messages of this group; devices without my current chain get it pairwise
        together with this message, in the same ``send`` op.
        """
        gid = parse_group_id(group_id)
        await self._flush_outbox(gid)
        message_id = secrets.token_hex(16)
        sent_ms = self._clock()
        body = encode_body(message_id, text, sent_ms)
        history: HistoryEntry | None = HistoryEntry(conversation_of(gid), str(self.address), message_id, text,
                                                    sent_ms, sent_ms, True)
        rounds = 0
        while rounds < MAX_STALE_RETRIES * 2:
            rounds += 1
            rpc = await self._wait_rpc()
            group = await self._group(gid)
            members = [str(u) for u in group.session.state.members]
            if self.user not in members:
                raise NotMember("I am not a member of this group")
            try:
                targets = await self._targets(rpc, members)
                fresh = not self._chain_is_current(group) or self._holder_left(group, targets)
                await self._ensure_sessions(rpc, [a for a in targets if fresh or a not in group.given])
            except TransportClosed:
                await self._until_replaced(rpc)
                continue
            async with self._lock:
                group.session.apply_pending()
                if [str(u) for u in group.session.state.members] != members:
                    continue                          # a change arrived meanwhile: recompute devices
                if self._chain_is_current(group) and self._holder_left(group, targets):
                    self._rotate(group)               # a revoked device holds my chain: never send under it
                need_key = not self._chain_is_current(group)
                need = [a for a in targets if need_key or a not in group.given]
                if any(not self._sessions.has(a) for a in need):
                    continue
                outbound = group.session.outbound
                before = outbound.distribution().to_bytes() if outbound is not None else None
                send = group.session.encrypt(body, system_rng)
                new_key = group.session.outbound
                if new_key is None:
                    raise GroupError("no sending chain")
                distribution = send.distribution if send.rotated or before is None else before
                if send.rotated or group.sent_key != new_key.key_id:
                    group.sent_key, group.given, group.anchor = new_key.key_id, {}, distribution
                    need = list(targets)
                iteration = new_key.iteration - 1     # the iteration of this message
                group.note_sent(iteration)
                batch = self._group_batch(gid)
                payloads: list[dict[str, Any]] = []
                if need:
                    if distribution is None:
                        raise GroupError("no distribution for a new chain")
                    bundle = GroupBundle(gid, distribution=distribution, message=send.message).to_bytes()
                    payloads += self._pairwise(need, members, message_id, sent_ms, bundle, {}, batch)
                rest = [a for a in targets if a not in need]
                if rest:
                    payloads.append({"devices": rest, "ciphertext": send.message})
                if history is not None:
                    batch.messages.append(history)
                    history = None
                await self._persist(batch)            # chain step and sessions durable before bytes leave
            if not payloads:
                return message_id
            if await self._send_or_stale(message_id, payloads):
                if need:
                    async with self._lock:
                        if group.sent_key == new_key.key_id:
                            for address in need:
                                group.given.setdefault(address, iteration)
                            await self._persist(self._group_batch(gid))
                return message_id
        raise SendFailed("the group's devices kept changing; gave up", code="stale_devices")

    @staticmethod
    def _holder_left(group: LocalGroup, targets: list[str]) -> bool:
        """Does a device that holds my current chain no longer belong to the group's current devices?"""
        current = set(targets)
        return any(device not in current for device in group.given)

    @staticmethod
    def _rotate(group: LocalGroup) -> None:
        outbound = group.session.outbound
        if outbound is not None:
            group.session.outbound = outbound.rotate(group.session.state.epoch, system_rng)
            log.info("sender key rotated: a device holding it left its user's device list")

    # --- changes and the outbox -----------------------------------------------------------------

    async def _change(self, group_id: str, op: ChangeOp, target: str) -> None:
        gid = parse_group_id(group_id)
        await self._flush_outbox(gid)                 # my earlier changes first (after the backlog)
        group = await self._group(gid)
        async with self._lock:
            before = [str(u) for u in group.session.state.members]
            group.session.apply_pending()
            signed = group.session.replica.propose(op, target, self._identity.signing_key)
            self._queue_control(group, signed, before)
            state = group.session.state
            await self._persist(self._group_batch(gid))
        self._emit(changed_event(state, (f"{op.value} {target}",)))
        await self._flush_outbox(gid)

    def _queue_control(self, group: LocalGroup, signed: SignedChange, before: list[str]) -> None:
        """Queue ``signed`` for the members of its base state and, for an addition, a welcome."""
        state = group.session.state
        gid = state.group_id
        control = GroupBundle(gid, controls=(signed.to_bytes(),)).to_bytes()
        users = sorted(set(before) | {str(u) for u in state.members})
        special: dict[str, bytes] = {}
        if signed.change.op is ChangeOp.ADD_MEMBER:
            special[signed.change.target] = GroupBundle(gid, welcome=state.to_bytes()).to_bytes()
        group.outbox.append(OutboxItem(secrets.token_hex(16), users, control, special))

    async def _flush_outbox(self, gid: bytes) -> None:
        """Send this group's queued control messages in order; each leaves the outbox once acknowledged.

        Every group send goes through here first, so this is where group sends wait
        for the mailbox backlog of the current connection.
        """
        await self._until_backlog_done()
        if self._group_send_lock is None:
            self._group_send_lock = trio.Lock()
        async with self._group_send_lock:
            group = await self._group(gid)
            while group.outbox:
                item = group.outbox[0]
                await self._deliver(item)
                async with self._lock:
                    group.outbox = [i for i in group.outbox if i.message_id != item.message_id]
                    await self._persist(self._group_batch(gid))

    async def _deliver(self, item: OutboxItem) -> None:
        """Pairwise bundles to every current device of ``item.users`` (and my other devices): one op."""
        stale = 0
        while stale < MAX_STALE_RETRIES:
            rpc = await self._wait_rpc()
            try:
                targets = await self._targets(rpc, item.users)
                await self._ensure_sessions(rpc, targets)
            except TransportClosed:
                await self._until_replaced(rpc)
                continue
            if not targets:
                return
            async with self._lock:
                batch = Batch()
                payloads = self._pairwise(targets, item.users, item.message_id, self._clock(), item.bundle,
                                          item.special, batch)
                await self._persist(batch)
            if await self._send_or_stale(item.message_id, payloads):
                return
            stale += 1
        raise SendFailed("the group's devices kept changing; gave up", code="stale_devices")

    def _pairwise(self, targets: list[str], users: list[str], message_id: str, sent_ms: int, bundle: bytes,
                  special: dict[str, bytes], batch: Batch) -> list[dict[str, Any]]:
        """One pairwise payload per device: the group bundle inside the usual content map (type ``group``)."""
        payloads = []
        plaintexts: dict[str, bytes] = {}
        for address in targets:
            user = address.partition("/")[0]
            if user not in plaintexts:
                template = Content(GROUP_CONTENT, message_id, user, "", sent_ms, 0, bytes(32))
                obj = codec.decode(self._content_for(template, user, users))
                obj["group"] = special.get(user, bundle)
                plaintexts[user] = codec.encode(obj)
            payloads.append({"devices": [address], "ciphertext": self._sessions.encrypt(address, plaintexts[user])})
            batch.sessions[address] = self._sessions.state_bytes(address)
        return payloads

    async def _send_or_stale(self, message_id: str, payloads: list[dict[str, Any]]) -> bool:
        """Send one op; False on ``stale_devices`` (lists marked stale: the caller re-encrypts and retries)."""
        try:
            await self._send_op(message_id, payloads)
            return True
        except RemoteError as exc:
            if exc.code != ErrorCode.STALE_DEVICES:
                raise SendFailed(f"the server refused the message: {exc.code.value}", code=exc.code.value) from None
            for user in (exc.details or {}):
                self._book.mark_stale(str(user))
            return False

    async def _group_background(self) -> None:
        """Per connection: flush outboxes, send and answer key requests, report held messages whose wait ended."""
        while True:
            # Groups are loaded on first use (not here: a store hop on every connect would delay
            # everyone's first sends); loading wakes this task if a crash left work behind.
            self._group_work = trio.Event()
            for gid, group in list((self._groups or {}).items()):
                if group.outbox:
                    try:
                        await self._flush_outbox(gid)
                    except _RECOVERABLE as exc:
                        log.info("group control send postponed: %s", type(exc).__name__)
            deadline: int | None = None
            if self._recovery is not None:
                await self._expire_held()
                await self._send_key_requests()
                await self._answer_key_requests()
                deadline = self._recovery.next_deadline()
            if deadline is None:
                await self._group_work.wait()
            else:
                with trio.move_on_after(max(0, deadline - self._clock()) / 1000 + 0.001):
                    await self._group_work.wait()

    def _wake_group_sends(self) -> None:
        if self._group_work is not None:
            self._group_work.set()

    # --- the mailbox backlog (server push backlog_done) -----------------------------------------

    def _backlog_reached(self, rpc: RpcClient) -> None:
        """``backlog_done``: handled by the pump after every envelope pushed before it."""
        self._backlog_for = rpc
        signal, self._backlog_signal = self._backlog_signal, trio.Event()
        if signal is not None:
            signal.set()

    async def _until_backlog_done(self) -> None:
        """Wait until this connection's backlog is processed (at most ``BACKLOG_WAIT_S`` per connection)."""
        while True:
            rpc = await self._wait_rpc()
            if self._backlog_for is rpc:
                return
            if self._backlog_wait is None or self._backlog_wait[0] is not rpc:
                self._backlog_wait = (rpc, trio.current_time() + BACKLOG_WAIT_S)
            if self._backlog_signal is None:
                self._backlog_signal = trio.Event()
            deadline = self._backlog_wait[1]
            with trio.move_on_at(deadline):
                await _first_of(self._backlog_signal, rpc.closed)
            if self._backlog_for is not rpc and self._rpc is rpc and trio.current_time() >= deadline:
                log.warning("the server sent no backlog_done within %.0f s: group sends go ahead", BACKLOG_WAIT_S)
                self._backlog_for = rpc

    # --- my own new devices learn my groups -----------------------------------------------------

    async def _sync_new_own_devices(self, added: set[str]) -> None:
        """The master device signed ``added`` into my list: send them every group I am in (no keys)."""
        added = added - {self.address.device_id}
        if not added:
            return
        groups = await self._loaded_groups()
        async with self._lock:
            batch = Batch()
            for gid, group in groups.items():
                if self.address.user in group.session.state.members:
                    sync = GroupBundle(gid, sync=group.session.replica.to_bytes()).to_bytes()
                    group.outbox.append(OutboxItem(secrets.token_hex(16), [self.user], sync))
                    self._group_batch(gid, batch)
            await self._persist(batch)
        self._wake_group_sends()

    # --- state and store ------------------------------------------------------------------------

    def _resolve(self, device: DeviceAddress) -> bytes | None:
        return self._book.listed_key(str(device))

    @staticmethod
    def _chain_is_current(group: LocalGroup) -> bool:
        key, state = group.session.outbound, group.session.state
        return key is not None and state.key_epoch <= key.epoch <= state.epoch and group.sent_key == key.key_id

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

    # --- receiving (called by the inbox, under the client lock) --------------------------------

    async def _receive_group_content(self, sender: DeviceAddress, plaintext: bytes, content: Content,
                                     batch: Batch) -> list[Event]:
        """A pairwise group bundle: welcome or sync, then controls, then the sender's chain, then its message."""
        try:
            raw = require_map(codec.decode(plaintext), "content").get("group")
            if not isinstance(raw, bytes):
                raise MalformedMessage("group content without a bundle")
            bundle = GroupBundle.from_bytes(raw)
        except (CodecError, ProtocolError, CryptoError):
            return [SecurityEvent("decryption_failed", str(sender.user), str(sender), "a group message is malformed")]
        if str(sender.user) != self.user and content.to != self.user:
            return [SecurityEvent("misaddressed_message", str(sender.user), str(sender),
                                  "message names another recipient")]
        groups = await self._loaded_groups()
        events: list[Event] = []
        gid = bundle.group_id
        group = groups.get(gid)
        if bundle.welcome is not None:
            group = self._accept_welcome(group, gid, bundle.welcome, sender, events)
        if bundle.sync is not None:
            group = self._accept_sync(group, gid, bundle.sync, sender, events)
        if group is None:
            return events + self._hold_bundle(sender, gid, plaintext, bundle, batch)
        groups[gid] = group
        for control in bundle.controls:
            group.session.queue_control(control)
        if bundle.controls:
            self._settle(group, events)
        if bundle.distribution is not None and self.address.user in group.session.state.members:
            try:
                group.session.add_sender_key(sender, bundle.distribution)
            except CryptoError as exc:
                log.info("sender key from %s refused: %s", sender, type(exc).__name__)
        if bundle.message is not None:
            events += self._group_decrypt(group, sender, bundle.message, batch)
        if bundle.distribution is not None or bundle.reply is not None:
            events += self._retry_held(group, sender, bundle.reply, batch)
        self._group_batch(gid, batch)
        return events + await self._release_bundles(gid, batch)

    async def _release_bundles(self, gid: bytes, batch: Batch) -> list[Event]:
        """Process what arrived for ``gid`` before this device knew the group (under the lock)."""
        events: list[Event] = []
        book = self._holds()
        for held in book.bundles_for(gid):
            batch.kv[HOLDS_KV] = book.to_bytes()
            try:
                events += await self._receive_group_content(DeviceAddress.parse(held.sender), held.data,
                                                            Content.from_bytes(held.data), batch)
            except (ProtocolError, CryptoError):
                log.info("a held group content does not parse")
        return events

    def _accept_welcome(self, group: LocalGroup | None, gid: bytes, welcome: bytes, sender: DeviceAddress,
                        events: list[Event]) -> LocalGroup | None:
        """Join (or re-join, or catch up after a rebased addition) from an admin's welcome."""
        try:
            replica = GroupReplica.from_welcome(welcome, sender, self.address)
        except CryptoError as exc:
            log.info("group welcome from %s refused: %s", sender, type(exc).__name__)
            return group
        return self._adopt(group, gid, replica, events)

    def _accept_sync(self, group: LocalGroup | None, gid: bytes, data: bytes, sender: DeviceAddress,
                     events: list[Event]) -> LocalGroup | None:
        """A group's replica from one of my own devices (a new device of mine learns my groups)."""
        if sender.user != self.address.user:
            log.info("group sync from another user's device %s ignored", sender)
            return group
        try:
            replica = replica_for(data, self.address)
        except CryptoError as exc:
            log.info("group sync from %s refused: %s", sender, type(exc).__name__)
            return group
        if self.address.user not in replica.state.members:
            return group
        return self._adopt(group, gid, replica, events)

    def _adopt(self, group: LocalGroup | None, gid: bytes, replica: GroupReplica,
               events: list[Event]) -> LocalGroup | None:
        if replica.state.group_id != gid:
            log.info("group state for another group id refused")
            return group
        if group is not None:
            current = group.session.state
            if self.address.user in current.members and replica.state.epoch <= current.epoch:
                return group                           # nothing newer than what I have
            if self.address.user in current.members:
                # Same membership, newer view: keep my chains, take the newer state.
                obj = codec.decode(group.session.to_bytes())
                obj["replica"] = replica.to_bytes()
                group.session = GroupSession.from_bytes(codec.encode(obj), self._resolve)
                events.append(changed_event(replica.state, ("welcome",)))
                return group
        events.append(changed_event(replica.state, ("welcome",)))
        if group is None:
            return LocalGroup(GroupSession(replica, self._resolve))
        # Re-added after a removal: a fresh start (other members' new chains come with their next sends).
        group.session = GroupSession(replica, self._resolve)
        group.sent_key, group.given, group.outbox, group.anchor = None, {}, [], None
        return group

    def _settle(self, group: LocalGroup, events: list[Event]) -> None:
        """Apply queued controls; re-queue my displaced changes rebased; forget chains if I was removed."""
        for outcome in group.session.apply_pending():
            state = group.session.state
            if outcome.applied or outcome.undone:
                events.append(changed_event(state, describe(outcome), outcome.removed_me))
            for change in outcome.displaced_own:
                prior = [str(u) for u in group.session.state.members]
                signed = group.session.replica.resend(change, self._identity.signing_key)
                if signed is not None:
                    self._queue_control(group, signed, prior)
                    events.append(changed_event(group.session.state, (f"{change.op.value} {change.target}",)))
                    self._wake_group_sends()
            if self.address.user not in group.session.state.members:
                # Removed: keep the state (history, events) but no chain of this group any more.
                group.session = GroupSession(group.session.replica, self._resolve)
                group.sent_key, group.given, group.outbox, group.anchor = None, {}, [], None

    async def _receive_group_message(self, sender: DeviceAddress, ciphertext: bytes, batch: Batch) -> list[Event]:
        """A shared sender-key ciphertext: find the group whose chain of ``sender`` has this key id.

        Under an unknown key id it is held and the sender device is asked for its key.
        """
        groups = await self._loaded_groups()
        candidates = []
        for gid, group in groups.items():
            members = group.session.state.members
            if sender.user not in members or self.address.user not in members:
                continue
            candidates.append(gid)
            events = self._group_decrypt(group, sender, ciphertext, batch, quiet_unknown=True)
            if events:
                self._group_batch(gid, batch)
                return events
        unreadable = [SecurityEvent("decryption_failed", str(sender.user), str(sender),
                                    "a group message could not be decrypted (no sender key)")]
        if not candidates or self._book.listed_key(str(sender)) is None:
            log.info("group message from %s under no known sender key", sender)
            return unreadable
        try:
            message = GroupMessage.from_bytes(ciphertext)
        except CryptoError:
            return unreadable
        now = self._clock()
        book = self._holds()
        lost = book.hold(Held(str(sender), list(candidates), ciphertext, now))
        for gid in candidates:
            if book.want_request(gid, str(sender), message.key_id, message.iteration, now):
                log.info("asking %s for its sender key", sender)
        batch.kv[HOLDS_KV] = book.to_bytes()
        self._wake_group_sends()
        return self._report_lost(lost, batch)

    def _group_decrypt(self, group: LocalGroup, sender: DeviceAddress, message: bytes, batch: Batch,
                       *, quiet_unknown: bool = False) -> list[Event]:
        try:
            plain = group.session.decrypt(sender, message, self._clock())
            return self._group_message(group, sender, plain, batch)
        except UnknownSenderKey:
            if quiet_unknown:
                return []
            return [SecurityEvent("decryption_failed", str(sender.user), str(sender),
                                  "a group message could not be decrypted (no sender key)")]
        except CryptoError as exc:
            log.info("group message from %s refused: %s", sender, type(exc).__name__)
            return [SecurityEvent("decryption_failed", str(sender.user), str(sender),
                                  "a group message could not be decrypted")]

    def _group_message(self, group: LocalGroup, sender: DeviceAddress, plain: GroupPlaintext,
                       batch: Batch) -> list[Event]:
        """A decrypted group message: into the history (this batch) and one event."""
        message_id, text, sent_ms = decode_body(plain.body)
        now = self._clock()
        gid = group.session.state.group_id
        outgoing = str(sender.user) == self.user
        batch.messages.append(HistoryEntry(conversation_of(gid), str(sender), message_id, text, sent_ms, now,
                                           outgoing))
        return [GroupMessageReceived(gid.hex(), str(sender.user), str(sender), message_id, text, sent_ms, now,
                                     outgoing, plain.epoch)]

    # --- held messages and key requests ---------------------------------------------------------

    def _hold_bundle(self, sender: DeviceAddress, gid: bytes, plaintext: bytes, bundle: GroupBundle,
                     batch: Batch) -> list[Event]:
        """Group content for a group I do not know yet (my new device before its sync): keep it a while."""
        if bundle.distribution is None and bundle.message is None and not bundle.controls:
            return []
        log.info("group content from %s for a group not known yet: held", sender)
        book = self._holds()
        lost = book.hold(Held(str(sender), [gid], plaintext, self._clock(), bundle=True))
        batch.kv[HOLDS_KV] = book.to_bytes()
        self._wake_group_sends()
        return self._report_lost(lost, batch)

    def _retry_held(self, group: LocalGroup, sender: DeviceAddress, reply: bytes | None,
                    batch: Batch) -> list[Event]:
        """A chain (or an answer) from ``sender`` arrived: decrypt what waited for it, report what cannot."""
        book = self._holds()
        gid = group.session.state.group_id
        if reply is not None:
            book.answered(gid, str(sender))
        waiting = book.waiting(str(sender), gid)
        if not waiting and reply is None:
            return []
        events: list[Event] = []
        lost: list[Held] = []
        for item in waiting:
            try:
                plain = group.session.decrypt(sender, item.data, self._clock())
                events += self._group_message(group, sender, plain, batch)
            except UnknownSenderKey:
                key = item.key()
                if reply is not None and key is not None and key[0] == reply:
                    item.group_ids.remove(gid)     # the sender has no more of that chain for this group
                    if not item.group_ids:
                        lost.append(item)
                continue
            except CryptoError:
                lost.append(item)
                continue
            book.drop(item)
        for item in lost:
            book.drop(item)
        if not book.waiting(str(sender), gid):
            book.answered(gid, str(sender))          # nothing waits: a later loss may ask again at once
        batch.kv[HOLDS_KV] = book.to_bytes()
        return events + self._report_lost(lost, batch, gid)

    def _report_lost(self, lost: list[Held], batch: Batch, group_id: bytes | None = None) -> list[Event]:
        """ONE event per sender device (and a notice in the group's history) for messages given up on.

        The notice goes to ``group_id``, else to the one group the messages may belong to.
        """
        by_sender: dict[str, list[Held]] = {}
        for item in lost:
            by_sender.setdefault(item.sender, []).append(item)
        events: list[Event] = []
        now = self._clock()
        for device, items in by_sender.items():
            user = device.partition("/")[0]
            count = len(items)
            if all(i.bundle for i in items):
                detail = f"{count} group message(s) from this device were for a group this device does not know"
            else:
                detail = f"{count} group message(s) from this device could not be decrypted: its sender key " \
                         "did not arrive"
            log.info("group messages from %s given up: %d", device, count)
            events.append(SecurityEvent("decryption_failed", user, device, detail))
            if group_id is not None:
                groups = {group_id}
            else:
                groups = {g for i in items for g in i.group_ids} if all(len(i.group_ids) == 1 for i in items) \
                    else set()
            for gid in sorted(groups):
                if self._groups is not None and gid in self._groups:
                    batch.messages.append(HistoryEntry(conversation_of(gid), device,
                                                       f"lost-{secrets.token_hex(12)}", detail, now, now,
                                                       user == self.user, kind="notice"))
        return events

    async def _expire_held(self) -> None:
        """Report held messages whose wait is over; process held contents of groups learnt meanwhile
        (e.g. from a history transfer)."""
        book = self._holds()
        groups = self._groups or {}
        deadline = book.next_deadline()
        learnt = {g for h in book.held if h.bundle for g in h.group_ids if g in groups}
        if not learnt and (deadline is None or deadline > self._clock()):
            return
        async with self._lock:
            batch = Batch()
            events: list[Event] = []
            for gid in sorted(learnt):
                events += await self._release_bundles(gid, batch)
            lost = book.expired(self._clock())
            batch.kv[HOLDS_KV] = book.to_bytes()
            events += self._report_lost(lost, batch)
            await self._persist(batch)
        for event in events:
            self._emit(event)

    async def _send_key_requests(self) -> None:
        """Send my queued ``sender_key_request`` contents (pairwise, to the sender's user)."""
        book = self._holds()
        while book.due:
            request = book.due[0]
            user = str(DeviceAddress.parse(request.device).user)
            template = Content(SENDER_KEY_REQUEST, secrets.token_hex(16), "", "", self._clock(), 0, bytes(32),
                               request.to_refs())
            try:
                await self._send_content([user], template)
            except _RECOVERABLE as exc:
                log.info("sender key request not sent: %s", type(exc).__name__)
            async with self._lock:
                if request in book.due:
                    book.due.remove(request)
                await self._persist(Batch(kv={HOLDS_KV: book.to_bytes()}))

    async def _receive_key_request(self, sender: DeviceAddress, content: Content, batch: Batch) -> Event | None:
        """A member device asks for my chain (inbox, under the lock): queued for the background task."""
        try:
            request = KeyRequest.from_refs(content.refs)
        except CryptoError:
            log.info("malformed sender key request from %s", sender)
            return None
        if request.device != str(self.address) or (str(sender.user) != self.user and content.to != self.user):
            return None                                # for another device of my user
        groups = await self._loaded_groups()
        if request.group_id in groups and self._holds().want_answer(str(sender), request):
            batch.kv[HOLDS_KV] = self._holds().to_bytes()
            self._wake_group_sends()
        return None

    async def _answer_key_requests(self) -> None:
        book = self._holds()
        while book.answers:
            requester, request = book.answers[0]
            try:
                await self._answer(requester, request)
            except _RECOVERABLE as exc:
                log.info("sender key request not answered: %s", type(exc).__name__)
            async with self._lock:
                if (requester, request) in book.answers:
                    book.answers.remove((requester, request))
                await self._persist(Batch(kv={HOLDS_KV: book.to_bytes()}))

    async def _answer(self, requester: str, request: KeyRequest) -> None:
        """Hand my chain to ``requester`` if it is a listed device of a current member; else nothing."""
        parsed = DeviceAddress.parse(requester)
        user = str(parsed.user)
        rpc = await self._wait_rpc()
        await self._device_list(rpc, user)
        if self._book.listed_key(requester) is None:
            log.info("sender key request from %s refused: not in its user's signed list", requester)
            return
        group = await self._group(request.group_id)
        gid = request.group_id
        message_id = secrets.token_hex(16)
        stale = 0
        while stale < MAX_STALE_RETRIES:
            rpc = await self._wait_rpc()
            try:
                targets = await self._targets(rpc, [user])
                await self._ensure_sessions(rpc, targets)
            except TransportClosed:
                await self._until_replaced(rpc)
                continue
            if requester not in targets:
                return
            async with self._lock:
                group.session.apply_pending()
                members = group.session.state.members
                if parsed.user not in members or self.address.user not in members:
                    log.info("sender key request from %s refused: not a member", requester)
                    return
                distribution, since = self._served(group, requester, request)
                now = self._clock()
                batch = Batch()
                answer = GroupBundle(gid, distribution=distribution, reply=request.key_id).to_bytes()
                payloads = self._pairwise([requester], [user], message_id, now, answer, {}, batch)
                others = [a for a in targets if a != requester]
                if others:      # the op must cover the user's devices: the others get an empty bundle
                    payloads += self._pairwise(others, [user], message_id, now, GroupBundle(gid).to_bytes(), {},
                                               batch)
                await self._persist(batch)
                key_id = group.sent_key
            if await self._send_or_stale(message_id, payloads):
                if since is not None:
                    async with self._lock:
                        if group.sent_key == key_id:
                            group.given.setdefault(requester, since)
                            await self._persist(self._group_batch(gid))
                return
            stale += 1

    def _served(self, group: LocalGroup, requester: str, request: KeyRequest) -> tuple[bytes | None, int | None]:
        """(distribution to hand out, iteration the requester now holds my chain from if new to it)."""
        outbound = group.session.outbound
        if outbound is None or not self._chain_is_current(group):
            return None, None                          # my next send starts a new chain for everyone
        served = group.served_distribution(requester, request.key_id, request.iteration)
        if served is not None:
            return served, None
        return outbound.distribution().to_bytes(), outbound.iteration
