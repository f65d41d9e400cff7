"""The crypto benchmark end to end with tiny parameters: one JSON object out, sane numbers."""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
RATES = ("ratchet_burst_msgs_per_s", "ratchet_pingpong_msgs_per_s", "primitive_msgs_per_s",
         "senderkey_msgs_per_s", "pqxdh_ms", "attachment_mb_s", "attachment_baseline_mb_s")
RATIOS = ("ratchet_ratio", "attachment_ratio")
ARGS = ["--messages", "60", "--pingpong-messages", "10", "--senderkey-messages", "10", "--rounds", "3",
        "--pqxdh-runs", "2", "--attachment-mb", "0.3", "--attachment-rounds", "3"]


@pytest.fixture(scope="module")
def result():
    proc = subprocess.run([sys.executable, "bench/crypto.py", *ARGS], check=False, cwd=REPO, capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout)      # exactly one JSON object, nothing else on stdout


def test_required_fields_are_positive_numbers(result):
    for name in RATES + RATIOS:
        value = result[name]
        assert isinstance(value, (int, float)) and math.isfinite(value) and value > 0, name


def test_ratios_are_the_reported_rates_divided(result):
    assert result["ratchet_ratio"] == pytest.approx(
        result["ratchet_burst_msgs_per_s"] / result["primitive_msgs_per_s"], abs=1e-3)
    assert result["attachment_ratio"] == pytest.approx(
        result["attachment_mb_s"] / result["attachment_baseline_mb_s"], abs=1e-3)
    assert result["targets"] == {"ratchet_ratio": 0.6, "attachment_ratio": 0.8}
    for name, met in result["targets_met"].items():
        assert met == (result[name] >= result["targets"][name])


def test_numbers_are_plausible(result):
    # the burst does the primitive loop's work and more; a DH step every message costs more again
    assert 0.05 < result["ratchet_ratio"] < 2
    assert result["ratchet_pingpong_msgs_per_s"] < 1.5 * result["ratchet_burst_msgs_per_s"]
    assert 0.05 < result["attachment_ratio"] < 5
    assert 0.05 < result["pqxdh_ms"] < 1_000
    details = result["details"]
    assert details["ratchet_state_bytes"] == 221      # the compact layout, no skipped keys
    for name in ("ratchet_burst_msgs_per_s", "primitive_msgs_per_s", "attachment_mb_s"):
        assert details[name]["worst"] <= details[name]["median"] <= details[name]["best"]
    assert details["ratchet_ratio_paired"] > 0 and details["attachment_ratio_paired"] > 0


def test_parameters_and_machine_are_reported(result):
    params = result["parameters"]
    assert (params["messages"], params["rounds"], params["payload_bytes"], params["attachment_bytes"]) \
        == (60, 3, 300, 300_000)
    assert len(result["machine"]["loadavg_start"]) == 3
