"""Contact verification on the client: safety numbers, QR codes, trust states and key changes (DESIGN §4).

Why a mixin of its own: the crypto (``clientsdk.crypto.verification``) is sans-I/O
and knows nothing of contacts; this module ties it to the contact book and the
store.  Trust states a user sees:

- ``unverified``: the master key was trusted on first use;
- ``verified``: the humans compared safety numbers (``mark_verified``) or a scanned
  QR code matched (``verify_scanned``);
- ``changed``: the server now reports another master key.  Sending to the contact
  stops (``ContactKeyChanged``) until ``accept_key_change``, which trusts the new key
  as *unverified* — a verified contact must be verified again.

The trusted key in the store stays the old one until the change is accepted, so a
restart that forgets the ``changed`` marker finds the change again on the next fetch.
Contact codes only help find the right account: a ``LookupHint`` never changes trust.
"""

from __future__ import annotations

from collections.abc import Callable
from enum import StrEnum
from typing import TYPE_CHECKING, Any

import trio

from clientsdk.contacts import TOFU, VERIFIED
from clientsdk.crypto.identity import VerifiedDeviceList
from clientsdk.crypto.primitives import ct_equal
from clientsdk.crypto.verification import (
    ContactCode, LookupHint, Party, ScanVerdict, compare_scanned, qr_payload, safety_number,
)
from clientsdk.devicelists import ContactBook, ListOutcome
from clientsdk.errors import ContactKeyChanged, SdkError
from clientsdk.events import Event, SecurityEvent
from clientsdk.sessions import SessionBook
from clientsdk.store import Batch
from federation.addresses import UserAddress
from federation.rpc import RpcClient


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


class VerifyMixin:
    user: str
    _book: ContactBook
    _sessions: SessionBook
    _lock: trio.Lock

    if TYPE_CHECKING:   # provided by Client (stubs here would shadow them in the MRO)
        def _emit(self, event: Event) -> None: ...

        async def _persist(self, batch: Batch) -> None: ...

        async def _wait_rpc(self) -> RpcClient: ...

        async def _device_list(self, rpc: RpcClient, user: str, *, force: bool = False,
                               have_lock: bool = False) -> VerifiedDeviceList: ...

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
        identity key is not in the new list are dropped.
        """
        address, _ = self._them(user)
        if not isinstance(self._book, TrustBook) or address not in self._book.key_changes:
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
