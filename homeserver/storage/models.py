"""Row types and domain errors shared by every storage implementation.

The repositories return these frozen values, never SQLAlchemy rows, so handlers
and the in-memory fake (``memory.py``) see exactly the same types.  The errors
are ``RequestRejected`` subclasses: a handler may let them reach the client
as-is, so their messages name no secret and no payload.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from collections.abc import Callable
from typing import Generic, Literal, Protocol, TypeVar

import trio

from federation.errors import ErrorCode, RequestRejected

T_co = TypeVar("T_co", covariant=True)
DAY_MS = 24 * 3600 * 1000
MAILBOX_TTL_MS = 30 * DAY_MS
# A claimed one-time prekey id stays reserved as long as a first message that
# uses it may wait in a mailbox, so its id is never accepted (or handed out) again.
CLAIMED_PREKEY_TTL_MS = MAILBOX_TTL_MS


class DeviceState(StrEnum):
    """Lifecycle of a device (DESIGN §3): pending until a device list names it."""

    PENDING = "pending"
    ACTIVE = "active"
    REVOKED = "revoked"


@dataclass(frozen=True, slots=True)
class Account:
    user: str
    password_hash: str
    master_key: bytes
    disabled: bool
    created_ms: int


@dataclass(frozen=True, slots=True)
class Invite:
    invite_id: str
    created_ms: int
    expires_ms: int
    uses_left: int
    note: str
    revoked: bool


@dataclass(frozen=True, slots=True)
class Device:
    user: str
    device_id: str
    identity_key: bytes
    state: DeviceState
    created_ms: int


@dataclass(frozen=True, slots=True)
class StoredDeviceList:
    user: str
    version: int
    body: bytes
    signature: bytes
    updated_ms: int


@dataclass(frozen=True, slots=True)
class ClaimedBundle:
    """What a claim hands out; the key fields are the wire encodings the handler stored."""

    identity_key: bytes
    signed_prekey: bytes
    pq_prekey: bytes
    one_time_prekey: bytes | None


@dataclass(frozen=True, slots=True)
class MailboxEntry:
    seq: int
    device: str
    sender: str
    message_id: str
    ciphertext: bytes
    ts_ms: int


@dataclass(frozen=True, slots=True)
class DeliverResult:
    """Outcome of ``deliver``: ``entries`` holds the new rows (empty unless ``new``)."""

    status: Literal["new", "duplicate", "conflict"]
    entries: tuple[MailboxEntry, ...]


def device_address(user: str, device_id: str) -> str:
    """The mailbox key of a device: the same text as ``str(DeviceAddress)``."""
    return f"{user}/{device_id}"


# --- errors -----------------------------------------------------------------------------------


class AccountExists(RequestRejected):
    code = ErrorCode.CONFLICT


class InviteInvalid(RequestRejected):
    """Unknown, expired, revoked or used-up invite: one error, so nothing is learnt."""

    code = ErrorCode.UNAUTHORIZED


class InviteExists(RequestRejected):
    """Two invite tokens whose hashes share the 12-hex-digit invite id."""

    code = ErrorCode.CONFLICT


class DeviceExists(RequestRejected):
    """The device id is taken (revoked ids too: an id is never reused)."""

    code = ErrorCode.CONFLICT


class DeviceListConflict(RequestRejected):
    """A device list whose version is not higher than the stored one (a rollback)."""

    code = ErrorCode.BAD_DEVICE_LIST


class UnknownDevice(RequestRejected):
    """No such device, or it is revoked."""

    code = ErrorCode.NOT_FOUND


class DuplicatePrekey(RequestRejected):
    """A prekey id already present, recently claimed, or repeated in one upload."""

    code = ErrorCode.BAD_BUNDLE


class DatabaseClosed(RequestRejected):
    """The storage is shutting down and accepts no more writes."""

    code = ErrorCode.SHUTTING_DOWN


class SchemaTooNew(RuntimeError):
    """The database was written by a newer release; refuse rather than corrupt it."""


# --- the repository interfaces (implemented by SQL and by the in-memory fake) -------------------


@dataclass(frozen=True, slots=True)
class NewAccount:
    """Everything registration stores, written in ONE transaction (no half-registered accounts)."""

    user: str
    password_hash: str
    master_key: bytes
    device_id: str
    identity_key: bytes
    list_version: int
    list_body: bytes
    list_signature: bytes
    invite_token_hash: bytes | None = None


class AccountStore(Protocol):
    async def create_account(self, user: str, password_hash: str, master_key: bytes,
                             now_ms: int, invite_token_hash: bytes | None = None) -> None: ...
    async def register(self, new: NewAccount, now_ms: int) -> None: ...
    async def get_account(self, user: str) -> Account | None: ...
    async def list_accounts(self) -> list[Account]: ...
    async def set_disabled(self, user: str, disabled: bool) -> bool: ...
    async def create_invite(self, token_hash: bytes, now_ms: int, expires_ms: int, uses: int,
                            note: str) -> Invite: ...
    async def list_invites(self) -> list[Invite]: ...
    async def revoke_invite(self, invite_id: str) -> bool: ...


class DeviceStore(Protocol):
    async def add_device(self, user: str, device_id: str, identity_key: bytes,
                         state: DeviceState, now_ms: int) -> None: ...
    async def get_device(self, user: str, device_id: str) -> Device | None: ...
    async def list_devices(self, user: str) -> list[Device]: ...
    async def put_device_list(self, user: str, version: int, body: bytes, signature: bytes,
                              listed_ids: frozenset[str], now_ms: int) -> list[str]: ...
    async def get_device_list(self, user: str) -> StoredDeviceList | None: ...
    async def revoke_device(self, user: str, device_id: str, now_ms: int) -> bool: ...
    async def set_signed_prekey(self, user: str, device_id: str, key_id: int, encoded: bytes,
                                now_ms: int) -> None: ...
    async def add_pq_prekeys(self, user: str, device_id: str,
                             items: list[tuple[int, bool, bytes]], now_ms: int) -> None: ...
    async def add_one_time_prekeys(self, user: str, device_id: str,
                                   items: list[tuple[int, bytes]], now_ms: int) -> int: ...
    async def claim_prekeys(self, user: str, device_id: str,
                            now_ms: int) -> ClaimedBundle | None: ...
    async def count_prekeys(self, user: str, device_id: str) -> tuple[int, int]: ...


class Completion(Generic[T_co]):
    """A write already queued, in order; ``await result()`` once it is committed."""

    async def result(self) -> T_co:
        raise NotImplementedError


class Done(Completion[T_co]):
    """A completion whose result is already known (in-memory storage)."""

    def __init__(self, value: T_co) -> None:
        self._value = value

    async def result(self) -> T_co:
        await trio.lowlevel.checkpoint()
        return self._value


class MailboxStore(Protocol):
    async def deliver(self, sender: str, message_id: str, digest: bytes,
                      payloads: list[tuple[list[str], bytes]], now_ms: int,
                      ttl_ms: int) -> DeliverResult: ...
    async def queue_deliver(self, sender: str, message_id: str, digest: bytes,
                            payloads: list[tuple[list[str], bytes]], now_ms: int, ttl_ms: int,
                            on_commit: Callable[[DeliverResult], None] | None = None
                            ) -> Completion[DeliverResult]: ...
    async def queue_ack(self, device: str, seqs: list[int]) -> Completion[int]: ...
    async def pending(self, device: str, after_seq: int, limit: int) -> list[MailboxEntry]: ...
    async def ack(self, device: str, seqs: list[int]) -> int: ...
    async def expire(self, now_ms: int) -> dict[str, int]: ...
    async def purge_device(self, device: str) -> int: ...
    async def counts(self) -> dict[str, int]: ...


class Storage(Protocol):
    """What the composition root hands out: the three repositories, and a way to close them."""

    @property
    def accounts(self) -> AccountStore: ...
    @property
    def devices(self) -> DeviceStore: ...
    @property
    def mailboxes(self) -> MailboxStore: ...
    async def aclose(self) -> None: ...
