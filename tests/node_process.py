"""A real node daemon (`python -m dcml.node.cli run`) in its own process, its log captured to a file: for tests that
attack the node over the network and then check that the process lived and what it wrote."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[1]


class NodeProcess:
    def __init__(self, config: Path, port: int, log_path: Path) -> None:
        self.url = f"http://127.0.0.1:{port}"
        self.port = port
        self.log_path = log_path
        self._log = log_path.open("wb")
        self.proc = subprocess.Popen([sys.executable, "-m", "dcml.node.cli", "run", "--config", str(config)], cwd=REPO,
                                     env={**os.environ, "PYTHONUNBUFFERED": "1"}, stdout=self._log,
                                     stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 90
        while True:
            assert self.proc.poll() is None, f"node exited during start:\n{self.log()[-3000:]}"
            try:
                self.health = httpx.get(f"{self.url}/health", timeout=1).json()
                return
            except httpx.TransportError:
                assert time.monotonic() < deadline, "node did not start"
                time.sleep(0.1)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def alive(self) -> bool:
        if self.proc.poll() is not None:
            return False
        return httpx.get(f"{self.url}/health", timeout=5).status_code == 200

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()
