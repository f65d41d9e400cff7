"""This device's pairwise sessions, per remote device address (sans-I/O).

Why a list per device (Sesame-like, DESIGN §4): when two devices start a session
with each other at the same time, each holds two sessions for a while; keeping up
to ``MAX_SESSIONS_PER_DEVICE`` and moving the one that last decrypted to the front
lets both sides converge instead of breaking.  Encryption always uses the front
session.  Sessions serialise per device to versioned bytes for the store.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from clientsdk.crypto.errors import CryptoError, MalformedMessage
from clientsdk.crypto.identity import DeviceIdentity, PrekeyStore
from clientsdk.crypto.primitives import ct_equal
from clientsdk.crypto.session import NormalMessage, PrekeyMessage, Session, accept_prekey_message
from federation import codec
from federation.addresses import DeviceAddress
from federation.errors import CodecError
from federation.keys import BadBundle, PrekeyBundle

MAX_SESSIONS_PER_DEVICE = 3
_LIMITS = codec.Limits(max_bytes=64 << 20)


class NoSession(CryptoError):
    """No session with this device can take the message (a normal message before any prekey message)."""

    code = "no_session"


class SessionBook:
    """Sessions per device; every change goes through here, so the encoded form can be cached.

    ``state_bytes`` is what the store keeps and also the receiver's undo point before a
    decryption (``clientsdk.inbox``): caching it until the next change makes that free.
    """

    __slots__ = ("_sessions", "_encoded")

    def __init__(self) -> None:
        self._sessions: dict[str, list[Session]] = {}
        self._encoded: dict[str, bytes] = {}

    def __repr__(self) -> str:
        return f"SessionBook({len(self._sessions)} devices)"

    def has(self, address: str) -> bool:
        return bool(self._sessions.get(address))

    def add(self, address: str, session: Session) -> None:
        self._encoded.pop(address, None)
        self._sessions[address] = ([session] + self._sessions.get(address, []))[:MAX_SESSIONS_PER_DEVICE]

    def drop(self, address: str) -> bool:
        self._encoded.pop(address, None)
        return self._sessions.pop(address, None) is not None

    def encrypt(self, address: str, plaintext: bytes) -> tuple[bytes, bool]:
        """(ciphertext, durable): if ``durable``, the new state must be fsynced before the ciphertext
        leaves (its send lease grew: ``Session.renew_send_lease``); else an unsynced write will do."""
        sessions = self._sessions.get(address)
        if not sessions:
            raise NoSession("no session with this device")
        self._encoded.pop(address, None)
        durable = sessions[0].renew_send_lease()
        return sessions[0].encrypt(plaintext), durable

    def recover_send_leases(self) -> None:
        """After loading from the store: skip every reserved sending index.

        A session that cannot skip (a reservation beyond ``MAX_SKIP``: only a damaged
        state) is dropped rather than risk a reused key; the next send starts a new one.
        """
        for address, sessions in list(self._sessions.items()):
            try:
                moved = [session.recover_send_lease() for session in sessions]
            except CryptoError:
                del self._sessions[address]
                moved = [True]
            if any(moved):
                self._encoded.pop(address, None)

    def release_send_leases(self) -> list[str]:
        """Before a clean close (``Session.release_send_lease``); the devices whose state changed."""
        changed = []
        for address, sessions in self._sessions.items():
            if any([session.release_send_lease() for session in sessions]):      # every one, not the first
                self._encoded.pop(address, None)
                changed.append(address)
        return changed

    def _promote(self, address: str, index: int) -> None:
        sessions = self._sessions[address]
        self._sessions[address] = [sessions[index]] + sessions[:index] + sessions[index + 1:]

    def decrypt_existing(self, sender: str, message: PrekeyMessage | NormalMessage, now_ms: int) -> bytes | None:
        """Decrypt with a session we hold; None for a prekey message that starts a new session."""
        self._encoded.pop(sender, None)
        sessions = self._sessions.get(sender, [])
        if isinstance(message, PrekeyMessage):
            for i, session in enumerate(sessions):
                if session.belongs_here(message):
                    plaintext = session.decrypt(message, now_ms)
                    self._promote(sender, i)
                    return plaintext
            return None
        last: CryptoError = NoSession("no session with the sender device")
        for i, session in enumerate(sessions):
            try:
                plaintext = session.decrypt(message, now_ms)
            except CryptoError as exc:
                last = exc
                continue
            self._promote(sender, i)
            return plaintext
        raise last

    def accept(self, me: DeviceIdentity, my_address: DeviceAddress, prekeys: PrekeyStore, sender: DeviceAddress,
               sender_identity_key: bytes, message: PrekeyMessage, now_ms: int) -> bytes:
        """Start the responder session of a prekey message (identity key from the sender's signed list)."""
        session, plaintext = accept_prekey_message(me, my_address, prekeys, sender, sender_identity_key,
                                                   message, now_ms)
        self.add(str(sender), session)
        return plaintext

    def state_bytes(self, address: str) -> bytes:
        data = self._encoded.get(address)
        if data is None:
            data = self._encoded[address] = codec.encode([s.to_bytes() for s in self._sessions.get(address, [])],
                                                         _LIMITS)
        return data

    def load(self, address: str, data: bytes) -> None:
        try:
            states = codec.decode(data, _LIMITS)
        except CodecError:
            raise MalformedMessage("malformed session list") from None
        if not isinstance(states, list) or not all(isinstance(s, bytes) for s in states):
            raise MalformedMessage("malformed session list")
        self._sessions[address] = [Session.from_bytes(s) for s in states]
        self._encoded[address] = data


def verified_bundle(raw: Any, listed_key: Callable[[str], bytes | None]) -> PrekeyBundle:
    """A claimed bundle whose prekeys verify under the identity key the *signed device list* names.

    The server hands out bundles; only the master-key-signed list says which identity
    key a device has, so a bundle for an unlisted device or with another key is
    refused (``BadBundle``): a server cannot slip in a device of its own.
    """
    bundle = PrekeyBundle.from_wire(raw)
    bundle.verify()
    listed = listed_key(bundle.device)
    if listed is None or not ct_equal(listed, bundle.identity_key):
        raise BadBundle("bundle identity key is not the one in the signed device list")
    return bundle
