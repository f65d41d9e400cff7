"""When to restart a session with a device whose message we could not decrypt (sans-I/O).

Why (LESSONS #1, #8): a rolled-back or lost ratchet state makes every later message
from that device undecryptable.  Instead of failing silently forever, the client
starts a fresh session with the device (a new PQXDH from a freshly claimed bundle)
and tells the app once.  Resets are rate-limited per remote device (default one per
hour, ``ClientOptions.session_reset_interval_ms``) so a peer or server that keeps
sending garbage cannot make us drain the peer's one-time prekeys or spam events.

Per device the book keeps: when it was last reset, whether that reset is still
*open* (no message from the device has decrypted since: further failures are the
same breakage and fold into the one event), and whether the new session still
has to be *sent* (persisted, so a crash before sending resumes on the next connect).
"""

from __future__ import annotations

from enum import Enum

from clientsdk.errors import StoreCorrupted, StoreVersionUnsupported
from federation import codec
from federation.errors import CodecError, ProtocolError

RESETS_VERSION = 1
KV_NAME = "session_resets"


class ResetDecision(Enum):
    RESET = "reset"                  # start a fresh session now; tell the app (one event)
    FOLD = "fold"                    # part of a reset already under way: no new event
    RATE_LIMITED = "rate_limited"    # a reset happened recently and healed; report the failure only


class ResetBook:
    __slots__ = ("interval_ms", "last_ms", "open", "unsent")

    def __init__(self, interval_ms: int) -> None:
        self.interval_ms = interval_ms
        self.last_ms: dict[str, int] = {}
        self.open: set[str] = set()
        self.unsent: set[str] = set()

    def __repr__(self) -> str:
        return f"ResetBook({len(self.last_ms)} devices, {len(self.unsent)} unsent)"

    def on_failure(self, device: str, now_ms: int) -> ResetDecision:
        """A message from ``device`` failed to decrypt: what to do about it."""
        last = self.last_ms.get(device)
        if last is not None and now_ms - last < self.interval_ms:
            return ResetDecision.FOLD if device in self.open else ResetDecision.RATE_LIMITED
        self.last_ms[device] = now_ms
        self.open.add(device)
        self.unsent.add(device)
        return ResetDecision.RESET

    def on_decrypted(self, device: str) -> bool:
        """A message from ``device`` decrypted: an open reset has healed.  True if the book changed."""
        if device in self.open:
            self.open.discard(device)
            return True
        return False

    def sent(self, device: str) -> None:
        self.unsent.discard(device)

    def forget(self, device: str) -> None:
        """The device left its user's list: nothing to reset any more."""
        self.unsent.discard(device)
        self.open.discard(device)

    def prune(self, now_ms: int) -> None:
        """Forget rate-limit entries older than the interval (the table does not grow forever)."""
        for device in [d for d, t in self.last_ms.items() if now_ms - t >= self.interval_ms
                       and d not in self.unsent]:
            del self.last_ms[device]
            self.open.discard(device)

    def to_bytes(self) -> bytes:
        return codec.encode({"v": RESETS_VERSION, "last": dict(self.last_ms), "open": sorted(self.open),
                             "unsent": sorted(self.unsent)})

    @classmethod
    def from_bytes(cls, data: bytes, interval_ms: int) -> ResetBook:
        try:
            obj = codec.decode(data)
            if not isinstance(obj, dict):
                raise StoreCorrupted("the session reset record does not parse")
            if obj.get("v") != RESETS_VERSION:
                raise StoreVersionUnsupported("the session reset record has an unknown version")
            last, open_, unsent = obj["last"], obj["open"], obj["unsent"]
            if not (isinstance(last, dict) and all(isinstance(k, str) and isinstance(v, int)
                                                   for k, v in last.items())
                    and isinstance(open_, list) and isinstance(unsent, list)
                    and all(isinstance(d, str) for d in (*open_, *unsent))):
                raise StoreCorrupted("the session reset record does not parse")
        except (KeyError, CodecError, ProtocolError):
            raise StoreCorrupted("the session reset record does not parse") from None
        book = cls(interval_ms)
        book.last_ms = dict(last)
        book.open = set(open_)
        book.unsent = set(unsent)
        return book
