"""Start real homeserver processes for tests: init a data dir, run, wait for /healthz, signal."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def init_server(directory: Path, domain: str = "localhost", *, registration: str = "open",
                extra_limits: str = "") -> Path:
    ws_port, http_port = free_port(), free_port()
    subprocess.run([sys.executable, "-m", "homeserver", "init", str(directory), "--domain", domain,
                    "--port", str(ws_port), "--http-port", str(http_port), "--registration", registration],
                   check=True, capture_output=True, cwd=ROOT)
    config = directory / "homeserver.toml"
    text = config.read_text()
    text = text.replace("password_opslimit = 2", "password_opslimit = 1")
    text = text.replace("password_memlimit = 67108864", "password_memlimit = 8388608")
    text = re.sub(r"per_second = \d+, burst = \d+", "per_second = 100000, burst = 100000", text)
    config.write_text(text + extra_limits)
    return config


@dataclass
class ServerProcess:
    config: Path
    process: subprocess.Popen[bytes]
    ws_port: int
    http_port: int
    log_path: Path

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.ws_port}/c2s"

    def signal(self, sig: int) -> None:
        self.process.send_signal(sig)

    def wait(self, timeout: float = 30) -> int:
        return self.process.wait(timeout)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


def start_server(config: Path, timeout: float = 20) -> ServerProcess:
    text = config.read_text()
    ws_port = int(re.search(r"websocket_port = (\d+)", text).group(1))
    http_port = int(re.search(r"http_port = (\d+)", text).group(1))
    log_path = config.parent / f"server-{time.monotonic_ns()}.log"
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    with log_path.open("wb") as log_file:  # the child keeps its own copy of the descriptor
        process = subprocess.Popen([sys.executable, "-m", "homeserver", "run", "--config", str(config)],
                                   stdout=log_file, stderr=subprocess.STDOUT, cwd=ROOT, env=env)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"server exited early:\n{log_path.read_text()}")
        try:
            if httpx.get(f"http://127.0.0.1:{http_port}/healthz", timeout=0.5).status_code == 200:
                return ServerProcess(config, process, ws_port, http_port, log_path)
        except httpx.HTTPError:
            pass
        time.sleep(0.05)
    process.kill()
    raise RuntimeError(f"server did not become healthy:\n{log_path.read_text()}")


def stop(server: ServerProcess) -> None:
    if server.process.poll() is None:
        server.signal(signal.SIGTERM)
        try:
            server.wait(20)
        except subprocess.TimeoutExpired:
            server.process.kill()
            server.wait(5)
