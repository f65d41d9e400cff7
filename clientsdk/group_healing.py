"""Healing in groups: held messages, sender-key requests and answers (``clientsdk.groups`` mixes it in).

Why its own module: this is the part of groups that turns "I cannot read this" into
either the message or ONE visible event, never a silent loss (LESSONS #1, #8, #9):

* A shared message under a key id I do not hold is *held* (persisted, bounded) and
  its sender device is asked, over our pairwise session, for its chain
  (``sender_key_request``, at most once a minute per group and device, at most
  ``MAX_REQUESTS`` unanswered).  The sender answers only a listed device of a
  current member, with its chain from the held message's iteration on — never from
  before the iteration that device was first given (``LocalGroup.anchor``/``given``).
* Held messages that still fail, or wait longer than ``HOLD_MS``, become ONE
  ``SecurityEvent("decryption_failed")`` per sender device plus a notice in the
  group's history.
* Group content for a group this device does not know yet (a new device of mine
  before its ``sync``) is held the same way and processed once the group is known.

The book of held messages and requests is ``KeyRecovery`` (``clientsdk.group_records``),
stored in one row; requests and answers are sent by the group background task.
"""

from __future__ import annotations

import logging
import secrets
from typing import TYPE_CHECKING, Any

from clientsdk.client_parts import ClientParts
from clientsdk.content import SENDER_KEY_REQUEST, Content
from clientsdk.crypto.errors import CryptoError
from clientsdk.crypto.sender_keys import GroupPlaintext, UnknownSenderKey
from clientsdk.errors import MAX_STALE_RETRIES, RECOVERABLE_ERRORS
from clientsdk.events import Event, SecurityEvent
from clientsdk.group_records import (
    HOLDS_KV,
    GroupBundle,
    Held,
    KeyRequest,
    LocalGroup,
    conversation_of,
)
from clientsdk.store import Batch, HistoryEntry
from federation.addresses import DeviceAddress
from federation.transport import TransportClosed

log = logging.getLogger(__name__)



class GroupHealingMixin(ClientParts):
    """Held group messages and sender-key requests/answers of ``Client`` (book: ``self._recovery``)."""

    _groups: dict[bytes, LocalGroup] | None

    if TYPE_CHECKING:   # a stub here would shadow the real method of the mixin that follows in the MRO
        # clientsdk.group_store
        async def _group(self, gid: bytes) -> LocalGroup: ...

        # clientsdk.group_receive
        def _group_message(self, group: LocalGroup, sender: DeviceAddress, plain: GroupPlaintext,
                           batch: Batch) -> list[Event]: ...

        async def _release_bundles(self, gid: bytes, batch: Batch) -> list[Event]: ...

        # clientsdk.groups
        @staticmethod
        def _chain_is_current(group: LocalGroup) -> bool: ...

        def _pairwise(self, targets: list[str], users: list[str], message_id: str, sent_ms: int, bundle: bytes,
                      special: dict[str, bytes], batch: Batch) -> list[dict[str, Any]]: ...

        async def _send_or_stale(self, message_id: str, payloads: list[dict[str, Any]]) -> bool: ...

    # --- held messages ----------------------------------------------------------------------------

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

    # --- sender-key requests and answers ----------------------------------------------------------

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
            except RECOVERABLE_ERRORS as exc:
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
            except RECOVERABLE_ERRORS as exc:
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
