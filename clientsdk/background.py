"""Receipts, typing, presence, and what the client sends on its own (delivery receipts, session resets).

Why its own module: these are all small encrypted sends on top of the one send
path (``Client._send_content``), and the automatic ones run in a background task of
each connection so that receiving never waits for them.  ``Client`` mixes this in.

* Delivery receipts are queued once the received message is stored (and acked)
  and sent in one receipt per conversation; read receipts are ``mark_read``.  Both
  are stored messages, so an offline sender gets them later.  A queued delivery
  receipt is in memory only: a crash before it goes out loses the receipt, never a
  message.
* Typing and presence are ``ephemeral`` sends: connected devices only, never stored
  by the server (LESSONS #7).
* A pending session reset (``clientsdk.resets``) claims a fresh bundle for the
  device, starts a new session in front of the old ones and sends a
  ``session_reset`` content through it, so the peer's next message uses it.
"""

from __future__ import annotations

import logging
import secrets
from collections.abc import Iterable
from typing import Any

import trio

from clientsdk.client_parts import ClientParts
from clientsdk.content import (
    DELIVERED,
    MAX_REFS,
    PRESENCE,
    READ,
    RECEIPT,
    SESSION_RESET,
    TYPING,
    Content,
)
from clientsdk.crypto.session import Session
from clientsdk.errors import RECOVERABLE_ERRORS, SdkError, SendFailed
from clientsdk.events import Event, MessageReceived
from clientsdk.resets import KV_NAME
from clientsdk.sessions import verified_bundle
from clientsdk.store import Batch
from federation.addresses import DeviceAddress, UserAddress
from federation.keys import BadBundle

log = logging.getLogger(__name__)

PRESENCE_STATES = frozenset({"online", "away", "busy", "offline"})
MAX_STATUS_CHARS = 200


def _new_id() -> str:
    return secrets.token_hex(16)


class BackgroundMixin(ClientParts):
    def _template(self, kind: str, *, refs: Iterable[str] = (), state: str = "", text: str = "") -> Content:
        return Content(kind, _new_id(), "", text, self._clock(), 0, bytes(32), tuple(refs), state)

    # --- public ------------------------------------------------------------------------

    async def mark_read(self, message_id: str) -> None:
        """Tell the sender (and my other devices) that I read this received message (a stored receipt)."""
        entry = await trio.to_thread.run_sync(self._store.find_message, message_id, limiter=self._store_limiter)
        if entry is None or entry.kind != "text":
            raise SendFailed("no such message in the history", code="not_found")
        if entry.outgoing:
            return                                   # my own message: nothing to acknowledge
        await self._send_content([entry.conversation], self._template(RECEIPT, refs=[message_id], state=READ))

    async def set_typing(self, user: str, typing: bool) -> None:
        """Show ``user`` that I am (or stopped) typing to them: ephemeral, never stored by the server."""
        user = str(UserAddress.parse(user))
        await self._send_content([user], self._template(TYPING, state=TYPING if typing else "stopped"),
                                 ephemeral=True)

    async def set_presence(self, state: str, status: str = "", *, to: Iterable[str] | None = None) -> None:
        """Tell my contacts (or ``to``) and my other devices my presence: ephemeral, never stored.

        ``state`` is ``online``, ``away``, ``busy`` or ``offline``; ``status`` a short text.
        Contacts whose keys cannot be used right now (a changed master key, a refused
        list) are skipped rather than failing the whole update.
        """
        if state not in PRESENCE_STATES:
            raise ValueError(f"presence state must be one of {sorted(PRESENCE_STATES)}")
        if len(status) > MAX_STATUS_CHARS:
            raise ValueError(f"a status has at most {MAX_STATUS_CHARS} characters")
        users = sorted({str(UserAddress.parse(u)) for u in to} if to is not None
                       else {u for u in self._book.contacts if u != self.user})
        rpc = await self._wait_rpc()
        usable = []
        for user in users:
            try:
                await self._device_list(rpc, user)
                usable.append(user)
            except SdkError as exc:
                log.info("presence not sent to a contact: %s", exc.code)
        await self._send_content(usable, self._template(PRESENCE, state=state, text=status), ephemeral=True)

    # --- automatic sends -----------------------------------------------------------------

    def _queue_delivery_receipts(self, events: list[Event]) -> None:
        """Called once received messages are stored: their senders get a delivery receipt soon."""
        if not self._send_receipts:
            return
        for event in events:
            if isinstance(event, MessageReceived) and not event.outgoing:
                self._receipts_due.setdefault(event.conversation, []).append(event.message_id)
                self._work_ready.set()

    async def _background_sends(self) -> None:
        """Per connection: send pending session resets, then queued delivery receipts, whenever woken."""
        while True:
            await self._work_ready.wait()
            self._work_ready = trio.Event()
            for device in sorted(self._resets.unsent):
                try:
                    await self._perform_reset(device)
                except RECOVERABLE_ERRORS as exc:
                    # Stays pending: tried again on the next wake-up or connect.
                    log.info("session reset with %s not sent yet: %s", device, type(exc).__name__)
            for conversation in list(self._receipts_due):
                ids = self._receipts_due[conversation][:MAX_REFS]
                try:
                    await self._send_content([conversation], self._template(RECEIPT, refs=ids, state=DELIVERED))
                except RECOVERABLE_ERRORS as exc:
                    log.info("delivery receipt dropped: %s", type(exc).__name__)
                remaining = self._receipts_due.get(conversation, [])[len(ids):]
                if remaining:
                    self._receipts_due[conversation] = remaining
                    self._work_ready.set()
                else:
                    self._receipts_due.pop(conversation, None)

    async def _perform_reset(self, device: str) -> None:
        """Fresh PQXDH session with ``device`` (a newly claimed bundle), announced through it."""
        rpc = await self._wait_rpc()
        parsed = DeviceAddress.parse(device)
        user = str(parsed.user)
        await self._device_list(rpc, user)
        if self._book.listed_key(device) is None:
            async with self._lock:
                self._resets.forget(device)
                await self._persist(Batch(kv={KV_NAME: self._resets.to_bytes()}))
            return
        answer: dict[str, Any] = await rpc.request("claim", user=user, device_ids=[parsed.device_id])
        raw = [b for b in answer.get("bundles", []) if isinstance(b, dict) and b.get("device") == device]
        if not raw:
            raise SendFailed("the device has no prekeys to restart the session", code="no_prekeys")
        async with self._lock:
            try:
                bundle = verified_bundle(raw[0], self._book.listed_key)
            except BadBundle:
                raise SendFailed("the device's prekey bundle was refused", code="bad_bundle") from None
            self._sessions.add(device, Session.initiate(self._identity, self.address, bundle))
            await self._persist(Batch(sessions={device: self._sessions.state_bytes(device)}))
        await self._send_content([user], self._template(SESSION_RESET, refs=[device]))
        async with self._lock:
            self._resets.sent(device)
            await self._persist(Batch(kv={KV_NAME: self._resets.to_bytes()}))
        log.info("session with %s restarted", device)
