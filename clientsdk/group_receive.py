"""Receiving in groups: pairwise group bundles and shared sender-key messages (``clientsdk.groups`` mixes it in).

Why its own module: everything here runs inside the inbox's one store hop — called
by ``clientsdk.inbox`` under the client lock, adding history entries and group rows
to the inbox's batch — and sends nothing: what must go out (a rebased change of
mine, a key request) is queued and the group background task woken.  A bundle
(format in the ``clientsdk.groups`` docstring) is processed in a fixed order:
welcome or sync, then admin-signed controls, then the sender's chain, then the
message it unlocks, so a key always arrives before the message it is for
(LESSONS #1).  What cannot be read yet is held, and its sender asked for its key,
by ``clientsdk.group_healing``.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from clientsdk.client_parts import ClientParts
from clientsdk.content import Content
from clientsdk.crypto.errors import CryptoError, MalformedMessage
from clientsdk.crypto.group_session import GroupSession
from clientsdk.crypto.group_state import GroupReplica, SignedChange
from clientsdk.crypto.sender_keys import GroupMessage, GroupPlaintext, UnknownSenderKey
from clientsdk.events import Event, SecurityEvent
from clientsdk.group_records import (
    HOLDS_KV,
    GroupBundle,
    GroupMessageReceived,
    Held,
    LocalGroup,
    changed_event,
    conversation_of,
    decode_body,
    describe,
    replica_for,
)
from clientsdk.store import Batch, HistoryEntry
from federation import codec
from federation.addresses import DeviceAddress
from federation.errors import CodecError, ProtocolError
from federation.validate import require_map

log = logging.getLogger(__name__)


class GroupReceiveMixin(ClientParts):
    """Group contents in (the inbox calls ``_receive_group_content`` and ``_receive_group_message``)."""

    if TYPE_CHECKING:   # a stub here would shadow the real method of the mixin that follows in the MRO
        # clientsdk.group_store
        def _resolve(self, device: DeviceAddress) -> bytes | None: ...

        # clientsdk.group_healing
        def _hold_bundle(self, sender: DeviceAddress, gid: bytes, plaintext: bytes, bundle: GroupBundle,
                         batch: Batch) -> list[Event]: ...

        def _retry_held(self, group: LocalGroup, sender: DeviceAddress, reply: bytes | None,
                        batch: Batch) -> list[Event]: ...

        def _report_lost(self, lost: list[Held], batch: Batch, group_id: bytes | None = None) -> list[Event]: ...

        # clientsdk.groups
        def _queue_control(self, group: LocalGroup, signed: SignedChange, before: list[str]) -> None: ...

    # --- pairwise group bundles -------------------------------------------------------------------

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
        # Groups are loaded by now, so this await never suspends: nothing can interrupt
        # between the changes above and the end (the inbox's undo rule).
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

    # --- shared sender-key messages ---------------------------------------------------------------

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
        unreadable: list[Event] = [SecurityEvent("decryption_failed", str(sender.user), str(sender),
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
