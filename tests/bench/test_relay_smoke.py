"""The relay benchmark end to end with tiny parameters: real server processes, one JSON object out."""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
TOP_LEVEL = ("msgs_per_s", "p50_ms", "p99_ms", "echo_msgs_per_s", "null_relay_msgs_per_s",
             "server_rss_mb", "ratio", "storage_ratio")


@pytest.fixture(scope="module")
def result():
    proc = subprocess.run(
        [sys.executable, "bench/relay.py", "--pairs", "3", "--messages", "60", "--open-loop-seconds", "2"],
        cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout)      # exactly one JSON object, nothing else on stdout


@pytest.mark.slow
def test_required_fields_are_positive_numbers(result):
    for name in TOP_LEVEL:
        value = result[name]
        assert isinstance(value, (int, float)) and math.isfinite(value) and value > 0, name


@pytest.mark.slow
def test_numbers_are_consistent(result):
    assert result["ratio"] == pytest.approx(result["msgs_per_s"] / result["echo_msgs_per_s"], abs=1e-3)
    assert result["storage_ratio"] == pytest.approx(result["msgs_per_s"] / result["null_relay_msgs_per_s"], abs=1e-3)
    assert result["p50_ms"] <= result["p99_ms"] <= result["open_loop"]["max_ms"]
    assert result["p99_ms"] < 10_000
    assert 10 < result["server_rss_mb"] < 4_000
    assert set(result["targets_met"]) == {"ratio", "storage_ratio", "p99_ms"}


@pytest.mark.slow
def test_parameters_are_reported_and_every_message_counted(result):
    params = result["parameters"]
    assert (params["pairs"], params["messages"], params["window"], params["payload_bytes"],
            params["open_loop_seconds"]) == (3, 60, 8, 300, 2.0)
    assert params["open_loop_rate"] == pytest.approx(result["msgs_per_s"] / 2, rel=0.01)
    for server in ("echo", "null_relay", "relay"):
        assert result["servers"][server]["messages"] == 60
    assert result["open_loop"]["messages"] > 0
    assert len(result["machine"]["loadavg_start"]) == 3
