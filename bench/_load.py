"""The load side of the relay benchmark: K sender/receiver pairs, one WebSocket per client.

Runs in the bench process only (never inside a server).  The hot path is lean on
purpose -- frames are packed directly with msgpack in canonical key order and
responses are matched by id through callbacks -- so that the same load generator
can drive the bare echo server, the null relay and the real homeserver and the
ratios between them measure the servers, not this file.

Message shape per send (DESIGN §5): ``{id, message_id, op: "send", payloads:
[{ciphertext, devices: [receiver]}]}``; the ciphertext starts with the send
timestamp (``>d``, trio clock seconds) so the receiver computes send-to-delivery
latency.  Receivers ack the ``seq`` of every envelope (batched: everything that
arrived while the previous ack was in flight, at most 1,000 per ack).
"""

from __future__ import annotations

import itertools
import random
import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import msgpack
import trio

from conformance.client import authenticate, register, throwaway_user
from federation import codec
from federation.transport import Transport, TransportClosed, connect_websocket

STAMP = struct.Struct(">d")
MAX_ACK_BATCH = 1_000
STALL_SECONDS = 30.0


class BenchError(Exception):
    """The run cannot produce a meaningful number (server error, closed connection, stall)."""


def _pack(obj: dict[str, Any]) -> bytes:
    return msgpack.packb(obj, use_bin_type=True)


@dataclass
class PhaseStats:
    """Counters of one phase; ``done`` fires once every issued message is ok'd and acked."""

    expected: int | None                 # None while an open-loop phase is still issuing
    record_latency: bool = False
    issued: int = 0
    oks: int = 0
    delivered: int = 0
    acked: int = 0
    latencies: list[float] = field(default_factory=list)
    started: float = 0.0
    finished: float = 0.0
    done: trio.Event = field(default_factory=trio.Event)

    def check_done(self) -> None:
        if self.expected is not None and self.oks >= self.expected and self.acked >= self.expected \
                and not self.done.is_set():
            self.finished = trio.current_time()
            self.done.set()

    def finish_issuing(self) -> None:
        self.expected = self.issued
        self.check_done()

    @property
    def progress(self) -> int:
        return self.oks + self.acked


class BenchConnection:
    """One client WebSocket: requests matched to responses by id, envelopes to ``on_push``."""

    def __init__(self, transport: Transport) -> None:
        self.transport = transport
        self.ids = itertools.count(1)
        self.callbacks: dict[int, Callable[[dict[str, Any]], None]] = {}
        self.on_push: Callable[[dict[str, Any]], None] = lambda obj: None
        self.closing = False

    async def run_reader(self) -> None:
        unpack = msgpack.unpackb
        callbacks = self.callbacks
        try:
            while True:
                obj = unpack(await self.transport.receive(), raw=False)
                if "push" in obj:
                    self.on_push(obj)
                else:
                    callback = callbacks.pop(obj["id"], None)
                    if callback is not None:
                        callback(obj)
        except (TransportClosed, trio.ClosedResourceError) as exc:
            if not self.closing:
                raise BenchError(f"server closed a connection: {exc}") from None

    async def request(self, op: str, **params: Any) -> dict[str, Any]:
        """A setup request (canonical codec); raises ``BenchError`` on an error response."""
        request_id = next(self.ids)
        event = trio.Event()
        slot: list[dict[str, Any]] = []

        def answer(obj: dict[str, Any]) -> None:
            slot.append(obj)
            event.set()

        self.callbacks[request_id] = answer
        await self.transport.send(codec.encode({**params, "id": request_id, "op": op}))
        await event.wait()
        if "error" in slot[0]:
            error = slot[0]["error"]
            raise BenchError(f"{op} failed: {error.get('code')}: {error.get('message')}")
        ok: dict[str, Any] = slot[0].get("ok", {})
        return ok

    async def aclose(self) -> None:
        self.closing = True
        await self.transport.aclose()


def send_frame(request_id: int, message_id: str, receiver: str, ciphertext: bytes) -> bytes:
    """A ``send`` request, keys already in canonical (sorted) order."""
    return _pack({"id": request_id, "message_id": message_id, "op": "send",
                  "payloads": [{"ciphertext": ciphertext, "devices": [receiver]}]})


def ack_frame(request_id: int, seqs: list[int]) -> bytes:
    return _pack({"id": request_id, "op": "ack", "seqs": seqs})


def check_frames_canonical() -> None:
    """The hand-packed hot-path frames must be what the server's canonical decoder accepts."""
    for frame in (send_frame(1, "m-1", "u@localhost/ABCDEFGH", b"\x00" * 300), ack_frame(2, [1, 2, 300])):
        if codec.encode(codec.decode(frame)) != frame:
            raise BenchError("hot-path frame is not canonical msgpack")


@dataclass
class Pair:
    sender: BenchConnection
    receiver: BenchConnection
    receiver_address: str
    sender_address: str


class Run:
    """All pairs against one server, plus the phase currently being measured."""

    def __init__(self, pairs: list[Pair], window: int, payload: int, seed: int) -> None:
        if payload < STAMP.size:
            raise BenchError(f"payload must be at least {STAMP.size} bytes")
        self.pairs = pairs
        self.window = window
        self.padding = random.Random(seed).randbytes(payload - STAMP.size)
        self.rng = random.Random(seed + 1)
        self.phase = PhaseStats(expected=0)
        self.phase_number = 0
        self.receivers = [Receiver(pair.receiver, self) for pair in pairs]

    async def closed_loop(self, messages: int) -> PhaseStats:
        """Every sender keeps ``window`` sends in flight until ``messages`` are delivered and acked."""
        stats = self._begin(PhaseStats(expected=messages))
        k = len(self.pairs)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._watch, stats, nursery.cancel_scope)
            for i, pair in enumerate(self.pairs):
                count = messages // k + (1 if i < messages % k else 0)
                nursery.start_soon(self._closed_sender, pair, count, stats)
        return stats

    async def open_loop(self, rate: float, seconds: float) -> PhaseStats:
        """Poisson arrivals at ``rate`` msgs/s in total (``rate / K`` per sender) for ``seconds``.

        The timestamp in each payload is the *scheduled* arrival time, so time spent
        waiting for a window slot counts as latency (no coordinated omission).
        """
        stats = self._begin(PhaseStats(expected=None, record_latency=True))
        per_sender = rate / len(self.pairs)
        end = stats.started + seconds
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._watch, stats, nursery.cancel_scope)
            async with trio.open_nursery() as senders:
                for pair in self.pairs:
                    arrivals = random.Random(self.rng.random())
                    senders.start_soon(self._open_sender, pair, per_sender, end, arrivals, stats)
            stats.finish_issuing()
        return stats

    def _begin(self, stats: PhaseStats) -> PhaseStats:
        self.phase_number += 1
        self.phase = stats
        stats.started = trio.current_time()
        return stats

    async def _watch(self, stats: PhaseStats, scope: trio.CancelScope) -> None:
        """End the phase when done; fail it when nothing has moved for ``STALL_SECONDS``."""
        last, last_change = -1, trio.current_time()
        while not stats.done.is_set():
            with trio.move_on_after(1.0):
                await stats.done.wait()
            now = trio.current_time()
            if stats.progress != last:
                last, last_change = stats.progress, now
            elif now - last_change > STALL_SECONDS:
                raise BenchError(f"stalled: {stats.oks} ok, {stats.acked} acked of {stats.expected or stats.issued}")

    def _on_send_response(self, stats: PhaseStats, window: trio.Semaphore) -> Callable[[dict[str, Any]], None]:
        def on_response(obj: dict[str, Any]) -> None:
            window.release()
            if "error" in obj:
                error = obj["error"]
                raise BenchError(f"send failed: {error.get('code')}: {error.get('message')}")
            stats.oks += 1
            stats.check_done()
        return on_response

    async def _send(self, pair: Pair, stamp: float, stats: PhaseStats,
                    on_response: Callable[[dict[str, Any]], None]) -> None:
        conn = pair.sender
        request_id = next(conn.ids)
        conn.callbacks[request_id] = on_response
        stats.issued += 1
        message_id = f"p{self.phase_number}-{request_id}"
        await conn.transport.send(send_frame(request_id, message_id, pair.receiver_address,
                                             STAMP.pack(stamp) + self.padding))

    async def _closed_sender(self, pair: Pair, count: int, stats: PhaseStats) -> None:
        window = trio.Semaphore(self.window)
        on_response = self._on_send_response(stats, window)
        for _ in range(count):
            await window.acquire()
            await self._send(pair, trio.current_time(), stats, on_response)

    async def _open_sender(self, pair: Pair, rate: float, end: float, arrivals: random.Random,
                           stats: PhaseStats) -> None:
        window = trio.Semaphore(self.window)
        on_response = self._on_send_response(stats, window)
        at = stats.started
        while True:
            at += arrivals.expovariate(rate)
            if at >= end:
                return
            await trio.sleep_until(at)
            await window.acquire()
            await self._send(pair, at, stats, on_response)


class Receiver:
    """Records each envelope's latency and acks its ``seq``; one ack request in flight at a time."""

    def __init__(self, conn: BenchConnection, run: Run) -> None:
        self.conn = conn
        self.run = run
        self.pending: list[int] = []
        self.wake = trio.Event()
        self.ack_done = trio.Event()
        conn.on_push = self.on_push

    def on_push(self, obj: dict[str, Any]) -> None:
        if obj.get("push") != "envelope":
            return                           # e.g. prekeys_low: not part of the measurement
        stats = self.run.phase
        stats.delivered += 1
        if stats.record_latency:
            stats.latencies.append(trio.current_time() - STAMP.unpack_from(obj["ciphertext"])[0])
        self.pending.append(obj["seq"])
        self.wake.set()

    async def run_acker(self) -> None:
        conn = self.conn
        while True:
            await self.wake.wait()
            self.wake = trio.Event()
            while self.pending:
                seqs, self.pending = self.pending[:MAX_ACK_BATCH], self.pending[MAX_ACK_BATCH:]
                stats = self.run.phase
                self.ack_done = trio.Event()
                request_id = next(conn.ids)
                conn.callbacks[request_id] = self._acked(stats, len(seqs))
                await conn.transport.send(ack_frame(request_id, seqs))
                await self.ack_done.wait()

    def _acked(self, stats: PhaseStats, count: int) -> Callable[[dict[str, Any]], None]:
        def on_response(obj: dict[str, Any]) -> None:
            if "error" in obj:
                error = obj["error"]
                raise BenchError(f"ack failed: {error.get('code')}: {error.get('message')}")
            stats.acked += count
            stats.check_done()
            self.ack_done.set()
        return on_response


# --- connecting pairs ------------------------------------------------------------------


async def _connect(nursery: trio.Nursery, url: str) -> BenchConnection:
    conn = BenchConnection(await connect_websocket(url))
    nursery.start_soon(conn.run_reader)
    return conn


async def connect_homeserver_pair(nursery: trio.Nursery, url: str, domain: str) -> Pair:
    """Two throwaway single-device accounts, each registered and authenticated on its own socket."""
    sender = await _connect(nursery, url)
    receiver = await _connect(nursery, url)
    devices = []
    for conn, prefix in ((sender, "bs"), (receiver, "br")):
        device = await register(conn, throwaway_user(domain, prefix))  # type: ignore[arg-type]
        await authenticate(conn, device, domain)  # type: ignore[arg-type]
        devices.append(device)
    return Pair(sender, receiver, devices[1].address, devices[0].address)


async def connect_echo_pair(nursery: trio.Nursery, url: str, index: int) -> Pair:
    """The echo server only needs a name per connection to forward envelopes to."""
    sender = await _connect(nursery, url)
    receiver = await _connect(nursery, url)
    names = (f"sender{index}@echo/SENDER{index:02d}", f"receiver{index}@echo/RECEIV{index:02d}")
    for conn, name in zip((sender, receiver), names):
        await conn.request("hello", device=name)
    return Pair(sender, receiver, names[1], names[0])


async def connect_pairs(nursery: trio.Nursery, url: str, count: int, *, echo: bool, domain: str,
                        concurrency: int = 8) -> list[Pair]:
    pairs: list[Pair | None] = [None] * count
    limit = trio.Semaphore(concurrency)

    async def one(i: int) -> None:
        async with limit:
            pairs[i] = await (connect_echo_pair(nursery, url, i) if echo
                              else connect_homeserver_pair(nursery, url, domain))

    async with trio.open_nursery() as setup:
        for i in range(count):
            setup.start_soon(one, i)
    return [p for p in pairs if p is not None]


def start_ackers(nursery: trio.Nursery, run: Run) -> None:
    for receiver in run.receivers:
        nursery.start_soon(receiver.run_acker)


def percentile(sorted_values: list[float], q: float) -> float:
    """Nearest-rank percentile of already sorted values (``q`` in 0..100)."""
    if not sorted_values:
        return float("nan")
    rank = max(1, min(len(sorted_values), int(-(-q * len(sorted_values) // 100))))
    return sorted_values[rank - 1]
