"""The load side of the end-to-end benchmark: real SDK clients over WebSocket (in a ``bench/_e2e_worker.py``).

Every client is a ``clientsdk.client.Client`` with its own encrypted store file
(SQLite, WAL, ``synchronous=FULL``) and its own WebSocket to the homeserver, used
only through the public API: ``send`` / ``create_group`` / ``send_group`` and
``events()``.  A message counts when the *receiving* client emits its event, which
the SDK does only after the decrypted message, the new ratchet state and the
dedupe key are committed to its store (the ack to the server follows).

The text of each 1:1 message starts with its scheduled send time on this process's
trio clock (``"%.6f "``), so the receiving side computes send-to-stored latency
without any bookkeeping on the hot path.  Group messages are keyed by their text.
"""

from __future__ import annotations

import os
import random
import statistics
from collections import defaultdict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import trio

from bench._load import BenchError, PhaseStats
from clientsdk.account import ClientOptions
from clientsdk.client import Client
from clientsdk.connection import Backoff, websocket_connector
from clientsdk.errors import SdkError
from clientsdk.events import ConnectionChanged, Event, MessageReceived, SecurityEvent
from clientsdk.groups import GroupChanged, GroupMessageReceived

PASSWORD = "bench password 1"
STALL_SECONDS = 30.0
# Receipts off: the benchmark measures messages, not the automatic receipts each
# stored batch would add (architecture.md: "e.g. for benchmarks").  A short
# backoff so that a dropped connection shows up as a stall, not as a long pause.
OPTIONS = ClientOptions(delivery_receipts=False, backoff=Backoff(initial_s=0.05, maximum_s=1.0))


@dataclass
class Pair:
    sender: Client
    receiver: Client


class Tally:
    """Which devices emitted which keyed event; a waiter fires when ``target`` devices have."""

    def __init__(self) -> None:
        self.seen: dict[str, set[str]] = defaultdict(set)
        self.waiters: dict[str, tuple[int, trio.Event]] = {}
        self.finished: dict[str, float] = {}

    def note(self, key: str, device: str) -> None:
        seen = self.seen[key]
        seen.add(device)
        waiter = self.waiters.get(key)
        if waiter is not None and len(seen) >= waiter[0] and key not in self.finished:
            self.finished[key] = trio.current_time()
            waiter[1].set()

    async def wait(self, key: str, target: int, what: str) -> float:
        """Wait until ``target`` devices noted ``key``; returns the trio time the last one did."""
        event = trio.Event()
        self.waiters[key] = (target, event)
        if len(self.seen[key]) >= target:
            self.finished.setdefault(key, trio.current_time())
            event.set()
        await _with_stall_check(event, lambda: len(self.seen[key]), what)
        return self.finished[key]


async def _with_stall_check(done: trio.Event, progress: Callable[[], int], what: str) -> None:
    """Wait for ``done``; ``BenchError`` when ``progress()`` has not moved for ``STALL_SECONDS``."""
    last, last_change = -1, trio.current_time()
    while not done.is_set():
        with trio.move_on_after(1.0):
            await done.wait()
        now = trio.current_time()
        if progress() != last:
            last, last_change = progress(), now
        elif now - last_change > STALL_SECONDS and not done.is_set():
            raise BenchError(f"stalled: {what} ({progress()} so far)")


@contextmanager
def _as_bench_error(what: str) -> Iterator[None]:
    """An SDK error fails the run as a ``BenchError`` (reported with the server's log tail)."""
    try:
        yield
    except SdkError as exc:
        raise BenchError(f"{what} failed: {type(exc).__name__}: {exc}") from None


async def _watch(stats: PhaseStats, what: str) -> None:
    await _with_stall_check(stats.done, lambda: stats.progress, what)


class Fleet:
    """Every SDK client of the run: registered, connected, and its events routed to the run."""

    def __init__(self, url: str, directory: Path, concurrency: int = 8) -> None:
        self.url = url
        self.directory = directory
        self.limit = trio.Semaphore(concurrency)
        self.stop = trio.Event()
        self.clients: list[Client] = []
        self.phase = PhaseStats(expected=0)
        self.tally = Tally()
        directory.mkdir(parents=True, exist_ok=True)

    # --- clients ---

    async def start(self, nursery: trio.Nursery, names: list[str]) -> list[Client]:
        """Register one single-device user per name and keep it connected until ``stop``."""
        out: list[Client | None] = [None] * len(names)

        async def one(i: int) -> None:
            async with self.limit:
                with _as_bench_error("register"):
                    client = await Client.register(self.directory / f"{names[i]}.db", f"{names[i]}@localhost",
                                                   PASSWORD, connect=websocket_connector(self.url),
                                                   store_key=os.urandom(32), options=OPTIONS)
                out[i] = await nursery.start(self._host, client)

        async with trio.open_nursery() as setup:
            for i in range(len(names)):
                setup.start_soon(one, i)
        clients = [c for c in out if c is not None]
        self.clients += clients
        return clients

    async def _host(self, client: Client, task_status: trio.TaskStatus[Client] = trio.TASK_STATUS_IGNORED) -> None:
        try:
            async with client.connect(), trio.open_nursery() as inner:
                inner.start_soon(self._consume, client)
                task_status.started(client)
                await self.stop.wait()
                inner.cancel_scope.cancel()
        finally:
            with trio.CancelScope(shield=True):
                await client.aclose()

    async def _consume(self, client: Client) -> None:
        device = str(client.address)
        async for event in client.events():
            self._on_event(device, event)

    def _on_event(self, device: str, event: Event) -> None:
        if isinstance(event, MessageReceived):
            if event.outgoing:
                return
            stats = self.phase
            stats.delivered += 1
            stats.acked += 1                # stored by the receiving SDK (its ack to the server follows)
            if stats.record_latency:
                stats.latencies.append(trio.current_time() - float(event.text.split(" ", 1)[0]))
            stats.check_done()
        elif isinstance(event, GroupMessageReceived):
            self.tally.note("message " + event.text, device)
        elif isinstance(event, GroupChanged) and "welcome" in event.changes:
            self.tally.note("joined " + event.group_id, device)
        elif isinstance(event, SecurityEvent):
            raise BenchError(f"security event at {device}: {event.kind} ({event.detail})")
        elif isinstance(event, ConnectionChanged) and not event.connected and not self.stop.is_set():
            raise BenchError(f"{device} lost its connection")


def text_of(stamp: float, padding: str) -> str:
    """``padding`` (``text_bytes`` long) with its start replaced by the stamp: every text has the same length."""
    prefix = f"{stamp:.6f} "
    return prefix + padding[len(prefix):]


class E2ERun:
    """K pairs of SDK clients: warm-up, closed loop and open loop, measured like ``bench/_load.Run``."""

    def __init__(self, fleet: Fleet, pairs: list[Pair], window: int, text_bytes: int, seed: int) -> None:
        self.fleet = fleet
        self.pairs = pairs
        self.window = window
        self.padding = "".join(random.Random(seed).choices("abcdefghijklmnopqrstuvwxyz ", k=max(0, text_bytes)))
        self.rng = random.Random(seed + 1)

    def _begin(self, stats: PhaseStats) -> PhaseStats:
        self.fleet.phase = stats
        stats.started = trio.current_time()
        return stats

    async def warm_up(self) -> None:
        """One message each way per pair: PQXDH sessions exist and are confirmed before timing.

        The reply matters: until a session's initiator has decrypted one message from
        the responder, everything it sends is a (larger) PQXDH prekey message.
        """
        for forward in (True, False):
            stats = self._begin(PhaseStats(expected=len(self.pairs)))
            async with trio.open_nursery() as nursery:
                nursery.start_soon(_watch, stats, "warm-up")
                for pair in self.pairs:
                    a, b = (pair.sender, pair.receiver) if forward else (pair.receiver, pair.sender)
                    nursery.start_soon(self._send, a, b.user, trio.current_time(), stats)

    async def closed_loop(self, messages: int) -> PhaseStats:
        """Each sender keeps ``window`` ``send`` calls in flight until ``messages`` are stored by receivers."""
        stats = self._begin(PhaseStats(expected=messages))
        k = len(self.pairs)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_watch, stats, "closed loop")
            for i, pair in enumerate(self.pairs):
                count = messages // k + (1 if i < messages % k else 0)
                nursery.start_soon(self._closed_sender, pair, count, stats)
        return stats

    async def open_loop(self, rate: float, seconds: float) -> PhaseStats:
        """Poisson arrivals at ``rate`` msgs/s in total for ``seconds``; latency from the *scheduled* time."""
        stats = self._begin(PhaseStats(expected=None, record_latency=True))
        per_sender = rate / len(self.pairs)
        end = stats.started + seconds
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_watch, stats, "open loop")
            async with trio.open_nursery() as senders:
                for pair in self.pairs:
                    arrivals = random.Random(self.rng.random())
                    senders.start_soon(self._open_sender, pair, per_sender, end, arrivals, stats)
            stats.finish_issuing()
        return stats

    async def _send(self, sender: Client, to: str, stamp: float, stats: PhaseStats) -> None:
        stats.issued += 1
        with _as_bench_error("send"):
            await sender.send(to, text_of(stamp, self.padding))
        stats.oks += 1                          # acknowledged by the server: durably queued
        stats.check_done()

    async def _closed_sender(self, pair: Pair, count: int, stats: PhaseStats) -> None:
        remaining = count

        async def worker() -> None:
            nonlocal remaining
            while remaining > 0:
                remaining -= 1
                await self._send(pair.sender, pair.receiver.user, trio.current_time(), stats)

        async with trio.open_nursery() as nursery:
            for _ in range(min(self.window, count)):
                nursery.start_soon(worker)

    async def _open_sender(self, pair: Pair, rate: float, end: float, arrivals: random.Random,
                           stats: PhaseStats) -> None:
        window = trio.Semaphore(self.window)

        async def one(at: float) -> None:
            try:
                await self._send(pair.sender, pair.receiver.user, at, stats)
            finally:
                window.release()

        at = stats.started
        async with trio.open_nursery() as nursery:
            while True:
                at += arrivals.expovariate(rate)
                if at >= end:
                    return
                await trio.sleep_until(at)
                await window.acquire()
                nursery.start_soon(one, at)


@dataclass
class GroupResult:
    devices: int
    setup_s: float
    first_send_ms: float          # the send that also carries the sender key pairwise to every device
    fanout_ms: list[float]        # later sends: one shared ciphertext, fanned out by the server

    @property
    def median_ms(self) -> float:
        return statistics.median(self.fanout_ms)


async def group_fanout(fleet: Fleet, sender: Client, members: list[Client], sends: int) -> GroupResult:
    """Create a group of ``sender`` + ``members`` (one device each), then time ``send_group`` to all of them."""
    started = trio.current_time()
    with _as_bench_error("create_group"):
        gid = await sender.create_group("bench", [m.user for m in members])
    await fleet.tally.wait("joined " + gid, len(members), "group welcome")
    setup_s = trio.current_time() - started
    times: list[float] = []
    for i in range(sends + 1):
        text = f"group {i}"
        t0 = trio.current_time()
        with _as_bench_error("send_group"):
            await sender.send_group(gid, text)
        done = await fleet.tally.wait("message " + text, len(members), f"group message {i}")
        times.append(1000 * (done - t0))
    return GroupResult(len(members), setup_s, times[0], times[1:])
