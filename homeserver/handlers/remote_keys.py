"""Remote keys (DESIGN §5, §7): ``RemoteKeys`` holds remote users' signed device lists
(cached, refreshed on change by ``device_list`` control envelopes and by periodic digest
comparison) and claims their bundles (never cached) over the synchronous signed
``s2s-request``; it is also the serving side of those requests for peers, and sends the
control envelopes and digests that keep peers' copies of our users' lists current.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from typing import Any

import trio

from federation import codec, s2s, signing
from federation.addresses import DeviceAddress, UserAddress
from federation.discovery import Discovery
from federation.errors import ErrorCode, ProtocolError, RequestRejected, SecureChatError
from federation.keys import BadDeviceList, SignedDeviceList
from federation.links import LinkPool
from federation.outbound import draft
from federation.s2s import Envelope, EnvelopeClass, EnvelopeKind
from federation.validate import field, require_map
from homeserver.clock import Clock
from homeserver.config import Config
from homeserver.handlers.federation_common import DomainNotPermitted, Rng, key_lookup_for, server_address
from homeserver.handlers.federation_outbound import OutboundSender
from homeserver.ratelimit import RateLimiter
from homeserver.server_keys import ServerKey, current_key
from homeserver.storage.models import FederationStore, OutboundDraft, RemoteDeviceList

log = logging.getLogger("securechat.federation")

REQUEST_REPLAY_WINDOW_S = 600.0
REMOTE_LIST_REFRESH_MS = 86_400_000   # re-fetch (and so re-subscribe) a cached remote list after a day
MAX_REMEMBERED_REQUESTS = 100_000
VERIFIED_LISTS_CACHED = 10_000

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
        self.local_claim: Callable[[str, list[str] | None], Awaitable[dict[str, Any]]] | None = None
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

    def _local_claims(self) -> Callable[[str, list[str] | None], Awaitable[dict[str, Any]]]:
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
