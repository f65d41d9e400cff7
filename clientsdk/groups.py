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

Pairwise group bundle (inside the usual content map, ``type = "group"``, field
``group``): ``canonical {v: 1, group_id: bin(32) [, welcome: bin (state bytes)]
[, controls: [bin]] [, distribution: bin] [, message: bin]}``, processed in that
order.  Group message body (what the sender key encrypts): ``canonical {v: 1, id,
text, sent_ms}``.
"""

from __future__ import annotations

import logging
import secrets
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import trio

from clientsdk.content import Content
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
from clientsdk.crypto.sender_keys import UnknownSenderKey
from clientsdk.devicelists import ContactBook
from clientsdk.errors import SdkError, SendFailed
from clientsdk.events import Event, SecurityEvent
from clientsdk.group_records import (
    GROUP_CONTENT,
    GroupBundle,
    GroupChanged,
    GroupError,
    GroupMessageReceived,
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
_RECOVERABLE = (SdkError, RemoteError, CryptoError, ProtocolError)


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

    _groups: dict[bytes, LocalGroup] | None = None
    _group_send_lock: trio.Lock | None = None
    _group_work: trio.Event | None = None

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

        Pending control sends of this group go first; devices without my current chain
        get it pairwise together with this message, in the same ``send`` op.
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
                await self._ensure_sessions(rpc, [a for a in targets if a not in group.given
                                                  or not self._chain_is_current(group)])
            except TransportClosed:
                await self._until_replaced(rpc)
                continue
            async with self._lock:
                group.session.apply_pending()
                if [str(u) for u in group.session.state.members] != members:
                    continue                          # a change arrived meanwhile: recompute devices
                need_key = not self._chain_is_current(group)
                need = [a for a in targets if need_key or a not in group.given]
                if any(not self._sessions.has(a) for a in need):
                    continue
                outbound = group.session.outbound
                before = outbound.distribution().to_bytes() if outbound is not None and not need_key else None
                send = group.session.encrypt(body, system_rng)
                new_key = group.session.outbound
                if new_key is None:
                    raise GroupError("no sending chain")
                if send.rotated or group.sent_key != new_key.key_id:
                    group.sent_key, group.given = new_key.key_id, set()
                    need = list(targets)
                distribution = send.distribution if send.rotated or before is None else before
                batch = self._group_batch(gid)
                payloads: list[dict[str, Any]] = []
                if need:
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
                            group.given.update(need)
                            await self._persist(self._group_batch(gid))
                return message_id
        raise SendFailed("the group's devices kept changing; gave up", code="stale_devices")

    # --- changes and the outbox -----------------------------------------------------------------

    async def _change(self, group_id: str, op: ChangeOp, target: str) -> None:
        gid = parse_group_id(group_id)
        await self._flush_outbox(gid)                 # my earlier changes first
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
        """Send this group's queued control messages in order; each leaves the outbox once acknowledged."""
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
        """Per connection: flush every group's outbox (re-sent rebased changes, sends cut off by a crash)."""
        while True:
            # Groups are loaded on first use (not here: a store hop on every connect would delay
            # everyone's first sends); loading wakes this task if a crash left an outbox behind.
            for gid, group in list((self._groups or {}).items()):
                if group.outbox:
                    try:
                        await self._flush_outbox(gid)
                    except _RECOVERABLE as exc:
                        log.info("group control send postponed: %s", type(exc).__name__)
            self._group_work = trio.Event()
            await self._group_work.wait()

    def _wake_group_sends(self) -> None:
        if self._group_work is not None:
            self._group_work.set()

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
            if self._groups is None:
                self._groups = groups
                if any(g.outbox for g in groups.values()):
                    self._wake_group_sends()
        return self._groups

    async def _group(self, gid: bytes) -> LocalGroup:
        group = (await self._loaded_groups()).get(gid)
        if group is None:
            raise UnknownGroup("no such group on this device")
        return group

    def _group_batch(self, gid: bytes, batch: Batch | None = None) -> Batch:
        batch = batch if batch is not None else Batch()
        if self._groups is not None and gid in self._groups:
            name = KV_PREFIX + self._store.row_id("group", gid.hex()).hex()
            batch.kv[name] = self._groups[gid].to_bytes()
        return batch

    # --- receiving (called by the inbox, under the client lock) --------------------------------

    async def _receive_group_content(self, sender: DeviceAddress, plaintext: bytes, content: Content,
                                     batch: Batch) -> list[Event]:
        """A pairwise group bundle: welcome, then controls, then the sender's chain, then its message."""
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
            group = self._accept_welcome(group, bundle.welcome, sender, events)
            if group is not None:
                groups[gid] = group
        if group is None:
            log.info("group content for an unknown group from %s", sender)
            return events
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
        self._group_batch(gid, batch)
        return events

    def _accept_welcome(self, group: LocalGroup | None, welcome: bytes, sender: DeviceAddress,
                        events: list[Event]) -> LocalGroup | None:
        """Join (or re-join, or catch up after a rebased addition) from an admin's welcome."""
        try:
            replica = GroupReplica.from_welcome(welcome, sender, self.address)
        except CryptoError as exc:
            log.info("group welcome from %s refused: %s", sender, type(exc).__name__)
            return group
        if group is not None:
            current = group.session.state
            if self.address.user in current.members and replica.state.epoch <= current.epoch:
                return group                           # nothing newer than what I have
            if self.address.user in current.members:
                # Same membership, newer view: keep my chains, take the admin's state.
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
        group.sent_key, group.given, group.outbox = None, set(), []
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
                group.sent_key, group.given, group.outbox = None, set(), []

    async def _receive_group_message(self, sender: DeviceAddress, ciphertext: bytes, batch: Batch) -> list[Event]:
        """A shared sender-key ciphertext: find the group whose chain of ``sender`` has this key id."""
        groups = await self._loaded_groups()
        for gid, group in groups.items():
            if sender.user not in group.session.state.members:
                continue
            events = self._group_decrypt(group, sender, ciphertext, batch, quiet_unknown=True)
            if events:
                self._group_batch(gid, batch)
                return events
        log.info("group message from %s under no known sender key", sender)
        return [SecurityEvent("decryption_failed", str(sender.user), str(sender),
                              "a group message could not be decrypted (no sender key)")]

    def _group_decrypt(self, group: LocalGroup, sender: DeviceAddress, message: bytes, batch: Batch,
                       *, quiet_unknown: bool = False) -> list[Event]:
        now = self._clock()
        try:
            plain = group.session.decrypt(sender, message, now)
            message_id, text, sent_ms = decode_body(plain.body)
        except UnknownSenderKey:
            if quiet_unknown:
                return []
            return [SecurityEvent("decryption_failed", str(sender.user), str(sender),
                                  "a group message could not be decrypted (no sender key)")]
        except CryptoError as exc:
            log.info("group message from %s refused: %s", sender, type(exc).__name__)
            return [SecurityEvent("decryption_failed", str(sender.user), str(sender),
                                  "a group message could not be decrypted")]
        gid = group.session.state.group_id
        outgoing = str(sender.user) == self.user
        batch.messages.append(HistoryEntry(conversation_of(gid), str(sender), message_id, text, sent_ms, now,
                                           outgoing))
        return [GroupMessageReceived(gid.hex(), str(sender.user), str(sender), message_id, text, sent_ms, now,
                                     outgoing, plain.epoch)]

