"""The client's book of users it talks to: trusted master keys and verified device lists (sans-I/O).

Why separate from the client: every trust decision of DESIGN §3/§4 lives here, in
plain synchronous code — TOFU of the master key, the version rule via
``accept_device_list``, the expiry event, and the list version/hash that every
message carries (a peer announcing a newer list makes our cached one stale, and
the server may then not serve an older one).  The client only does the I/O.

Key-change policy (issue 4, DESIGN §4): a master key other than the trusted one is
always a ``master_key_changed`` security event.  For an *unverified* contact the new
key is trusted on first use again (pinned; sessions with devices the new list does
not name with the same identity key are dropped) and sending continues.  For a
*verified* contact — and for my own user, whose key never changes under a device —
sending stops (``ContactKeyChanged``) until the user accepts the new key
(``VerifyMixin.accept_key_change``), after which the contact is unverified.  An
expired list is a ``device_list_expired`` event; for a verified contact sending
stops (``SendFailed`` code ``device_list_expired``) until a fresh list arrives.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from clientsdk.contacts import SELF, TOFU, VERIFIED, Contact
from clientsdk.content import Content
from clientsdk.crypto.identity import VerifiedDeviceList, accept_device_list
from clientsdk.crypto.primitives import ct_equal
from clientsdk.errors import ContactKeyChanged, SendFailed
from clientsdk.events import DeviceListChanged, Event, SecurityEvent
from federation.addresses import DeviceAddress
from federation.errors import ProtocolError
from federation.keys import BadDeviceList, DeviceListEquivocation, DeviceListRollback, SignedDeviceList


@dataclass(frozen=True, slots=True)
class ListOutcome:
    current: VerifiedDeviceList
    changed: bool                    # persist the contact (new contact or a newer list)
    removed: frozenset[str]          # device ids no longer listed: drop their sessions


class ContactBook:
    """Contacts (and my own user) by user address; ``emit`` receives security and list events."""

    def __init__(self, my_user: str, emit: Callable[[Event], None]) -> None:
        self.my_user = my_user
        self._emit = emit
        self.contacts: dict[str, Contact] = {}

    def fresh(self, user: str) -> VerifiedDeviceList | None:
        """The cached list if nothing says a newer one exists."""
        contact = self.contacts.get(user)
        if contact is None or contact.stale:
            return None
        return contact.current

    def current(self, user: str) -> VerifiedDeviceList | None:
        contact = self.contacts.get(user)
        return None if contact is None else contact.current

    def mark_stale(self, user: str) -> None:
        contact = self.contacts.get(user)
        if contact is not None:
            contact.stale = True

    def listed_key(self, address: str) -> bytes | None:
        """Identity key of a device from its user's verified list, or None if not listed."""
        parsed = DeviceAddress.parse(address)
        current = self.current(str(parsed.user))
        return None if current is None else current.device_list.identity_key_of(parsed.device_id)

    def record(self, user: str) -> dict[str, Any]:
        return self.contacts[user].to_record()

    def set_own(self, master_public: bytes, signed: SignedDeviceList) -> None:
        """The master device's own list, trusted because it signed it."""
        contact = self.contacts.get(self.my_user) or Contact(self.my_user, master_public, SELF)
        contact.current = VerifiedDeviceList.open(master_public, signed)
        contact.stale = False
        self.contacts[self.my_user] = contact

    def accept(self, user: str, answer: dict[str, Any], now_ms: int) -> ListOutcome:
        """Check a ``get_device_list`` answer against what we trust; raises ``SendFailed`` / ``ContactKeyChanged``."""
        master = answer.get("master_key")
        if not isinstance(master, bytes) or len(master) != 32:
            raise SendFailed("the server sent a malformed master key", code="bad_device_list")
        contact = self.contacts.get(user)
        is_new = contact is None
        replaced: Contact | None = None
        if contact is None:
            contact = Contact(user, master, SELF if user == self.my_user else TOFU)   # trust on first use
        elif not ct_equal(master, contact.master_key):
            if contact.trust in (VERIFIED, SELF):
                self._emit(SecurityEvent("master_key_changed", user, None,
                                         "the server reports a different master key; sending stops until the "
                                         "new key is accepted"))
                if contact.trust == SELF:
                    raise ContactKeyChanged("the server reports another master key for my own account; this "
                                            "device does not send until the key it trusts is served again")
                raise ContactKeyChanged(f"the master key of {user} changed and {user} was verified: sending to "
                                        "them stops until the new key is accepted (accept_key_change)")
            self._emit(SecurityEvent("master_key_changed", user, None,
                                     "the master key changed; the new key is trusted on first use (unverified): "
                                     "compare safety numbers"))
            replaced, contact, is_new = contact, Contact(user, master, TOFU), True
        try:
            signed = SignedDeviceList.from_wire(answer.get("device_list"))
            update = accept_device_list(contact.master_key, contact.current, signed, now_ms)
            if update.current.device_list.user != user:
                raise BadDeviceList("device list is for another user")
        except (BadDeviceList, ProtocolError) as exc:
            kind = ("device_list_equivocation" if isinstance(exc, DeviceListEquivocation)
                    else "device_list_rollback" if isinstance(exc, DeviceListRollback) else "device_list_rejected")
            self._emit(SecurityEvent(kind, user, None, exc.message))
            raise SendFailed(f"the device list of {user} was refused", code=kind) from None
        version = update.current.device_list.version
        if version < contact.min_version:
            self._emit(SecurityEvent("device_list_rollback", user, None,
                                     "the server serves an older list than a peer announced"))
            raise SendFailed(f"the server serves an outdated device list for {user}", code="device_list_rollback")
        if update.expired is not None and not contact.expired_reported:
            contact.expired_reported = True
            self._emit(SecurityEvent("device_list_expired", user, None, "the device list has expired"))
        if contact.verified and update.expired is not None:
            contact.stale = True                   # ask again on every send until a fresh list arrives
            raise SendFailed(f"the device list of {user} has expired; sending to a verified contact waits for a "
                             "fresh one", code="device_list_expired")
        contact.stale = False
        changed = update.changed or is_new
        removed: frozenset[str] = frozenset()
        if changed:
            previous = replaced if replaced is not None else contact
            removed = _dropped_devices(previous.current, update.current)
            contact.current = update.current
            self.contacts[user] = contact
            self._emit(DeviceListChanged(user, version, tuple(sorted(update.current.device_list.device_ids()))))
        return ListOutcome(update.current, changed, removed)

    def note_sender_list(self, user: str, content: Content) -> None:
        """The list version/hash a message carries (DESIGN §3): newer means stale, same version other hash is
        equivocation."""
        contact = self.contacts.get(user)
        if contact is None:
            return
        contact.min_version = max(contact.min_version, content.list_version)
        current = contact.current
        if current is None:
            return
        version = current.device_list.version
        if content.list_version > version:
            contact.stale = True
        elif content.list_version == version and not ct_equal(content.list_hash, current.signed.digest):
            self._emit(SecurityEvent("device_list_equivocation", user, None,
                                     "a peer holds a different list with the same version"))


def _dropped_devices(old: VerifiedDeviceList | None, new: VerifiedDeviceList) -> frozenset[str]:
    """Device ids of ``old`` that ``new`` does not name with the same identity key: their sessions go."""
    if old is None:
        return frozenset()
    out = set()
    for entry in old.device_list.devices:
        key = new.device_list.identity_key_of(entry.id)
        if key is None or not ct_equal(key, entry.identity_key):
            out.add(entry.id)
    return frozenset(out)
