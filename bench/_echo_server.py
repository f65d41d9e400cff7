"""A bare trio-websocket msgpack echo server: the ceiling the relay benchmark compares against.

Same frame pattern as the homeserver, none of its work: ``hello {device}`` names a
connection; ``send`` is answered at once with ``ok`` (the "durable ack") and its
ciphertext is forwarded as an ``envelope`` push to each named device; ``ack`` is
answered with ``ok``.  No validation, no storage, no canonical-form check.  Like
the homeserver, each connection has one writer task fed by a bounded outbox.

Run: ``python bench/_echo_server.py [--host H] [--port P]``; prints
``echo server listening: ws://H:P/c2s`` once bound; SIGTERM/SIGINT stop it.
"""

from __future__ import annotations

import sys
from pathlib import Path

# Run as a script, Python puts bench/ first on sys.path, where bench/federation.py
# would shadow the federation package: the repository root goes first instead.
_BENCH = str(Path(__file__).resolve().parent)
sys.path[:] = [p for p in sys.path if p and str(Path(p).resolve()) != _BENCH]
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import argparse
import signal
from typing import Any

import msgpack
import trio
import trio_websocket

OUTBOX_SIZE = 1024


class EchoServer:
    def __init__(self) -> None:
        self.outboxes: dict[str, trio.MemorySendChannel[bytes]] = {}
        self.seqs: dict[str, int] = {}

    async def handle(self, request: trio_websocket.WebSocketRequest) -> None:
        ws = await request.accept()
        outbox, pending = trio.open_memory_channel[bytes](OUTBOX_SIZE)
        name = None
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._writer, ws, pending)
                try:
                    while True:
                        obj: dict[str, Any] = msgpack.unpackb(await ws.get_message(), raw=False)
                        op = obj.get("op")
                        if op == "send":
                            await self._forward(obj)
                            ok: dict[str, Any] = {"duplicate": False, "message_id": obj["message_id"]}
                        elif op == "ack":
                            ok = {"removed": len(obj["seqs"])}
                        elif op == "hello":
                            name = obj["device"]
                            self.outboxes[name] = outbox
                            ok = {}
                        else:
                            ok = {}
                        await outbox.send(msgpack.packb({"id": obj["id"], "ok": ok}, use_bin_type=True))
                except trio_websocket.ConnectionClosed:
                    pass
                nursery.cancel_scope.cancel()
        finally:
            if name is not None and self.outboxes.get(name) is outbox:
                del self.outboxes[name]

    async def _forward(self, obj: dict[str, Any]) -> None:
        for payload in obj["payloads"]:
            for device in payload["devices"]:
                target = self.outboxes.get(device)
                if target is None:
                    continue
                seq = self.seqs[device] = self.seqs.get(device, 0) + 1
                push = {"ciphertext": payload["ciphertext"], "message_id": obj["message_id"], "push": "envelope",
                        "sender": "echo", "seq": seq, "ts_ms": 0}
                try:
                    await target.send(msgpack.packb(push, use_bin_type=True))
                except (trio.ClosedResourceError, trio.BrokenResourceError):
                    pass

    @staticmethod
    async def _writer(ws: trio_websocket.WebSocketConnection, pending: trio.MemoryReceiveChannel[bytes]) -> None:
        try:
            async for frame in pending:
                await ws.send_message(frame)
        except trio_websocket.ConnectionClosed:
            pass


async def main(host: str, port: int) -> None:
    server = EchoServer()
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async with trio.open_nursery() as nursery:
            listener = await nursery.start(lambda task_status: trio_websocket.serve_websocket(
                server.handle, host, port, None, max_message_size=1 << 20, message_queue_size=16,
                task_status=task_status))
            print(f"echo server listening: ws://{host}:{listener.port}/c2s", flush=True)
            async for _ in signals:
                break
            nursery.cancel_scope.cancel()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    args = parser.parse_args()
    trio.run(main, args.host, args.port)
