"""History transfer to a newly linked device (LESSONS #9: linked devices must not start empty).

Why it is shaped this way:

* **Who sends.**  Only the master device approves a device, so it shares its view when
  it approves (``approve_device`` / ``approve_link``, ``share_history=True`` by default):
  contacts with their trust state and the last ``MAX_MESSAGES_PER_CONVERSATION``
  messages of every conversation (1:1 and group conversations), newest first within
  ``MAX_TRANSFER_BYTES`` in all.  Whatever the caps leave out is counted (``omitted``)
  and reported to the new device.  Group *memberships* are not in the bundle: the
  groups module sends every new own device each group's replica when the master
  device lists it (``GroupsMixin._sync_new_own_devices``), one mechanism for that.
* **How it travels.**  As stored pairwise messages to that one device (end-to-end
  encrypted, durable, acknowledged like every message), in chunks of at most
  ``CHUNK_BYTES`` so every ciphertext stays far below the 1 MiB frame limit.  The
  server requires every send to cover all my other current devices, so they get the
  same content type *without* the bundle, which they ignore.
* **When.**  The bulk goes to the device while it is still *pending* (a pending device
  receives from its own user's devices), before the list that makes it current is
  signed: the history lands in its mailbox ahead of any live message, so ``history()``
  keeps its order.  After the list is published a *final* chunk carries what was
  stored meanwhile (the receiver skips ids it already has) and the omitted count.
* **Who is believed.**  The new device imports a chunk only from its own user's master
  device — the device the master-key-signed list names first (``devices.master_first``)
  — and only if the chunk names this device; anything else is ignored.  Each chunk is
  imported in the same store hop as its envelope's dedupe key (before the ack); the
  final one yields ONE ``HistoryImported`` event with the counts.

Wire (content ``type = "history"``, inside the usual content map, field ``history``):
``canonical {v: 1, transfer: bin(16), index: uint, final: bool, device: str (target
device id), contacts: [{user, v, master_key, trust, min_version [, list]}], messages:
[{conversation, device, id, text, sent_ms, received_ms, outgoing, kind}], omitted: uint}``.
A content of this type without ``history`` is the stub the other devices get.
Unknown versions are refused.
"""

from __future__ import annotations

import logging
import os
import secrets
from collections.abc import Iterable
from dataclasses import dataclass
from dataclasses import field as dc_field
from typing import Any

import trio

from clientsdk.client_parts import ClientParts
from clientsdk.contacts import TOFU, VERIFIED, Contact
from clientsdk.content import Content
from clientsdk.crypto.errors import MalformedMessage, UnsupportedVersion
from clientsdk.crypto.identity import resign_device_list
from clientsdk.crypto.primitives import ct_equal
from clientsdk.crypto.session import Session
from clientsdk.devices import master_device_id
from clientsdk.errors import (
    MAX_STALE_RETRIES,
    RECOVERABLE_ERRORS,
    TRANSIENT_CODES,
    KeysUnavailable,
    SdkError,
    SendFailed,
    StoreCorrupted,
    StoreVersionUnsupported,
)
from clientsdk.events import Event, HistoryImported
from clientsdk.sessions import verified_bundle
from clientsdk.store import Batch, HistoryEntry
from federation import codec
from federation.addresses import DeviceAddress, UserAddress
from federation.errors import CodecError, ErrorCode, ProtocolError
from federation.keys import BadBundle
from federation.rpc import RemoteError, RpcClient
from federation.transport import TransportClosed
from federation.validate import field, non_negative, require_map

log = logging.getLogger(__name__)

HISTORY_CONTENT = "history"
CHUNK_VERSION = 1
PROGRESS_VERSION = 1
PROGRESS_KV = "history_import"
MAX_MESSAGES_PER_CONVERSATION = 500          # the most recent ones of each conversation
MAX_TRANSFER_BYTES = 8 << 20                 # contacts and messages together (encoded)
CHUNK_BYTES = 256 << 10                      # one chunk's encoded size: ciphertexts stay far below 1 MiB
MAX_TAIL_MESSAGES = 1_000                    # stored while the bulk was being sent
MAX_RATE_RETRIES = 5
RATE_BACKOFF_S = 1.0
_CHUNK_OVERHEAD = 256                        # the chunk map around its items
_CHUNK_LIMITS = codec.Limits(max_bytes=1 << 20, max_depth=6, max_items=200_000, max_container=50_000)
_SIZE_LIMITS = codec.Limits(max_bytes=64 << 20, max_depth=6, max_items=200_000, max_container=50_000)
_KINDS = ("text", "notice")


# --- wire (sans-I/O) --------------------------------------------------------------------------


def entry_to_wire(entry: HistoryEntry) -> dict[str, Any]:
    return {"conversation": entry.conversation, "device": entry.sender_device, "id": entry.message_id,
            "text": entry.text, "sent_ms": entry.sent_ms, "received_ms": entry.received_ms,
            "outgoing": entry.outgoing, "kind": entry.kind}


def entry_from_wire(obj: Any) -> HistoryEntry:
    obj = require_map(obj, "history message")
    kind = field(obj, "kind", str, max_length=16)
    if kind not in _KINDS:
        raise ProtocolError("unknown history message kind")
    return HistoryEntry(field(obj, "conversation", str, max_length=400), field(obj, "device", str, max_length=400),
                        field(obj, "id", str, max_length=128), field(obj, "text", str), field(obj, "sent_ms", int),
                        field(obj, "received_ms", int), field(obj, "outgoing", bool), kind)


def _size(obj: Any) -> int:
    return len(codec.encode(obj, _SIZE_LIMITS))


@dataclass(frozen=True, slots=True)
class HistoryChunk:
    """One part of a transfer: self-contained, so each is imported as it arrives."""

    transfer: bytes                                  # 16 random bytes naming the transfer
    index: int
    final: bool
    device: str                                      # the target device id
    contacts: tuple[dict[str, Any], ...] = ()
    messages: tuple[HistoryEntry, ...] = ()
    omitted: int = 0

    def to_bytes(self) -> bytes:
        return codec.encode({"v": CHUNK_VERSION, "transfer": self.transfer, "index": self.index, "final": self.final,
                             "device": self.device, "contacts": list(self.contacts),
                             "messages": [entry_to_wire(m) for m in self.messages], "omitted": self.omitted},
                            _CHUNK_LIMITS)

    @classmethod
    def from_bytes(cls, data: bytes) -> HistoryChunk:
        """``MalformedMessage`` / ``UnsupportedVersion`` on bad input."""
        try:
            obj = require_map(codec.decode(data, _CHUNK_LIMITS), "history chunk")
            if field(obj, "v", int) != CHUNK_VERSION:
                raise UnsupportedVersion("unknown history chunk version")
            contacts = field(obj, "contacts", list)
            if not all(isinstance(c, dict) for c in contacts):
                raise ProtocolError("history chunk contacts must be maps")
            return cls(field(obj, "transfer", bytes, length=16), non_negative(field(obj, "index", int), "index"),
                       field(obj, "final", bool), field(obj, "device", str, max_length=16), tuple(contacts),
                       tuple(entry_from_wire(m) for m in field(obj, "messages", list)),
                       non_negative(field(obj, "omitted", int), "omitted"))
        except (CodecError, ProtocolError) as exc:
            raise MalformedMessage(f"malformed history chunk: {exc.message}") from None


def select_messages(entries: list[HistoryEntry], budget: int, max_entry: int) -> tuple[list[HistoryEntry], int]:
    """The newest messages that fit ``budget`` bytes (each at most ``max_entry``), oldest first; and how many
    were left out."""
    chosen: list[HistoryEntry] = []
    used = 0
    for entry in reversed(entries):
        size = _size(entry_to_wire(entry))
        if size > max_entry or used + size > budget:
            continue
        used += size
        chosen.append(entry)
    chosen.reverse()
    return chosen, len(entries) - len(chosen)


def pack_chunks(transfer: bytes, device: str, *, contacts: Iterable[dict[str, Any]] = (),
                messages: Iterable[HistoryEntry] = (), first_index: int = 0,
                final: bool = False, omitted: int = 0, chunk_bytes: int = CHUNK_BYTES) -> list[HistoryChunk]:
    """Greedily pack items, in order, into chunks of at most ``chunk_bytes`` encoded bytes.

    An item too big for any chunk is skipped (callers select messages with
    ``select_messages`` first).  A ``final`` transfer ends with a final chunk, empty
    if nothing is left, carrying ``omitted``.
    """
    room = chunk_bytes - _CHUNK_OVERHEAD
    parts: list[dict[str, list[Any]]] = []
    current: dict[str, list[Any]] = {"contacts": [], "messages": []}
    used = 0

    def add(kind: str, item: Any, size: int) -> None:
        nonlocal current, used
        if size > room:
            log.info("a history %s item of %d bytes does not fit a chunk", kind, size)
            return
        if used + size > room:
            parts.append(current)
            current, used = {"contacts": [], "messages": []}, 0
        current[kind].append(item)
        used += size

    for contact in contacts:
        add("contacts", contact, _size(contact))
    for entry in messages:
        add("messages", entry, _size(entry_to_wire(entry)))
    if any(current.values()) or (final and not parts):
        parts.append(current)
    return [HistoryChunk(transfer, first_index + i, final and i == len(parts) - 1, device,
                         tuple(p["contacts"]), tuple(p["messages"]),
                         omitted if final and i == len(parts) - 1 else 0)
            for i, p in enumerate(parts)]


@dataclass(slots=True)
class ImportProgress:
    """What the new device imported of one transfer so far (persisted: chunks arrive in several batches)."""

    transfer: bytes = b""
    messages: int = 0
    conversations: set[str] = dc_field(default_factory=set)
    contacts: int = 0

    def to_bytes(self) -> bytes:
        return codec.encode({"v": PROGRESS_VERSION, "transfer": self.transfer, "messages": self.messages,
                             "conversations": sorted(self.conversations), "contacts": self.contacts},
                            _CHUNK_LIMITS)

    @classmethod
    def from_bytes(cls, data: bytes) -> ImportProgress:
        try:
            obj = require_map(codec.decode(data, _CHUNK_LIMITS), "history import progress")
            if field(obj, "v", int) != PROGRESS_VERSION:
                raise StoreVersionUnsupported("the history import record has an unknown version")
            conversations = field(obj, "conversations", list)
            if not all(isinstance(c, str) for c in conversations):
                raise ProtocolError("conversations must be strings")
            return cls(field(obj, "transfer", bytes), field(obj, "messages", int), set(conversations),
                       field(obj, "contacts", int))
        except (CodecError, ProtocolError):
            raise StoreCorrupted("the history import record does not parse") from None


@dataclass(slots=True)
class Transfer:
    """The master device's side of one transfer, between the bulk (device pending) and the final chunk."""

    transfer: bytes
    device: str                  # device address
    identity_key: bytes          # pinned by the linking code
    last_seq: int                # history rows up to here went in the bulk
    next_index: int
    omitted: int
    budget: int                  # bytes left under MAX_TRANSFER_BYTES


# --- the mixin ----------------------------------------------------------------------------------


class HistoryMixin(ClientParts):
    """History transfer of ``Client``: sending (master device) and importing (new device)."""

    _history_progress: ImportProgress | None = None

    # --- master device: sending -----------------------------------------------------------

    async def _share_history(self, device_id: str, identity_key: bytes) -> Transfer | None:
        """Send the bulk of the history to the pending device ``device_id``; None if there is nothing to share.

        A failure is logged and does not stop the approval: the device is linked, only
        without (all of) the history.
        """
        try:
            entries, last_seq, total = await trio.to_thread.run_sync(
                self._store.recent_history, MAX_MESSAGES_PER_CONVERSATION, limiter=self._store_limiter)
            contacts = self._shared_contacts()
            if not (entries or contacts):
                return None
            await self._list_me_first()
            budget = MAX_TRANSFER_BYTES - sum(_size(c) for c in contacts)
            chosen, dropped = select_messages(entries, budget, CHUNK_BYTES - _CHUNK_OVERHEAD)
            transfer = Transfer(os.urandom(16), f"{self.user}/{device_id}", identity_key, last_seq, 0,
                                total - len(entries) + dropped,
                                budget - sum(_size(entry_to_wire(e)) for e in chosen))
            chunks = pack_chunks(transfer.transfer, device_id, contacts=contacts, messages=chosen,
                                 chunk_bytes=CHUNK_BYTES)
            for chunk in chunks:
                await self._send_history_chunk(transfer, chunk)
            transfer.next_index = len(chunks)
            log.info("history shared with %s: %d messages in %d chunks", device_id, len(chosen), len(chunks))
            return transfer
        except RECOVERABLE_ERRORS as exc:
            log.warning("history not shared with %s: %s", device_id, type(exc).__name__)
            return None

    async def _finish_history(self, transfer: Transfer) -> None:
        """After the device is listed: what was stored meanwhile, and the final chunk with the counts."""
        try:
            tail, _ = await trio.to_thread.run_sync(self._store.history_after, transfer.last_seq, MAX_TAIL_MESSAGES,
                                                    limiter=self._store_limiter)
            chosen, dropped = select_messages(tail, transfer.budget, CHUNK_BYTES - _CHUNK_OVERHEAD)
            device_id = transfer.device.partition("/")[2]
            for chunk in pack_chunks(transfer.transfer, device_id, messages=chosen, first_index=transfer.next_index,
                                     final=True, omitted=transfer.omitted + dropped, chunk_bytes=CHUNK_BYTES):
                await self._send_history_chunk(transfer, chunk)
        except RECOVERABLE_ERRORS as exc:
            log.warning("history transfer to %s not finished: %s", transfer.device, type(exc).__name__)

    def _shared_contacts(self) -> list[dict[str, Any]]:
        return [{**contact.to_record(), "user": user} for user, contact in sorted(self._book.contacts.items())
                if user != self.user and contact.trust in (TOFU, VERIFIED)]

    async def _list_me_first(self) -> None:
        """Make sure the signed list names this (master) device first, so the new device believes it."""
        if self._master is None:
            raise SendFailed("only the master device shares history", code="not_master_device")
        rpc = await self._wait_rpc()
        current = await self._device_list(rpc, self.user, force=True)
        if master_device_id(current.device_list) != self.device_id:
            await self._publish_own_list(rpc, resign_device_list(self._master, current.device_list, self._clock()))

    async def _send_history_chunk(self, transfer: Transfer, chunk: HistoryChunk) -> None:
        message_id = secrets.token_hex(16)
        template = Content(HISTORY_CONTENT, message_id, self.user, "", self._clock(), 0, bytes(32))
        base = codec.decode(self._content_for(template, self.user, [self.user]))
        private = codec.encode({**base, "history": chunk.to_bytes()})
        await self._send_to_own_device(transfer.device, transfer.identity_key, message_id, private,
                                       codec.encode(base))

    async def _send_to_own_device(self, device: str, identity_key: bytes, message_id: str, private: bytes,
                                  stub: bytes) -> None:
        """One send op: ``private`` to ``device`` (listed or still pending), ``stub`` to my other devices."""
        stale = rate = 0
        while True:
            rpc = await self._wait_rpc()
            try:
                targets = [t for t in await self._targets(rpc, []) if t != device]
                await self._ensure_sessions(rpc, targets)
                await self._ensure_pinned_session(rpc, device, identity_key)
            except TransportClosed:
                await self._until_replaced(rpc)
                continue
            async with self._lock:
                batch = Batch()
                payloads = []
                for address in [device, *targets]:
                    payloads.append({"devices": [address], "ciphertext": self._sessions.encrypt(
                        address, private if address == device else stub)[0]})
                    batch.sessions[address] = self._sessions.state_bytes(address)
                await self._persist(batch)          # ratchet steps are durable before ciphertext leaves
            try:
                await self._send_op(message_id, payloads)
                return
            except RemoteError as exc:
                if exc.code == ErrorCode.STALE_DEVICES and stale < MAX_STALE_RETRIES:
                    stale += 1
                    for user in (exc.details or {}):
                        self._book.mark_stale(str(user))
                    continue
                if exc.code == ErrorCode.RATE_LIMITED and rate < MAX_RATE_RETRIES:
                    rate += 1
                    await trio.sleep(RATE_BACKOFF_S * rate)
                    continue
                raise SendFailed(f"the server refused the history: {exc.code.value}", code=exc.code.value) from None

    async def _ensure_pinned_session(self, rpc: RpcClient, device: str, identity_key: bytes) -> None:
        """A session with ``device`` whose bundle verifies under the key its linking code pinned."""
        if self._sessions.has(device):
            return
        parsed = DeviceAddress.parse(device)
        answer = await rpc.request("claim", user=str(parsed.user), device_ids=[parsed.device_id])
        raw = [b for b in answer.get("bundles", []) if isinstance(b, dict) and b.get("device") == device]
        if not raw:
            raise SendFailed("the new device has no prekeys", code="no_prekeys")
        async with self._lock:
            try:
                bundle = verified_bundle(raw[0], lambda address: identity_key if address == device else None)
            except BadBundle:
                raise SendFailed("the new device's prekey bundle was refused", code="bad_bundle") from None
            if not self._sessions.has(device):
                self._sessions.add(device, Session.initiate(self._identity, self.address, bundle))
                await self._persist(Batch(sessions={device: self._sessions.state_bytes(device)}))

    # --- new device: importing (called by the inbox, under the client lock) ----------------

    async def _receive_history(self, rpc: RpcClient, sender: DeviceAddress, plaintext: bytes,
                               batch: Batch) -> Event | None:
        """Import one chunk from my master device into ``batch``; the final chunk gives ``HistoryImported``."""
        if str(sender.user) != self.user:
            log.info("history content from another user's device %s ignored", sender)
            return None
        raw = require_map(codec.decode(plaintext), "content").get("history")
        if raw is None:
            return None                               # the stub: the history went to another device of mine
        try:
            if not isinstance(raw, bytes):
                raise MalformedMessage("history field must be bytes")
            chunk = HistoryChunk.from_bytes(raw)
        except (MalformedMessage, UnsupportedVersion) as exc:
            log.info("history chunk from %s refused: %s", sender, type(exc).__name__)
            return None
        if chunk.device != self.device_id:
            return None
        if not await self._from_master_device(rpc, sender):
            log.warning("history chunk from %s ignored: not my master device", sender)
            return None
        progress = await self._import_progress()
        known = await trio.to_thread.run_sync(self._store.known_message_ids, [m.message_id for m in chunk.messages],
                                              limiter=self._store_limiter)
        # No await below: an interruption can only come before the first change (inbox rule).
        if not ct_equal(progress.transfer, chunk.transfer):
            progress = self._history_progress = ImportProgress(chunk.transfer)
        for item in chunk.contacts:
            if self._import_contact(item, batch):
                progress.contacts += 1
        known |= {m.message_id for m in batch.messages}
        for entry in chunk.messages:
            if entry.message_id in known:
                continue
            known.add(entry.message_id)
            batch.messages.append(entry)
            progress.messages += 1
            progress.conversations.add(entry.conversation)
        batch.kv[PROGRESS_KV] = progress.to_bytes()
        if not chunk.final:
            return None
        return HistoryImported(str(sender), progress.messages, len(progress.conversations), progress.contacts,
                               chunk.omitted)

    async def _from_master_device(self, rpc: RpcClient, sender: DeviceAddress) -> bool:
        """Is ``sender`` the device my user's master-key-signed list names first (re-fetched once if not)?"""
        own = self._book.current(self.user)
        if own is not None and master_device_id(own.device_list) == sender.device_id:
            return True
        try:
            own = await self._device_list(rpc, self.user, force=True, have_lock=True)
        except RemoteError as exc:
            if exc.code in TRANSIENT_CODES:        # not now: the chunk comes again (inbox rolls back)
                raise KeysUnavailable(f"my device list is unavailable ({exc.code.value})") from exc
            return False
        except SdkError:
            return False
        return master_device_id(own.device_list) == sender.device_id

    async def _import_progress(self) -> ImportProgress:
        if self._history_progress is None:
            raw = await trio.to_thread.run_sync(self._store.get_kv, PROGRESS_KV, limiter=self._store_limiter)
            self._history_progress = ImportProgress.from_bytes(raw) if raw is not None else ImportProgress()
        return self._history_progress

    def _import_contact(self, item: dict[str, Any], batch: Batch) -> bool:
        """Take the master device's trust decision for a contact (its pin wins over a fresh TOFU of mine)."""
        try:
            user = str(UserAddress.parse(field(item, "user", str)))     # missing or not a str: ProtocolError
            incoming = Contact.from_record(user, {k: v for k, v in item.items() if k != "user"})
        except (ProtocolError, StoreCorrupted):
            log.info("a contact in a history chunk does not parse")
            return False
        if user == self.user or incoming.trust not in (TOFU, VERIFIED):
            return False
        mine = self._book.contacts.get(user)
        if mine is None or not ct_equal(mine.master_key, incoming.master_key):
            # The master device trusted this key first; if the server now reports another,
            # the next fetch applies the key-change policy (event; a verified contact stops).
            incoming.stale = mine is not None
            self._book.contacts[user] = incoming
        elif incoming.trust == VERIFIED and mine.trust != VERIFIED:
            mine.trust = VERIFIED
        else:
            return True
        batch.contacts[user] = self._book.record(user)
        return True
