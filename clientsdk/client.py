"""The trio client: one device of one user, with its encrypted store.

    client = await Client.register(path, "alice@example.org", password, connect=connector, passphrase=pp)
    async with client.connect():
        await client.send("bob@example.org", "hi")
        async for event in client.events():
            ...

Why it is shaped this way: the crypto core is sans-I/O (``clientsdk.crypto``);
this module is the edge that owns the connection (signed challenge auth,
reconnect with backoff and jitter), the store (one thread hop per batch) and the
events.  No ciphertext leaves before a restart from the store would skip its
message key (the send lease, ``clientsdk.crypto.session``), and an envelope is
acknowledged only after its event and the new session state are stored (fsynced),
so a crash or a power cut loses no received message and never reuses a key.
"""

from __future__ import annotations

import math
import os
from collections import OrderedDict
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any, Self

import trio

from clientsdk.account import Account, ClientOptions
from clientsdk.background import BackgroundMixin
from clientsdk.backups import BackupMixin
from clientsdk.connection import Connector
from clientsdk.contacts import Contact
from clientsdk.content import TEXT, Content
from clientsdk.crypto.errors import CryptoError
from clientsdk.crypto.identity import (
    DeviceIdentity, MasterKey, PrekeyStore, VerifiedDeviceList, add_device, new_device_list,
)
from clientsdk.crypto.primitives import ct_equal
from clientsdk.crypto.session import Session
from clientsdk.devices import DevicesMixin, master_first
from clientsdk.errors import MAX_STALE_RETRIES, NotConnected, NotMasterDevice, SendFailed, StoreCorrupted
from clientsdk.events import Event, MessageReceived, SecurityEvent
from clientsdk.group_commit import GroupCommit
from clientsdk.groups import GroupsMixin
from clientsdk.history import HistoryMixin
from clientsdk.inbox import InboxMixin
from clientsdk.lifecycle import ConnectionMixin
from clientsdk.repair import DeliveryRepairMixin, RecentSend
from clientsdk.resets import KV_NAME as RESETS_KV, ResetBook
from clientsdk.sessions import SessionBook, verified_bundle
from clientsdk.store import Batch, HistoryEntry, Store
from clientsdk.verify import TrustBook, VerifyMixin
from federation.addresses import DeviceAddress, UserAddress, new_device_id
from federation.errors import ErrorCode
from federation.keys import BadBundle, DeviceEntry, SignedDeviceList
from federation.rpc import RemoteError, RpcClient, open_rpc
from federation.transport import TransportClosed


MessageHandler = Callable[[MessageReceived], Awaitable[None]]

DEFAULT_OPTIONS = ClientOptions()



class _RandomPool:
    """Random bytes from ``os.urandom``, drawn 4 KiB at a time.

    ``os.urandom`` releases the GIL, and getting it back while a store thread holds it
    costs far more than the syscall (``clientsdk.store``): one draw per 256 message ids
    instead of one per send.  The pool is emptied in a forked child, so a parent and
    its child never hand out the same bytes.
    """

    def __init__(self, size: int = 4096) -> None:
        self._size = size
        self._buffer = b""
        self._used = 0
        os.register_at_fork(after_in_child=self._forget)

    def _forget(self) -> None:
        self._buffer, self._used = b"", 0

    def take(self, n: int) -> bytes:
        start, end = self._used, self._used + n
        if end > len(self._buffer):
            self._buffer, start, end = os.urandom(max(self._size, n)), 0, n
        self._used = end
        return self._buffer[start:end]


_random = _RandomPool()


def _pass_if_free(lock: trio.Lock) -> bool:
    """Take and release ``lock`` if it is free and nobody waits for it; False (untouched) if not."""
    try:
        lock.acquire_nowait()
    except trio.WouldBlock:
        return False
    lock.release()
    return True


def _new_message_id() -> str:
    return _random.take(16).hex()


class Client(ConnectionMixin, InboxMixin, BackgroundMixin, BackupMixin, VerifyMixin, DevicesMixin, HistoryMixin,
             GroupsMixin, DeliveryRepairMixin):
    """One device's view of the world.  Create with ``register``, ``login`` or ``open``."""

    def __init__(self, store: Store, account: Account, prekeys: PrekeyStore, *, connector: Connector | None,
                 options: ClientOptions) -> None:
        self._store = store
        self.user = account.user
        self.device_id = account.device_id
        self.address = UserAddress.parse(account.user).device(account.device_id)
        self._identity = account.identity
        self._master = account.master
        self._account = account
        self._prekeys = prekeys
        self._connector = connector
        self._options = options
        self._clock = options.clock
        self._sessions = SessionBook()
        self._book = TrustBook(self.user, self._emit)
        self._lock = trio.Lock()                 # serialises every change of crypto state
        self._send_order = trio.Lock()           # send ops leave in encryption order (``_send_content``)
        self._store_limiter = trio.CapacityLimiter(1)
        self._commits = GroupCommit(store.stage, store.commit_staged, store.abort_staged, self._store_limiter)
        self._rpc: RpcClient | None = None
        self._connected = trio.Event()           # set while ``_rpc`` is a connection
        self._dropped = trio.Event()             # set once the loop has let go of that connection
        self._event_send, self._event_receive = trio.open_memory_channel[Event](math.inf)
        self._handlers: list[MessageHandler] = []
        self.revoked = False
        self._store_path: Path | None = None
        self._auth_state = "active"
        self._running = False
        self._stopping = False
        self._resets = ResetBook(options.session_reset_interval_ms)
        self._recent_sends: OrderedDict[str, RecentSend] = OrderedDict()    # for delivery reports
        self._receipts_due: dict[str, list[str]] = {}
        self._work_ready = trio.Event()
        self._send_receipts = options.delivery_receipts

    def __repr__(self) -> str:
        return f"Client({self.address}, master={self._master is not None})"

    @property
    def identity_key(self) -> bytes:
        """This device's public identity key (what a linking code carries to the master device)."""
        return self._identity.public_key

    @property
    def is_master(self) -> bool:
        return self._master is not None

    # --- creating and opening -------------------------------------------------------------

    @classmethod
    async def register(cls, store_path: str | Path, user: str, password: str, *, connect: Connector,
                       store_key: bytes | None = None, passphrase: str | None = None,
                       options: ClientOptions = DEFAULT_OPTIONS, invite: str | None = None) -> Client:
        """Create the account and its first device, which holds the master key (device list v1)."""
        master = MasterKey.generate()
        client = await cls._create(store_path, user, master, connect, store_key, passphrase, options)
        now = client._clock()
        signed = new_device_list(master, client.user, [DeviceEntry(client.device_id, client.identity_key, now)], now)
        client._book.set_own(master.public_key, signed)
        params: dict[str, Any] = {"user": client.user, "password": password, "master_key": master.public_key,
                                  "device_id": client.device_id, "identity_key": client.identity_key,
                                  "device_list": signed.to_wire()}
        if invite is not None:
            params["invite"] = invite
        await client._enrol("register", params, Batch(contacts={client.user: client._book.record(client.user)}))
        return client

    @classmethod
    async def login(cls, store_path: str | Path, user: str, password: str, *, connect: Connector,
                    store_key: bytes | None = None, passphrase: str | None = None,
                    options: ClientOptions = DEFAULT_OPTIONS) -> Client:
        """Add a *pending* device by password; it becomes current once the master device approves it."""
        client = await cls._create(store_path, user, None, connect, store_key, passphrase, options)
        await client._enrol("login", {"user": client.user, "password": password, "device_id": client.device_id,
                                      "identity_key": client.identity_key}, Batch())
        return client

    @classmethod
    async def open(cls, store_path: str | Path, *, store_key: bytes | None = None, passphrase: str | None = None,
                   connect: Connector | None = None, options: ClientOptions = DEFAULT_OPTIONS) -> Client:
        """Load an existing device from its store: the same device, with the same sessions (LESSONS #11)."""
        store = await trio.to_thread.run_sync(lambda: Store.open(store_path, store_key=store_key,
                                                                 passphrase=passphrase))
        try:
            snapshot = await trio.to_thread.run_sync(store.load)
            account, prekeys = Account.from_kv(snapshot.kv)
            client = cls(store, account, prekeys, connector=connect, options=options)
            try:
                for device, state in snapshot.sessions.items():
                    client._sessions.load(device, state)
            except CryptoError:
                raise StoreCorrupted("a stored session does not parse") from None
            # A store that was not closed may be older than what was sent: no reserved message
            # key is used again (the next send stores the moved state, fsynced).
            client._sessions.recover_send_leases()
            for user, record in snapshot.contacts.items():
                client._book.contacts[user] = Contact.from_record(user, record)
            if RESETS_KV in snapshot.kv:
                client._resets = ResetBook.from_bytes(snapshot.kv[RESETS_KV], options.session_reset_interval_ms)
        except BaseException:
            store.close()
            raise
        return client

    @classmethod
    async def _create(cls, store_path: str | Path, user: str, master: MasterKey | None, connect: Connector,
                      store_key: bytes | None, passphrase: str | None, options: ClientOptions) -> Client:
        account = Account(str(UserAddress.parse(user)), new_device_id(), DeviceIdentity.generate(), master)
        store = await trio.to_thread.run_sync(lambda: Store.create(store_path, store_key=store_key,
                                                                   passphrase=passphrase, kdf=options.kdf))
        client = cls(store, account, PrekeyStore(), connector=connect, options=options)
        client._store_path = Path(store_path)
        return client

    async def _enrol(self, op: str, params: dict[str, Any], batch: Batch,
                     after: Callable[[RpcClient], Awaitable[None]] | None = None) -> None:
        """Register or log in, persist the new device, authenticate and upload its prekeys."""
        uploads = self._prekeys.build_uploads(self._identity, self._clock(),
                                              one_time_count=self._options.one_time_prekeys)
        batch.kv.update(self._account.to_kv(self._prekeys))
        connector = self._connector
        enrolled = False
        try:
            if connector is None:
                raise NotConnected("register and login need a connector")
            async with trio.open_nursery() as nursery:
                transport = await connector(nursery)
                async with open_rpc(transport) as rpc:
                    await rpc.request(op, **params)
                    enrolled = True
                    await self._persist(batch)
                    await self._authenticate(rpc)
                    await rpc.request("upload_keys", signed_prekey=uploads.signed_prekey.to_wire(),
                                      pq_prekeys=[uploads.pq_last_resort.to_wire()],
                                      one_time_prekeys=[k.to_wire() for k in uploads.one_time_prekeys])
                    if after is not None:
                        await after(rpc)
                nursery.cancel_scope.cancel()
        except BaseException:
            self._store.close()
            if not enrolled and self._store_path is not None:
                # Nothing exists on the server: remove the fresh store so the user can simply retry.
                for suffix in ("", "-wal", "-shm"):
                    Path(str(self._store_path) + suffix).unlink(missing_ok=True)
            raise

    async def aclose(self) -> None:
        """Close the store (the connection ends with ``connect()``'s block)."""
        async with self._lock:
            # Sends queued outside the lock are committed first, and fsynced: with nothing left
            # unsynced, the send leases go back and the next start skips no message keys.
            released = self._sessions.release_send_leases()
            await self._persist(Batch(sessions={a: self._sessions.state_bytes(a) for a in released}))
            await trio.to_thread.run_sync(self._store.close, limiter=self._store_limiter)

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    # --- store -------------------------------------------------------------------------------

    async def _persist(self, batch: Batch) -> None:
        """Store ``batch`` durably (group commit: it may share one transaction with batches queued with it)."""
        await self._commits.wait(self._commits.add(batch, self._clock()))

    async def history(self, conversation: str, limit: int = 100) -> list[HistoryEntry]:
        """The stored messages of a 1:1 conversation (decrypted from the store), oldest first."""
        return await trio.to_thread.run_sync(self._store.history, conversation, limit, limiter=self._store_limiter)

    # --- events ----------------------------------------------------------------------------

    def _emit(self, event: Event) -> None:
        self._event_send.send_nowait(event)

    def events(self) -> trio.MemoryReceiveChannel[Event]:
        """Every event, in order (``async for event in client.events()``); messages are stored first.

        A channel rather than a generator: breaking out of the loop and iterating
        again later loses nothing and leaves no generator to finalise.
        """
        return self._event_receive

    def on_message(self, handler: MessageHandler) -> MessageHandler:
        """Decorator for bots: ``@client.on_message`` ``async def reply(event): ...``."""
        self._handlers.append(handler)
        return handler

    async def run(self, connector: Connector | None = None) -> None:
        """Connect and call the ``on_message`` handlers for every incoming message, forever."""
        async with self.connect(connector):
            async for event in self.events():
                if isinstance(event, MessageReceived) and not event.outgoing:
                    for handler in self._handlers:
                        await handler(event)

    # --- device lists ------------------------------------------------------------------------

    @asynccontextmanager
    async def _locked(self, have_lock: bool) -> AsyncIterator[None]:
        if have_lock:
            yield
        else:
            async with self._lock:
                yield

    async def _device_list(self, rpc: RpcClient, user: str, *, force: bool = False,
                           have_lock: bool = False) -> VerifiedDeviceList:
        """The verified current list of ``user``: cached, or fetched and checked by the contact book."""
        cached = self._book.fresh(user)
        if cached is not None and not force:
            return cached
        answer = await rpc.request("get_device_list", user=user)
        outcome = self._book.accept(user, answer, self._clock())
        if outcome.changed:
            batch = Batch(contacts={user: self._book.record(user)})
            async with self._locked(have_lock):
                for device_id in outcome.removed:
                    address = f"{user}/{device_id}"
                    if self._sessions.drop(address):
                        batch.deleted_sessions.add(address)
                await self._persist(batch)
        return outcome.current

    async def _publish_own_list(self, rpc: RpcClient, signed: SignedDeviceList) -> None:
        if self._master is None:
            raise NotMasterDevice("only the master device signs the device list")
        signed = master_first(self._master, signed, self.device_id)      # the master device is listed first
        before = self._book.current(self.user)
        await rpc.request("put_device_list", device_list=signed.to_wire())
        self._book.set_own(self._master.public_key, signed)
        await self._persist(Batch(contacts={self.user: self._book.record(self.user)}))
        after = self._book.current(self.user)
        if before is not None and after is not None:      # my new devices learn my groups (clientsdk.groups)
            await self._sync_new_own_devices(set(after.device_list.device_ids() - before.device_list.device_ids()))

    async def approve_device(self, device_id: str, identity_key: bytes | None = None, *,
                             share_history: bool = True) -> int:
        """Sign a pending device of my user into the list (master device only); returns the new version.

        ``identity_key`` comes from the new device's linking code when there is one;
        without it the key the server reports for the pending device is used.  With
        ``share_history`` the device first gets my history (``clientsdk.history``).
        """
        if self._master is None:
            raise NotMasterDevice("only the master device can approve devices")
        rpc = await self._wait_rpc()
        known = {d["id"]: d for d in (await rpc.request("devices"))["devices"]}
        device = known.get(device_id)
        if device is None or device.get("state") != "pending":
            raise SendFailed("no such pending device", code="not_found")
        if identity_key is not None and not ct_equal(identity_key, device["identity_key"]):
            raise SendFailed("the server reports another identity key for this device", code="key_mismatch")
        transfer = await self._share_history(device_id, device["identity_key"]) if share_history else None
        rpc = await self._wait_rpc()
        current = await self._device_list(rpc, self.user, force=True)
        signed = add_device(self._master, current.device_list, device_id, device["identity_key"], self._clock())
        await self._publish_own_list(rpc, signed)
        if transfer is not None:
            await self._finish_history(transfer)
        return current.device_list.version + 1

    # --- sending -----------------------------------------------------------------------------

    async def send(self, to: str, text: str) -> str:
        """Send ``text`` to every current device of ``to`` and my own other devices; returns the message id."""
        to = str(UserAddress.parse(to))
        message_id = _new_message_id()
        sent_ms = self._clock()
        await self._send_content([to], Content(TEXT, message_id, to, text, sent_ms, 0, bytes(32)),
                                 history=HistoryEntry(to, str(self.address), message_id, text, sent_ms, sent_ms,
                                                      True))
        return message_id

    def _content_for(self, template: Content, user: str, recipients: list[str]) -> bytes:
        """The plaintext for ``user``'s devices: ``to`` names them (or, for my own devices, the one recipient)."""
        if user == self.user:
            to = recipients[0] if len(recipients) == 1 else self.user
        else:
            to = user
        own = self._book.current(self.user)
        return replace(template, to=to, list_version=own.device_list.version if own else 0,
                       list_hash=own.signed.digest if own else bytes(32)).to_bytes()

    async def _send_content(self, recipients: list[str], template: Content, *, ephemeral: bool = False,
                            history: HistoryEntry | None = None) -> None:
        """Encrypt ``template`` for every current device of ``recipients`` and my other devices; one send op.

        On ``stale_devices`` the lists are re-fetched and the whole round repeats under
        the same message id (``template.id``); the send lease covering each round's
        ratchet steps is fsynced before its ciphertext leaves (``clientsdk.crypto.session``).
        """
        message_id = template.id
        if not ephemeral:
            self._remember_send(message_id, recipients, template)
        stale_rounds = 0
        while stale_rounds < MAX_STALE_RETRIES:
            rpc = await self._wait_rpc()
            try:
                targets = await self._targets(rpc, recipients)
                await self._ensure_sessions(rpc, targets)
            except TransportClosed:
                await self._until_replaced(rpc)
                continue
            if not targets:
                return                              # nobody to tell (no contacts, no other devices)
            async with self._lock:
                payloads = []
                batch = Batch()
                plaintexts: dict[str, bytes] = {}
                durable = False
                for address in targets:
                    user = address.partition("/")[0]
                    if user not in plaintexts:
                        plaintexts[user] = self._content_for(template, user, recipients)
                    ciphertext, renewed = self._sessions.encrypt(address, plaintexts[user])
                    payloads.append({"devices": [address], "ciphertext": ciphertext})
                    if renewed:         # inside a lease the stored state may lag: a restart skips the lease
                        batch.sessions[address] = self._sessions.state_bytes(address)
                        durable = True
                if history is not None:
                    batch.messages.append(history)
                    history = None
                # Queued under the lock, so store order is ratchet order; committed outside it,
                # so concurrent sends share one commit (group commit).  A renewed send lease is
                # fsynced before the ciphertext leaves; inside a lease nothing of the ratchet
                # needs storing (a restart skips the lease), and the history copy is written
                # (unsynced) while the server answers, with the sends queued meanwhile.
                commit = self._commits.add(batch, self._clock(), durable)
            # The send order lock is FIFO and taken before this task yields, so ciphertexts leave
            # in the order they were encrypted (a receiver need not skip and store keys).  A send
            # with nothing to wait for that finds it free passes at once (no yield, no scope).
            if durable or not _pass_if_free(self._send_order):
                with trio.CancelScope(shield=True):
                    async with self._send_order:
                        if durable:
                            await self._commits.wait_shielded(commit)
            try:
                await self._send_op(message_id, payloads, ephemeral)
                return
            except RemoteError as exc:
                if exc.code == ErrorCode.FORBIDDEN and self._auth_state == "pending" \
                        and await self._listed_now(rpc):
                    # The server fixes a connection's pending state at auth: re-authenticate as active.
                    self._auth_state = "active"
                    await rpc.transport.aclose()
                    await self._until_replaced(rpc)
                    stale_rounds += 1
                    continue
                if exc.code != ErrorCode.STALE_DEVICES:
                    raise SendFailed(f"the server refused the message: {exc.code.value}",
                                     code=exc.code.value) from None
                stale_rounds += 1
                for user in (exc.details or {}):
                    self._book.mark_stale(str(user))
            finally:
                if not durable:                     # send returns once its history copy is written
                    await self._commits.wait(commit)
        raise SendFailed("recipients' devices kept changing; gave up", code="stale_devices")

    async def _send_op(self, message_id: str, payloads: list[dict[str, Any]], ephemeral: bool = False) -> None:
        """One ``send`` op; after a lost connection the very same bytes are retried (idempotent).

        An ephemeral send is not retried: it reaches connected devices only, and late is useless.
        """
        while True:
            rpc = await self._wait_rpc()
            try:
                await rpc.request("send", message_id=message_id, payloads=payloads, ephemeral=ephemeral)
                return
            except TransportClosed:
                if ephemeral:
                    return
                await self._until_replaced(rpc)

    async def _listed_now(self, rpc: RpcClient) -> bool:
        """True if my user's current signed list names this device (a pending device got approved)."""
        own = await self._device_list(rpc, self.user, force=True)
        return own.device_list.identity_key_of(self.device_id) is not None

    async def _until_replaced(self, rpc: RpcClient) -> None:
        """Wait until the connection loop has dropped ``rpc`` (after it failed under us)."""
        while self._rpc is rpc:
            await self._dropped.wait()         # this connection's: set when the loop lets go of it

    async def _targets(self, rpc: RpcClient, recipients: list[str]) -> list[str]:
        mine = await self._device_list(rpc, self.user)
        out = [f"{self.user}/{d}" for d in sorted(mine.device_list.device_ids()) if d != self.device_id]
        for to in recipients:
            if to != self.user:
                theirs = await self._device_list(rpc, to)
                out += [f"{to}/{d}" for d in sorted(theirs.device_list.device_ids())]
        return out

    async def _ensure_sessions(self, rpc: RpcClient, targets: list[str]) -> None:
        """Claim bundles for devices without a session and start PQXDH sessions with them."""
        wanted: dict[str, list[str]] = {}
        for address in targets:
            if not self._sessions.has(address):
                parsed = DeviceAddress.parse(address)
                wanted.setdefault(str(parsed.user), []).append(parsed.device_id)
        for user, device_ids in wanted.items():
            answer = await rpc.request("claim", user=user, device_ids=device_ids)
            if answer.get("missing"):
                raise SendFailed(f"{user} has a device without prekeys", code="no_prekeys")
            async with self._lock:
                batch = Batch()
                for raw in answer.get("bundles", []):
                    try:
                        bundle = verified_bundle(raw, self._book.listed_key)
                    except BadBundle as exc:
                        self._emit(SecurityEvent("bad_bundle", user, None, exc.message))
                        raise SendFailed("a recipient's prekey bundle was refused", code="bad_bundle") from None
                    if self._sessions.has(bundle.device):
                        continue                  # a session appeared meanwhile (their prekey message)
                    self._sessions.add(bundle.device, Session.initiate(self._identity, self.address, bundle))
                    batch.sessions[bundle.device] = self._sessions.state_bytes(bundle.device)
                await self._persist(batch)
