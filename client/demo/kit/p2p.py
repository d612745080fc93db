"""Real p2p demo node processes (`python -m dcml.client.demo.p2p_node`) on loopback, for the overlay tests and
bench_discovery."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from dcml.client.chain.devnet import REPO
from dcml.client.sdk.discovery import RegisteredNode


@dataclass
class NodeInfo:
    address: str
    peer_id: str
    addrs: list[str]
    endpoint: str
    attestation_hash: str
    models: list[str]

    def registered(self, **overrides: object) -> RegisteredNode:
        kw: dict = {"address": self.address, "attestation_hash": self.attestation_hash, "peer_id": self.peer_id,
                    "endpoint": self.endpoint}
        kw.update(overrides)
        return RegisteredNode(**kw)


@dataclass
class NodeProcess:
    proc: subprocess.Popen
    nodes: list[NodeInfo] = field(default_factory=list)

    def stop(self, timeout: float = 15.0) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(OSError):
                self.proc.stdin.close()  # type: ignore[union-attr]
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def spawn(data_dir: Path, models: list[str], *, bootstrap: Sequence[str] = (), price_in: int = 1, price_out: int = 2,
          interval: float = 2.0, ttl: int = 6, count: int = 1, bad_attestation: bool = False,
          log_level: str = "WARNING") -> NodeProcess:
    """Start a demo node process; returns at once (call `wait_ready`)."""
    cmd = [sys.executable, "-m", "dcml.client.demo.p2p_node", "--data-dir", str(data_dir), "--interval", str(interval),
           "--ttl", str(ttl), "--count", str(count), "--price-in", str(price_in), "--price-out", str(price_out),
           "--log-level", log_level]
    for m in models:
        cmd += ["--model", m]
    for b in bootstrap:
        cmd += ["--bootstrap", b]
    if bad_attestation:
        cmd.append("--bad-attestation")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    log = open(data_dir.parent / f"{data_dir.name}.log", "wb")  # noqa: SIM115 (lives as long as the process)
    data_dir.mkdir(parents=True, exist_ok=True)
    proc = subprocess.Popen(cmd, cwd=REPO, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log, env=env)
    return NodeProcess(proc)


def wait_ready(p: NodeProcess, timeout: float = 60.0) -> NodeProcess:
    deadline = time.monotonic() + timeout
    assert p.proc.stdout is not None
    while time.monotonic() < deadline:
        line = p.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"demo node exited with {p.proc.wait()}; see its .log file")
        text = line.decode().strip()
        if text == "READY":
            return p
        if text.startswith("{"):
            p.nodes.append(NodeInfo(**json.loads(text)))
    raise TimeoutError("demo node did not become ready")


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0
