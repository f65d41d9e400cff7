"""Mailboxes: ``send`` with exact device coverage, durable fan-out, ordered delivery, acks.

``send`` (DESIGN §5, normative): ``{message_id, payloads: [{devices, ciphertext}],
ephemeral}``.  For every recipient user the devices of the whole operation must be
exactly that user's current devices (for the sender's own user: all its other
devices, even when the operation names none of them; its pending devices may be
included), else ``stale_devices`` with
``{user: {missing, extra, revoked}}`` and nothing is stored.  A message is
acknowledged only after its group commit; one ciphertext is stored once for all
its devices.  Delivery pushes each device's entries in ``seq`` order, straight from
memory when the device is connected, from storage after a reconnect; an entry is
deleted only when the device acks it.
"""

from __future__ import annotations

import functools
import hashlib
import heapq
import logging
import os
from collections import defaultdict
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import trio

from federation import codec
from federation.addresses import DeviceAddress, UserAddress
from federation.errors import ErrorCode, ProtocolError, RequestRejected, SecureChatError
from federation.frames import Push, PushKind, encode_frame
from federation.outbound import draft
from federation.s2s import EnvelopeClass, EnvelopeKind
from federation.validate import field, require_map
from homeserver.clock import Clock
from homeserver.config import Config
from homeserver.connection import Deferred, Session
from homeserver.handlers.directory import DeviceDirectory
from homeserver.handlers.federation_common import FederationDisabled
from homeserver.ratelimit import RateLimiter
from homeserver.storage.models import (
    DeliverResult, DeliveryPlan, DeviceState, MailboxEntry, MailboxStore, OutboundDraft,
)

if TYPE_CHECKING:
    from federation.s2s import Envelope
    from homeserver.handlers.federation_outbound import OutboundSender
    from homeserver.handlers.remote_keys import RemoteKeys

log = logging.getLogger("securechat.mailbox")
MAX_MESSAGE_ID = 128
MAX_ACK_BATCH = 1_000
BACKLOG_PAGE = 500
MAX_BUFFERED = 10_000          # live entries held for one slow device before falling back to storage

# Every send names the same few addresses again and again: parse each once (the
# values are immutable; an invalid address is not cached and raises every time).
_device_address = functools.lru_cache(maxsize=16_384)(DeviceAddress.parse)


class StaleDevices(RequestRejected):
    code = ErrorCode.STALE_DEVICES


class ShuttingDown(RequestRejected):
    code = ErrorCode.SHUTTING_DOWN


SERVER_SENDER_PREFIX = "=server@"    # mailbox entries a homeserver wrote itself (delivery reports)
REPAIR_SUFFIX = "#repair-"            # storage key of a repair send: the id stays the sender's


def envelope_push(entry: MailboxEntry) -> Push:
    if entry.sender.startswith(SERVER_SENDER_PREFIX):
        return Push(PushKind.DELIVERY_REPORT, {"seq": entry.seq, "reporter": entry.sender[len(SERVER_SENDER_PREFIX):],
                                               "ts_ms": entry.ts_ms, "report": entry.ciphertext})
    return Push(PushKind.ENVELOPE, {"seq": entry.seq, "sender": entry.sender, "message_id": entry.message_id,
                                    "ts_ms": entry.ts_ms, "ciphertext": entry.ciphertext})


@dataclass(frozen=True, slots=True)
class RemotePlan:
    """A remote message checked against our devices: the mailbox write (if any) and the mismatch."""

    message_id: str
    delivery: DeliveryPlan | None
    stale: dict[str, dict[str, list[str]]]


def _reported_users(report: bytes, reporter: str) -> list[str]:
    """Users named by a delivery report frame ``{body, key_id, sig}`` (all of the reporter's domain)."""
    frame = require_map(codec.decode(report), "delivery report")
    body = require_map(codec.decode(field(frame, "body", bytes)), "delivery report body")
    users = [str(UserAddress.parse(u)) for u in require_map(field(body, "users", dict), "users")]
    if any(UserAddress.parse(u).domain != reporter for u in users):
        raise ProtocolError("a delivery report may only name the reporter's users")
    return users


class DeviceDelivery:
    """Pushes one connected device's mailbox in ``seq`` order, exactly once per connection.

    The device is attached (live entries start arriving in ``offer``) *before* the
    backlog is read, so nothing committed in between is missed; entries seen both
    ways are skipped by ``seq``.  Once the stored backlog has been pushed, one
    ``backlog_done {seq}`` push (``seq`` = the last entry pushed, 0 if none) tells the
    client where it ends, so it can apply group changes waiting there before it sends.
    """

    def __init__(self, device: str, session: Session, mailboxes: MailboxStore) -> None:
        self.device = device
        self.session = session
        self.mailboxes = mailboxes
        self.last_pushed = 0
        self._heap: list[tuple[int, MailboxEntry]] = []
        self._wake = trio.Event()
        self._resync = True
        self._backlog_reported = False
        self._idle = False          # the task waits with nothing pending: ``offer`` may push itself

    def offer(self, entry: MailboxEntry) -> None:
        if entry.seq <= self.last_pushed:
            return                             # already pushed (seen through storage)
        if self._idle:
            # Everything before this entry is pushed: push it now (in the writer's
            # commit order) instead of waking the task for it.
            if self.session.push_frame_nowait(encode_frame(envelope_push(entry))):
                self.last_pushed = entry.seq
                return
            self._idle = False                 # the task takes over, in seq order
        if len(self._heap) >= MAX_BUFFERED:
            self._heap.clear()
            self._resync = True               # too far behind: read the rest from storage
        else:
            heapq.heappush(self._heap, (entry.seq, entry))
        self._wake.set()

    async def run(self) -> None:
        try:
            await self._run()
        except (trio.ClosedResourceError, trio.BrokenResourceError):
            return                             # the connection is closing; the rest stays stored

    async def _run(self) -> None:
        while True:
            if self._resync:
                self._resync = False
                await self._drain_storage()
                if not self._backlog_reported:
                    self._backlog_reported = True
                    await self.session.push(Push(PushKind.BACKLOG_DONE, {"seq": self.last_pushed}))
            while self._heap:
                seq, entry = heapq.heappop(self._heap)
                if seq > self.last_pushed:
                    await self.session.push(envelope_push(entry))
                    self.last_pushed = seq
            if not self._heap and not self._resync:
                self._wake = trio.Event()
                self._idle = True
                try:
                    await self._wake.wait()
                finally:
                    self._idle = False

    async def _drain_storage(self) -> None:
        while True:
            page = await self.mailboxes.pending(self.device, self.last_pushed, BACKLOG_PAGE)
            for entry in page:
                await self.session.push(envelope_push(entry))
                self.last_pushed = entry.seq
            if len(page) < BACKLOG_PAGE:
                return


class MailboxHandler:
    def __init__(self, config: Config, mailboxes: MailboxStore, directory: DeviceDirectory,
                 limiter: RateLimiter, clock: Clock) -> None:
        self.config = config
        self.mailboxes = mailboxes
        self.directory = directory
        self.limiter = limiter
        self.clock = clock
        self.draining = False
        self._deliveries: dict[str, DeviceDelivery] = {}
        # Set by the composition root when federation is enabled.
        self.remote: RemoteKeys | None = None
        self.outbound: OutboundSender | None = None

    # -- connection lifecycle -----------------------------------------------------------
    def start_delivery(self, session: Session) -> None:
        delivery = DeviceDelivery(session.device, session, self.mailboxes)
        self._deliveries[session.device] = delivery
        if session.nursery is not None:
            session.nursery.start_soon(delivery.run)

    def stop_delivery(self, session: Session) -> None:
        if session.authenticated:
            delivery = self._deliveries.get(session.device)
            if delivery is not None and delivery.session is session:
                del self._deliveries[session.device]

    def _notify(self, entries: tuple[MailboxEntry, ...]) -> None:
        for entry in entries:
            delivery = self._deliveries.get(entry.device)
            if delivery is not None:
                delivery.offer(entry)

    # -- send ---------------------------------------------------------------------------
    def _parse_payloads(self, params: dict[str, Any]) -> list[tuple[list[str], bytes]]:
        raw = field(params, "payloads", list)
        if not raw:
            raise ProtocolError("payloads must not be empty")
        payloads: list[tuple[list[str], bytes]] = []
        seen: set[str] = set()
        total_devices = 0
        for item in raw:
            item = require_map(item, "payload")
            devices = field(item, "devices", list)
            ciphertext = field(item, "ciphertext", bytes)
            if not devices:
                raise ProtocolError("a payload must name at least one device")
            total_devices += len(devices)
            if total_devices > self.config.limits.max_payloads_per_send:
                raise RequestRejected("too many recipient devices", code=ErrorCode.TOO_LARGE)
            addresses = []
            for text in devices:
                if not isinstance(text, str):
                    raise ProtocolError("device addresses must be strings")
                address = str(_device_address(text))
                if address in seen:
                    raise ProtocolError("a device appears twice in one send")
                seen.add(address)
                addresses.append(address)
            payloads.append((addresses, ciphertext))
        return payloads

    async def _check_coverage(self, session: Session, payloads: list[tuple[list[str], bytes]],
                              repair: bool = False) -> None:
        by_user: dict[str, set[str]] = {}
        remote_users: set[str] = set()
        for devices, _ in payloads:
            for text in devices:
                address = _device_address(text)
                user = text.partition("/")[0]        # == str(address.user): ``text`` parsed
                given_of_user = by_user.get(user)
                if given_of_user is None:
                    given_of_user = by_user[user] = set()
                    if address.domain != self.config.domain:
                        if self.remote is None:
                            raise FederationDisabled(f"{address.domain} is not served here "
                                                     "(federation is not enabled)")
                        remote_users.add(user)
                given_of_user.add(address.device_id)
        # The sender's own user is always a recipient: every send also reaches
        # the sender's other devices, so they stay in sync (DESIGN §4 multi-device).
        # A repair (after a delivery report) only adds devices a send missed.
        if not repair:
            by_user.setdefault(session.user or "", set())
        # The sender's state is read now, not at auth: a device approved while
        # connected may send to others at once.
        own_devices = await self.directory.devices_of(session.user or "")
        sender = own_devices.get(session.device_id or "")
        sender_pending = sender is None or sender.state is not DeviceState.ACTIVE
        if sender_pending and set(by_user) != {session.user}:
            raise RequestRejected("a pending device may only send to its own user's devices",
                                  code=ErrorCode.FORBIDDEN)
        stale: dict[str, dict[str, list[str]]] = {}
        for user, given in by_user.items():
            if user in remote_users:
                current = await self._remote().current_devices(user)
                missing = [] if repair else sorted(current - given)
                extra = sorted(given - current)
                if missing or extra:
                    stale[user] = {"missing": missing, "extra": extra, "revoked": []}
                continue
            own = user == session.user
            user_devices = own_devices if own else await self.directory.devices_of(user)
            if not user_devices:
                raise RequestRejected(f"no such user {user}", code=ErrorCode.NOT_FOUND)
            required = {i for i, d in user_devices.items() if d.state is DeviceState.ACTIVE}
            allowed = set(required)
            if own:
                required.discard(session.device_id or "")
                allowed = required | {i for i, d in user_devices.items() if d.state is DeviceState.PENDING}
            missing = [] if repair else sorted(required - given)
            revoked = sorted(i for i in given if i in user_devices and user_devices[i].state is DeviceState.REVOKED)
            extra = sorted(given - allowed - set(revoked))
            if missing or extra or revoked:
                stale[user] = {"missing": missing, "extra": extra, "revoked": revoked}
        if stale:
            raise StaleDevices("the send does not cover exactly the recipients' current devices",
                               details=stale)

    async def send(self, session: Session, params: dict[str, Any]) -> dict[str, Any] | Deferred:
        if self.draining:
            raise ShuttingDown("server is shutting down; retry on reconnect")
        message_id = field(params, "message_id", str, max_length=MAX_MESSAGE_ID)
        if not message_id:
            raise ProtocolError("message_id must not be empty")
        ephemeral = field(params, "ephemeral", bool, default=False)
        repair = field(params, "repair", bool, default=False)
        if repair and ephemeral:
            raise ProtocolError("an ephemeral send cannot be a repair")
        payloads = self._parse_payloads(params)
        limits = self.config.limits
        self.limiter.take("message", session.device, limits.messages_per_device)
        self.limiter.take("message-user", session.user or "", limits.messages_per_user)
        self.limiter.take("message-address", session.remote, limits.messages_per_address)
        await self._check_coverage(session, payloads, repair)
        now = self.clock()
        local, remote = self._split_by_domain(payloads)
        if ephemeral:
            # Typing and presence stay on this server: they are not worth a durable
            # cross-domain queue (LESSONS #7); remote devices are simply not reached.
            delivered = 0
            for devices, ciphertext in local:
                push = Push(PushKind.ENVELOPE, {"seq": 0, "sender": session.device, "message_id": message_id,
                                                "ts_ms": now, "ciphertext": ciphertext, "ephemeral": True})
                for device in devices:
                    target = self.directory.session_of(device)
                    if target is not None and target.push_nowait(push):
                        delivered += 1
            return {"message_id": message_id, "delivered": delivered}
        digest = hashlib.sha256(codec.encode([[sorted(d), c] for d, c in payloads])).digest()
        key = f"{message_id}{REPAIR_SUFFIX}{digest[:6].hex()}" if repair else message_id
        outbound = self._outbound_drafts(session.device, message_id, remote, repair, now)
        # New entries are handed to connected devices in commit order, by the
        # storage writer itself, so every device's pushes follow its seq order;
        # envelopes for other domains are queued in the same write.
        queued = await self.mailboxes.queue_deliver(session.device, key, digest, local, now,
                                                    self.config.mailbox_ttl_ms,
                                                    on_commit=self.on_delivered, outbound=outbound)

        def committed(result: DeliverResult) -> dict[str, Any]:
            if result.status == "conflict":
                raise RequestRejected("message_id was already used with different content",
                                      code=ErrorCode.CONFLICT)
            return {"message_id": message_id, "duplicate": result.status == "duplicate"}

        return Deferred.of(queued, committed)

    def _remote(self) -> RemoteKeys:
        """Remote keys; only reached for a remote device, which coverage refuses without federation."""
        if self.remote is None:
            raise FederationDisabled("federation is not enabled")
        return self.remote

    def on_delivered(self, result: DeliverResult) -> None:
        """Committed mailbox entries: push them to connected devices; queued envelopes: send them."""
        self._notify(result.entries)
        if result.outbound and self.outbound is not None:
            self.outbound.on_committed(result.outbound)

    def _split_by_domain(self, payloads: list[tuple[list[str], bytes]]
                         ) -> tuple[list[tuple[list[str], bytes]], dict[str, list[tuple[list[str], bytes]]]]:
        """(payloads for local devices, {domain: payloads for its devices}); a ciphertext may be split."""
        local: list[tuple[list[str], bytes]] = []
        remote: dict[str, list[tuple[list[str], bytes]]] = defaultdict(list)
        for devices, ciphertext in payloads:
            by_domain: dict[str, list[str]] = defaultdict(list)
            for device in devices:
                by_domain[_device_address(device).domain].append(device)
            for domain, group in by_domain.items():
                (local if domain == self.config.domain else remote[domain]).append((group, ciphertext))
        return local, dict(remote)

    def _outbound_drafts(self, sender: str, message_id: str, remote: dict[str, list[tuple[list[str], bytes]]],
                         repair: bool, now: int) -> list[OutboundDraft]:
        drafts = []
        for domain, items in sorted(remote.items()):
            users = sorted({str(DeviceAddress.parse(d).user) for devices, _ in items for d in devices})
            payload = codec.encode({"message_id": message_id, "repair": repair,
                                    "payloads": [{"devices": devices, "ciphertext": c} for devices, c in items]})
            drafts.append(OutboundDraft(domain, EnvelopeClass.MESSAGE, draft(
                EnvelopeKind.MESSAGE, sender, users, payload, now + self.config.mailbox_ttl_ms, os.urandom)))
        return drafts

    # -- federation: envelopes released by the inbound side ---------------------------
    async def deliver_remote(self, origin: str, env: Envelope) -> None:
        """A message from another domain: check coverage again here, store, report any mismatch."""
        plan = await self.plan_remote(env)
        if plan.delivery is not None:
            d = plan.delivery
            await self.mailboxes.queue_deliver(d.sender, d.message_id, d.digest, d.payloads, self.clock(), d.ttl_ms,
                                               on_commit=self.on_delivered)
        await self.report_stale(origin, env, plan)

    async def report_stale(self, origin: str, env: Envelope, plan: RemotePlan) -> None:
        if plan.stale and self.outbound is not None:
            await self.outbound.report_delivery(origin, env, plan.message_id, plan.stale)

    async def plan_remote(self, env: Envelope) -> RemotePlan:
        """Coverage of a remote message against our devices now: what to store, what to report."""
        obj = require_map(codec.decode(env.payload), "message payload")
        message_id = field(obj, "message_id", str, max_length=MAX_MESSAGE_ID)
        repair = field(obj, "repair", bool, default=False)
        payloads = self._parse_payloads(obj)
        users = set(env.recipients)
        stale: dict[str, dict[str, list[str]]] = {}
        kept: set[str] = set()
        given_by_user: dict[str, set[str]] = defaultdict(set)
        for devices, _ in payloads:
            for text in devices:
                address = DeviceAddress.parse(text)
                if address.domain != self.config.domain or str(address.user) not in users:
                    raise ProtocolError("a payload names a device outside the envelope's recipients")
                given_by_user[str(address.user)].add(address.device_id)
        for user in sorted(users):
            user_devices = await self.directory.devices_of(user)
            active = {i for i, d in user_devices.items() if d.state is DeviceState.ACTIVE}
            given = given_by_user.get(user, set())
            missing = [] if repair else sorted(active - given)
            revoked = sorted(i for i in given if i in user_devices and user_devices[i].state is DeviceState.REVOKED)
            extra = sorted(given - active - set(revoked))
            kept.update(f"{user}/{i}" for i in given & active)
            if missing or extra or revoked:
                stale[user] = {"missing": missing, "extra": extra, "revoked": revoked}
        deliverable = [([d for d in devices if d in kept], c) for devices, c in payloads]
        deliverable = [(devices, c) for devices, c in deliverable if devices]
        digest = hashlib.sha256(codec.encode([[sorted(d), c] for d, c in payloads])).digest()
        key = f"{message_id}{REPAIR_SUFFIX}{digest[:6].hex()}" if repair else message_id
        delivery = (DeliveryPlan(env.sender, key, digest, deliverable, max(1, env.expires_ms - self.clock()))
                    if deliverable else None)
        return RemotePlan(message_id, delivery, stale)

    async def deliver_report(self, origin: str, env: Envelope) -> None:
        """A signed delivery report about one of our devices' sends: into that device's mailbox."""
        (device,) = env.recipients
        DeviceAddress.parse(device)
        if self.remote is not None:
            # Our cached copy of those users' lists was stale (that is why the report
            # exists): refresh it first, or the sender's repair would be checked against it.
            for user in _reported_users(env.payload, origin):
                try:
                    await self.remote.device_list(user, force=True)
                except SecureChatError as exc:
                    log.warning("refreshing a reported device list failed: %s", exc.code.value)
        now = self.clock()
        digest = hashlib.sha256(env.payload).digest()
        await self.mailboxes.queue_deliver(f"{SERVER_SENDER_PREFIX}{origin}", f"report:{env.id.hex()}", digest,
                                           [([device], env.payload)], now, max(1, env.expires_ms - now),
                                           on_commit=self.on_delivered)

    async def ack(self, session: Session, params: dict[str, Any]) -> dict[str, Any] | Deferred:
        seqs = field(params, "seqs", list)
        if len(seqs) > MAX_ACK_BATCH:
            raise RequestRejected(f"at most {MAX_ACK_BATCH} seqs per ack", code=ErrorCode.TOO_LARGE)
        if not all(isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in seqs):
            raise ProtocolError("seqs must be positive integers")
        queued = await self.mailboxes.queue_ack(session.device, seqs)
        return Deferred.of(queued, lambda removed: {"removed": removed})
