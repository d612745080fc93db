"""Paid nodes at chosen prices (in process, or a real process to SIGKILL) and a gateway on loopback."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import httpx

from dcml.client.sdk.gateway import Gateway, GatewayConfig, create_gateway_app
from dcml.node.api.app import create_app
from dcml.node.api.server import BackgroundServer
from dcml.node.config import load_settings
from dcml.node.engine.synthetic import SyntheticEngine
from dcml.node.identity import EnclaveIdentity
from dcml.node.tee.simulated import SimulatedProvider
from tests.paid_helpers import MODEL, PRICE_IN, fund

REPO = Path(__file__).resolve().parents[1]


def node_settings(deployment_file: Path, data_dir: Path, price_out: int):
    return load_settings(
        None, data_dir=data_dir, engine={"kind": "synthetic", "served_model_name": MODEL, "model_dir": None},
        payments={"enabled": True, "deployment": deployment_file, "prepay_tokens": 8, "credit_tokens": 4,
                  "settle_threshold": 10**30, "settle_interval_s": 0.5,
                  "prices": {MODEL: {"price_per_input_token": PRICE_IN, "price_per_output_token": price_out}}})


def start_node(w3, deployment_file: Path, data_dir: Path, price_out: int, *, provider=None) -> tuple:
    identity = EnclaveIdentity.generate()
    fund(w3, identity.address)
    app = create_app(node_settings(deployment_file, data_dir, price_out), engine=SyntheticEngine(model_name=MODEL),
                     identity=identity, provider=provider or SimulatedProvider())
    return BackgroundServer(app).start(), identity, app


class NodeProcess:
    """`dcml-node run` as a real process (SIGKILL-able); the synthetic engine waits `first_token_ms`."""

    def __init__(self, w3, deployment_file: Path, data_dir: Path, port: int, price_out: int,
                 first_token_ms: int, tokens_per_second: float = 0) -> None:
        data_dir.mkdir(parents=True, exist_ok=True)
        config = data_dir / "node.toml"
        config.write_text(f"""
data_dir = "{data_dir}"
[server]
port = {port}
[engine]
kind = "synthetic"
served_model_name = "{MODEL}"
options = {{ first_token_ms = {first_token_ms}, tokens_per_second = {tokens_per_second} }}
[payments]
enabled = true
deployment = "{deployment_file}"
prepay_tokens = 8
credit_tokens = 4
settle_threshold = 1000000000000000000000000
[payments.prices.{MODEL}]
price_per_input_token = {PRICE_IN}
price_per_output_token = {price_out}
""")
        self.url = f"http://127.0.0.1:{port}"
        self.proc = subprocess.Popen([sys.executable, "-m", "dcml.node.cli", "run", "--config", str(config)], cwd=REPO,
                                     env={**os.environ, "PYTHONUNBUFFERED": "1"})
        deadline = time.monotonic() + 60
        while True:
            assert self.proc.poll() is None, "node exited during start"
            try:
                self.address = httpx.get(f"{self.url}/health", timeout=1).json()["address"]
                break
            except httpx.TransportError:
                assert time.monotonic() < deadline, "node did not start"
                time.sleep(0.1)
        fund(w3, self.address)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def start_gateway(wallet, deployment, store_dir: Path, nodes: list[str], **cfg) -> tuple[BackgroundServer, Gateway]:
    cfg = {"deposit": 10**17, "first_token_timeout_s": 20.0, **cfg}
    config = GatewayConfig(nodes=nodes, store_dir=store_dir, allow_simulated=True, **cfg)
    gateway = Gateway(config, wallet, deployment=deployment)
    return BackgroundServer(create_gateway_app(gateway)).start(), gateway
