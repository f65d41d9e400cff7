"""Contact verification on the client: safety numbers, QR codes, trust states and key changes (DESIGN §4).

Why a mixin of its own: the crypto (``clientsdk.crypto.verification``) is sans-I/O
and knows nothing of contacts; this module ties it to the contact book and the
store.  Trust states a user sees:

- ``unverified``: the master key was trusted on first use;
- ``verified``: the humans compared safety numbers (``mark_verified``) or a scanned
  QR code matched (``verify_scanned``);
- ``changed``: the server now reports another master key for a *verified* contact.
  Sending to the contact stops (``ContactKeyChanged``) until ``accept_key_change``,
  which trusts the new key as *unverified* — the contact must be verified again.
  (An *unverified* contact's new key is trusted on first use again at once, with a
  ``master_key_changed`` event: see ``clientsdk.devicelists``.)

Receiving follows the same rule: while a verified contact's key change waits, a
message from a device that only the new, unaccepted key lists is neither decrypted
nor shown; its envelope is *held* (sealed in the store, at most ``MAX_HELD``
envelopes / ``MAX_HELD_BYTES``, 30 days) with one ``message_held`` security event,
and processed as if just received once the user accepts the key.  Devices the
trusted list names keep working throughout.

The trusted key in the store stays the old one until the change is accepted, so a
restart that forgets the ``changed`` marker finds the change again on the next fetch.
Contact codes only help find the right account: a ``LookupHint`` never changes trust.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum
from typing import TYPE_CHECKING, Any

import trio

from clientsdk.client_parts import ClientParts
from clientsdk.contacts import TOFU, VERIFIED
from clientsdk.crypto.primitives import ct_equal
from clientsdk.crypto.verification import (
    ContactCode, LookupHint, Party, ScanVerdict, compare_scanned, qr_payload, safety_number,
)
from clientsdk.devicelists import ContactBook, ListOutcome
from clientsdk.errors import ContactKeyChanged, SdkError, StoreCorrupted, StoreVersionUnsupported
from clientsdk.events import Event, SecurityEvent
from clientsdk.store import Batch
from federation import codec
from federation.addresses import DeviceAddress, UserAddress
from federation.errors import CodecError, ProtocolError
from federation.rpc import RpcClient
from federation.validate import field, require_map

log = logging.getLogger(__name__)

HELD_KV = "held_messages"
HELD_VERSION = 1
MAX_HELD = 200                          # envelopes held for key changes waiting to be accepted
MAX_HELD_BYTES = 4 << 20                # their ciphertexts together
HELD_TTL_MS = 30 * 86_400_000           # as long as a server would have kept them (mailbox TTL)
_HELD_LIMITS = codec.Limits(max_bytes=MAX_HELD_BYTES + (1 << 20), max_depth=4, max_items=MAX_HELD * 8 + 16,
                            max_container=MAX_HELD * 6)


class TrustState(StrEnum):
    UNVERIFIED = "unverified"
    VERIFIED = "verified"
    CHANGED = "changed"


class VerificationError(SdkError):
    """Verification needs something this device does not have (an unknown contact, no own key yet)."""

    code = "verification_failed"

    def __init__(self, message: str, *, code: str = "verification_failed") -> None:
        super().__init__(message)
        self.code = code


class TrustBook(ContactBook):
    """The contact book plus the master keys a server reported *instead of* the trusted ones."""

    def __init__(self, my_user: str, emit: Callable[[Event], None]) -> None:
        super().__init__(my_user, emit)
        self.key_changes: dict[str, bytes] = {}

    def accept(self, user: str, answer: dict[str, Any], now_ms: int) -> ListOutcome:
        try:
            outcome = super().accept(user, answer, now_ms)
        except ContactKeyChanged:
            self.key_changes[user] = answer["master_key"]      # 32 bytes: checked before the comparison
            raise
        self.key_changes.pop(user, None)          # the server reports the trusted key (again)
        return outcome


@dataclass(frozen=True, slots=True)
class HeldEnvelope:
    """An envelope from a device only an unaccepted master key lists, kept until the user decides."""

    user: str
    sender: str                # device address
    message_id: str
    ciphertext: bytes
    held_ms: int

    def fields(self) -> dict[str, Any]:
        """The envelope fields the inbox processes (as if the server pushed it now)."""
        return {"sender": self.sender, "message_id": self.message_id, "ciphertext": self.ciphertext}


class HeldMessages:
    """Held envelopes (sans-I/O), persisted as one sealed kv row ``{v: 1, items: [...]}``."""

    __slots__ = ("items",)

    def __init__(self, items: list[HeldEnvelope] | None = None) -> None:
        self.items = items or []

    def __repr__(self) -> str:
        return f"HeldMessages({len(self.items)})"

    def has(self, user: str) -> bool:
        return any(i.user == user for i in self.items)

    def add(self, item: HeldEnvelope, now_ms: int) -> bool:
        """Hold ``item`` unless the caps are reached (False: the message cannot be kept)."""
        self.prune(now_ms)
        size = sum(len(i.ciphertext) for i in self.items)
        if len(self.items) >= MAX_HELD or size + len(item.ciphertext) > MAX_HELD_BYTES:
            return False
        self.items.append(item)
        return True

    def take(self, user: str) -> list[HeldEnvelope]:
        """Remove and return ``user``'s held envelopes, oldest first."""
        mine = [i for i in self.items if i.user == user]
        self.items = [i for i in self.items if i.user != user]
        return mine

    def prune(self, now_ms: int) -> None:
        self.items = [i for i in self.items if now_ms - i.held_ms < HELD_TTL_MS]

    def to_bytes(self) -> bytes:
        return codec.encode({"v": HELD_VERSION, "items": [
            {"user": i.user, "sender": i.sender, "message_id": i.message_id, "ciphertext": i.ciphertext,
             "held_ms": i.held_ms} for i in self.items]}, _HELD_LIMITS)

    @classmethod
    def from_bytes(cls, data: bytes) -> HeldMessages:
        try:
            obj = require_map(codec.decode(data, _HELD_LIMITS), "held messages")
            if field(obj, "v", int) != HELD_VERSION:
                raise StoreVersionUnsupported("the held-messages record has an unknown version")
            items = []
            for raw in field(obj, "items", list, max_length=MAX_HELD):
                raw = require_map(raw, "held message")
                items.append(HeldEnvelope(field(raw, "user", str), field(raw, "sender", str),
                                          field(raw, "message_id", str), field(raw, "ciphertext", bytes),
                                          field(raw, "held_ms", int)))
        except (CodecError, ProtocolError):
            raise StoreCorrupted("the held-messages record does not parse") from None
        return cls(items)


class VerifyMixin(ClientParts):
    _held: HeldMessages | None = None         # loaded from the store on first use

    if TYPE_CHECKING:   # provided by clientsdk.inbox (a stub here would shadow it in the MRO)
        async def _receive_one(self, rpc: RpcClient, fields: dict[str, Any],
                               batch: Batch) -> Event | list[Event] | None: ...      # clientsdk.inbox

    # --- parties and numbers ---------------------------------------------------------------

    def _me(self) -> Party:
        own = self._book.contacts.get(self.user)
        if own is None:
            raise VerificationError("this device does not know its user's master key yet; connect once first",
                                    code="own_key_unknown")
        return Party.of(self.user, own.master_key)

    def _them(self, user: str) -> tuple[str, Party]:
        address = str(UserAddress.parse(user))
        if address == self.user:
            raise VerificationError("verification is between two different users", code="own_user")
        contact = self._book.contacts.get(address)
        if contact is None:
            raise VerificationError(f"{address} is not a contact yet: send to them or look them up first",
                                    code="unknown_contact")
        return address, Party.of(address, contact.master_key)

    def safety_number(self, user: str) -> str:
        """The 60-digit safety number with ``user`` (12 groups of 5), the same on both sides.

        Computed over the *trusted* master keys; after a key change it changes once
        the new key is accepted.
        """
        _, them = self._them(user)
        return str(safety_number(self._me(), them))

    def qr_payload(self, user: str) -> bytes:
        """What this device shows ``user`` as a QR code (they scan it with ``verify_scanned``)."""
        _, them = self._them(user)
        return qr_payload(self._me(), them)

    def trust(self, user: str) -> TrustState:
        """``unverified``, ``verified`` or ``changed`` (the server reports another master key)."""
        address, _ = self._them(user)
        if isinstance(self._book, TrustBook) and address in self._book.key_changes:
            return TrustState.CHANGED
        return TrustState.VERIFIED if self._book.contacts[address].trust == VERIFIED else TrustState.UNVERIFIED

    async def check_contact(self, user: str) -> TrustState:
        """Fetch ``user``'s current list from the server (a new contact is trusted on first use) and
        return the trust state; ``changed`` if the server now reports another master key."""
        address = str(UserAddress.parse(user))
        if address == self.user:
            raise VerificationError("verification is between two different users", code="own_user")
        rpc = await self._wait_rpc()
        try:
            await self._device_list(rpc, address, force=True)
        except ContactKeyChanged:
            pass                      # recorded by the book; the state below says ``changed``
        return self.trust(address)

    # --- decisions ------------------------------------------------------------------------

    async def verify_scanned(self, user: str, payload: bytes) -> ScanVerdict:
        """Compare a QR code ``user`` shows; on ``MATCH`` the contact is marked verified.

        A mismatch is a security event (possible interception or a key change);
        ``MalformedMessage`` for something that is no SecureChat verification code.
        """
        address, them = self._them(user)
        verdict = compare_scanned(payload, self._me(), them)
        if verdict is ScanVerdict.MATCH:
            await self._set_trust(address, VERIFIED)
        elif verdict is ScanVerdict.KEY_MISMATCH:
            self._emit(SecurityEvent("verification_mismatch", address, None,
                                     "the scanned code does not match the keys this device holds"))
        return verdict

    async def mark_verified(self, user: str) -> None:
        """The humans compared the safety number (out of band) and it matched."""
        address, _ = self._them(user)
        await self._set_trust(address, VERIFIED)

    async def mark_unverified(self, user: str) -> None:
        address, _ = self._them(user)
        await self._set_trust(address, TOFU)

    async def _set_trust(self, address: str, trust: str) -> None:
        async with self._lock:
            contact = self._book.contacts[address]
            contact.trust = trust
            await self._persist(Batch(contacts={address: contact.to_record()}))

    async def accept_key_change(self, user: str) -> None:
        """Trust the new master key the server reports for ``user`` (as unverified); sending resumes.

        Only the key the user was warned about is accepted: if the server now reports
        yet another one, ``ContactKeyChanged`` again.  Sessions with devices whose
        identity key is not in the new list are dropped.  Messages held while the change
        waited are then processed (events and history, as if they just arrived).
        """
        address, _ = self._them(user)
        if not isinstance(self._book, TrustBook) or address not in self._book.key_changes:
            if (await self._held_messages()).has(address):
                # The change was settled otherwise (marked unverified, so the new key was trusted
                # on first use): what was held is processed under the key trusted now.
                await self._release_held(await self._wait_rpc(), address)
                return
            raise VerificationError(f"no master key change is pending for {address}", code="no_key_change")
        warned = self._book.key_changes[address]
        rpc = await self._wait_rpc()
        answer = await rpc.request("get_device_list", user=address)
        reported = answer.get("master_key")
        if not isinstance(reported, bytes) or not ct_equal(reported, warned):
            self._emit(SecurityEvent("master_key_changed", address, None,
                                     "the master key changed again before it was accepted"))
            raise ContactKeyChanged(f"the master key of {address} changed again; review it before accepting")
        old = self._book.contacts.pop(address)
        try:
            current = await self._device_list(rpc, address, force=True)     # trust on first use of the new key
        except BaseException:
            self._book.contacts[address] = old
            raise
        self._book.key_changes.pop(address, None)
        batch = Batch()
        if old.current is not None:
            for entry in old.current.device_list.devices:
                key = current.device_list.identity_key_of(entry.id)
                device = f"{address}/{entry.id}"
                if (key is None or not ct_equal(key, entry.identity_key)) and self._sessions.has(device):
                    self._sessions.drop(device)
                    batch.deleted_sessions.add(device)
        if batch:
            async with self._lock:
                await self._persist(batch)
        self._emit(SecurityEvent("master_key_accepted", address, None,
                                 "the new master key is trusted, unverified: compare safety numbers again"))
        await self._release_held(rpc, address)

    # --- messages held while a key change waits -------------------------------------------

    def _key_change_pending(self, user: str) -> bool:
        """Does a verified contact's master key change wait for the user's decision?"""
        return isinstance(self._book, TrustBook) and user in self._book.key_changes and user != self.user

    async def _held_messages(self) -> HeldMessages:
        if self._held is None:
            raw = await trio.to_thread.run_sync(self._store.get_kv, HELD_KV, limiter=self._store_limiter)
            held = HeldMessages.from_bytes(raw) if raw is not None else HeldMessages()
            held.prune(self._clock())
            if self._held is None:
                self._held = held
        return self._held

    async def _hold_for_key_change(self, sender: DeviceAddress, fields: dict[str, Any],
                                   batch: Batch) -> Event | None:
        """Called by the inbox (under the client lock) for a message only an unaccepted key vouches for.

        The envelope is kept in the store (same hop as its ack) and processed once the
        change is accepted; the app hears about it once per contact and change.
        """
        user, device = str(sender.user), str(sender)
        if not self._key_change_pending(user):
            return SecurityEvent("decryption_failed", user, device,
                                 "a message from a device the trusted master key does not list was refused")
        held = await self._held_messages()
        first = not held.has(user)
        now = self._clock()
        item = HeldEnvelope(user, device, str(fields.get("message_id", "")), fields["ciphertext"], now)
        if not held.add(item, now):
            log.info("held-message limit reached; a message from %s was dropped", device)
            return SecurityEvent("decryption_failed", user, device,
                                 "a message under an unaccepted master key was dropped: too many are held")
        batch.kv[HELD_KV] = held.to_bytes()
        if not first:
            return None
        return SecurityEvent("message_held", user, device,
                             "a message from a device under the new, not yet accepted master key is held until "
                             "the key change is accepted")

    async def _release_held(self, rpc: RpcClient, user: str) -> None:
        """Process ``user``'s held envelopes now that the new key is trusted (events, history, receipts)."""
        held = await self._held_messages()
        if not held.has(user):
            return
        events: list[Event] = []
        async with self._lock:
            items = held.take(user)
            batch = Batch()
            done = 0
            try:
                for item in items:
                    event = await self._receive_one(rpc, item.fields(), batch)
                    done += 1
                    if isinstance(event, list):
                        events.extend(event)
                    elif event is not None:
                        events.append(event)
            finally:
                held.items[:0] = items[done:]          # interrupted: the rest stays held
                batch.kv[HELD_KV] = held.to_bytes()
                batch.kv["prekeys"] = self._prekeys.to_bytes()
                with trio.CancelScope(shield=True):
                    await self._persist(batch)
                for event in events:
                    self._emit(event)
        self._queue_delivery_receipts(events)

    # --- contact codes --------------------------------------------------------------------

    def contact_code(self) -> str:
        """``alice@example.org#1A2B3C4D``: helps others find this account; it verifies nothing."""
        return str(ContactCode.for_key(UserAddress.parse(self.user), self._me().master_public_key))

    async def lookup_contact_code(self, code: str) -> LookupHint:
        """Find the account a contact code names and say whether its key fits (a hint, never trust).

        The user becomes a contact (trust on first use, unverified) if not one yet;
        an existing trust state is left exactly as it was.
        """
        parsed = ContactCode.parse(code)
        address = str(parsed.address)
        if address == self.user:
            return parsed.matches(parsed.address, self._me().master_public_key)
        rpc = await self._wait_rpc()
        await self._device_list(rpc, address)
        return parsed.matches(parsed.address, self._book.contacts[address].master_key)
