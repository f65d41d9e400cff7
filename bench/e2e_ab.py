"""A/B benchmark of SDK code: ``bench/e2e.py``'s closed loop for two checkouts, alternating, in one run.

This machine's speed drifts by 10% and more within a minute, so two separate
``bench/e2e.py`` runs cannot show whether a change to the SDK gained or lost 3%.
Here both sides are set up at once and their closed loops alternate (A, B, then B, A,
...), so each pair of rounds sees the same machine; the median of the per-round ratios
B/A is the result.  Run against itself (``--baseline .``) it shows the noise floor:
per-round ratios of 0.86–1.09, medians of 1.015 (6 rounds) and 0.995 (10 rounds).

    git worktree add /tmp/base HEAD          # A: the code as committed
    .venv/bin/python bench/e2e_ab.py --baseline /tmp/base --rounds 12    # B: this checkout

Each side has its own homeserver (this checkout's: the SDK is what is compared) and its
own load processes, which import the SDK of their checkout (``LoadWorkers(repo=...)``).
Options of ``bench/e2e.py`` (``--pairs``, ``--messages``, ``--window``, ``--text-bytes``,
``--load-processes``) apply to both.  Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

# Run as a script, bench/ is first on sys.path and bench/federation.py would shadow the
# federation package: the repository root goes before it.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench._load import BenchError  # noqa: E402
from bench._machine import MachineRecord  # noqa: E402
from bench.e2e import REPO, LoadWorkers, closed_round, parse_args  # noqa: E402
from bench.relay import ServerProcess, write_config  # noqa: E402

SIDES = ("A", "B")


def _median_ratio(a: list[float], b: list[float]) -> float:
    return round(statistics.median(y / x for x, y in zip(a, b)), 3)


def run(baseline: Path, rounds: int, args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    """Both sides up at once, ``rounds`` closed loops each, alternating; the per-round numbers."""
    repos = {"A": baseline, "B": REPO}
    servers = {side: ServerProcess(f"e2e-{side}", ["-m", "homeserver", "run", "--config",
                                                   str(write_config(workdir / f"server-{side}"))],
                                   workdir, None) for side in SIDES}
    rates: dict[str, list[float]] = {side: [] for side in SIDES}
    cpu: dict[str, list[float]] = {side: [] for side in SIDES}
    workers: dict[str, LoadWorkers] = {}
    with servers["A"], servers["B"]:
        try:
            for side in SIDES:
                (workdir / side).mkdir()
                workers[side] = LoadWorkers(servers[side], args, workdir / side, None, repo=repos[side])
            for i in range(rounds):
                for side in (SIDES if i % 2 == 0 else SIDES[::-1]):
                    fields = closed_round(servers[side], args, workers[side])
                    rates[side].append(fields["msgs_per_s"])
                    cpu[side].append(fields["load_cpu_ms_per_msg"])
        finally:
            for side_workers in workers.values():
                side_workers.stop()
    return {"rates": rates, "load_cpu_ms_per_msg": cpu}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="A/B of two SDK checkouts on bench/e2e.py's closed loop "
                                                 "(prints one JSON object)")
    parser.add_argument("--baseline", required=True, help="checkout A (this checkout is B)")
    parser.add_argument("--rounds", type=int, default=12, help="closed loops per side (default 12)")
    known, rest = parser.parse_known_args(argv)
    args = parse_args(rest)
    baseline = Path(known.baseline).resolve()
    if known.rounds < 1 or not (baseline / "bench" / "_e2e_worker.py").is_file():
        parser.error("need --rounds >= 1 and a --baseline checkout with bench/_e2e_worker.py")
    machine = MachineRecord()
    try:
        with tempfile.TemporaryDirectory(prefix="securechat-bench-ab-", dir=args.data_dir) as tmp:
            numbers = run(baseline, known.rounds, args, Path(tmp))
    except BenchError as exc:
        print(f"bench failed: {exc}", file=sys.stderr)
        return 1
    rates, cpu = numbers["rates"], numbers["load_cpu_ms_per_msg"]
    result = {
        "b_over_a": _median_ratio(rates["A"], rates["B"]),
        "b_over_a_per_round": [round(b / a, 3) for a, b in zip(rates["A"], rates["B"])],
        "load_cpu_b_over_a": _median_ratio(cpu["A"], cpu["B"]),
        "a": {"checkout": str(baseline), "msgs_per_s": rates["A"], "load_cpu_ms_per_msg": cpu["A"]},
        "b": {"checkout": str(REPO), "msgs_per_s": rates["B"], "load_cpu_ms_per_msg": cpu["B"]},
        "parameters": {"rounds": known.rounds, "pairs": args.pairs, "messages": args.messages,
                       "window": args.window, "text_bytes": args.text_bytes,
                       "load_processes": args.load_processes},
        "machine": machine.fields(profile_dir=None),
    }
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
