"""Row types and domain errors shared by every storage implementation.

The repositories return these frozen values, never SQLAlchemy rows, so handlers
and the in-memory fake (``memory.py``) see exactly the same types.  The errors
are ``RequestRejected`` subclasses: a handler may let them reach the client
as-is, so their messages name no secret and no payload.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from collections.abc import Callable, Mapping, Sequence
from typing import Generic, Literal, Protocol, TypeVar

import trio

from federation.errors import ErrorCode, RequestRejected
from federation.inbound import HoldBackFull as HoldBackFull  # re-exported: queue_receive refuses with it
from federation.outbound import EnvelopeDraft
from federation.s2s import Envelope, EnvelopeClass

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
    """Outcome of ``deliver``: ``entries`` holds the new rows (empty unless ``new``);
    ``outbound`` the envelopes queued for remote domains in the same write (numbered)."""

    status: Literal["new", "duplicate", "conflict"]
    entries: tuple[MailboxEntry, ...]
    outbound: tuple[Envelope, ...] = ()


# --- federation -------------------------------------------------------------------------------

SUBSCRIPTION_TTL_MS = 30 * DAY_MS
INBOUND_TXN_TTL_MS = 2 * 3600 * 1000       # >= the protocol's one hour
INBOUND_MAX_HELD = 10_000


@dataclass(frozen=True, slots=True)
class OutboundDraft:
    """An envelope to queue for a destination; storage numbers it (seq) inside the write."""

    destination: str
    cls: EnvelopeClass
    draft: EnvelopeDraft


@dataclass(frozen=True, slots=True)
class OutboundState:
    """A destination's persisted queue state (restored by the outbound service at start)."""

    destination: str
    next_seq: dict[EnvelopeClass, int]     # the seq the NEXT queued envelope of a class gets
    failures: int
    next_attempt_ms: int
    last_failure_ms: int                   # -1 if none


@dataclass(frozen=True, slots=True)
class ReceiveResult:
    """Outcome of ``queue_receive`` for one verified transaction."""

    duplicate: bool                        # txn id already seen: nothing changed
    released: tuple[Envelope, ...]         # newly releasable, control first, seq order per class
    held: int                              # envelopes now held back behind a gap (this origin)
    # Released envelopes that had a ``DeliveryPlan``: stored in mailboxes in the same write
    # (not in ``released``), with the mailbox outcome of each.
    delivered: tuple[tuple[Envelope, DeliverResult], ...] = ()


@dataclass(frozen=True, slots=True)
class DeliveryPlan:
    """How to store a remote message in mailboxes if the write that receives it also releases it."""

    sender: str
    message_id: str
    digest: bytes
    payloads: list[tuple[list[str], bytes]]
    ttl_ms: int


@dataclass(frozen=True, slots=True)
class RemoteDeviceList:
    """Another domain's user's signed device list, as fetched (``body``/``sig`` verbatim),
    with the master key it verified under (later pushed lists must verify under it too)."""

    user: str
    version: int
    body: bytes
    sig: bytes
    fetched_ms: int
    master_key: bytes


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

    def on_done(self, callback: Callable[[], None]) -> bool:
        """Call ``callback()`` on the trio thread once ``result_now`` can answer.

        Lets a connection answer from the writer's wake-up instead of a task per
        request.  False (this default) if unsupported: await ``result`` instead.
        """
        return False

    def result_now(self) -> T_co:
        """What ``result`` returns or raises; only once ``on_done`` called back."""
        raise NotImplementedError


class Done(Completion[T_co]):
    """A completion whose result is already known (in-memory storage)."""

    def __init__(self, value: T_co) -> None:
        self._value = value

    async def result(self) -> T_co:
        await trio.lowlevel.checkpoint()
        return self._value

    def on_done(self, callback: Callable[[], None]) -> bool:
        callback()
        return True

    def result_now(self) -> T_co:
        return self._value


class MailboxStore(Protocol):
    async def deliver(self, sender: str, message_id: str, digest: bytes,
                      payloads: list[tuple[list[str], bytes]], now_ms: int,
                      ttl_ms: int, outbound: Sequence[OutboundDraft] = ()) -> DeliverResult: ...
    async def queue_deliver(self, sender: str, message_id: str, digest: bytes,
                            payloads: list[tuple[list[str], bytes]], now_ms: int, ttl_ms: int,
                            on_commit: Callable[[DeliverResult], None] | None = None,
                            outbound: Sequence[OutboundDraft] = ()
                            ) -> Completion[DeliverResult]: ...
    async def queue_ack(self, device: str, seqs: list[int]) -> Completion[int]: ...
    async def pending(self, device: str, after_seq: int, limit: int) -> list[MailboxEntry]: ...
    async def ack(self, device: str, seqs: list[int]) -> int: ...
    async def expire(self, now_ms: int) -> dict[str, int]: ...
    async def purge_device(self, device: str) -> int: ...
    async def counts(self) -> dict[str, int]: ...


class FederationStore(Protocol):
    """Durable server-to-server state: outbound queues, inbound ordering, remote lists."""

    # --- outbound ---
    async def queue_outbound(self, drafts: Sequence[OutboundDraft], now_ms: int,
                             on_commit: Callable[[list[Envelope]], None] | None = None
                             ) -> Completion[list[Envelope]]: ...
    async def outbound_states(self) -> list[OutboundState]: ...
    async def outbound_pending(self, destination: str) -> list[Envelope]: ...
    async def queue_outbound_ack(self, destination: str,
                                 envelope_ids: Sequence[bytes]) -> Completion[int]: ...
    async def queue_backoff(self, destination: str, failures: int, next_attempt_ms: int,
                            last_failure_ms: int) -> Completion[None]: ...
    async def outbound_stats(self, now_ms: int) -> dict[str, tuple[int, int]]: ...
    # --- inbound ---
    async def queue_receive(self, origin: str, txn_id: bytes, envelopes: Sequence[Envelope],
                            now_ms: int, txn_ttl_ms: int = INBOUND_TXN_TTL_MS,
                            max_held: int = INBOUND_MAX_HELD, plans: Mapping[bytes, DeliveryPlan] | None = None,
                            on_commit: Callable[[ReceiveResult], None] | None = None
                            ) -> Completion[ReceiveResult]: ...
    async def released(self) -> list[tuple[str, Envelope]]: ...
    async def queue_processed(self, origin: str,
                              envelope_ids: Sequence[bytes]) -> Completion[int]: ...
    async def inbound_next_seq(self, origin: str) -> dict[EnvelopeClass, int]: ...
    # --- remote device lists ---
    async def put_remote_device_list(self, entry: RemoteDeviceList) -> bool: ...
    async def get_remote_device_list(self, user: str) -> RemoteDeviceList | None: ...
    async def remote_device_lists(self, domain: str) -> list[RemoteDeviceList]: ...
    # --- subscriptions ---
    async def subscribe(self, user: str, domain: str, now_ms: int) -> None: ...
    async def subscribers(self, user: str) -> list[str]: ...
    async def subscriptions(self) -> dict[str, list[str]]: ...
    # --- housekeeping ---
    async def expire(self, now_ms: int,
                     subscription_ttl_ms: int = SUBSCRIPTION_TTL_MS) -> dict[str, int]: ...


class Storage(Protocol):
    """What the composition root hands out: the repositories, and a way to close them."""

    @property
    def accounts(self) -> AccountStore: ...
    @property
    def devices(self) -> DeviceStore: ...
    @property
    def mailboxes(self) -> MailboxStore: ...
    @property
    def federation(self) -> FederationStore: ...
    async def aclose(self) -> None: ...
