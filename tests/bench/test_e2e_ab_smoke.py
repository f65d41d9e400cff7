"""The SDK A/B benchmark with tiny parameters, this checkout against itself: one JSON object out."""

import json
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_alternating_rounds_and_their_median_ratio():
    proc = subprocess.run(
        [sys.executable, "bench/e2e_ab.py", "--baseline", ".", "--rounds", "3",
         "--pairs", "2", "--messages", "40", "--load-processes", "1"],
        cwd=REPO, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout)
    a, b = result["a"]["msgs_per_s"], result["b"]["msgs_per_s"]
    assert len(a) == len(b) == 3 and all(x > 0 for x in a + b)
    assert result["b_over_a_per_round"] == [round(y / x, 3) for x, y in zip(a, b)]
    assert result["b_over_a"] == round(statistics.median(y / x for x, y in zip(a, b)), 3)
    assert len(result["a"]["load_cpu_ms_per_msg"]) == 3
    assert result["parameters"]["rounds"] == 3 and result["parameters"]["messages"] == 40
