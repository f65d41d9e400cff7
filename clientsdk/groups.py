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

* **Key re-request.**  A shared message under a key id I do not hold is held and its
  sender device asked for its chain; what still fails becomes ONE visible event per
  sender device, never a silent loss (``clientsdk.group_healing``).
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

Modules: this one is the public API, sending, the outbox and the backlog wait;
``clientsdk.group_receive`` takes bundles and sender-key messages in,
``clientsdk.group_healing`` holds what cannot be read yet and asks for keys,
``clientsdk.group_store`` loads and stores group state; ``GroupsMixin`` combines them.
"""

from __future__ import annotations

import logging
import secrets
from typing import Any

import trio

from clientsdk.content import Content
from clientsdk.crypto.group_session import GroupSession
from clientsdk.crypto.group_state import ChangeOp, GroupReplica, GroupState, NotMember, SignedChange
from clientsdk.crypto.primitives import system_rng
from clientsdk.errors import MAX_STALE_RETRIES, RECOVERABLE_ERRORS, SendFailed
from clientsdk.group_healing import GroupHealingMixin
from clientsdk.group_receive import GroupReceiveMixin
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
    encode_body,
    is_group_message,
    parse_group_id,
)
from clientsdk.group_store import GroupStoreMixin
from clientsdk.store import Batch, HistoryEntry
from federation import codec
from federation.addresses import UserAddress
from federation.errors import ErrorCode
from federation.rpc import RemoteError, RpcClient
from federation.transport import TransportClosed

__all__ = ["GROUP_CONTENT", "GroupBundle", "GroupChanged", "GroupError", "GroupMessageReceived", "GroupsMixin",
           "LocalGroup", "UnknownGroup", "is_group_message", "parse_group_id"]

log = logging.getLogger(__name__)

BACKLOG_WAIT_S = 10.0            # a server that never sends backlog_done delays group sends this long, once


async def _first_of(*events: trio.Event) -> None:
    """Return as soon as any of ``events`` is set."""
    async with trio.open_nursery() as nursery:
        async def wait(event: trio.Event) -> None:
            await event.wait()
            nursery.cancel_scope.cancel()
        for event in events:
            nursery.start_soon(wait, event)


# --- the mixin ----------------------------------------------------------------------------------


class GroupsMixin(GroupReceiveMixin, GroupHealingMixin, GroupStoreMixin):
    """Group API of ``Client``; state lives in ``self._groups`` (loaded lazily from the store).

    Receiving, healing and the store rows come from the mixins it combines, so
    ``Client`` names only this class.
    """

    _group_send_lock: trio.Lock | None = None
    _group_work: trio.Event | None = None
    _backlog_for: RpcClient | None = None            # the connection whose backlog_done was processed
    _backlog_signal: trio.Event | None = None
    _backlog_wait: tuple[RpcClient, float] | None = None

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

    @staticmethod
    def _chain_is_current(group: LocalGroup) -> bool:
        key, state = group.session.outbound, group.session.state
        return key is not None and state.key_epoch <= key.epoch <= state.epoch and group.sent_key == key.key_id

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
            payloads.append({"devices": [address], "ciphertext": self._sessions.encrypt(address, plaintexts[user])[0]})
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
                    except RECOVERABLE_ERRORS as exc:
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
