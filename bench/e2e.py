"""End-to-end benchmark (issue 4, item 11): encrypted messages between SDK clients vs the opaque relay.

This script is the load process; each homeserver (``python -m homeserver run`` on
SQLite, WAL, synchronous=FULL) is a subprocess of it, started fresh per part:

* ``relay`` -- ``bench/relay.py``'s lean load (hand-packed opaque ciphertexts) with the
  same K, window and message count: the baseline ``relay_msgs_per_s``;
* ``e2e``   -- K pairs of real ``clientsdk`` clients (``bench/_e2e_load.py``), each with
  its own WebSocket and encrypted store.  Sessions (PQXDH) are set up and confirmed
  before timing.  Phase 1, closed loop: M messages, ``window`` ``send`` calls in
  flight per sender; a message counts once the server acknowledged it and the
  receiving client decrypted and durably stored it.  Phase 2, open loop: Poisson
  arrivals at 50% of the phase-1 rate; latency = send scheduled -> receiver's
  event (stored).  Phase 3: a group of 100 member devices; ``send_group`` until
  every member device has emitted the message (median of a few sends).

Prints one JSON object (fields: bench/README.md).  ``BENCH_PROFILE=DIR`` runs both
servers under cProfile and profiles the e2e load (trio thread) into
``DIR/e2e_load.prof``; each ``.prof`` gets a ``.txt`` summary.
"""

from __future__ import annotations

import argparse
import cProfile
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import trio

REPO = Path(__file__).resolve().parent.parent
# Run as a script, bench/ is first on sys.path and bench/federation.py would shadow the
# federation package: the repository root goes before it.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench._e2e_load import E2ERun, Fleet, Pair, group_fanout
from bench._machine import MachineRecord  # noqa: E402
from bench._load import BenchError, PhaseStats, check_frames_canonical
from bench.relay import (
    CpuMeter,
    ServerProcess,
    _bench_errors,
    _ratio,
    open_loop_fields,
    run_server,
    write_config,
)

TARGETS = {"ratio": 0.6}
GROUP_FIELD = "group100_fanout_ms"


class LoadMeter(CpuMeter):
    """``CpuMeter`` plus the split of this process's CPU into the trio thread and store threads.

    The SDK hops to a worker thread for every store read and write; the split shows
    whether the crypto/protocol work (trio thread) or the store (threads) dominates.
    """

    def __init__(self, server: ServerProcess) -> None:
        super().__init__(server)
        self.trio_start = time.thread_time()

    def summary(self, stats: PhaseStats) -> dict[str, Any]:
        load_cpu = time.process_time() - self.load_start
        trio_cpu = time.thread_time() - self.trio_start
        out = super().summary(stats)
        elapsed = stats.finished - stats.started
        if elapsed > 0:
            out["load_trio_thread_cpu_pct"] = round(100 * trio_cpu / elapsed, 1)
            out["load_store_threads_cpu_pct"] = round(100 * (load_cpu - trio_cpu) / elapsed, 1)
        if stats.expected:
            out["load_cpu_ms_per_msg"] = round(1000 * load_cpu / stats.expected, 3)
        return out


def _summary_text(profile: Path) -> None:
    import io
    import pstats

    text = io.StringIO()
    stats = pstats.Stats(str(profile), stream=text)
    stats.sort_stats("tottime").print_stats(30)
    stats.sort_stats("cumulative").print_stats(40)
    profile.with_suffix(".txt").write_text(text.getvalue())


def _log(message: str) -> None:
    print(f"[bench] e2e: {message}", file=sys.stderr, flush=True)


async def measure_e2e(server: ServerProcess, args: argparse.Namespace, clients_dir: Path) -> dict[str, Any]:
    """Register and connect every client, warm up, run the three phases, return the numbers."""
    setup_started = trio.current_time()
    async with trio.open_nursery() as nursery:
        fleet = Fleet(server.url, clients_dir)
        k = args.pairs
        clients = await fleet.start(nursery, [f"s{i:03d}" for i in range(k)] + [f"r{i:03d}" for i in range(k)])
        pairs = [Pair(clients[i], clients[k + i]) for i in range(k)]
        extra = max(0, args.group_devices - len(clients))
        members = clients[:args.group_devices] + await fleet.start(nursery, [f"g{i:03d}" for i in range(extra)])
        (group_sender,) = await fleet.start(nursery, ["admin"])
        run = E2ERun(fleet, pairs, args.window, args.text_bytes, args.seed)
        await run.warm_up()
        _log(f"{len(fleet.clients)} clients connected, sessions ready in {trio.current_time() - setup_started:.1f} s")

        meter = LoadMeter(server)
        closed = await run.closed_loop(args.messages)
        result: dict[str, Any] = {"closed_loop": meter.summary(closed)}
        _log(f"closed loop {json.dumps(result['closed_loop'])}")

        rate = 0.5 * result["closed_loop"]["msgs_per_s"]
        meter = LoadMeter(server)
        stats = await run.open_loop(rate, args.open_loop_seconds)
        result["open_loop"] = {**meter.summary(stats), **open_loop_fields(rate, stats, args.open_loop_seconds)}
        _log(f"open loop {json.dumps(result['open_loop'])}")

        group = await group_fanout(fleet, group_sender, members, args.group_sends)
        result["group"] = {
            "member_devices": group.devices, "users": group.devices, "devices_per_user": 1,
            "median_ms": round(group.median_ms, 2), "sends_ms": [round(t, 2) for t in group.fanout_ms],
            "first_send_ms": round(group.first_send_ms, 2), "setup_s": round(group.setup_s, 2),
        }
        _log(f"group {json.dumps(result['group'])}")
        result["clients"] = len(fleet.clients)
        fleet.stop.set()
    return result


def run_e2e(workdir: Path, profile_dir: Path | None, args: argparse.Namespace) -> dict[str, Any]:
    print("[bench] e2e: starting", file=sys.stderr, flush=True)
    config = write_config(workdir / "e2e-server")
    server = ServerProcess("e2e", ["-m", "homeserver", "run", "--config", str(config)], workdir, profile_dir)
    profiler = cProfile.Profile() if profile_dir is not None else None
    with server:
        try:
            if profiler is not None:
                profiler.enable()
            result = trio.run(measure_e2e, server, args, workdir / "clients")
        except BaseException as exc:
            bench_errors = _bench_errors(exc)
            if bench_errors:
                raise BenchError(f"e2e: {bench_errors[0]}\ne2e server log tail:\n{server.log_tail()}") from None
            raise
        finally:
            if profiler is not None:
                profiler.disable()
        result["server_rss_mb"] = server.rss_mb()
    server.write_profile_summary()
    if profiler is not None and profile_dir is not None:
        profiler.dump_stats(str(profile_dir / "e2e_load.prof"))
        _summary_text(profile_dir / "e2e_load.prof")
    return result


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="SecureChat end-to-end benchmark (prints one JSON object)")
    parser.add_argument("--pairs", type=int, default=50, help="sender/receiver pairs K (default 50)")
    parser.add_argument("--messages", type=int, default=10_000, help="closed-loop messages M (default 10000)")
    parser.add_argument("--open-loop-seconds", type=float, default=10.0, help="open-loop duration (default 10)")
    parser.add_argument("--window", type=int, default=8, help="max sends in flight per sender (default 8)")
    parser.add_argument("--text-bytes", type=int, default=50,
                        help="text characters per e2e message (default 50: a 301-byte ciphertext, like --payload)")
    parser.add_argument("--payload", type=int, default=300, help="relay baseline ciphertext bytes (default 300)")
    parser.add_argument("--group-devices", type=int, default=100, help="member devices of the group (default 100)")
    parser.add_argument("--group-sends", type=int, default=5, help="timed group sends (default 5)")
    parser.add_argument("--seed", type=int, default=1, help="seed of padding and Poisson arrivals")
    parser.add_argument("--data-dir", default=None, help="parent of the temporary directory (servers and stores)")
    args = parser.parse_args(argv)
    if args.pairs < 1 or args.messages < args.pairs or args.window < 1 or args.payload < 8 \
            or args.open_loop_seconds <= 0 or args.group_devices < 1 or args.group_sends < 1 \
            or args.text_bytes < 0:
        parser.error("need pairs >= 1, messages >= pairs, window >= 1, payload >= 8, open-loop-seconds > 0, "
                     "group-devices >= 1, group-sends >= 1, text-bytes >= 0")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    check_frames_canonical()
    profile_env = os.environ.get("BENCH_PROFILE")
    profile_dir = Path(profile_env).resolve() if profile_env else None
    if profile_dir is not None:
        profile_dir.mkdir(parents=True, exist_ok=True)
    machine = MachineRecord()
    relay_args = argparse.Namespace(pairs=args.pairs, messages=args.messages, window=args.window,
                                    payload=args.payload, seed=args.seed, open_loop_seconds=args.open_loop_seconds)
    try:
        with tempfile.TemporaryDirectory(prefix="securechat-bench-e2e-", dir=args.data_dir) as tmp:
            workdir = Path(tmp)
            relay_config = write_config(workdir / "relay-server")
            relay = run_server("relay", ["-m", "homeserver", "run", "--config", str(relay_config)],
                               workdir, profile_dir, relay_args)
            e2e = run_e2e(workdir, profile_dir, args)
    except BenchError as exc:
        print(f"bench failed: {exc}", file=sys.stderr)
        return 1
    e2e_rate = e2e["closed_loop"]["msgs_per_s"]
    relay_rate = relay["closed_loop"]["msgs_per_s"]
    ratio = _ratio(e2e_rate, relay_rate)
    result = {
        "e2e_msgs_per_s": e2e_rate,
        "p50_ms": e2e["open_loop"]["p50_ms"],
        "p99_ms": e2e["open_loop"]["p99_ms"],
        GROUP_FIELD: e2e["group"]["median_ms"],
        "relay_msgs_per_s": relay_rate,
        "ratio": ratio,
        "targets": TARGETS,
        "targets_met": {"ratio": ratio is not None and ratio >= TARGETS["ratio"]},
        "parameters": {
            "pairs": args.pairs, "messages": args.messages, "window": args.window,
            "text_bytes": args.text_bytes, "relay_payload_bytes": args.payload,
            "open_loop_seconds": args.open_loop_seconds, "open_loop_rate": e2e["open_loop"]["offered_msgs_per_s"],
            "group_devices": args.group_devices, "group_sends": args.group_sends, "seed": args.seed,
        },
        "e2e": {
            "closed_loop": e2e["closed_loop"], "open_loop": e2e["open_loop"], "group": e2e["group"],
            "clients": e2e["clients"], "server_rss_mb": e2e["server_rss_mb"],
        },
        "relay": {**relay["closed_loop"], "server_rss_mb": relay["server_rss_mb"]},
        "machine": machine.fields(profile_dir=str(profile_dir) if profile_dir else None),
    }
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
