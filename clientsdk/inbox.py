"""The receiving half of the client: envelopes in, events and stored history out.

Why its own module: receiving has the strictest ordering rule of the SDK — decrypt,
store the new session state, the history entry and the dedupe key in ONE store
hop, emit the events, and only then acknowledge — and it reads best on its own.
``Client`` mixes this in; the attributes below are the client's.
"""

from __future__ import annotations

import logging
import secrets
from typing import TYPE_CHECKING, Any

import trio

from clientsdk.client_parts import ClientParts
from clientsdk.content import SENDER_KEY_REQUEST, SESSION_RESET, Content, content_event
from clientsdk.crypto.errors import CryptoError
from clientsdk.crypto.identity import PrekeyStore
from clientsdk.crypto.session import PrekeyMessage, message_from_wire, parse_message
from clientsdk.errors import TRANSIENT_CODES, ContactKeyChanged, KeysUnavailable, SdkError, SendFailed
from clientsdk.events import Event, MessageReceived, SecurityEvent
from clientsdk.group_records import is_group_wire
from clientsdk.groups import GROUP_CONTENT
from clientsdk.history import HISTORY_CONTENT
from clientsdk.resets import KV_NAME as RESETS_KV
from clientsdk.resets import ResetDecision
from clientsdk.sessions import NoSession
from clientsdk.store import Batch, HistoryEntry
from federation import codec
from federation.addresses import DeviceAddress
from federation.errors import CodecError, ProtocolError
from federation.rpc import RemoteError, RpcClient
from federation.transport import TransportClosed

log = logging.getLogger(__name__)

def _decoded(ciphertext: bytes) -> object:
    """An envelope's ciphertext decoded, or None if it is not canonical msgpack."""
    try:
        return codec.decode(ciphertext)
    except CodecError:
        return None


def _interrupted(exc: BaseException) -> bool:
    """An error that says "not now" (the envelope comes again and can succeed), not "never"."""
    if isinstance(exc, (trio.Cancelled, TransportClosed, trio.BrokenResourceError, trio.ClosedResourceError,
                        KeysUnavailable)):
        return True
    return isinstance(exc, RemoteError) and exc.code in TRANSIENT_CODES


class _UndoPoint:
    """Where a sender's sessions (and, for a prekey message, the prekey store) stood before a decryption."""

    __slots__ = ("sender", "sessions", "prekeys")

    def __init__(self, sender: str, sessions: bytes | None) -> None:
        self.sender = sender
        self.sessions = sessions            # None: there was no session with the sender
        self.prekeys: bytes | None = None   # set when accepting a prekey message takes a one-time prekey


class InboxMixin(ClientParts):
    _prekeys_changed = False          # a prekey message was accepted since the prekey store was last stored
    _live_after: tuple[RpcClient, int] | None = None    # (connection, seq of its backlog_done push)

    if TYPE_CHECKING:   # a stub here would shadow the real method (of a mixin that follows in the MRO)
        async def _receive_group_message(self, sender: DeviceAddress, ciphertext: bytes,
                                         batch: Batch) -> list[Event]: ...          # clientsdk.groups

        async def _receive_group_content(self, sender: DeviceAddress, plaintext: bytes, content: Content,
                                         batch: Batch) -> list[Event]: ...          # clientsdk.groups

        async def _receive_key_request(self, sender: DeviceAddress, content: Content,
                                       batch: Batch) -> Event | None: ...          # clientsdk.groups

        async def _receive_history(self, rpc: RpcClient, sender: DeviceAddress, plaintext: bytes,
                                   batch: Batch) -> Event | None: ...                # clientsdk.history

        def _key_change_pending(self, user: str) -> bool: ...                       # clientsdk.verify

        async def _hold_for_key_change(self, sender: DeviceAddress, fields: dict[str, Any],
                                       batch: Batch) -> Event | None: ...           # clientsdk.verify

    async def _handle_envelopes(self, rpc: RpcClient, pushes: list[Any]) -> None:
        """Decrypt a batch, store events and state in one hop, emit, then ack (never before storing)."""
        keys = [f"{p.fields.get('sender')}|{p.fields.get('message_id')}" for p in pushes]
        events: list[Event] = []
        acks: list[int] = []
        async with self._lock:
            unseen = self._unseen_keys(rpc, pushes, keys)
            done: set[str] = set()
            if len(unseen) < len(keys):           # only envelopes that may have come before: one read hop
                done = await trio.to_thread.run_sync(self._store.processed, [k for k in keys if k not in unseen],
                                                     limiter=self._store_limiter)
            batch = Batch()
            kept: set[object] = set()             # senders with an envelope kept for later
            try:
                for push, key in zip(pushes, keys):
                    seq = push.fields.get("seq")
                    if key not in done and key not in batch.processed:
                        sender = push.fields.get("sender")
                        if sender in kept:
                            continue              # after a kept one of the same sender: keeps its order
                        try:
                            event = await self._receive_one(rpc, push.fields, batch)
                        except KeysUnavailable as exc:
                            log.info("envelope from %s kept for the next connection: %s", sender, exc)
                            kept.add(sender)
                            continue              # neither processed nor acked: pushed again later
                        batch.processed.add(key)      # only once handled: an interrupted one comes again
                        if isinstance(event, list):
                            events.extend(event)
                        elif event is not None:
                            events.append(event)
                    if isinstance(seq, int) and seq > 0:
                        acks.append(seq)
            finally:
                # Even when the connection drops mid-batch, what was decrypted (and moved the
                # ratchets) is stored, or its redelivery would be a replay and the message lost.
                prekeys_changed = self._prekeys_changed
                if prekeys_changed:             # else the stored prekey store is current (~0.3 ms to encode)
                    batch.kv["prekeys"] = self._prekeys.to_bytes()
                await self._persist(batch)      # shielded from its first checkpoint (GroupCommit.wait)
                if prekeys_changed:
                    self._prekeys_changed = False
                for event in events:
                    self._emit(event)
                # Stored is delivered: the receipt is queued with the event, not after the ack's
                # round trip, so a connection that ends in between loses no receipt (the
                # redelivered envelope is skipped as processed and would never queue one).
                self._queue_delivery_receipts(events)
        # Acked only now: every event of the batch, session_reset notices included, is stored.
        if acks:
            await rpc.request("ack", seqs=acks)
        if self._resets.unsent:
            self._work_ready.set()

    def _note_backlog_end(self, rpc: RpcClient, seq: object) -> None:
        """``backlog_done {seq}``: what this connection pushes with a higher seq is new to this device."""
        if type(seq) is int and seq >= 0:
            self._live_after = (rpc, seq)

    def _unseen_keys(self, rpc: RpcClient, pushes: list[Any], keys: list[str]) -> set[str]:
        """Dedupe keys that cannot be stored yet: envelopes this connection pushed after its backlog.

        Redelivery is how an envelope comes twice: on connect the server pushes what is still
        unacked, in seq order up to ``backlog_done {seq}``, then new entries with higher seqs,
        each once per connection.  An envelope an earlier connection handled was pushed to it
        before this one connected, so it is in this backlog, which is still checked.  Skipping
        the read for the rest saves a thread hop per received batch once connected.
        """
        live = self._live_after
        if live is None or live[0] is not rpc:
            return set()
        after = live[1]
        return {key for push, key in zip(pushes, keys)
                if type(seq := push.fields.get("seq")) is int and seq > after}

    async def _receive_one(self, rpc: RpcClient, fields: dict[str, Any],
                           batch: Batch) -> Event | list[Event] | None:
        sender = fields.get("sender")
        ciphertext = fields.get("ciphertext")
        try:
            if not isinstance(sender, str) or not isinstance(ciphertext, bytes):
                raise ProtocolError("malformed envelope")
            sender_address = DeviceAddress.parse(sender)
            wire = _decoded(ciphertext)             # once: the kind test and the parse share it
            if is_group_wire(wire):
                return await self._receive_group_message(sender_address, ciphertext, batch)
            undo = _UndoPoint(sender, self._sessions.state_bytes(sender) if self._sessions.has(sender) else None)
            try:
                plaintext = await self._decrypt(rpc, sender_address, ciphertext, wire, undo)
            except ContactKeyChanged:
                return await self._hold_for_key_change(sender_address, fields, batch)     # clientsdk.verify
            except CryptoError as exc:
                if not await self._is_listed(rpc, sender_address):
                    raise
                return self._undecryptable(sender_address, batch, exc)
            batch.sessions[sender] = self._sessions.state_bytes(sender)
            if self._resets.on_decrypted(sender):
                batch.kv[RESETS_KV] = self._resets.to_bytes()
            content = Content.from_bytes(plaintext)
        except KeysUnavailable:
            raise                                   # not this message's fault: it comes again
        except (CryptoError, ProtocolError, SdkError, RemoteError) as exc:
            log.info("undecryptable envelope from %s: %s", sender, type(exc).__name__)
            return SecurityEvent("decryption_failed", str(sender).partition("/")[0], str(sender),
                                 "a message could not be decrypted")
        self._book.note_sender_list(str(sender_address.user), content)
        try:
            return await self._handle_content(rpc, sender_address, plaintext, content, batch)
        except BaseException as exc:
            if _interrupted(exc):
                # Interrupted after decryption (a lost connection, keys unavailable now, a
                # closing client): the envelope is neither marked processed nor acked, so it
                # comes again, and the ratchet must be where it was or its message key is
                # spent and the redelivery ends in a session reset (LESSONS #1).  Any other
                # error would fail again on every redelivery: no undo, so the redelivered
                # copy ends in one session reset instead of blocking the inbox for good.
                self._undo_decryption(undo, batch)
            raise

    def _undo_decryption(self, undo: _UndoPoint, batch: Batch) -> None:
        if undo.sessions is None:
            self._sessions.drop(undo.sender)
            batch.sessions.pop(undo.sender, None)
        else:
            self._sessions.load(undo.sender, undo.sessions)
            batch.sessions[undo.sender] = undo.sessions
        if undo.prekeys is not None:
            self._prekeys = PrekeyStore.from_bytes(undo.prekeys)

    async def _handle_content(self, rpc: RpcClient, sender_address: DeviceAddress, plaintext: bytes,
                              content: Content, batch: Batch) -> Event | list[Event] | None:
        """What a decrypted message means; may need the store or the network (history, groups).

        Rule for every handler: all its awaits come before its first change to memory or to
        ``batch``, so an interruption (which can only happen at an await) leaves nothing
        half-applied and ``_undo_decryption`` restores the whole state.
        """
        sender = str(sender_address)
        if content.type == GROUP_CONTENT:
            return await self._receive_group_content(sender_address, plaintext, content, batch)
        if content.type == SENDER_KEY_REQUEST:
            return await self._receive_key_request(sender_address, content, batch)          # clientsdk.groups
        if content.type == HISTORY_CONTENT:
            return await self._receive_history(rpc, sender_address, plaintext, batch)      # clientsdk.history
        if content.type == SESSION_RESET:
            log.info("%s restarted its session with %s", sender, self.address)
        event = content_event(content, sender_address, self.user, self._clock())
        if isinstance(event, MessageReceived):
            batch.messages.append(HistoryEntry(event.conversation, sender, event.message_id, event.text,
                                               event.sent_ms, event.received_ms, event.outgoing))
        return event

    async def _is_listed(self, rpc: RpcClient, sender: DeviceAddress) -> bool:
        """Is the device in its user's signed list?  A known contact's list is re-fetched once if not;
        a stranger's is not fetched (garbage from anyone must not make us trust-on-first-use them)."""
        if self._book.listed_key(str(sender)) is not None:
            return True
        user = str(sender.user)
        if user not in self._book.contacts:
            return False
        try:
            await self._device_list(rpc, user, force=True, have_lock=True)
        except (SdkError, RemoteError):
            return False
        return self._book.listed_key(str(sender)) is not None

    def _undecryptable(self, sender: DeviceAddress, batch: Batch, exc: CryptoError) -> Event | None:
        """A listed device's message failed to decrypt: heal the session (rate-limited), tell the app once.

        The notice goes into the conversation's history in the same store hop as the
        batch, before the envelope is acked, so the loss is never silent.
        """
        device = str(sender)
        user = str(sender.user)
        now = self._clock()
        decision = self._resets.on_failure(device, now)
        log.info("undecryptable message from %s (%s): %s", device, type(exc).__name__, decision.value)
        if decision is ResetDecision.FOLD:
            return None
        if decision is ResetDecision.RATE_LIMITED:
            return SecurityEvent("decryption_failed", user, device, "a message could not be decrypted")
        batch.kv[RESETS_KV] = self._resets.to_bytes()
        detail = "a message could not be decrypted; a new secure session was started with this device"
        batch.messages.append(HistoryEntry(user, device, f"reset-{secrets.token_hex(12)}", detail, now, now,
                                           user == self.user, kind="notice"))
        return SecurityEvent("session_reset", user, device, detail)

    async def _decrypt(self, rpc: RpcClient, sender: DeviceAddress, ciphertext: bytes, wire: object,
                       undo: _UndoPoint) -> bytes:
        """``wire`` is ``ciphertext`` decoded, or None if it did not decode (``parse_message`` says why)."""
        message = parse_message(ciphertext) if wire is None else message_from_wire(wire)
        plaintext = self._sessions.decrypt_existing(str(sender), message, self._clock())
        if plaintext is None and isinstance(message, PrekeyMessage):
            identity_key = await self._sender_identity_key(rpc, sender)
            undo.prekeys = self._prekeys.to_bytes()
            self._prekeys_changed = True            # accepting deletes a one-time prekey: store them with the batch
            plaintext = self._sessions.accept(self._identity, self.address, self._prekeys, sender, identity_key,
                                              message, self._clock())
        if plaintext is None:
            raise NoSession("no session with the sender device")
        return plaintext

    async def _sender_identity_key(self, rpc: RpcClient, sender: DeviceAddress) -> bytes:
        """The sender device's identity key from its user's verified list (re-fetched once if unknown)."""
        key = self._book.listed_key(str(sender))
        if key is None and self._key_change_pending(str(sender.user)):
            raise ContactKeyChanged("the sender's master key changed and is not accepted yet")
        if key is None:
            try:
                await self._device_list(rpc, str(sender.user), force=True, have_lock=True)
            except RemoteError as exc:
                if exc.code in TRANSIENT_CODES:
                    raise KeysUnavailable(f"the sender's device list is unavailable ({exc.code.value})") from exc
                raise
            key = self._book.listed_key(str(sender))
        if key is None:
            raise SendFailed("the sender device is not in its user's signed list", code="unknown_sender_device")
        return key
