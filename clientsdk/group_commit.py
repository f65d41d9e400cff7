"""Group commit for the client store: many batches, one transaction, one thread hop, one fsync.

Split from ``clientsdk.client``: sends and received batches of one client queue their
``Batch`` here and wait for it to be written; which commits are fsynced, and which
run on the trio thread, is decided here.
"""

from __future__ import annotations

from collections.abc import Callable

import trio

from clientsdk.errors import StoreError
from clientsdk.store import Batch

# Scheduling rounds a commit waits for more batches before it starts: an ack wakes its send
# through the transport's reader, then the rpc reader.  In bench/e2e.py 3 rounds took sends from
# ~1.7 to ~2.8 per commit (a thread hop and an fsync each), for a few µs of latency.
GATHER_ROUNDS = 3


class _Commit:
    """One store transaction: the batches queued while the previous one ran, merged in order."""

    __slots__ = ("batch", "done", "error", "now_ms", "durable")

    def __init__(self) -> None:
        self.batch = Batch()
        self.now_ms = 0
        self.durable = False
        self.done = trio.Event()
        self.error: BaseException | None = None


class GroupCommit:
    """Group commit for the client store: one thread hop and one fsync for many batches.

    ``add`` queues a batch (synchronously, so callers fix the order under their lock);
    ``wait`` returns once it is written (fsynced unless every batch of it was added
    with ``durable=False``).  While one commit runs, later batches merge
    into the next one (``Batch.merge``: the result is the same as applying them one by
    one); whichever waiter finds no commit running starts it, after ``GATHER_ROUNDS``
    scheduling rounds in which tasks already woken (say, sends whose previous ack just
    arrived) can join.  A commit holds the store's limiter, ``stage``s the rows on the
    trio thread and runs only ``commit`` (the fsync) in a worker thread
    (``Store.stage``).  Waiting is shielded from cancellation: a queued batch is always
    written.  A commit is fsynced if any of its batches must be durable; one whose
    batches may all wait for the disk (``add(durable=False)``) is committed on the
    trio thread without the fsync, so it needs no thread hop.
    """

    def __init__(self, stage: Callable[[Batch, int, bool], bool], commit: Callable[[], None], abort: Callable[[], None],
                 limiter: trio.CapacityLimiter) -> None:
        self._stage = stage
        self._commit = commit
        self._abort = abort
        self._limiter = limiter
        self._open: _Commit | None = None
        self._running = False
        self._finished = trio.Event()          # set (and replaced) whenever a commit ends

    def add(self, batch: Batch, now_ms: int, durable: bool = True) -> _Commit:
        commit = self._open
        if commit is None:
            commit = self._open = _Commit()
        commit.batch.merge(batch)
        commit.now_ms = max(commit.now_ms, now_ms)
        commit.durable = commit.durable or durable
        return commit

    async def wait(self, commit: _Commit) -> None:
        """Until ``commit`` is written (fsynced if durable); raises its ``StoreError`` (its batches share it)."""
        if commit.done.is_set():           # another waiter's commit wrote it: no cancel scope needed
            if commit.error is not None:
                raise commit.error
            return
        with trio.CancelScope(shield=True):
            await self.wait_shielded(commit)

    async def wait_shielded(self, commit: _Commit) -> None:
        """``wait`` for a caller already inside a shielded scope (a cancel scope costs ~4 µs: one per send saved)."""
        gathered = 0
        while not commit.done.is_set():
            if self._running or commit is not self._open:     # queued behind the running one
                await self._finished.wait()
                continue
            if gathered < GATHER_ROUNDS:
                gathered += 1
                await trio.lowlevel.checkpoint()
                continue
            self._open = None
            self._running = True
            written = False
            try:
                async with self._limiter:             # the store's one connection is ours
                    staged = self._stage(commit.batch, commit.now_ms, commit.durable)
                    if staged and not commit.durable:
                        self._commit()                # no fsync: a write to the WAL, ~20 µs
                    elif staged:
                        try:
                            await trio.to_thread.run_sync(self._commit)
                        except BaseException:
                            # A failed commit rolled back already; one that never ran must not
                            # leave its rows staged for the next commit to take along.
                            self._abort()
                            raise
                written = True
            except StoreError as exc:
                commit.error = exc
            finally:
                if not written and commit.error is None:      # anything else propagates from here
                    commit.error = StoreError("the store write failed")
                self._running = False
                commit.done.set()
                finished, self._finished = self._finished, trio.Event()
                finished.set()
        if commit.error is not None:
            raise commit.error
