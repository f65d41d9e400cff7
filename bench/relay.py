"""Relay benchmark (issue 2, item 6): durable relay throughput and latency against two baselines.

This script is the load process; every server is a subprocess of it:

* ``echo``       -- ``bench/_echo_server.py``, a bare trio-websocket msgpack echo (the ceiling);
* ``null_relay`` -- ``bench/_null_server.py``, the homeserver over ``MemoryStorage``;
* ``relay``      -- ``python -m homeserver run`` on SQLite (WAL, synchronous=FULL).

Each gets the same K sender/receiver pairs (one WebSocket per client), window and
payload.  Phase 1 (closed loop, M messages) gives each server's msgs/s; phase 2
(relay only) offers Poisson arrivals at 50% of the relay's rate and gives p50/p99
send-to-delivery latency.  Prints one JSON object (fields: bench/README.md).

Set ``BENCH_PROFILE=DIR`` to run every server under cProfile (``DIR/<server>.prof``
plus a text summary ``DIR/<server>.txt``).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import TracebackType
from typing import Any

import trio

REPO = Path(__file__).resolve().parent.parent
# Run as a script, bench/ is first on sys.path and bench/federation.py would shadow the
# federation package: the repository root goes before it.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench._machine import MachineRecord  # noqa: E402
from bench._load import (  # noqa: E402
    BenchError,
    PhaseStats,
    Run,
    check_frames_canonical,
    connect_pairs,
    percentile,
    start_ackers,
)

DOMAIN = "localhost"
TARGETS = {"ratio": 0.25, "storage_ratio": 0.6, "p99_ms": 50.0}
URL_LINE = re.compile(r"(ws://[^\s]+/c2s)")
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
BIG_RATE = "{ per_second = 1000000, burst = 1000000 }"


# --- server processes ------------------------------------------------------------------


class ServerProcess:
    """A server subprocess: started, waited for (its printed ws:// URL), measured, stopped by SIGTERM."""

    def __init__(self, name: str, argv: list[str], workdir: Path, profile_dir: Path | None) -> None:
        self.name = name
        self.profile = None if profile_dir is None else profile_dir / f"{name}.prof"
        prefix = [] if self.profile is None else ["-m", "cProfile", "-o", str(self.profile)]
        self.argv = [sys.executable, *prefix, *argv]
        self.stdout_path = workdir / f"{name}.out"
        self.stderr_path = workdir / f"{name}.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.url = ""

    def __enter__(self) -> ServerProcess:
        with open(self.stdout_path, "wb") as out, open(self.stderr_path, "wb") as err:
            self.proc = subprocess.Popen(self.argv, stdout=out, stderr=err, stdin=subprocess.DEVNULL, cwd=REPO)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            match = URL_LINE.search(self.stdout_path.read_text(errors="replace"))
            if match:
                self.url = match.group(1)
                return self
            if self.proc.poll() is not None:
                break
            time.sleep(0.05)
        self.stop()
        raise BenchError(f"{self.name} server did not start; its log:\n{self.log_tail()}")

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()

    @property
    def pid(self) -> int:
        if self.proc is None:
            raise BenchError(f"{self.name} server is not running")
        return self.proc.pid

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()

    def cpu_seconds(self) -> tuple[float, float]:
        """User + system CPU so far: (whole process incl. exited threads, main thread only).

        The difference is what worker threads (the SQLite writer and readers) burned.
        """
        return (_stat_cpu(Path(f"/proc/{self.pid}/stat")), _stat_cpu(Path(f"/proc/{self.pid}/task/{self.pid}/stat")))

    def rss_mb(self) -> float:
        """Peak resident set (VmHWM; VmRSS where the kernel does not report it)."""
        status = Path(f"/proc/{self.pid}/status").read_text()
        for key in ("VmHWM", "VmRSS"):
            match = re.search(rf"^{key}:\s+(\d+) kB", status, re.MULTILINE)
            if match:
                return round(int(match.group(1)) / 1024, 1)
        return float("nan")

    def log_tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.stderr_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def write_profile_summary(self) -> None:
        if self.profile is None or not self.profile.exists():
            return
        import io
        import pstats

        text = io.StringIO()
        stats = pstats.Stats(str(self.profile), stream=text)
        stats.sort_stats("tottime").print_stats(30)
        stats.sort_stats("cumulative").print_stats(40)
        self.profile.with_suffix(".txt").write_text(text.getvalue())


def _stat_cpu(path: Path) -> float:
    fields = path.read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def write_config(directory: Path) -> Path:
    """``securechat-server init`` output, edited for benchmarking: cheap passwords, no rate limits."""
    subprocess.run([sys.executable, "-m", "homeserver", "init", str(directory), "--domain", DOMAIN,
                    "--port", "0", "--http-port", "0"], check=True, cwd=REPO, stdout=subprocess.DEVNULL)
    path = directory / "homeserver.toml"
    text = path.read_text(encoding="utf-8")
    text = re.sub(r"^password_opslimit\s*=.*$", "password_opslimit = 1", text, flags=re.MULTILINE)
    text = re.sub(r"^password_memlimit\s*=.*$", "password_memlimit = 8388608", text, flags=re.MULTILINE)
    text = re.sub(r"^shutdown_grace_s\s*=.*$", "shutdown_grace_s = 3", text, flags=re.MULTILINE)
    text = re.sub(r"\{\s*per_second\s*=[^}]*\}", BIG_RATE, text)
    path.write_text(text, encoding="utf-8")
    return path


# --- one server under load -------------------------------------------------------------


class CpuMeter:
    """CPU used by the server process (and its main thread) and by this load process over a phase."""

    def __init__(self, server: ServerProcess) -> None:
        self.server = server
        self.server_start, self.main_start = server.cpu_seconds()
        self.load_start = time.process_time()

    def summary(self, stats: PhaseStats) -> dict[str, Any]:
        total, main = self.server.cpu_seconds()
        return phase_cpu_fields(stats.expected or 0, stats.finished - stats.started,
                                total - self.server_start, main - self.main_start,
                                time.process_time() - self.load_start)


def phase_cpu_fields(messages: int, elapsed: float, server_cpu: float, main_cpu: float,
                     load_cpu: float) -> dict[str, Any]:
    """A phase's rate and where its CPU went (seconds in; % of one core and ms per message out)."""

    def pct(seconds: float) -> float | None:
        return round(100 * seconds / elapsed, 1) if elapsed > 0 else None

    return {
        "messages": messages,
        "elapsed_s": round(elapsed, 3),
        "msgs_per_s": round(messages / elapsed, 1) if elapsed > 0 else 0.0,
        "server_cpu_ms_per_msg": round(1000 * server_cpu / messages, 3) if messages else None,
        "server_cpu_pct": pct(server_cpu),
        "server_main_thread_cpu_pct": pct(main_cpu),
        "server_worker_threads_cpu_pct": pct(server_cpu - main_cpu),
        "load_cpu_pct": pct(load_cpu),
    }


def open_loop_fields(rate: float, stats: PhaseStats, seconds: float) -> dict[str, Any]:
    """Phase 2's offered and achieved rates and its latency percentiles (ms, nearest rank)."""
    latencies = sorted(1000 * s for s in stats.latencies)
    return {
        "offered_msgs_per_s": round(rate, 1),
        "achieved_msgs_per_s": round(stats.issued / seconds, 1),
        "p50_ms": round(percentile(latencies, 50), 2),
        "p90_ms": round(percentile(latencies, 90), 2),
        "p99_ms": round(percentile(latencies, 99), 2),
        "p999_ms": round(percentile(latencies, 99.9), 2),
        "max_ms": round(latencies[-1], 2) if latencies else None,
    }


async def measure(server: ServerProcess, args: argparse.Namespace, *, echo: bool,
                  open_loop: bool) -> dict[str, Any]:
    """Connect the pairs, run phase 1 (and phase 2 if ``open_loop``), return the numbers."""
    async with trio.open_nursery() as nursery:
        pairs = await connect_pairs(nursery, server.url, args.pairs, echo=echo, domain=DOMAIN)
        run = Run(pairs, args.window, args.payload, args.seed)
        start_ackers(nursery, run)
        meter = CpuMeter(server)
        closed = await run.closed_loop(args.messages)
        result = {"closed_loop": meter.summary(closed)}
        if open_loop:
            rate = 0.5 * result["closed_loop"]["msgs_per_s"]
            meter = CpuMeter(server)
            stats = await run.open_loop(rate, args.open_loop_seconds)
            result["open_loop"] = {**meter.summary(stats), **open_loop_fields(rate, stats, args.open_loop_seconds)}
        for pair in pairs:
            pair.sender.closing = pair.receiver.closing = True
        async with trio.open_nursery() as closers:
            for pair in pairs:
                closers.start_soon(pair.sender.aclose)
                closers.start_soon(pair.receiver.aclose)
        nursery.cancel_scope.cancel()
    return result


def measure_on(server: ServerProcess, args: argparse.Namespace, *, echo: bool = False,
               open_loop: bool = False) -> dict[str, Any]:
    """``measure`` on a running server, with fresh pairs; a ``BenchError`` gains the server's log tail."""
    try:
        return trio.run(lambda: measure(server, args, echo=echo, open_loop=open_loop))
    except BaseException as exc:
        bench_errors = _bench_errors(exc)
        if bench_errors:
            name = server.name
            raise BenchError(f"{name}: {bench_errors[0]}\n{name} server log tail:\n{server.log_tail()}") from None
        raise


def run_server(name: str, argv: list[str], workdir: Path, profile_dir: Path | None,
               args: argparse.Namespace, *, echo: bool = False, open_loop: bool = False) -> dict[str, Any]:
    print(f"[bench] {name}: starting", file=sys.stderr, flush=True)
    server = ServerProcess(name, argv, workdir, profile_dir)
    with server:
        result = measure_on(server, args, echo=echo, open_loop=open_loop)
        result["server_rss_mb"] = server.rss_mb()
    server.write_profile_summary()
    print(f"[bench] {name}: {json.dumps(result)}", file=sys.stderr, flush=True)
    return result


def _bench_errors(exc: BaseException) -> list[BenchError]:
    if isinstance(exc, BenchError):
        return [exc]
    if isinstance(exc, BaseExceptionGroup):
        return [e for sub in exc.exceptions for e in _bench_errors(sub)]
    return []


# --- the whole run ---------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="SecureChat relay benchmark (prints one JSON object)")
    parser.add_argument("--pairs", type=int, default=50, help="sender/receiver pairs K (default 50)")
    parser.add_argument("--messages", type=int, default=20_000, help="closed-loop messages M (default 20000)")
    parser.add_argument("--open-loop-seconds", type=float, default=20.0, help="open-loop duration (default 20)")
    parser.add_argument("--window", type=int, default=8, help="max unacknowledged sends per sender (default 8)")
    parser.add_argument("--payload", type=int, default=300, help="ciphertext bytes per message (default 300)")
    parser.add_argument("--seed", type=int, default=1, help="seed of payload bytes and Poisson arrivals")
    parser.add_argument("--data-dir", default=None, help="parent of the temporary server directory")
    args = parser.parse_args(argv)
    if args.pairs < 1 or args.messages < args.pairs or args.window < 1 or args.payload < 8 \
            or args.open_loop_seconds <= 0:
        parser.error("need pairs >= 1, messages >= pairs, window >= 1, payload >= 8, open-loop-seconds > 0")
    return args


def _ratio(a: float, b: float) -> float | None:
    return round(a / b, 3) if b else None


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    check_frames_canonical()
    profile_env = os.environ.get("BENCH_PROFILE")
    profile_dir = Path(profile_env).resolve() if profile_env else None
    if profile_dir is not None:
        profile_dir.mkdir(parents=True, exist_ok=True)
    machine = MachineRecord()
    try:
        with tempfile.TemporaryDirectory(prefix="securechat-bench-", dir=args.data_dir) as tmp:
            workdir = Path(tmp)
            config = write_config(workdir / "server")
            echo = run_server("echo", ["bench/_echo_server.py"], workdir, profile_dir, args, echo=True)
            null = run_server("null_relay", ["bench/_null_server.py", "--config", str(config)],
                              workdir, profile_dir, args)
            relay = run_server("relay", ["-m", "homeserver", "run", "--config", str(config)],
                               workdir, profile_dir, args, open_loop=True)
    except BenchError as exc:
        print(f"bench failed: {exc}", file=sys.stderr)
        return 1
    msgs_per_s = relay["closed_loop"]["msgs_per_s"]
    open_loop = relay["open_loop"]
    ratio = _ratio(msgs_per_s, echo["closed_loop"]["msgs_per_s"])
    storage_ratio = _ratio(msgs_per_s, null["closed_loop"]["msgs_per_s"])
    result = {
        "msgs_per_s": msgs_per_s,
        "p50_ms": open_loop["p50_ms"],
        "p99_ms": open_loop["p99_ms"],
        "echo_msgs_per_s": echo["closed_loop"]["msgs_per_s"],
        "null_relay_msgs_per_s": null["closed_loop"]["msgs_per_s"],
        "server_rss_mb": relay["server_rss_mb"],
        "ratio": ratio,
        "storage_ratio": storage_ratio,
        "targets": TARGETS,
        "targets_met": {
            "ratio": ratio is not None and ratio >= TARGETS["ratio"],
            "storage_ratio": storage_ratio is not None and storage_ratio >= TARGETS["storage_ratio"],
            "p99_ms": open_loop["p99_ms"] <= TARGETS["p99_ms"],
        },
        "parameters": {
            "pairs": args.pairs, "messages": args.messages, "window": args.window,
            "payload_bytes": args.payload, "open_loop_seconds": args.open_loop_seconds,
            "open_loop_rate": open_loop["offered_msgs_per_s"], "seed": args.seed,
        },
        "open_loop": open_loop,
        "servers": {
            "echo": {**echo["closed_loop"], "server_rss_mb": echo["server_rss_mb"]},
            "null_relay": {**null["closed_loop"], "server_rss_mb": null["server_rss_mb"]},
            "relay": {**relay["closed_loop"], "server_rss_mb": relay["server_rss_mb"]},
        },
        "machine": machine.fields(profile_dir=str(profile_dir) if profile_dir else None),
    }
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
