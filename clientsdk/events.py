"""Events that ``Client.events()`` yields: frozen dataclasses, one per kind of happening."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Event:
    """Base of every SDK event."""


@dataclass(frozen=True, slots=True)
class MessageReceived(Event):
    """A decrypted text message, already stored in history before it is yielded.

    ``conversation`` is the other user of the 1:1 chat: the sender for incoming
    messages, the recipient for copies of my own messages sent from my other devices
    (``outgoing`` is then True).
    """

    conversation: str
    sender: str               # user address
    sender_device: str        # device address
    message_id: str           # the content id (same on every device)
    text: str
    sent_ms: int
    received_ms: int
    outgoing: bool


@dataclass(frozen=True, slots=True)
class SecurityEvent(Event):
    """Something the user should know about keys or devices (DESIGN §3, §4).

    ``kind``: ``master_key_changed``, ``device_list_equivocation``,
    ``device_list_expired``, ``device_list_rejected``, ``decryption_failed``,
    ``unknown_sender_device``, ``session_reset`` (a message from ``device`` could not
    be decrypted, so this client started a fresh session with it: that message and
    any sent before the peer switches are lost; the peer can send them again),
    ``message_held`` (a message from a device that only a verified contact's new, not
    yet accepted master key lists: kept, and delivered once the change is accepted).
    """

    kind: str
    user: str
    device: str | None = None
    detail: str = ""


@dataclass(frozen=True, slots=True)
class DeviceListChanged(Event):
    """A contact's (or my own) verified device list moved to a new version."""

    user: str
    version: int
    devices: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class HistoryImported(Event):
    """My master device shared its history with this newly linked device; all of it is stored.

    Counts are what this device imported (messages it already had are not counted
    twice); ``omitted`` messages were left out by the master device's caps
    (``clientsdk.history``), so a short history is never silent.
    """

    from_device: str          # the master device's address
    messages: int
    conversations: int        # 1:1 and group conversations with imported messages
    contacts: int
    omitted: int


@dataclass(frozen=True, slots=True)
class ConnectionChanged(Event):
    """The client (re)connected and authenticated, or lost its connection."""

    connected: bool


@dataclass(frozen=True, slots=True)
class ReceiptReceived(Event):
    """A delivery or read receipt for messages in a 1:1 conversation.

    ``kind`` is ``delivered`` (sent automatically once the receiving device stored
    the message) or ``read`` (``Client.mark_read``).  ``outgoing`` is True for my own
    receipts reported by my other devices (the message was read elsewhere).
    """

    conversation: str
    sender: str               # user who sent the receipt
    sender_device: str
    kind: str
    message_ids: tuple[str, ...]
    sent_ms: int
    outgoing: bool


@dataclass(frozen=True, slots=True)
class TypingChanged(Event):
    """A contact started or stopped typing to me (ephemeral: only while both are connected)."""

    user: str
    device: str
    typing: bool


@dataclass(frozen=True, slots=True)
class PresenceChanged(Event):
    """A contact's (or my other device's) presence: ``state`` such as ``online``/``away``/``offline``."""

    user: str
    device: str
    state: str
    status: str = ""
