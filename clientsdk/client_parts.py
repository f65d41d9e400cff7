"""What every mixin of ``Client`` may use of ``Client`` and of the other mixins, declared once.

Why: ``Client`` is composed of mixins (``clientsdk.lifecycle``, ``clientsdk.inbox``,
``clientsdk.groups`` …) that each use the client's attributes and call each other's
methods.  Strict mypy checks each mixin on its own, so each must be told what
``self`` has; ``ClientParts`` says it once and every mixin inherits it: the
``Client`` attributes the mixins use, and the methods two or more mixins call (a
stub only one mixin needs stays in that mixin).

The attributes are annotations only: ``Client.__init__`` assigns them.  The methods
are stubs under ``if TYPE_CHECKING:`` so that they never exist at run time: a real
stub would be a method in ``Client``'s MRO, shadowing the real one wherever it came
first, and a call to a method no class defines any more would quietly return None
instead of failing.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import trio

from clientsdk.account import ClientOptions
from clientsdk.connection import Connector
from clientsdk.content import Content
from clientsdk.crypto.identity import DeviceIdentity, MasterKey, PrekeyStore, VerifiedDeviceList
from clientsdk.devicelists import ContactBook
from clientsdk.events import Event
from clientsdk.group_records import KeyRecovery, LocalGroup
from clientsdk.resets import ResetBook
from clientsdk.sessions import SessionBook
from clientsdk.store import Batch, HistoryEntry, Store
from federation.addresses import DeviceAddress
from federation.keys import SignedDeviceList
from federation.rpc import RpcClient


class ClientParts:
    """The attributes and methods of ``Client`` that its mixins share (for the type checker)."""

    user: str
    device_id: str
    address: DeviceAddress
    revoked: bool
    _identity: DeviceIdentity
    _master: MasterKey | None
    _prekeys: PrekeyStore
    _sessions: SessionBook
    _book: ContactBook
    _store: Store
    _lock: trio.Lock
    _store_limiter: trio.CapacityLimiter
    _clock: Callable[[], int]
    _options: ClientOptions
    _connector: Connector | None
    _rpc: RpcClient | None
    _connected: trio.Event
    _dropped: trio.Event
    _running: bool
    _stopping: bool
    _auth_state: str
    _resets: ResetBook
    _receipts_due: dict[str, list[str]]
    _work_ready: trio.Event
    _send_receipts: bool

    if TYPE_CHECKING:   # stubs only: a real one would shadow the real method in Client's MRO
        # Client
        @property
        def identity_key(self) -> bytes: ...

        def _emit(self, event: Event) -> None: ...

        async def _persist(self, batch: Batch) -> None: ...

        async def _device_list(self, rpc: RpcClient, user: str, *, force: bool = False,
                               have_lock: bool = False) -> VerifiedDeviceList: ...

        async def _publish_own_list(self, rpc: RpcClient, signed: SignedDeviceList) -> None: ...

        def _content_for(self, template: Content, user: str, recipients: list[str]) -> bytes: ...

        async def _send_content(self, recipients: list[str], template: Content, *, ephemeral: bool = False,
                                history: HistoryEntry | None = None) -> None: ...

        async def _send_op(self, message_id: str, payloads: list[dict[str, Any]],
                           ephemeral: bool = False) -> None: ...

        async def _until_replaced(self, rpc: RpcClient) -> None: ...

        async def _targets(self, rpc: RpcClient, recipients: list[str]) -> list[str]: ...

        async def _ensure_sessions(self, rpc: RpcClient, targets: list[str]) -> None: ...

        # clientsdk.lifecycle
        async def _wait_rpc(self) -> RpcClient: ...

        # clientsdk.background
        def _queue_delivery_receipts(self, events: list[Event]) -> None: ...

        # clientsdk.group_store
        async def _loaded_groups(self) -> dict[bytes, LocalGroup]: ...

        def _holds(self) -> KeyRecovery: ...

        def _group_batch(self, gid: bytes, batch: Batch | None = None) -> Batch: ...

        # clientsdk.groups
        def _wake_group_sends(self) -> None: ...
