"""The plaintext inside every pairwise ciphertext (canonical msgpack, version ``v`` = 1)::

    {v: 1, type: "text", id: str, to: str, text: str, sent_ms: int,
     list_version: uint, list_hash: bin(32) [, refs: [str, ...]] [, state: str]}

``type`` is one of ``text``; ``receipt`` (``state`` = ``delivered`` | ``read``,
``refs`` = the message ids it acknowledges); ``typing`` (``state`` = ``typing`` |
``stopped``, ephemeral); ``presence`` (``state`` = e.g. ``online`` | ``away`` |
``offline``, ``text`` an optional status line, ephemeral); ``session_reset``
(``refs`` = the device addresses whose session the sender restarted);
``sender_key_request`` (``refs`` = [group id hex, device address, key id hex,
iteration]: that device is asked for its sender key of the group, see
``clientsdk.group_records.KeyRequest``).  ``refs`` and
``state`` are present only when non-empty, so text messages keep their bytes.

``to`` is the recipient user (so my other devices file a copy under the right
conversation); ``list_version`` / ``list_hash`` are the sender's own signed device
list version and SHA-256 (DESIGN §3), so a recipient that sees a newer list through
a peer refuses an older one from its server.  Unknown ``type`` values are ignored
by receivers (forward compatibility); unknown versions are refused.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from clientsdk.crypto.errors import MalformedMessage, UnsupportedVersion
from clientsdk.events import (
    Event,
    MessageReceived,
    PresenceChanged,
    ReceiptReceived,
    SecurityEvent,
    TypingChanged,
)
from federation import codec
from federation.addresses import DeviceAddress
from federation.errors import CodecError, ProtocolError
from federation.validate import field, non_negative, require_map

CONTENT_VERSION = 1
TEXT = "text"
RECEIPT = "receipt"
TYPING = "typing"
PRESENCE = "presence"
SESSION_RESET = "session_reset"
SENDER_KEY_REQUEST = "sender_key_request"
DELIVERED = "delivered"
READ = "read"
MAX_ID_LEN = 128
MAX_REFS = 1000
MAX_STATE_LEN = 64


@dataclass(frozen=True, slots=True)
class Content:
    type: str
    id: str
    to: str
    text: str
    sent_ms: int
    list_version: int
    list_hash: bytes
    refs: tuple[str, ...] = ()
    state: str = ""

    def to_bytes(self) -> bytes:
        obj: dict[str, Any] = {"v": CONTENT_VERSION, "type": self.type, "id": self.id, "to": self.to,
                               "text": self.text, "sent_ms": self.sent_ms, "list_version": self.list_version,
                               "list_hash": self.list_hash}
        if self.refs:
            obj["refs"] = list(self.refs)
        if self.state:
            obj["state"] = self.state
        return codec.encode(obj)

    @classmethod
    def from_bytes(cls, data: bytes) -> Content:
        """Parse decrypted content; ``MalformedMessage`` / ``UnsupportedVersion`` on bad input."""
        try:
            obj: dict[str, Any] = require_map(codec.decode(data), "content")
            if field(obj, "v", int) != CONTENT_VERSION:
                raise UnsupportedVersion("unknown message content version")
            refs = field(obj, "refs", list, max_length=MAX_REFS, default=[])
            if not all(isinstance(r, str) and len(r) <= 400 for r in refs):
                raise ProtocolError("field 'refs' must hold short strings")
            return cls(field(obj, "type", str, max_length=64), field(obj, "id", str, max_length=MAX_ID_LEN),
                       field(obj, "to", str, max_length=400), field(obj, "text", str),
                       field(obj, "sent_ms", int),
                       non_negative(field(obj, "list_version", int), "list_version"),
                       field(obj, "list_hash", bytes, length=32), tuple(refs),
                       field(obj, "state", str, max_length=MAX_STATE_LEN, default=""))
        except (CodecError, ProtocolError) as exc:
            raise MalformedMessage(f"malformed message content: {exc.message}") from None


def content_event(content: Content, sender: DeviceAddress, my_user: str, received_ms: int) -> Event | None:
    """The event a decrypted content becomes (None for types this SDK does not show).

    A copy of my own message (from my other device) is filed under its recipient;
    a message from someone else must name me as recipient, else the server or the
    sender is redirecting someone else's message: a security event, not a message.
    """
    if content.type not in (TEXT, RECEIPT, TYPING, PRESENCE):
        return None
    sender_user = str(sender.user)
    if sender_user == my_user:
        conversation, outgoing = content.to, True
    elif content.to != my_user:
        return SecurityEvent("misaddressed_message", sender_user, str(sender), "message names another recipient")
    else:
        conversation, outgoing = sender_user, False
    if content.type == RECEIPT:
        if content.state not in (DELIVERED, READ) or not content.refs:
            return None
        return ReceiptReceived(conversation, sender_user, str(sender), content.state, content.refs,
                               content.sent_ms, outgoing)
    if content.type == TYPING:
        if outgoing:
            return None                       # my own typing, echoed to my other devices: not news
        return TypingChanged(sender_user, str(sender), content.state == TYPING)
    if content.type == PRESENCE:
        return PresenceChanged(sender_user, str(sender), content.state, content.text)
    return MessageReceived(conversation, sender_user, str(sender), content.id, content.text, content.sent_ms,
                           received_ms, outgoing)
