"""The end-to-end benchmark with tiny parameters: real server processes and SDK clients, one JSON object out."""

import json
import math
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
TOP_LEVEL = ("e2e_msgs_per_s", "p50_ms", "p99_ms", "group100_fanout_ms", "relay_msgs_per_s", "ratio")


@pytest.fixture(scope="module")
def result():
    proc = subprocess.run(
        [sys.executable, "bench/e2e.py", "--pairs", "2", "--messages", "40", "--open-loop-seconds", "1",
         "--group-devices", "3", "--group-sends", "2", "--load-processes", "2"],
        cwd=REPO, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout)      # exactly one JSON object, nothing else on stdout


@pytest.mark.slow
def test_required_fields_are_positive_numbers(result):
    for name in TOP_LEVEL:
        value = result[name]
        assert isinstance(value, (int, float)) and math.isfinite(value) and value > 0, name


@pytest.mark.slow
def test_numbers_are_consistent(result):
    assert result["ratio"] == pytest.approx(result["e2e_msgs_per_s"] / result["relay_msgs_per_s"], abs=1e-3)
    open_loop = result["e2e"]["open_loop"]
    assert result["p50_ms"] <= result["p99_ms"] <= open_loop["max_ms"] < 10_000
    assert open_loop["messages"] > 0
    assert open_loop["offered_msgs_per_s"] == pytest.approx(result["e2e_msgs_per_s"] / 2, rel=0.01)
    assert result["targets_met"] == {"ratio": result["ratio"] >= 0.6}


@pytest.mark.slow
def test_every_message_and_group_device_counted(result):
    params = result["parameters"]
    assert (params["pairs"], params["messages"], params["group_devices"], params["group_sends"]) == (2, 40, 3, 2)
    assert result["e2e"]["closed_loop"]["messages"] == 40
    assert result["relay"]["messages"] == 40
    group = result["e2e"]["group"]
    assert group["member_devices"] == 3 and len(group["sends_ms"]) == 2
    assert result["group100_fanout_ms"] == pytest.approx(statistics.median(group["sends_ms"]), abs=0.01)
    assert params["load_processes"] == 2 and params["rounds"] == 3
    # one pair per load process; the first also hosts the group: its pair + 1 more member + the admin
    assert result["e2e"]["clients"] == 2 + 2 + 1 + 1
    assert len(result["machine"]["loadavg_start"]) == 3


@pytest.mark.slow
def test_rates_are_the_medians_of_alternating_rounds(result):
    rounds = result["rounds"]
    assert len(rounds) == 3
    assert result["relay_msgs_per_s"] == statistics.median(r["relay_msgs_per_s"] for r in rounds)
    assert result["e2e_msgs_per_s"] == statistics.median(r["e2e_msgs_per_s"] for r in rounds)
    assert result["e2e"]["closed_loop"]["msgs_per_s"] == result["e2e_msgs_per_s"]
    assert result["relay"]["msgs_per_s"] == result["relay_msgs_per_s"]
    for r in rounds:
        assert r["ratio"] == pytest.approx(r["e2e_msgs_per_s"] / r["relay_msgs_per_s"], abs=1e-3)
