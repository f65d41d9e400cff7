"""Federation (issue 5, DESIGN §5): durable outbound queues, verified inbound transactions,
remote keys and device lists, delivery reports.

Three parts, each small and driven by the sans-I/O cores in ``federation/``:

* ``OutboundSender`` — one ``OutboundQueue`` per destination, fed by storage (envelopes are
  numbered inside the database write that stores them, so nothing acknowledged to a client
  is lost and no seq gap can appear), a window of signed transactions in flight, backoff
  kept in storage, control before messages.
* ``InboundReceiver`` — the ``FederationEndpoint`` half that takes transactions: allow/deny
  lists, per-origin rate limits, ``verify_transaction`` (the ONE origin-binding check),
  store-and-ack, then release in ``seq`` order to mailboxes and the device-list cache.
  Released envelopes stay in storage until processed, so a crash re-processes them;
  every effect is idempotent (mailbox delivery is keyed by sender and message id).
* ``RemoteKeys`` — remote users' signed device lists (cached, refreshed on change by
  control envelopes and by periodic digest comparison) and prekey claims (never cached)
  over the synchronous signed ``s2s-request``; and the serving side of those requests.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Iterable
from typing import TYPE_CHECKING, Any

import trio

from federation import codec, s2s, signing
from federation.addresses import DeviceAddress, UserAddress
from federation.discovery import Discovery, ServerKeyError, VerifyKey
from federation.errors import ErrorCode, ProtocolError, RequestRejected, SecureChatError
from federation.keys import BadDeviceList, SignedDeviceList
from federation.links import LinkPool
from federation.outbound import OutboundConfig, OutboundQueue, draft
from federation.s2s import Envelope, EnvelopeClass, EnvelopeKind
from federation.signing import Purpose
from federation.validate import field, require_map
from homeserver.clock import Clock
from homeserver.config import Config
from homeserver.ratelimit import RateLimiter
from homeserver.server_keys import ServerKey, current_key
from homeserver.storage.models import FederationStore, OutboundDraft, RemoteDeviceList

if TYPE_CHECKING:
    from homeserver.handlers.directory import DeviceDirectory

log = logging.getLogger("securechat.federation")

SERVER_LOCALPART = "=server"          # sender/recipient of server-originated envelopes
REQUEST_REPLAY_WINDOW_S = 600.0
REMOTE_LIST_REFRESH_MS = 86_400_000   # re-fetch (and so re-subscribe) a cached remote list after a day
MAX_REMEMBERED_REQUESTS = 100_000
VERIFIED_LISTS_CACHED = 10_000
DELIVERY_REPORT_TTL_MS = 7 * 86_400_000

Rng = Callable[[int], bytes]


def server_address(domain: str) -> str:
    """The reserved address a homeserver uses for envelopes it originates itself."""
    return f"{SERVER_LOCALPART}@{domain}"


class FederationDisabled(RequestRejected):
    code = ErrorCode.UNKNOWN_DOMAIN


class DomainNotPermitted(RequestRejected):
    code = ErrorCode.FORBIDDEN


# --- keys of other servers -----------------------------------------------------------------


async def _fetch_key(discovery: Discovery, domain: str, key_id: str) -> VerifyKey | None:
    """The origin's published key ``key_id``; an unknown id triggers one rate-limited refresh."""
    key = (await discovery.lookup(domain)).key(key_id)
    if key is None:
        try:
            await discovery.verify_key(domain, key_id, 0, 0)
        except ServerKeyError:
            pass
        key = (await discovery.lookup(domain)).key(key_id)
    return key


async def key_lookup_for(discovery: Discovery, domain: str, key_id: str) -> s2s.KeyLookup:
    """A synchronous ``KeyLookup`` for ``verify_transaction``/``verify_request``, resolved now."""
    key = await _fetch_key(discovery, domain, key_id)

    def lookup(origin: str, wanted: str) -> tuple[bytes, int, int]:
        if key is None or origin != domain or wanted != key_id:
            raise LookupError(wanted)
        return key.public_key, key.valid_from_ms, key.valid_until_ms

    return lookup


# --- outbound ------------------------------------------------------------------------------


class OutboundSender:
    """Sends every destination's queue as signed transactions, a window at a time."""

    def __init__(self, config: Config, store: FederationStore, links: LinkPool, server_keys: list[ServerKey],
                 clock: Clock, rng: Rng = os.urandom) -> None:
        fed = config.federation
        self.domain = config.domain
        self.store = store
        self.links = links
        self.server_keys = server_keys
        self.clock = clock
        self.rng = rng
        self.queue_config = OutboundConfig(max_batch_envelopes=fed.max_batch_envelopes, max_wait_ms=fed.batch_wait_ms,
                                           max_in_flight=fed.max_in_flight, backoff_base_ms=fed.backoff_base_ms,
                                           backoff_cap_ms=fed.backoff_cap_ms)
        self.queues: dict[str, OutboundQueue] = {}
        self._wakeups: dict[str, trio.Event] = {}
        self._nursery: trio.Nursery | None = None
        self.sent_transactions = 0
        self.failed_transactions = 0

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Restore every queue from storage, then run one worker per destination."""
        async with trio.open_nursery() as nursery:
            for state in await self.store.outbound_states():
                pending = await self.store.outbound_pending(state.destination)
                self.queues[state.destination] = OutboundQueue.restore(
                    self.domain, state.destination, next_seq=dict(state.next_seq), failures=state.failures,
                    next_attempt_ms=state.next_attempt_ms, last_failure_ms=state.last_failure_ms,
                    envelopes=pending, config=self.queue_config)
            self._nursery = nursery
            for destination in self.queues:
                self._start_worker(destination)
            task_status.started()
            await trio.sleep_forever()

    def on_committed(self, envelopes: Iterable[Envelope]) -> None:
        """Storage committed these numbered envelopes (called in commit order): send them."""
        for env in envelopes:
            destination = s2s.address_domain(env.recipients[0])
            queue = self.queues.get(destination)
            if queue is None:
                queue = self.queues[destination] = OutboundQueue(self.domain, destination, self.queue_config)
                self._start_worker(destination)
            queue.add(env)
            self._wake(destination)

    async def enqueue(self, drafts: list[OutboundDraft]) -> None:
        """Durably queue server-originated envelopes (control traffic, reports)."""
        if drafts:
            completion = await self.store.queue_outbound(drafts, self.clock(), on_commit=self.on_committed)
            await completion.result()

    async def report_delivery(self, origin: str, env: Envelope, message_id: str,
                              stale: dict[str, dict[str, list[str]]]) -> None:
        """Send a signed ``delivery_report`` back to the sending device (DESIGN §5)."""
        now = self.clock()
        key = current_key(self.server_keys, now)
        fields = {"reporter": self.domain, "sender": env.sender, "message_id": message_id, "ts_ms": now,
                  "users": stale}
        body = signing.signing_input(Purpose.DELIVERY_REPORT, fields)
        report = codec.encode({"body": body, "key_id": key.key_id,
                               "sig": signing.sign(key.private_key, Purpose.DELIVERY_REPORT, fields)})
        await self.enqueue([OutboundDraft(origin, EnvelopeClass.CONTROL, draft(
            EnvelopeKind.DELIVERY_REPORT, server_address(self.domain), [env.sender], report,
            now + DELIVERY_REPORT_TTL_MS, self.rng))])

    def stats(self) -> dict[str, dict[str, int]]:
        now = self.clock()
        return {dest: {"depth": q.depth(), "oldest_age_ms": q.oldest_age_ms(now), "in_flight": q.in_flight,
                       "failures": q.backoff_state[0], "next_attempt_ms": q.next_attempt_ms}
                for dest, q in sorted(self.queues.items())}

    def _wake(self, destination: str) -> None:
        event = self._wakeups.get(destination)
        if event is not None:
            event.set()

    def _start_worker(self, destination: str) -> None:
        if self._nursery is not None and destination not in self._wakeups:
            self._wakeups[destination] = trio.Event()
            self._nursery.start_soon(self._worker, destination, self._nursery)

    async def _worker(self, destination: str, nursery: trio.Nursery) -> None:
        queue = self.queues[destination]
        while True:
            now = self.clock()
            batch = queue.next_batch(now, self.rng)
            if batch is not None:
                nursery.start_soon(self._attempt, destination, queue, batch)
                continue
            self._wakeups[destination] = event = trio.Event()
            wake_ms = queue.next_wakeup_ms(now)
            with trio.move_on_after((wake_ms - now) / 1000 if wake_ms is not None else float("inf")):
                await event.wait()

    async def _attempt(self, destination: str, queue: OutboundQueue, batch: Any) -> None:
        now = self.clock()
        key = current_key(self.server_keys, now)
        frame = s2s.sign_transaction(key.private_key, key.key_id, origin=self.domain, destination=destination,
                                     ts_ms=now, txn_id=batch.txn_id, envelopes=batch.envelopes,
                                     envelopes_checked=True)      # storage checked each when it was queued
        try:
            link = await self.links.get(destination)
            await link.send_transaction(frame)
        except (SecureChatError, OSError) as exc:
            self.failed_transactions += 1
            code = getattr(exc, "code", ErrorCode.REMOTE_ERROR)
            log.warning("transaction to %s failed (%s: %s); %d envelopes requeued", destination,
                        getattr(code, "value", code), getattr(exc, "message", type(exc).__name__),
                        len(batch.envelopes))
            queue.on_failure(batch.txn_id, self.clock(), self.rng)
            failures, next_attempt, last_failure = queue.backoff_state
            await self.store.queue_backoff(destination, failures, next_attempt, last_failure)
        else:
            self.sent_transactions += 1
            had_failures = queue.backoff_state[0] > 0
            queue.on_ack(batch.txn_id)
            await self.store.queue_outbound_ack(destination, [e.id for e in batch.envelopes])
            if had_failures:
                await self.store.queue_backoff(destination, 0, 0, queue.backoff_state[2])
        self._wake(destination)


# --- inbound -------------------------------------------------------------------------------

EnvelopeHandler = Callable[[str, Envelope], Awaitable[None]]


class _Turn:
    """One transaction's place in its origin's processing order."""

    def __init__(self, previous: trio.Event | None) -> None:
        self._previous = previous
        self.done = trio.Event()

    async def __aenter__(self) -> None:
        if self._previous is not None:
            try:
                await self._previous.wait()
            except BaseException:
                self.done.set()          # cancelled while waiting: never block the turns after us
                raise

    async def __aexit__(self, *exc: object) -> None:
        self.done.set()


class _Lane:
    """Per origin: ``lock`` orders the queueing, turns order the processing."""

    def __init__(self) -> None:
        self.lock = trio.Lock()
        self._tail: trio.Event | None = None

    def next_turn(self) -> _Turn:
        turn = _Turn(self._tail)
        self._tail = turn.done
        return turn


class InboundReceiver:
    """Takes transactions: refuse, verify, store and acknowledge, then release in order."""

    def __init__(self, config: Config, store: FederationStore, discovery: Discovery, limiter: RateLimiter,
                 clock: Clock) -> None:
        self.config = config
        self.domain = config.domain
        self.store = store
        self.discovery = discovery
        self.limiter = limiter
        self.clock = clock
        self.handlers: dict[EnvelopeKind, EnvelopeHandler] = {}
        # Message envelopes released by the write that receives them are stored in that same
        # write (one commit before the recipient sees them, not two): set by the composition root.
        self.planner: Callable[[Envelope], Awaitable[Any]] | None = None
        self.on_delivered: Callable[[Any], None] | None = None
        self.report_stale: Callable[[str, Envelope, Any], Awaitable[None]] | None = None
        self._lanes: dict[str, _Lane] = {}
        self.received_transactions = 0
        self.rejected_transactions = 0

    def check_origin(self, origin: str) -> None:
        """Allow/deny lists, applied before any work is spent on a peer."""
        if not self.config.federation.permits(origin):
            raise DomainNotPermitted(f"this server does not federate with {origin}")

    async def receive_transaction(self, frame: bytes, remote: str) -> None:
        try:
            await self._receive(frame)
        except SecureChatError as exc:
            self.rejected_transactions += 1
            log.warning("refused a transaction from %s: %s (%s)", remote, exc.code.value,
                        (exc.details or {}).get("reason", "") if isinstance(exc.details, dict) else "")
            raise

    async def _receive(self, frame: bytes) -> None:
        origin, key_id = s2s.claimed_signer(frame)
        self.check_origin(origin)
        self.limiter.take("s2s-txn", origin, self.config.federation.transactions_per_origin)
        lookup = await key_lookup_for(self.discovery, origin, key_id)
        txn = s2s.verify_transaction(frame, expected_destination=self.domain, now_ms=self.clock(),
                                     key_lookup=lookup)
        plans = await self._plan_messages(txn.envelopes)
        lane = self._lanes.setdefault(txn.origin, _Lane())
        async with lane.lock:
            # Queued in arrival order, so storage releases in that order; the commit is
            # awaited outside the lock, so several transactions of one origin share a
            # group commit, and their releases are processed one after the other.
            completion = await self.store.queue_receive(
                txn.origin, txn.txn_id, list(txn.envelopes), self.clock(),
                max_held=self.config.federation.max_held_per_origin,
                plans={i: p.delivery for i, p in plans.items() if p.delivery is not None},
                on_commit=self._on_receive_committed)
            turn = lane.next_turn()
        async with turn:
            result = await completion.result()
            if result.duplicate:
                raise s2s.ReplayedTransaction("this transaction id was already received")
            self.received_transactions += 1
            if self.report_stale is not None:
                for env, _ in result.delivered:
                    await self.report_stale(txn.origin, env, plans[env.id])
            await self._process(txn.origin, result.released)

    async def _plan_messages(self, envelopes: Iterable[Envelope]) -> dict[bytes, Any]:
        """Coverage plans for the message envelopes, so a release stores them in the same write."""
        plans: dict[bytes, Any] = {}
        if self.planner is None:
            return plans
        for env in envelopes:
            if env.kind is EnvelopeKind.MESSAGE:
                try:
                    plans[env.id] = await self.planner(env)
                except SecureChatError:
                    continue          # a bad payload: the ordinary path drops it, with a log line
        return plans

    def _on_receive_committed(self, result: Any) -> None:
        if self.on_delivered is not None:
            for _, delivered in result.delivered:
                self.on_delivered(delivered)

    async def recover(self) -> int:
        """Process envelopes released before a restart but not yet handed on."""
        pending = await self.store.released()
        for origin, env in pending:
            lane = self._lanes.setdefault(origin, _Lane())
            async with lane.lock:
                turn = lane.next_turn()
            async with turn:
                await self._process(origin, [env])
        return len(pending)

    async def _process(self, origin: str, envelopes: Iterable[Envelope]) -> None:
        done: list[bytes] = []
        for env in envelopes:
            handler = self.handlers.get(env.kind)
            try:
                if handler is None:
                    log.warning("no handler for %s envelopes; dropped", env.kind.value)
                else:
                    await handler(origin, env)
            except SecureChatError as exc:
                # The envelope is bad in a way the signature could not show (e.g. an
                # unparsable payload); it is dropped, never retried forever.
                log.warning("dropped a %s envelope from %s: %s", env.kind.value, origin, exc.code.value)
            done.append(env.id)
        if done:
            await self.store.queue_processed(origin, done)


# --- remote keys and device lists ------------------------------------------------------------

Notify = Callable[[str, int], object]


class RemoteKeys:
    """Remote users' device lists and bundles for local clients; the same for remote servers."""

    def __init__(self, config: Config, store: FederationStore, links: LinkPool, discovery: Discovery,
                 server_keys: list[ServerKey], limiter: RateLimiter, clock: Clock,
                 outbound: OutboundSender, rng: Rng = os.urandom) -> None:
        self.config = config
        self.domain = config.domain
        self.store = store
        self.links = links
        self.discovery = discovery
        self.server_keys = server_keys
        self.limiter = limiter
        self.clock = clock
        self.outbound = outbound
        self.rng = rng
        self._seen_requests: OrderedDict[tuple[str, bytes], float] = OrderedDict()
        self._fetch_locks: dict[str, trio.Lock] = {}
        self._verified: OrderedDict[str, tuple[int, int, frozenset[str]]] = OrderedDict()  # user -> version, fetched, ids
        # set by the composition root: local answers and local notifications
        self.local_device_list: Callable[[str], Awaitable[dict[str, Any]]] | None = None
        self.local_claim: Callable[[str, list[str]], Awaitable[dict[str, Any]]] | None = None
        self.notify_local: Notify | None = None
        self.nursery: trio.Nursery | None = None           # for background repairs, set by ``Federation.run``

    # -- requests we send ---------------------------------------------------------------
    async def _request(self, domain: str, op: str, args: dict[str, Any]) -> dict[str, Any]:
        if not self.config.federation.permits(domain):
            raise DomainNotPermitted(f"this server does not federate with {domain}")
        now = self.clock()
        key = current_key(self.server_keys, now)
        request_id = s2s.new_id(self.rng)
        frame = s2s.sign_request(key.private_key, key.key_id, origin=self.domain, destination=domain, ts_ms=now,
                                 request_id=request_id, op=op, args=args)
        link = await self.links.get(domain)
        answer = await link.request(frame)           # the link's own timeout raises LinkError
        origin, key_id = s2s.claimed_signer(answer)
        if origin != domain:
            raise RequestRejected(f"{domain} answered in the name of another server", code=ErrorCode.REMOTE_ERROR)
        lookup = await key_lookup_for(self.discovery, domain, key_id)
        return s2s.verify_response(answer, expected_origin=domain, expected_destination=self.domain,
                                   request_id=request_id, now_ms=self.clock(), key_lookup=lookup)

    async def device_list(self, user: str, *, force: bool = False) -> RemoteDeviceList:
        """A remote user's signed list: cached (kept current by pushes and digests) or fetched."""
        async with self._fetch_locks.setdefault(user, trio.Lock()):
            cached = await self.store.get_remote_device_list(user)
            fresh = cached is not None and self.clock() - cached.fetched_ms < REMOTE_LIST_REFRESH_MS
            if cached is not None and fresh and not force:
                return cached
            domain = UserAddress.parse(user).domain
            result = await self._request(domain, "get_device_list", {"user": user})
            entry = self._checked_list(user, result)
            if cached is not None and entry.version < cached.version:
                log.warning("%s served an older device list for a user than we hold; kept ours", domain)
                return cached
            if await self.store.put_remote_device_list(entry) and cached is not None:
                self._notify(user, entry.version)
            self._remember(entry)
            return entry if cached is None or entry.version >= cached.version else cached

    def _checked_list(self, user: str, result: dict[str, Any]) -> RemoteDeviceList:
        """Check a served list the way clients will: signed by the master key it came with, for that user."""
        master_key = field(result, "master_key", bytes, length=signing.PUBLIC_KEY_LEN)
        signed = SignedDeviceList.from_wire(result.get("device_list"))
        listed = signed.open(master_key)
        if listed.user != user or field(result, "user", str) != user:
            raise BadDeviceList("a remote server served a device list for another user")
        return RemoteDeviceList(user, listed.version, signed.body, signed.signature, self.clock(), master_key)

    async def current_devices(self, user: str) -> frozenset[str]:
        """Device ids of a remote user's current list (for coverage checks at the origin).

        On the send path: served from memory (verified once per list version), so a send
        to a remote user costs no database read and no signature check (DESIGN §7).
        """
        known = self._verified.get(user)
        if known is not None and self.clock() - known[1] < REMOTE_LIST_REFRESH_MS:
            self._verified.move_to_end(user)
            return known[2]
        return self._remember(await self.device_list(user))

    def _remember(self, entry: RemoteDeviceList) -> frozenset[str]:
        """Cache the verified device ids of ``entry`` (replacing an older version's)."""
        known = self._verified.get(entry.user)
        if known is not None and known[0] > entry.version:
            return known[2]
        ids = SignedDeviceList(entry.body, entry.sig).open(entry.master_key).device_ids()
        self._verified[entry.user] = (entry.version, entry.fetched_ms, ids)
        self._verified.move_to_end(entry.user)
        while len(self._verified) > VERIFIED_LISTS_CACHED:
            self._verified.popitem(last=False)
        return ids

    async def claim(self, user: str, device_ids: list[str] | None) -> dict[str, Any]:
        """Claim bundles of a remote user's devices: one-time prekeys exactly once, never cached."""
        domain = UserAddress.parse(user).domain
        args: dict[str, Any] = {"user": user}
        if device_ids is not None:
            args["device_ids"] = device_ids
        result = await self._request(domain, "claim", args)
        bundles = field(result, "bundles", list)
        for bundle in bundles:
            address = DeviceAddress.parse(field(require_map(bundle, "bundle"), "device", str))
            if str(address.user) != user:
                raise RequestRejected(f"{domain} answered with another user's bundle", code=ErrorCode.REMOTE_ERROR)
        return {"user": user, "bundles": bundles, "missing": field(result, "missing", list, default=[])}

    def _notify(self, user: str, version: int) -> None:
        if self.notify_local is not None:
            self.notify_local(user, version)

    # -- requests we answer -------------------------------------------------------------
    async def handle_request(self, frame: bytes, remote: str) -> bytes:
        origin, key_id = s2s.claimed_signer(frame)
        if not self.config.federation.permits(origin):
            raise DomainNotPermitted(f"this server does not federate with {origin}")
        self.limiter.take("s2s-request", origin, self.config.federation.requests_per_origin)
        lookup = await key_lookup_for(self.discovery, origin, key_id)
        request = s2s.verify_request(frame, expected_destination=self.domain, now_ms=self.clock(),
                                     key_lookup=lookup)
        self._refuse_replay(request.origin, request.request_id)
        now = self.clock()
        key = current_key(self.server_keys, now)
        try:
            result = await self._answer(request)
        except SecureChatError as exc:
            return s2s.sign_response(key.private_key, key.key_id, origin=self.domain, destination=request.origin,
                                     ts_ms=now, request_id=request.request_id,
                                     error={"code": exc.code.value, "message": exc.message})
        return s2s.sign_response(key.private_key, key.key_id, origin=self.domain, destination=request.origin,
                                 ts_ms=now, request_id=request.request_id, result=result)

    def _refuse_replay(self, origin: str, request_id: bytes) -> None:
        now = trio.current_time()
        while self._seen_requests and (next(iter(self._seen_requests.values())) < now
                                       or len(self._seen_requests) > MAX_REMEMBERED_REQUESTS):
            self._seen_requests.popitem(last=False)
        if (origin, request_id) in self._seen_requests:
            raise s2s.StaleTransaction("this request was already answered")
        self._seen_requests[(origin, request_id)] = now + REQUEST_REPLAY_WINDOW_S

    def _local_lists(self) -> Callable[[str], Awaitable[dict[str, Any]]]:
        if self.local_device_list is None:
            raise RuntimeError("RemoteKeys.local_device_list is not wired (composition root)")
        return self.local_device_list

    def _local_claims(self) -> Callable[[str, list[str]], Awaitable[dict[str, Any]]]:
        if self.local_claim is None:
            raise RuntimeError("RemoteKeys.local_claim is not wired (composition root)")
        return self.local_claim

    def _local_user(self, text: Any) -> str:
        if not isinstance(text, str):
            raise ProtocolError("user must be an address")
        user = UserAddress.parse(text)
        if user.domain != self.domain:
            raise RequestRejected("that user is not served here", code=ErrorCode.NOT_FOUND)
        return str(user)

    async def _answer(self, request: Any) -> dict[str, Any]:
        args = request.args
        if request.op == "get_device_list":
            user = self._local_user(args.get("user"))
            answer = await self._local_lists()(user)
            await self.store.subscribe(user, request.origin, self.clock())
            return answer
        if request.op == "get_device_lists":
            users = field(args, "users", list, max_length=1000)
            lists = []
            for text in users:
                user = self._local_user(text)
                try:
                    lists.append(await self._local_lists()(user))
                except RequestRejected:
                    continue
                await self.store.subscribe(user, request.origin, self.clock())
            return {"lists": lists}
        if request.op == "claim":
            user = self._local_user(args.get("user"))
            wanted = args.get("device_ids")
            if wanted is not None and (not isinstance(wanted, list) or not all(isinstance(x, str) for x in wanted)):
                raise ProtocolError("device_ids must be a list of device ids")
            return await self._local_claims()(user, wanted)
        raise ProtocolError(f"unknown request op {request.op!r:.40}")

    # -- device-list changes across domains -------------------------------------------
    async def local_list_changed(self, user: str, version: int, body: bytes, sig: bytes) -> None:
        """Tell every domain that fetched ``user``'s list about the new one (control envelopes)."""
        domains = [d for d in await self.store.subscribers(user) if self.config.federation.permits(d)]
        payload = codec.encode({"user": user, "version": version, "body": body, "sig": sig})
        expires = self.clock() + self.config.mailbox_ttl_ms
        drafts = [OutboundDraft(d, EnvelopeClass.CONTROL,
                                draft(EnvelopeKind.DEVICE_LIST, user, [server_address(d)], payload, expires, self.rng))
                  for d in domains]
        await self.outbound.enqueue(drafts)

    async def on_device_list(self, origin: str, env: Envelope) -> None:
        obj = require_map(codec.decode(env.payload), "device list payload")
        user = field(obj, "user", str)
        if user != env.sender:
            raise ProtocolError("a device_list envelope must be sent in the name of the list's user")
        cached = await self.store.get_remote_device_list(user)
        if cached is None:
            return          # nobody here asked for this user's list
        signed = SignedDeviceList(field(obj, "body", bytes), field(obj, "sig", bytes))
        listed = signed.open(cached.master_key)   # the master key we were served first; a swap needs a fetch
        if listed.user != user or listed.version <= cached.version:
            return
        entry = RemoteDeviceList(user, listed.version, signed.body, signed.signature, self.clock(), cached.master_key)
        if await self.store.put_remote_device_list(entry):
            self._remember(entry)
            self._notify(user, listed.version)

    async def send_digests(self) -> int:
        """One ``device_list_digests`` envelope per subscribed domain: their view of our users."""
        subscriptions = await self.store.subscriptions()
        drafts = []
        expires = self.clock() + self.config.mailbox_ttl_ms
        for domain, users in subscriptions.items():
            queue = self.outbound.queues.get(domain)
            if not self.config.federation.permits(domain) or (queue is not None and queue.depth() > 0):
                continue        # a peer that has not taken our last traffic gets no pile of digests
            digests: dict[str, list[Any]] = {}
            for user in users:
                try:
                    answer = await self._local_lists()(user)
                except RequestRejected:
                    continue
                body = answer["device_list"]["body"]
                digests[user] = [answer["version"], hashlib.sha256(body).digest()]
            if digests:
                payload = codec.encode({"users": digests})
                drafts.append(OutboundDraft(domain, EnvelopeClass.CONTROL, draft(
                    EnvelopeKind.DEVICE_LIST_DIGESTS, server_address(self.domain), [server_address(domain)],
                    payload, expires, self.rng)))
        await self.outbound.enqueue(drafts)
        return len(drafts)

    async def on_digests(self, origin: str, env: Envelope) -> None:
        """Compare a peer's digests with our cache; re-fetch every list that differs (repair)."""
        obj = require_map(codec.decode(env.payload), "digests payload")
        users = require_map(field(obj, "users", dict), "users")
        stale = []
        for user, pair in users.items():
            if not isinstance(user, str) or UserAddress.parse(user).domain != origin:
                raise ProtocolError("digests may only name the origin's users")
            cached = await self.store.get_remote_device_list(user)
            if cached is None:
                continue
            if not isinstance(pair, list) or len(pair) != 2:
                raise ProtocolError("a digest is [version, sha256]")
            if [cached.version, hashlib.sha256(cached.body).digest()] != pair:
                stale.append(user)
        if stale and self.nursery is not None:
            self.nursery.start_soon(self._repair, stale)

    async def _repair(self, users: list[str]) -> None:
        for user in users:
            try:
                await self.device_list(user, force=True)
            except Exception as exc:        # a repair that fails is retried at the next digest round
                log.warning("device-list repair of a user failed: %s", type(exc).__name__)


# --- composition -----------------------------------------------------------------------------


class Federation:
    """The federation side of one homeserver: the ``FederationEndpoint`` peers call, and the tasks."""

    def __init__(self, config: Config, store: FederationStore, server_keys: list[ServerKey], limiter: RateLimiter,
                 clock: Clock, *, discovery: Discovery | None = None, memory_network: Any = None,
                 rng: Rng = os.urandom) -> None:
        fed = config.federation
        self.config = config
        self.discovery = discovery or Discovery(static=fed.static, insecure_domains=fed.insecure_domains)
        self.memory_network = memory_network
        self._resolver: Callable[[str], Awaitable[Any]] | None = None
        self.links = LinkPool(self._resolve)
        self.outbound = OutboundSender(config, store, self.links, server_keys, clock, rng)
        self.inbound = InboundReceiver(config, store, self.discovery, limiter, clock)
        self.remote = RemoteKeys(config, store, self.links, self.discovery, server_keys, limiter, clock,
                                 self.outbound, rng)
        self.inbound.handlers[EnvelopeKind.DEVICE_LIST] = self.remote.on_device_list
        self.inbound.handlers[EnvelopeKind.DEVICE_LIST_DIGESTS] = self.remote.on_digests

    async def _resolve(self, domain: str) -> Any:
        if not self.config.federation.permits(domain):
            raise DomainNotPermitted(f"this server does not federate with {domain}")
        if self._resolver is None:
            raise RequestRejected("federation is starting", code=ErrorCode.SHUTTING_DOWN)
        return await self._resolver(domain)

    # FederationEndpoint ----------------------------------------------------------------
    async def receive_transaction(self, frame: bytes, remote: str) -> None:
        await self.inbound.receive_transaction(frame, remote)

    async def handle_request(self, frame: bytes, remote: str) -> bytes:
        return await self.remote.handle_request(frame, remote)

    # tasks -----------------------------------------------------------------------------
    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Links, the outbound workers, recovery of released envelopes, the digest rounds."""
        from federation import links as link_impl

        async with trio.open_nursery() as nursery:
            if self.memory_network is not None:
                self._resolver = link_impl.memory_resolver(self.memory_network, nursery,
                                                           timeout_s=self.config.federation.request_timeout_s)
            elif self.config.federation.transport == "http":
                import httpx
                client = httpx.AsyncClient(timeout=self.config.federation.request_timeout_s)
                self._http_client = client
                self._resolver = link_impl.http_resolver(self.discovery, client,
                                                         timeout_s=self.config.federation.request_timeout_s)
            else:
                self._resolver = link_impl.websocket_resolver(self.discovery, nursery,
                                                              timeout_s=self.config.federation.request_timeout_s)
            self.remote.nursery = nursery
            await nursery.start(self.outbound.run)
            recovered = await self.inbound.recover()
            if recovered:
                log.info("processed %d envelopes released before the restart", recovered)
            nursery.start_soon(self._digest_rounds)
            task_status.started()
            await trio.sleep_forever()

    async def _digest_rounds(self) -> None:
        while True:
            await trio.sleep(self.config.federation.digest_interval_s)
            try:
                await self.remote.send_digests()
            except Exception:
                log.exception("device-list digest round failed; next round retries")

    async def aclose(self) -> None:
        await self.links.aclose()
        client = getattr(self, "_http_client", None)
        if client is not None:
            await client.aclose()
        await self.discovery.aclose()
