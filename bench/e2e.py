"""End-to-end benchmark (issue 4, item 11): encrypted messages between SDK clients vs the opaque relay.

Each homeserver (``python -m homeserver run`` on SQLite, WAL, synchronous=FULL) is a
subprocess of this script; both stay up for the whole run, and phase 1 runs
``--rounds`` times on each, alternating relay and e2e, each side reporting its median
round (the machine's speed drifts within a minute; alternation shows both the same):

* ``relay`` -- ``bench/relay.py``'s lean load (hand-packed opaque ciphertexts), run by
  this script with the same K, window and message count: the baseline ``relay_msgs_per_s``;
* ``e2e``   -- K pairs of real ``clientsdk`` clients (``bench/_e2e_load.py``), each with
  its own WebSocket and encrypted store, spread over ``--load-processes`` load
  processes (``bench/_e2e_worker.py``, one per core by default) that this script
  drives phase by phase (``LoadWorkers``).  Sessions (PQXDH) are set up and confirmed
  before timing.  Phase 1, closed loop: M messages, ``window`` ``send`` calls in
  flight per sender; a message counts once the server acknowledged it and the
  receiving client decrypted and durably stored it.  Phase 2, open loop: Poisson
  arrivals at 50% of the phase-1 rate; latency = send scheduled -> receiver's
  event (stored).  Phase 3: a group of 100 member devices; ``send_group`` until
  every member device has emitted the message (median of a few sends).

Prints one JSON object (fields: bench/README.md).  ``BENCH_PROFILE=DIR`` runs both
servers under cProfile and profiles each e2e load process (trio thread) into
``DIR/e2e_load_<i>.prof``; each ``.prof`` gets a ``.txt`` summary.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any


REPO = Path(__file__).resolve().parent.parent
# Run as a script, bench/ is first on sys.path and bench/federation.py would shadow the
# federation package: the repository root goes before it.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench._machine import MachineRecord  # noqa: E402
from bench._load import BenchError, PhaseStats, check_frames_canonical
from bench.relay import (
    ServerProcess,
    _ratio,
    measure_on,
    open_loop_fields,
    phase_cpu_fields,
    write_config,
)

TARGETS = {"ratio": 0.6}
GROUP_FIELD = "group100_fanout_ms"


class LoadWorkers:
    """The e2e load processes (``bench/_e2e_worker.py``), each hosting a share of the K pairs.

    100 SDK clients in ONE Python process share one GIL: that process, not the SDK's
    work, would bound the run while the other core idles.  Real clients each run in
    their own process; on this machine ``--load-processes`` (default: one per core)
    is as close as the cores allow.  Worker 0 also hosts the group (admin + members).
    The workers run ``repo``'s worker script, so they import ``repo``'s SDK
    (``bench/e2e_ab.py`` compares two checkouts that way).
    """

    def __init__(self, server: ServerProcess, args: argparse.Namespace, workdir: Path,
                 profile_dir: Path | None, repo: Path = REPO) -> None:
        count = max(1, min(args.load_processes, args.pairs))
        self.pairs = [args.pairs // count + (1 if i < args.pairs % count else 0) for i in range(count)]
        self.procs: list[subprocess.Popen[str]] = []
        self.logs = [workdir / f"e2e-load-{i}.log" for i in range(count)]
        env = dict(os.environ)
        env.pop("BENCH_PROFILE", None)
        if profile_dir is not None:
            env["BENCH_PROFILE"] = str(profile_dir)
        try:
            for i, k in enumerate(self.pairs):
                config = {"index": i, "url": server.url, "directory": str(workdir / f"clients-{i}"), "pairs": k,
                          "window": args.window, "text_bytes": args.text_bytes, "seed": args.seed,
                          "group_devices": args.group_devices if i == 0 else 0}
                with open(self.logs[i], "wb") as err:
                    self.procs.append(subprocess.Popen(
                        [sys.executable, str(repo / "bench" / "_e2e_worker.py"), json.dumps(config)],
                        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=err, text=True, cwd=repo, env=env))
            self.clients = sum(self._read(i)["clients"] for i in range(count))
        except BaseException:
            self.stop()                      # the ones already started
            raise

    def _read(self, i: int) -> dict[str, Any]:
        """Worker ``i``'s next answer (it fails a stalled phase itself, after 30 s without progress)."""
        stdout = self.procs[i].stdout
        line = stdout.readline() if stdout is not None else ""
        answer = json.loads(line) if line.strip() else {"error": "the load process ended"}
        if "error" in answer:
            self._fail(i, answer["error"])
        return answer

    def _fail(self, i: int, what: str) -> None:
        tail = "\n".join(self.logs[i].read_text(errors="replace").splitlines()[-20:])
        raise BenchError(f"load process {i}: {what}\n{tail}")

    def command(self, commands: dict[int, dict[str, Any]]) -> list[dict[str, Any]]:
        """Send each worker its command (all written before any answer is read); the answers, in order."""
        for i, command in commands.items():
            stdin = self.procs[i].stdin
            try:
                if stdin is not None:
                    stdin.write(json.dumps(command) + "\n")
                    stdin.flush()
            except (BrokenPipeError, OSError):
                self._fail(i, "the load process ended")
        return [self._read(i) for i in commands]

    def shares(self, total: float) -> list[float]:
        """``total`` (messages, msgs/s) split over the workers in proportion to their pairs."""
        return [total * k / sum(self.pairs) for k in self.pairs]

    def stop(self) -> None:
        for proc in self.procs:
            try:
                if proc.poll() is None and proc.stdin is not None:
                    proc.stdin.write(json.dumps({"cmd": "stop"}) + "\n")
                    proc.stdin.close()
            except (BrokenPipeError, OSError):
                pass
        for proc in self.procs:
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def phase_fields(answers: list[dict[str, Any]], messages: int, server: ServerProcess,
                 server_before: tuple[float, float]) -> dict[str, Any]:
    """One phase over every load process: ``relay.py``'s CPU fields plus the load's CPU split."""
    elapsed = max(a["finished"] for a in answers) - min(a["started"] for a in answers)
    total, main = server.cpu_seconds()
    load_cpu = sum(a["cpu_s"] for a in answers)
    trio_cpu = sum(a["trio_cpu_s"] for a in answers)
    fields = phase_cpu_fields(messages, elapsed, total - server_before[0], main - server_before[1], load_cpu)
    if elapsed > 0:
        fields["load_trio_thread_cpu_pct"] = round(100 * trio_cpu / elapsed, 1)
        fields["load_store_threads_cpu_pct"] = round(100 * (load_cpu - trio_cpu) / elapsed, 1)
    fields["load_cpu_ms_per_msg"] = round(1000 * load_cpu / messages, 3) if messages else None
    return fields


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


def closed_round(server: ServerProcess, args: argparse.Namespace, workers: LoadWorkers) -> dict[str, Any]:
    """One e2e closed loop (phase 1) over the load processes: M messages."""
    before = server.cpu_seconds()
    closed = workers.command({i: {"cmd": "closed", "messages": n}
                              for i, n in enumerate(_split(args.messages, workers.pairs))})
    fields = phase_fields(closed, args.messages, server, before)
    _log(f"closed loop {json.dumps(fields)}")
    return fields


def measure_e2e(server: ServerProcess, args: argparse.Namespace, workers: LoadWorkers,
                closed_rate: float) -> dict[str, Any]:
    """Phases 2 and 3 (the open loop at half of ``closed_rate``, then the group)."""
    rate = 0.5 * closed_rate
    before = server.cpu_seconds()
    answers = workers.command({i: {"cmd": "open", "rate": share, "seconds": args.open_loop_seconds}
                               for i, share in enumerate(workers.shares(rate))})
    issued = sum(a["issued"] for a in answers)
    stats = PhaseStats(expected=issued, issued=issued, latencies=[x for a in answers for x in a["latencies"]])
    result: dict[str, Any] = {"open_loop": {**phase_fields(answers, issued, server, before),
                                            **open_loop_fields(rate, stats, args.open_loop_seconds)}}
    _log(f"open loop {json.dumps(result['open_loop'])}")

    (group,) = workers.command({0: {"cmd": "group", "sends": args.group_sends}})
    fanout = group["fanout_ms"]
    result["group"] = {
        "member_devices": group["devices"], "users": group["devices"], "devices_per_user": 1,
        "median_ms": round(statistics.median(fanout), 2), "sends_ms": [round(t, 2) for t in fanout],
        "first_send_ms": round(group["first_send_ms"], 2), "setup_s": round(group["setup_s"], 2),
    }
    _log(f"group {json.dumps(result['group'])}")
    result["clients"] = workers.clients
    result["load_processes"] = len(workers.procs)
    return result


def _split(total: int, weights: list[int]) -> list[int]:
    """``total`` split in proportion to ``weights``, in whole numbers that add up to ``total``."""
    shares = [total * w // sum(weights) for w in weights]
    for i in range(total - sum(shares)):
        shares[i] += 1
    return shares


def median_round(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    """The round with the median ``msgs_per_s`` (the lower middle one of an even count)."""
    ordered = sorted(rounds, key=lambda r: r["msgs_per_s"])
    return ordered[(len(ordered) - 1) // 2]


def run_both(workdir: Path, profile_dir: Path | None, args: argparse.Namespace,
             relay_args: argparse.Namespace) -> tuple[list[dict[str, Any]], list[dict[str, Any]], dict[str, Any]]:
    """Both servers up at once; ``--rounds`` closed loops alternating relay, e2e; then e2e phases 2 and 3.

    The machine's speed drifts by 10% and more within a minute (other tenants, clock
    changes), so one relay loop followed by one e2e loop put the drift into the ratio;
    alternating rounds, each side's median, see the same machine.  The idle side costs
    nothing meanwhile (its server and clients wait on sockets).
    """
    _log("starting")
    relay_server = ServerProcess("relay", ["-m", "homeserver", "run", "--config",
                                           str(write_config(workdir / "relay-server"))], workdir, profile_dir)
    e2e_server = ServerProcess("e2e", ["-m", "homeserver", "run", "--config",
                                       str(write_config(workdir / "e2e-server"))], workdir, profile_dir)
    with relay_server, e2e_server:
        started = time.monotonic()
        try:
            workers = LoadWorkers(e2e_server, args, workdir, profile_dir)
            try:
                _log(f"{workers.clients} clients in {len(workers.procs)} load processes connected, "
                     f"sessions ready in {time.monotonic() - started:.1f} s")
                relay_rounds: list[dict[str, Any]] = []
                e2e_rounds: list[dict[str, Any]] = []
                for _ in range(args.rounds):
                    relay_rounds.append(measure_on(relay_server, relay_args)["closed_loop"])
                    _log(f"relay closed loop {json.dumps(relay_rounds[-1])}")
                    e2e_rounds.append(closed_round(e2e_server, args, workers))
                result = measure_e2e(e2e_server, args, workers, median_round(e2e_rounds)["msgs_per_s"])
            finally:
                workers.stop()
        except BenchError as exc:
            # A relay round's error names the relay and carries its log (measure_on) already.
            raise BenchError(f"{exc}\ne2e server log tail:\n{e2e_server.log_tail()}") from None
        result["server_rss_mb"] = e2e_server.rss_mb()
        relay_rss = relay_server.rss_mb()
    for server in (relay_server, e2e_server):
        server.write_profile_summary()
    if profile_dir is not None:
        for prof in sorted(profile_dir.glob("e2e_load_*.prof")):
            _summary_text(prof)
    for fields in relay_rounds:
        fields["server_rss_mb"] = relay_rss
    return relay_rounds, e2e_rounds, result


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
    parser.add_argument("--rounds", type=int, default=3,
                        help="closed loops of each part, alternating relay and e2e; medians (default 3)")
    parser.add_argument("--seed", type=int, default=1, help="seed of padding and Poisson arrivals")
    parser.add_argument("--load-processes", type=int, default=os.cpu_count() or 1,
                        help="processes the e2e clients are spread over (default: one per core)")
    parser.add_argument("--data-dir", default=None, help="parent of the temporary directory (servers and stores)")
    args = parser.parse_args(argv)
    if args.pairs < 1 or args.messages < args.pairs or args.window < 1 or args.payload < 8 \
            or args.open_loop_seconds <= 0 or args.group_devices < 1 or args.group_sends < 1 \
            or args.text_bytes < 0 or args.load_processes < 1 or args.rounds < 1:
        parser.error("need pairs >= 1, messages >= pairs, window >= 1, payload >= 8, open-loop-seconds > 0, "
                     "group-devices >= 1, group-sends >= 1, text-bytes >= 0, load-processes >= 1, rounds >= 1")
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
            relay_rounds, e2e_rounds, e2e = run_both(Path(tmp), profile_dir, args, relay_args)
    except BenchError as exc:
        print(f"bench failed: {exc}", file=sys.stderr)
        return 1
    relay = median_round(relay_rounds)
    closed = median_round(e2e_rounds)
    e2e_rate = closed["msgs_per_s"]
    relay_rate = relay["msgs_per_s"]
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
            "load_processes": e2e["load_processes"], "rounds": args.rounds,
        },
        "rounds": [{"relay_msgs_per_s": r["msgs_per_s"], "e2e_msgs_per_s": e["msgs_per_s"],
                    "ratio": _ratio(e["msgs_per_s"], r["msgs_per_s"])} for r, e in zip(relay_rounds, e2e_rounds)],
        "e2e": {
            "closed_loop": closed, "open_loop": e2e["open_loop"], "group": e2e["group"],
            "clients": e2e["clients"], "server_rss_mb": e2e["server_rss_mb"],
        },
        "relay": relay,
        "machine": machine.fields(profile_dir=str(profile_dir) if profile_dir else None),
    }
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
