"""Federation benchmark (issue 5, item 8): cross-domain messages between two homeservers vs one server.

This script is the load process; every homeserver (``python -m homeserver run`` on
SQLite, WAL, synchronous=FULL, the config of ``bench/relay.py``) is a subprocess of it:

* ``local``       -- ONE server; K sender/receiver pairs with both ends on it (the baseline);
* ``origin``      -- ``example.org``: the K senders;
* ``destination`` -- ``example.net``: the K receivers.  The two find each other through
  ``[federation] static`` (domain -> the peer's loopback HTTP listener) and exchange
  signed transactions over the default WebSocket link (``/fed``).

Both parts use ``bench/_load.py``'s lean load (raw protocol devices with real keys,
hand-packed opaque ciphertexts) with the same K, window, payload and message count.
Before timing, every sender sends one message (warm-up), so the origin has fetched
and cached each receiver's signed device list and the link is up.  Phase 1 (closed
loop, M messages) gives each part's msgs/s: a message counts once the sender's
``ok`` arrived (durable at the origin) and the receiver's ack of it was answered (it
was stored at the destination and pushed).  Phase 2 (federation only) offers Poisson
arrivals at 50% of the federated rate and gives p50/p99 send-to-delivery latency.
Prints one JSON object (fields: bench/README.md).

Set ``BENCH_PROFILE=DIR`` to run every server under cProfile (``DIR/<server>.prof``
plus a text summary ``DIR/<server>.txt``).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import socket
import sys
import tempfile
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import trio

REPO = Path(__file__).resolve().parent.parent
# Run as a script, bench/ is first on sys.path and bench/federation.py would shadow the
# federation package: the repository root goes before it.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench._machine import MachineRecord  # noqa: E402
from bench._load import (
    BenchError,
    Pair,
    PhaseStats,
    Run,
    _connect,
    check_frames_canonical,
    connect_pairs,
    percentile,
    start_ackers,
)
from bench.relay import (
    BIG_RATE,
    CpuMeter,
    ServerProcess,
    _bench_errors,
    _ratio,
    write_config,
)
from conformance.client import authenticate, register, throwaway_user

ORIGIN, DESTINATION = "example.org", "example.net"
TARGETS = {"ratio": 0.5, "p99_ms": 100.0}
SERVER_FIELDS = ("server_cpu_ms_per_msg", "server_cpu_pct", "server_main_thread_cpu_pct",
                 "server_worker_threads_cpu_pct")


def _log(message: str) -> None:
    print(f"[bench] {message}", file=sys.stderr, flush=True)


# --- configuration ---------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def write_fed_config(directory: Path, domain: str, http_port: int, peers: dict[str, int]) -> Path:
    """``relay.py``'s benchmark config for ``domain``, plus the peers' loopback HTTP listeners.

    The HTTP port is fixed in advance (the peer's ``static`` map names it); the WebSocket
    port stays 0 because the discovery document advertises the port actually bound.  The
    per-origin federation rate limits are lifted like the client ones: the bench measures
    the server, not its limiter.
    """
    path = write_config(directory)
    text = path.read_text(encoding="utf-8")
    text, domains = re.subn(r'^domain = "[^"]*"$', f'domain = "{domain}"', text, flags=re.MULTILINE)
    text, ports = re.subn(r"^http_port = \d+$", f"http_port = {http_port}", text, flags=re.MULTILINE)
    static = ", ".join(f'"{peer}" = "http://127.0.0.1:{port}"' for peer, port in peers.items())
    text, sections = re.subn(r"^\[federation\]$", "[federation]\n"
                             f"static = {{ {static} }}\n"
                             f"transactions_per_origin = {BIG_RATE}\n"
                             f"requests_per_origin = {BIG_RATE}", text, flags=re.MULTILINE)
    if (domains, ports, sections) != (1, 1, 1):
        raise BenchError("the homeserver config template changed; bench/federation.py cannot edit it")
    path.write_text(text, encoding="utf-8")
    return path


# --- load ------------------------------------------------------------------------------


async def connect_cross_pair(nursery: trio.Nursery, origin_url: str, destination_url: str) -> Pair:
    """A throwaway sender on the origin and a throwaway receiver on the destination, authenticated."""
    sender = await _connect(nursery, origin_url)
    receiver = await _connect(nursery, destination_url)
    devices = []
    for conn, domain, prefix in ((sender, ORIGIN, "bs"), (receiver, DESTINATION, "br")):
        device = await register(conn, throwaway_user(domain, prefix))  # type: ignore[arg-type]
        await authenticate(conn, device, domain)  # type: ignore[arg-type]
        devices.append(device)
    return Pair(sender, receiver, devices[1].address, devices[0].address)


async def connect_cross_pairs(nursery: trio.Nursery, origin_url: str, destination_url: str, count: int,
                              concurrency: int = 8) -> list[Pair]:
    pairs: list[Pair] = []
    limit = trio.Semaphore(concurrency)

    async def one() -> None:
        async with limit:
            pairs.append(await connect_cross_pair(nursery, origin_url, destination_url))

    async with trio.open_nursery() as setup:
        for _ in range(count):
            setup.start_soon(one)
    return pairs


class Meters:
    """``relay.CpuMeter`` for every server of a part: one load process, one or two servers."""

    def __init__(self, servers: dict[str, ServerProcess]) -> None:
        self.meters = {role: CpuMeter(server) for role, server in servers.items()}

    def summary(self, stats: PhaseStats) -> dict[str, Any]:
        summaries = {role: meter.summary(stats) for role, meter in self.meters.items()}
        first = next(iter(summaries.values()))
        out = {k: v for k, v in first.items() if k not in SERVER_FIELDS}
        if len(summaries) == 1:
            out.update({k: first[k] for k in SERVER_FIELDS})
        else:
            for role, summary in summaries.items():
                out[role] = {k: summary[k] for k in SERVER_FIELDS}
            cpu = [summary["server_cpu_ms_per_msg"] for summary in summaries.values()]
            out["servers_cpu_ms_per_msg"] = round(sum(cpu), 3) if None not in cpu else None
        return out


async def measure(servers: dict[str, ServerProcess], args: argparse.Namespace, *, open_loop: bool) -> dict[str, Any]:
    """Connect the pairs (across the two servers if there are two), warm up, run the phases."""
    async with trio.open_nursery() as nursery:
        if len(servers) == 1:
            (server,) = servers.values()
            pairs = await connect_pairs(nursery, server.url, args.pairs, echo=False, domain=ORIGIN)
        else:
            pairs = await connect_cross_pairs(nursery, servers["origin"].url, servers["destination"].url,
                                              args.pairs)
        run = Run(pairs, args.window, args.payload, args.seed)
        start_ackers(nursery, run)
        warm = await run.closed_loop(len(pairs))          # one message per sender: remote lists cached, link up
        _log(f"warm-up: {len(pairs)} messages in {warm.finished - warm.started:.2f} s")
        meters = Meters(servers)
        closed = await run.closed_loop(args.messages)
        result: dict[str, Any] = {"closed_loop": meters.summary(closed)}
        if open_loop:
            rate = 0.5 * result["closed_loop"]["msgs_per_s"]
            meters = Meters(servers)
            stats = await run.open_loop(rate, args.open_loop_seconds)
            summary = meters.summary(stats)
            latencies = sorted(1000 * s for s in stats.latencies)
            summary.update({
                "offered_msgs_per_s": round(rate, 1),
                "achieved_msgs_per_s": round(stats.issued / args.open_loop_seconds, 1),
                "p50_ms": round(percentile(latencies, 50), 2),
                "p90_ms": round(percentile(latencies, 90), 2),
                "p99_ms": round(percentile(latencies, 99), 2),
                "p999_ms": round(percentile(latencies, 99.9), 2),
                "max_ms": round(latencies[-1], 2) if latencies else None,
            })
            result["open_loop"] = summary
        for pair in pairs:
            pair.sender.closing = pair.receiver.closing = True
        async with trio.open_nursery() as closers:
            for pair in pairs:
                closers.start_soon(pair.sender.aclose)
                closers.start_soon(pair.receiver.aclose)
        nursery.cancel_scope.cancel()
    return result


def run_part(name: str, configs: dict[str, Path], workdir: Path, profile_dir: Path | None,
             args: argparse.Namespace, *, open_loop: bool = False) -> dict[str, Any]:
    """Start the part's servers (stopped in reverse order), measure, report their peak memory."""
    _log(f"{name}: starting {', '.join(configs)}")
    servers = {role: ServerProcess(role, ["-m", "homeserver", "run", "--config", str(config)], workdir, profile_dir)
               for role, config in configs.items()}
    with ExitStack() as stack:
        for server in servers.values():
            stack.enter_context(server)
        try:
            result = trio.run(lambda: measure(servers, args, open_loop=open_loop))
        except BaseException as exc:
            bench_errors = _bench_errors(exc)
            if bench_errors:
                tails = "\n".join(f"{role} server log tail:\n{s.log_tail()}" for role, s in servers.items())
                raise BenchError(f"{name}: {bench_errors[0]}\n{tails}") from None
            raise
        result["server_rss_mb"] = {role: server.rss_mb() for role, server in servers.items()}
    for server in servers.values():
        server.write_profile_summary()
    _log(f"{name}: {json.dumps(result)}")
    return result


# --- the whole run ---------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="SecureChat federation benchmark (prints one JSON object)")
    parser.add_argument("--pairs", type=int, default=50, help="sender/receiver pairs K (default 50)")
    parser.add_argument("--messages", type=int, default=10_000, help="closed-loop messages M (default 10000)")
    parser.add_argument("--open-loop-seconds", type=float, default=15.0, help="open-loop duration (default 15)")
    parser.add_argument("--window", type=int, default=8, help="max unacknowledged sends per sender (default 8)")
    parser.add_argument("--payload", type=int, default=300, help="ciphertext bytes per message (default 300)")
    parser.add_argument("--seed", type=int, default=1, help="seed of payload bytes and Poisson arrivals")
    parser.add_argument("--data-dir", default=None, help="parent of the temporary server directories")
    args = parser.parse_args(argv)
    if args.pairs < 1 or args.messages < args.pairs or args.window < 1 or args.payload < 8 \
            or args.open_loop_seconds <= 0:
        parser.error("need pairs >= 1, messages >= pairs, window >= 1, payload >= 8, open-loop-seconds > 0")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    check_frames_canonical()
    profile_env = os.environ.get("BENCH_PROFILE")
    profile_dir = Path(profile_env).resolve() if profile_env else None
    if profile_dir is not None:
        profile_dir.mkdir(parents=True, exist_ok=True)
    machine = MachineRecord()
    try:
        with tempfile.TemporaryDirectory(prefix="securechat-bench-fed-", dir=args.data_dir) as tmp:
            workdir = Path(tmp)
            local_config = write_fed_config(workdir / "local", ORIGIN, _free_port(), {})
            local = run_part("local", {"local": local_config}, workdir, profile_dir, args)
            ports = {ORIGIN: _free_port(), DESTINATION: _free_port()}
            configs = {
                role: write_fed_config(workdir / role, domain, ports[domain],
                                       {peer: port for peer, port in ports.items() if peer != domain})
                for role, domain in (("destination", DESTINATION), ("origin", ORIGIN))   # origin stops first
            }
            fed = run_part("federation", configs, workdir, profile_dir, args, open_loop=True)
    except BenchError as exc:
        print(f"bench failed: {exc}", file=sys.stderr)
        return 1
    fed_rate = fed["closed_loop"]["msgs_per_s"]
    local_rate = local["closed_loop"]["msgs_per_s"]
    open_loop = fed["open_loop"]
    ratio = _ratio(fed_rate, local_rate)
    result = {
        "fed_msgs_per_s": fed_rate,
        "p50_ms": open_loop["p50_ms"],
        "p99_ms": open_loop["p99_ms"],
        "local_msgs_per_s": local_rate,
        "ratio": ratio,
        "targets": TARGETS,
        "targets_met": {
            "ratio": ratio is not None and ratio >= TARGETS["ratio"],
            "p99_ms": open_loop["p99_ms"] < TARGETS["p99_ms"],
        },
        "parameters": {
            "pairs": args.pairs, "messages": args.messages, "window": args.window,
            "payload_bytes": args.payload, "open_loop_seconds": args.open_loop_seconds,
            "open_loop_rate": open_loop["offered_msgs_per_s"], "seed": args.seed,
            "origin": ORIGIN, "destination": DESTINATION, "link": "websocket",
        },
        "federation": {
            "closed_loop": fed["closed_loop"],
            "open_loop": open_loop,
            "server_rss_mb": fed["server_rss_mb"],
        },
        "local": {**local["closed_loop"], "server_rss_mb": local["server_rss_mb"]["local"]},
        "machine": machine.fields(profile_dir=str(profile_dir) if profile_dir else None),
    }
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
