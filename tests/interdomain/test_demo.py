"""``examples/two_orgs.py`` (``make demo``) runs for real: two server processes, ciphertext only, clean exit."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import trio

from tests.serverproc import ROOT

DEMO = ROOT / "examples" / "two_orgs.py"

pytestmark = pytest.mark.slow


def start_demo(data_dir: Path) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, str(DEMO), str(data_dir)], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, cwd=ROOT,
                            env=dict(os.environ, PYTHONUNBUFFERED="1"))


def finish(demo: subprocess.Popen[str], timeout: float) -> str:
    """The demo's whole output; a demo still running at ``timeout`` gets SIGTERM (it stops its servers)."""
    try:
        output, _ = demo.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        demo.send_signal(signal.SIGTERM)
        output, _ = demo.communicate(timeout=30)
        pytest.fail(f"the demo took more than {timeout:g} s:\n{output}")
    return output


def server_ports(output: str) -> list[int]:
    ports = re.findall(r"clients at ws://127\.0\.0\.1:(\d+)/c2s, discovery at http://127\.0\.0\.1:(\d+)/", output)
    assert len(ports) == 2, output
    return [int(port) for pair in ports for port in pair]


def listening(port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) == 0


def test_demo_talks_across_two_servers_and_they_store_only_ciphertext(tmp_path) -> None:
    output = finish(start_demo(tmp_path), timeout=60)
    assert "demo finished in" in output, output
    assert "PLAINTEXT FOUND" not in output
    for line in [
        # 1:1 both ways, a group across both domains
        "bob@example.net decrypted: 'Hi Bob, Alice from example.org here.'",
        "alice@example.org decrypted: 'Hi Alice! Bob at example.net, reading you loud and clear.'",
        "carol@example.net decrypted: 'Launch is on Thursday.'",
        "alice@example.org decrypted: 'Servers at example.net are ready.'",
        "bob@example.net decrypted: 'Docs are done, see you Thursday.'",
        # while example.net was down, then after it came back
        "federation queue: 2 message envelope(s) waiting for a peer",
        "example.org's federation queue is empty: example.net acknowledged every envelope",
        "bob@example.net decrypted: 'Call me when you are back online.'",
        "carol@example.net decrypted: 'Reminder: launch at 10:00.'",
        # acknowledged means deleted; no plaintext in any server file
        "example.org: 0 mailbox entries, 0 envelopes queued for peers",
        "example.net: 0 mailbox entries, 0 envelopes queued for peers",
        "example.org: none of the 8 texts appear in",
        "example.net: none of the 8 texts appear in",
    ]:
        assert line in output, f"missing {line!r} in:\n{output}"

    # The offline group message is one ciphertext (one blob) with an entry for each device.
    entries = re.findall(r"for (bob|carol)@example\.net/\w+ from alice@example\.org/\w+: blob (\d+), ", output)
    carol_blobs = {blob for user, blob in entries if user == "carol"}
    assert carol_blobs and carol_blobs <= {blob for user, blob in entries if user == "bob"}, output
    assert not any(listening(port) for port in server_ports(output)), "a server outlived the demo"


async def test_ctrl_c_stops_both_servers(tmp_path) -> None:
    demo = start_demo(tmp_path)
    seen = ""
    try:
        with trio.fail_after(45):
            while "== 1:1 across domains" not in seen:
                line = await trio.to_thread.run_sync(demo.stdout.readline)
                assert line, seen
                seen += line
        demo.send_signal(signal.SIGINT)
        output = seen + await trio.to_thread.run_sync(finish, demo, 30)
    finally:
        if demo.poll() is None:
            demo.kill()
            demo.communicate()
    assert demo.returncode == 130, output
    assert "interrupted; both servers stopped" in output
    assert not any(listening(port) for port in server_ports(output)), "a server outlived the demo"
