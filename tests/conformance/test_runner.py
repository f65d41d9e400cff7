"""The black-box runner against real servers: in-process (WebSocket on 127.0.0.1:0) and as processes.

The subprocess test is the CI requirement: ``securechat-server init`` + ``run`` on
free ports, then ``python -m conformance`` against it, then SIGTERM.
"""

import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import trio

from conformance.runner import CHECK_ORDER, exit_code, run_checks
from homeserver.app import serve
from homeserver.config import Config, Limits, Rate
from homeserver.server_keys import new_server_key

ROOT = Path(__file__).resolve().parents[2]
GENEROUS = Rate(100_000, 100_000)


def in_process_config(tmp_path: Path, **overrides) -> Config:
    limits = Limits(messages_per_device=GENEROUS, messages_per_user=GENEROUS, messages_per_address=GENEROUS,
                    connections_per_address=GENEROUS, claims_per_device=GENEROUS, logins_per_address=GENEROUS)
    return Config(domain="conformance.test", data_dir=tmp_path, websocket_port=0, http_port=0,
                  password_opslimit=1, password_memlimit=8 * 1024 * 1024, limits=limits).replace(**overrides)


async def run_in_process(config: Config) -> tuple[list, list[str]]:
    lines: list[str] = []
    async with trio.open_nursery() as nursery:
        running = await nursery.start(lambda task_status: serve(config, [new_server_key(0, 10**15)],
                                                                task_status=task_status))
        try:
            results = await run_checks(running.c2s_url, out=lines.append, timeout_s=10)
        finally:
            running.stop.set()
    return results, lines


async def test_every_check_passes_against_an_in_process_server(tmp_path):
    results, lines = await run_in_process(in_process_config(tmp_path))
    assert [line for line in lines if line.startswith("FAIL")] == []
    assert len(results) == len(CHECK_ORDER) >= 20
    assert lines[-1] == f"{len(CHECK_ORDER)} passed, 0 failed"
    assert exit_code(results) == 0


async def test_refused_registration_is_reported_as_failed_checks(tmp_path):
    results, lines = await run_in_process(in_process_config(tmp_path, registration="closed"))
    assert "FAIL register_and_auth: registration refused: forbidden (registration is closed on this server)" in lines
    assert "PASS ping" in lines and "PASS unknown_op" in lines
    assert exit_code(results) == 1
    assert re.fullmatch(r"\d+ passed, [1-9]\d* failed", lines[-1])


async def test_claim_returns_bundles_of_own_pending_devices(tmp_path):
    from conformance.client import authenticate, login
    from conformance.runner import Runner

    async with trio.open_nursery() as nursery:
        running = await nursery.start(lambda task_status: serve(in_process_config(tmp_path),
                                                                [new_server_key(0, 10**15)], task_status=task_status))
        try:
            runner = Runner(running.c2s_url, "conformance.test", out=lambda line: None)
            master = (await runner.user("owner"))[0]
            async with runner.connect() as rpc:
                phone = await login(rpc, master.user)
                await authenticate(rpc, phone, "conformance.test")
                await rpc.request("upload_keys", **phone.prekey_upload(one_time=1))
            async with runner.connect(master) as rpc:
                answer = await rpc.request("claim", user=master.user)
            assert [b["device"] for b in answer["bundles"]] == [phone.address], answer["missing"]
        finally:
            running.stop.set()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def server_command() -> list[str]:
    script = Path(sys.executable).parent / "securechat-server"
    if script.exists():
        return [str(script)]
    found = shutil.which("securechat-server")
    return [found] if found else [sys.executable, "-m", "homeserver"]


@pytest.mark.slow
def test_python_m_conformance_against_a_freshly_started_server_process(tmp_path):
    ws_port, http_port = free_port(), free_port()
    subprocess.run([*server_command(), "init", str(tmp_path), "--domain", "localhost", "--port", str(ws_port),
                    "--http-port", str(http_port)], check=True, capture_output=True, cwd=ROOT, timeout=30)
    config = tmp_path / "homeserver.toml"
    text = config.read_text()
    text = text.replace("password_opslimit = 2", "password_opslimit = 1")  # cheap hashes for a test
    config.write_text(text.replace("password_memlimit = 67108864", "password_memlimit = 8388608"))
    log = (tmp_path / "server.log").open("wb")
    server = subprocess.Popen([*server_command(), "run", "--config", str(config)], stdout=log,
                              stderr=subprocess.STDOUT, cwd=ROOT)
    try:
        deadline = time.monotonic() + 20
        while True:
            assert server.poll() is None, (tmp_path / "server.log").read_text()
            try:
                if httpx.get(f"http://127.0.0.1:{http_port}/healthz", timeout=0.5).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "server did not become healthy"
            time.sleep(0.05)
        done = subprocess.run([sys.executable, "-m", "conformance", f"ws://127.0.0.1:{ws_port}/c2s"],
                              capture_output=True, text=True, cwd=ROOT, timeout=90)
        lines = done.stdout.splitlines()
        assert done.returncode == 0, done.stdout + done.stderr
        assert lines[-1] == f"{len(CHECK_ORDER)} passed, 0 failed"
        assert all(line.startswith("PASS ") for line in lines[:-1])
    finally:
        server.send_signal(signal.SIGTERM)
        try:
            assert server.wait(20) == 0
        finally:
            if server.poll() is None:
                server.kill()
            log.close()
