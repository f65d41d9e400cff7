"""Per-device ciphertext mailboxes (DESIGN §7): store once, point many times, delete on ack.

A ciphertext is one ``blobs`` row however many devices receive it; each device
gets a ``mailbox`` row pointing at it, numbered by a global, only-growing
``seq``, so a device's entries come back in commit order.  A blob goes when
its last pointer goes (ack, purge, revocation or expiry).
"""

from __future__ import annotations

import hmac
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import TypeVar

import trio

from sqlalchemy import Connection, bindparam, delete, exists, func, insert, select

from homeserver.storage.db import Database, Prepared
from homeserver.storage.federation_outbound import check_drafts, insert_outbound
from homeserver.storage.models import Completion, DeliverResult, MailboxEntry, OutboundDraft
from homeserver.storage.schema import blobs, claimed_prekeys, invites, mailbox, message_ids

CHUNK = 500     # bound on bound parameters per IN (...) list

_X = TypeVar("_X")


def chunks(items: Sequence[_X], size: int = CHUNK) -> Iterator[Sequence[_X]]:
    for start in range(0, len(items), size):
        yield items[start:start + size]


_no_pointer = ~exists().where(mailbox.c.blob_id == blobs.c.id)


def delete_orphan_blobs(conn: Connection, blob_ids: Iterable[int]) -> int:
    """Delete those of ``blob_ids`` that no mailbox entry points at any more."""
    ids = sorted(set(blob_ids))
    deleted = 0
    for part in chunks(ids):
        deleted += conn.execute(delete(blobs).where(blobs.c.id.in_(part), _no_pointer)).rowcount
    return deleted


def delete_device_entries(conn: Connection, device: str) -> int:
    """Drop every mailbox entry of ``device`` (and blobs left without a pointer)."""
    blob_ids = conn.execute(
        select(mailbox.c.blob_id).where(mailbox.c.device == device).distinct()).scalars().all()
    deleted = conn.execute(delete(mailbox).where(mailbox.c.device == device)).rowcount
    delete_orphan_blobs(conn, blob_ids)
    return int(deleted)


# The per-message statements run through ``Prepared`` (see db.py): compiled once.
_find_message = Prepared(select(message_ids.c.digest, message_ids.c.expires_ms).where(
    message_ids.c.sender == bindparam("sender"),
    message_ids.c.message_id == bindparam("message_id")))
_forget_message = Prepared(delete(message_ids).where(
    message_ids.c.sender == bindparam("sender"),
    message_ids.c.message_id == bindparam("message_id")))
_insert_message = Prepared(insert(message_ids).values(
    sender=bindparam("sender"), message_id=bindparam("message_id"), digest=bindparam("digest"),
    expires_ms=bindparam("expires_ms")))
_insert_blob = Prepared(insert(blobs).values(ciphertext=bindparam("ciphertext"))
                        .returning(blobs.c.id))
_insert_entry = Prepared(insert(mailbox).values(
    device=bindparam("device"), sender=bindparam("sender"), message_id=bindparam("message_id"),
    blob_id=bindparam("blob_id"), ts_ms=bindparam("ts_ms"), expires_ms=bindparam("expires_ms"))
    .returning(mailbox.c.seq))
_delete_entry = Prepared(delete(mailbox).where(
    mailbox.c.seq == bindparam("seq"), mailbox.c.device == bindparam("device"))
    .returning(mailbox.c.blob_id))
_delete_blob_if_orphan = Prepared(delete(blobs).where(
    blobs.c.id == bindparam("blob_id"),
    ~exists().where(mailbox.c.blob_id == bindparam("blob_id"))))


def _deliver(conn: Connection, sender: str, message_id: str, digest: bytes,
             payloads: list[tuple[list[str], bytes]], now_ms: int, ttl_ms: int,
             outbound: Sequence[OutboundDraft] = ()) -> DeliverResult:
    key = {"sender": sender, "message_id": message_id}
    seen = _find_message.first(conn, key)
    if seen is not None and seen[1] > now_ms:
        same = hmac.compare_digest(bytes(seen[0]), digest)
        return DeliverResult("duplicate" if same else "conflict", ())
    if seen is not None:     # an expired id not yet cleaned up: the old message is gone
        _forget_message.rowcount(conn, key)
    expires_ms = now_ms + ttl_ms
    _insert_message.rowcount(conn, {**key, "digest": digest, "expires_ms": expires_ms})
    entries: list[MailboxEntry] = []
    for devices, ciphertext in payloads:
        if not devices:
            continue
        blob = _insert_blob.first(conn, {"ciphertext": ciphertext})
        if blob is None:
            raise RuntimeError("INSERT ... RETURNING returned no row")
        row = {"sender": sender, "message_id": message_id, "blob_id": blob[0], "ts_ms": now_ms,
               "expires_ms": expires_ms, "device": ""}
        for device in devices:
            row["device"] = device
            entry = _insert_entry.first(conn, row)
            if entry is None:
                raise RuntimeError("INSERT ... RETURNING returned no row")
            entries.append(MailboxEntry(int(entry[0]), device, sender, message_id, ciphertext,
                                        now_ms))
    # Remote copies are queued in the same op: stored locally <=> queued for the remote domains.
    queued = tuple(insert_outbound(conn, outbound, now_ms)) if outbound else ()
    return DeliverResult("new", tuple(entries), queued)


def deliver_in_transaction(conn: Connection, sender: str, message_id: str, digest: bytes,
                           payloads: list[tuple[list[str], bytes]], now_ms: int, ttl_ms: int) -> DeliverResult:
    """The mailbox write, for another repository's op (federation: receive and deliver at once)."""
    return _deliver(conn, sender, message_id, digest, payloads, now_ms, ttl_ms)


def _pending(conn: Connection, device: str, after_seq: int, limit: int) -> list[MailboxEntry]:
    if limit <= 0:
        return []
    rows = conn.execute(
        select(mailbox.c.seq, mailbox.c.device, mailbox.c.sender, mailbox.c.message_id,
               blobs.c.ciphertext, mailbox.c.ts_ms)
        .join_from(mailbox, blobs, mailbox.c.blob_id == blobs.c.id)
        .where(mailbox.c.device == device, mailbox.c.seq > after_seq)
        .order_by(mailbox.c.seq).limit(limit))
    return [MailboxEntry(int(r.seq), r.device, r.sender, r.message_id, bytes(r.ciphertext),
                         int(r.ts_ms)) for r in rows]


def _ack(conn: Connection, device: str, seqs: list[int]) -> int:
    deleted = 0
    for seq in sorted(set(seqs)):
        gone = _delete_entry.first(conn, {"seq": seq, "device": device})
        if gone is not None:
            deleted += 1
            _delete_blob_if_orphan.rowcount(conn, {"blob_id": gone[0]})
    return deleted


def _expire(conn: Connection, now_ms: int) -> dict[str, int]:
    return {
        "entries": conn.execute(delete(mailbox).where(mailbox.c.expires_ms <= now_ms)).rowcount,
        "blobs": conn.execute(delete(blobs).where(_no_pointer)).rowcount,
        "message_ids": conn.execute(
            delete(message_ids).where(message_ids.c.expires_ms <= now_ms)).rowcount,
        "claimed_prekeys": conn.execute(
            delete(claimed_prekeys).where(claimed_prekeys.c.expires_ms <= now_ms)).rowcount,
        "invites": conn.execute(delete(invites).where(invites.c.expires_ms <= now_ms)).rowcount,
    }


def _counts(conn: Connection) -> dict[str, int]:
    return {
        "entries": int(conn.execute(select(func.count()).select_from(mailbox)).scalar_one()),
        "blobs": int(conn.execute(select(func.count()).select_from(blobs)).scalar_one()),
    }


class _AckGroup:
    """Acks that will be applied by one write op (coalesced: one op, one savepoint)."""

    def __init__(self) -> None:
        self.items: list[tuple[str, list[int]]] = []
        self.queued = trio.Event()
        self.completion: Completion[list[int]] | None = None
        self.waiting: list[Callable[[], None]] = []     # ``on_done`` callers before it was queued

    def set_queued(self) -> None:
        self.queued.set()
        waiting, self.waiting = self.waiting, []
        for callback in waiting:
            if self.completion is None:
                callback()                   # never queued: ``result_now`` raises at once
            else:
                self.completion.on_done(callback)     # a ``Database.queue`` completion: supported


class _AckSlot(Completion[int]):
    def __init__(self, group: _AckGroup, index: int) -> None:
        self._group = group
        self._index = index

    async def result(self) -> int:
        await self._group.queued.wait()
        if self._group.completion is None:
            raise RuntimeError("ack group was never queued")
        return (await self._group.completion.result())[self._index]

    def on_done(self, callback: Callable[[], None]) -> bool:
        group = self._group
        if not group.queued.is_set():
            group.waiting.append(callback)
            return True
        if group.completion is None:
            callback()
            return True
        return group.completion.on_done(callback)

    def result_now(self) -> int:
        if self._group.completion is None:
            raise RuntimeError("ack group was never queued")
        return self._group.completion.result_now()[self._index]


class MailboxRepository:
    """Mailbox entries, their shared ciphertext blobs and the send dedupe ids."""

    def __init__(self, db: Database) -> None:
        self._db = db
        # Acks of every device that arrive while an ack op waits in the writer's
        # queue join that op, so a busy server spends one op (not one per ack) on them.
        self._ack_lock = threading.Lock()
        self._open_acks: _AckGroup | None = None

    async def deliver(self, sender: str, message_id: str, digest: bytes,
                      payloads: list[tuple[list[str], bytes]], now_ms: int,
                      ttl_ms: int, outbound: Sequence[OutboundDraft] = ()) -> DeliverResult:
        """Store a send exactly once per (sender, message_id); ONE write op.

        Same id and digest again -> ``duplicate``; same id, other digest ->
        ``conflict``; neither adds rows nor queues anything.  Otherwise every
        ciphertext is stored once with one entry per device, and the new entries
        come back with their seq; ``outbound`` (envelopes for remote domains) is
        queued in the same op and comes back numbered.  ``payloads`` may be empty
        (every other device is remote): the message id is still recorded.
        """
        return await (await self.queue_deliver(sender, message_id, digest, payloads, now_ms, ttl_ms,
                                               outbound=outbound)).result()

    async def queue_deliver(self, sender: str, message_id: str, digest: bytes,
                            payloads: list[tuple[list[str], bytes]], now_ms: int, ttl_ms: int,
                            on_commit: Callable[[DeliverResult], None] | None = None,
                            outbound: Sequence[OutboundDraft] = ()
                            ) -> Completion[DeliverResult]:
        """``deliver``, queued now and awaited later; ``on_commit`` runs in commit order.

        An invalid outbound draft raises ``ValueError`` here, before anything is queued.
        """
        drafts = list(outbound)
        check_drafts(drafts, now_ms)
        return await self._db.queue(
            lambda conn: _deliver(conn, sender, message_id, digest, payloads, now_ms, ttl_ms, drafts),
            on_commit, quick=True)

    async def pending(self, device: str, after_seq: int, limit: int) -> list[MailboxEntry]:
        """Up to ``limit`` entries of ``device`` after ``after_seq``, oldest first."""
        return await self._db.read(lambda conn: _pending(conn, device, after_seq, limit))

    async def ack(self, device: str, seqs: list[int]) -> int:
        """Delete those entries of ``device`` (others' seqs are ignored); returns how many."""
        return await (await self.queue_ack(device, seqs)).result()

    async def queue_ack(self, device: str, seqs: list[int]) -> Completion[int]:
        """``ack``, queued now and awaited later; joins an ack op still waiting to run."""
        with self._ack_lock:
            group = self._open_acks
            new = group is None
            if group is None:
                group = self._open_acks = _AckGroup()
            group.items.append((device, list(seqs)))
            index = len(group.items) - 1
        if new:
            try:
                group.completion = await self._db.queue(lambda conn: self._apply_acks(conn, group), quick=True)
            except BaseException:
                with self._ack_lock:
                    if self._open_acks is group:
                        self._open_acks = None
                raise
            finally:
                group.set_queued()
        return _AckSlot(group, index)

    def _apply_acks(self, conn: Connection, group: _AckGroup) -> list[int]:
        """Writer thread: close the group to newcomers, then apply every ack in it."""
        with self._ack_lock:
            if self._open_acks is group:
                self._open_acks = None
            items = list(group.items)
        return [_ack(conn, device, seqs) for device, seqs in items]

    async def expire(self, now_ms: int) -> dict[str, int]:
        """Housekeeping: drop everything past its TTL; returns the count per kind."""
        return await self._db.write(lambda conn: _expire(conn, now_ms))

    async def purge_device(self, device: str) -> int:
        """Drop every entry of ``device``; returns how many."""
        return await self._db.write(lambda conn: delete_device_entries(conn, device))

    async def counts(self) -> dict[str, int]:
        """``entries`` and ``blobs`` currently stored, for health and metrics."""
        return await self._db.read(_counts)
