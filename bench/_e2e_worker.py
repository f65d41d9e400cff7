"""One load process of the end-to-end benchmark: a share of the SDK clients, driven by ``bench/e2e.py``.

Run as ``python bench/_e2e_worker.py CONFIG_JSON``.  It registers and connects its
pairs (and, for worker 0, the group's admin and members), warms the sessions up,
prints ``{"ready": ...}`` and then runs one phase per command line on stdin:

* ``{"cmd": "closed", "messages": N}``  -> ``{"phase": "closed", ...}``
* ``{"cmd": "open", "rate": R, "seconds": S}`` -> ``{"phase": "open", ..., "latencies": [...]}``
* ``{"cmd": "group", "sends": N}`` (worker 0) -> ``{"phase": "group", ...}``
* ``{"cmd": "stop"}``

Every answer is one JSON line on stdout; times are ``time.monotonic()`` seconds, the
clock every process on the machine shares, so the parent can merge the workers'
phases.  CPU is this process's (``process_time``) and its trio thread's
(``thread_time``).  A failure prints ``{"error": ...}`` and exits 1.
"""

from __future__ import annotations

import cProfile
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import trio

# Run as a script, bench/ is first on sys.path and bench/federation.py would shadow the
# federation package: the repository root goes before it.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench._e2e_load import E2ERun, Fleet, Pair, group_fanout  # noqa: E402
from bench._load import BenchError  # noqa: E402
from bench.relay import _bench_errors  # noqa: E402


def _say(obj: dict[str, Any]) -> None:
    print(json.dumps(obj), flush=True)


class _PhaseClock:
    """A phase's CPU (process and trio thread) and the offset from trio's clock to ``time.monotonic``."""

    def __init__(self) -> None:
        self.cpu = time.process_time()
        self.trio_cpu = time.thread_time()
        self.offset = time.monotonic() - trio.current_time()

    def fields(self, started: float, finished: float) -> dict[str, Any]:
        return {"started": started + self.offset, "finished": finished + self.offset,
                "cpu_s": time.process_time() - self.cpu, "trio_cpu_s": time.thread_time() - self.trio_cpu}


async def _commands() -> Any:
    """Command lines from stdin, parsed."""
    stream = trio.lowlevel.FdStream(os.dup(sys.stdin.fileno()))
    buffer = b""
    while True:
        chunk = await stream.receive_some(65536)
        if not chunk:
            return
        buffer += chunk
        while b"\n" in buffer:
            line, buffer = buffer.split(b"\n", 1)
            if line.strip():
                yield json.loads(line)


async def serve(config: dict[str, Any]) -> None:
    index, k = config["index"], config["pairs"]
    async with trio.open_nursery() as nursery:
        fleet = Fleet(config["url"], Path(config["directory"]))
        names = [f"w{index}s{i:03d}" for i in range(k)] + [f"w{index}r{i:03d}" for i in range(k)]
        clients = await fleet.start(nursery, names)
        pairs = [Pair(clients[i], clients[k + i]) for i in range(k)]
        members, admin = [], None
        if config["group_devices"]:
            extra = max(0, config["group_devices"] - len(clients))
            members = clients[:config["group_devices"]] + await fleet.start(
                nursery, [f"w{index}g{i:03d}" for i in range(extra)])
            (admin,) = await fleet.start(nursery, [f"w{index}admin"])
        run = E2ERun(fleet, pairs, config["window"], config["text_bytes"], config["seed"] + index)
        await run.warm_up()
        _say({"ready": True, "clients": len(fleet.clients)})
        async for command in _commands():
            cmd = command["cmd"]
            clock = _PhaseClock()
            if cmd == "closed":
                stats = await run.closed_loop(command["messages"])
                _say({"phase": "closed", "messages": stats.expected, **clock.fields(stats.started, stats.finished)})
            elif cmd == "open":
                stats = await run.open_loop(command["rate"], command["seconds"])
                _say({"phase": "open", "messages": stats.expected, "issued": stats.issued,
                      "latencies": stats.latencies, **clock.fields(stats.started, stats.finished)})
            elif cmd == "group" and admin is not None:
                group = await group_fanout(fleet, admin, members, command["sends"])
                _say({"phase": "group", "devices": group.devices, "setup_s": group.setup_s,
                      "first_send_ms": group.first_send_ms, "fanout_ms": group.fanout_ms})
            elif cmd == "stop":
                break
            else:
                raise BenchError(f"unknown command {cmd!r}")
        fleet.stop.set()


def main() -> int:
    config = json.loads(sys.argv[1])
    profile_dir = os.environ.get("BENCH_PROFILE")
    profiler = cProfile.Profile() if profile_dir else None
    try:
        if profiler is not None:
            profiler.enable()
        trio.run(serve, config)
    except BaseException as exc:           # the parent reports it with this worker's log tail
        errors = _bench_errors(exc)
        _say({"error": str(errors[0]) if errors else f"{type(exc).__name__}: {exc}"})
        if not errors:
            raise
        return 1
    finally:
        if profiler is not None and profile_dir:
            profiler.disable()
            profiler.dump_stats(str(Path(profile_dir) / f"e2e_load_{config['index']}.prof"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
