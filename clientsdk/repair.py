"""Delivery reports from other domains (issue 5, DESIGN §5): re-encrypt for the devices a send missed.

The origin homeserver checks a send against its cached copy of a remote user's device
list; the destination checks again against the real one.  When a device was added in
between, the destination delivers to the devices it knows and sends back a signed
``delivery_report {message_id, users: {user: {missing, extra, revoked}}}``, which
reaches the sending device as a ``delivery_report`` push.  The client re-fetches that
user's list, encrypts the same content for the missing devices only and sends it as a
``repair`` under the same message id, so the recipient sees one message.

The content of recent sends is kept in memory (bounded); a report about a message no
longer there (e.g. after a restart) is not silent: it becomes a ``delivery_incomplete``
security event naming the user.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

from clientsdk.client_parts import ClientParts
from clientsdk.content import Content
from clientsdk.events import SecurityEvent
from clientsdk.store import Batch
from federation import codec
from federation.addresses import UserAddress
from federation.errors import CodecError, ProtocolError, SecureChatError
from federation.rpc import RemoteError, RpcClient
from federation.validate import field, require_map

log = logging.getLogger("securechat.sdk.repair")
RECENT_SENDS = 1_000


@dataclass(frozen=True, slots=True)
class RecentSend:
    recipients: tuple[str, ...]
    template: Content


def parse_report(report: bytes) -> tuple[str, dict[str, list[str]]]:
    """(message_id, {user: missing device ids}) of a delivery report frame ``{body, key_id, sig}``.

    The signature was checked by our homeserver when the transaction arrived (it is the
    reporting server's); here only the shape matters.
    """
    try:
        frame = require_map(codec.decode(report), "report")
        body = require_map(codec.decode(field(frame, "body", bytes)), "report body")
        message_id = field(body, "message_id", str, max_length=200)
        users = require_map(field(body, "users", dict), "users")
        missing: dict[str, list[str]] = {}
        for user, entry in users.items():
            ids = field(require_map(entry, "entry"), "missing", list)
            missing[str(UserAddress.parse(user))] = [str(i) for i in ids]
    except (CodecError, ProtocolError, SecureChatError) as exc:
        raise ProtocolError(f"malformed delivery report: {exc.message}") from None
    return message_id, missing


class DeliveryRepairMixin(ClientParts):
    """Handles ``delivery_report`` pushes for ``Client``."""

    _recent_sends: OrderedDict[str, RecentSend]

    def _remember_send(self, message_id: str, recipients: list[str], template: Content) -> None:
        recent = self._recent_sends
        recent[message_id] = RecentSend(tuple(recipients), template)
        recent.move_to_end(message_id)
        while len(recent) > RECENT_SENDS:
            recent.popitem(last=False)

    async def _on_delivery_report(self, rpc: RpcClient, fields: dict[str, Any]) -> None:
        seq = fields.get("seq")
        try:
            message_id, missing = parse_report(fields.get("report", b""))
        except ProtocolError as exc:
            log.warning("ignored a delivery report: %s", exc.message)
        else:
            await self._repair(rpc, message_id, missing)
        if isinstance(seq, int) and seq > 0:
            await rpc.request("ack", seqs=[seq])

    async def _repair(self, rpc: RpcClient, message_id: str, missing: dict[str, list[str]]) -> None:
        sent = self._recent_sends.get(message_id)
        for user, device_ids in missing.items():
            if not device_ids:
                continue
            if sent is None:
                self._emit(SecurityEvent("delivery_incomplete", user, None,
                                         f"a message did not reach {len(device_ids)} new device(s) of {user} "
                                         "and can no longer be re-sent"))
                continue
            current = await self._device_list(rpc, user, force=True)
            listed = current.device_list.device_ids()
            targets = [f"{user}/{d}" for d in sorted(set(device_ids) & listed)]
            if not targets:
                continue        # the server's view and the signed list disagree: the list wins
            await self._ensure_sessions(rpc, targets)
            async with self._lock:
                plaintext = self._content_for(sent.template, user, list(sent.recipients))
                batch = Batch()
                payloads = []
                for address in targets:
                    payloads.append({"devices": [address], "ciphertext": self._sessions.encrypt(address, plaintext)[0]})
                    batch.sessions[address] = self._sessions.state_bytes(address)
                await self._persist(batch)
            try:
                await rpc.request("send", message_id=message_id, payloads=payloads, repair=True)
            except RemoteError as exc:
                log.warning("repair send for a delivery report failed: %s", exc.code.value)
