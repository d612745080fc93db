"""Paid nodes on loopback over a local chain: in this process (`start_paid_node`) or as a real `dcml-node run`
process (`NodeProcess`, SIGKILL-able), their TOML config (`paid_config` + `to_toml`), and anvil funding."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import httpx
from eth_account import Account
from eth_account.signers.local import LocalAccount
from fastapi import FastAPI
from web3 import Web3

from dcml.client.attestation.verify import Policy, verify_attestation
from dcml.client.chain.contracts import contract
from dcml.client.chain.deployment import Deployment
from dcml.client.chain.devnet import REPO
from dcml.client.chain.tx import send
from dcml.client.publisher.key_broker import measurement_id
from dcml.client.wire.receipts import SignedReceipt
from dcml.node.api.app import create_app
from dcml.node.api.server import BackgroundServer
from dcml.node.config import NodeSettings, load_settings
from dcml.node.engine.base import Engine
from dcml.node.engine.synthetic import SyntheticEngine
from dcml.node.identity import EnclaveIdentity
from dcml.node.payments.ledger import Ledger
from dcml.node.tee.base import AttestationProvider
from dcml.node.tee.document import build_attestation_document
from dcml.node.tee.simulated import SimulatedProvider

MODEL = "synthetic"
PRICE_IN, PRICE_OUT = 10**12, 3 * 10**12
NEVER = 10**24  # a settle threshold never reached: the node settles when a channel closes


def fund(w3: Web3, address: str) -> None:
    """Gas money for a node's enclave address (anvil cheat; on a live chain the operator sends ETH)."""
    w3.provider.make_request("anvil_setBalance", [address, hex(10**20)])  # type: ignore[arg-type]


def funded_wallet(w3: Web3, deployment: Deployment, tokens: int = 10**19) -> LocalAccount:
    """A fresh payer with gas and `tokens` of the test token, so channels and balances never mix."""
    acct = Account.create()
    fund(w3, acct.address)
    donor = Account.from_key(deployment.accounts["client"].private_key)
    send(w3, donor, contract(w3, "TestToken", deployment.token).functions.transfer(acct.address, tokens),
         action="fund")
    return acct


def paid_settings(deployment_file: Path, data_dir: Path, *, prepay_tokens: int = 8, credit_tokens: int = 4,
                  voucher_timeout_s: float = 2.0, settle_threshold: int = 10**30, settle_interval_s: float = 0.3,
                  confirmations: int = 1, model: str = MODEL, price_in: int = PRICE_IN, price_out: int = PRICE_OUT,
                  **payments: Any) -> NodeSettings:
    return load_settings(
        None, data_dir=data_dir,
        engine={"kind": "synthetic", "served_model_name": model, "model_dir": None},
        payments={"enabled": True, "deployment": deployment_file, "prepay_tokens": prepay_tokens,
                  "credit_tokens": credit_tokens, "voucher_timeout_s": voucher_timeout_s,
                  "settle_threshold": settle_threshold, "settle_interval_s": settle_interval_s,
                  "confirmations": confirmations, **payments,
                  "prices": {model: {"price_per_input_token": price_in, "price_per_output_token": price_out}}},
    )


@dataclass
class PaidNode:
    server: BackgroundServer
    identity: EnclaveIdentity
    app: FastAPI

    @property
    def url(self) -> str:
        return self.server.url

    @property
    def ledger(self) -> Ledger:
        return self.app.state.node.gate.payments.ledger

    @property
    def data_dir(self) -> Path:
        return Path(self.app.state.node.settings.data_dir)


def start_paid_node(w3: Web3, deployment_file: Path, data_dir: Path, *, engine: Engine | None = None,
                    provider: AttestationProvider | None = None, **settings: Any) -> PaidNode:
    """A paid node in this process on a loopback port (simulated TEE, synthetic engine unless `engine`)."""
    return serve_node(w3, paid_settings(deployment_file, data_dir, **settings), engine=engine, provider=provider)


def serve_node(w3: Web3, cfg: NodeSettings, *, identity: EnclaveIdentity | None = None, engine: Engine | None = None,
               provider: AttestationProvider | None = None) -> PaidNode:
    """The node `cfg` describes, in this process on a loopback port, its enclave address funded for gas
    (simulated TEE unless `provider`; the synthetic engine unless `engine` or a configured one)."""
    identity = identity or EnclaveIdentity.generate()
    fund(w3, identity.address)
    if engine is None and cfg.engine.kind == "synthetic":
        engine = SyntheticEngine(model_name=cfg.engine.served_model_name)
    app = create_app(cfg, engine=engine, identity=identity, provider=provider or SimulatedProvider())
    return PaidNode(BackgroundServer(app).start(), identity, app)


Sections = dict[str, dict[str, Any]]


def paid_config(data_dir: Path, port: int, deployment_file: Path, *, model: str = MODEL, price_in: int = PRICE_IN,
                price_out: int = PRICE_OUT) -> Sections:
    """A paid synthetic node's config as TOML sections ("" is the top level); callers add or change keys."""
    return {
        "": {"data_dir": data_dir},
        "server": {"port": port, "graceful_shutdown_s": 5},
        "engine": {"kind": "synthetic", "served_model_name": model},
        "payments": {"enabled": True, "deployment": deployment_file, "prepay_tokens": 8, "credit_tokens": 4,
                     "settle_threshold": NEVER},
        f"payments.prices.{model}": {"price_per_input_token": price_in, "price_per_output_token": price_out},
    }


def _value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int | float):
        return str(v)
    if isinstance(v, Mapping):
        return "{ " + ", ".join(f"{k} = {_value(x)}" for k, x in v.items()) + " }"
    return json.dumps(str(v))  # a TOML basic string (paths included)


def to_toml(sections: Sections) -> str:
    """TOML for flat sections of scalars and inline tables: all a node config needs."""
    out: list[str] = []
    for name, items in sections.items():
        if name:
            out.append(f"[{name}]")
        out += [f"{k} = {_value(v)}" for k, v in items.items()]
    return "\n".join(out) + "\n"


class NodeProcess:
    """`python -m dcml.node.cli run --config CONFIG` in its own process, ready once /health answers. Its output
    goes to `log_path` when given (read back with `log()`), else to this process's own."""

    def __init__(self, config: Path, port: int, log_path: Path | None = None, *, env: Mapping[str, str] = {},
                 timeout_s: float = 90) -> None:
        self.url = f"http://127.0.0.1:{port}"
        self.port = port
        self.log_path = log_path
        self._log: IO[bytes] | None = log_path.open("wb") if log_path else None
        self.proc = subprocess.Popen([sys.executable, "-m", "dcml.node.cli", "run", "--config", str(config)],
                                     cwd=REPO, env={**os.environ, "PYTHONUNBUFFERED": "1", **env}, stdout=self._log,
                                     stderr=subprocess.STDOUT if self._log else None)
        deadline = time.monotonic() + timeout_s
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the node exited during start:\n{self.log()[-3000:]}")
            try:
                self.health: dict[str, Any] = httpx.get(f"{self.url}/health", timeout=1).json()
                return
            except (httpx.TransportError, ValueError):
                if time.monotonic() > deadline:
                    self.kill()
                    raise RuntimeError(f"the node did not start within {timeout_s:g} s") from None
                time.sleep(0.1)

    @property
    def address(self) -> str:
        return self.health["address"]

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path else ""

    def alive(self) -> bool:
        if self.proc.poll() is not None:
            return False
        return httpx.get(f"{self.url}/health", timeout=5).status_code == 200

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(30)
        self._close()

    def stop(self, timeout_s: float = 20) -> None:
        """SIGTERM (graceful: in-flight answers finish, due channels settle), SIGKILL after `timeout_s`."""
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.kill()
        self._close()

    def _close(self) -> None:
        if self._log:
            self._log.close()


def synthetic_node(w3: Web3, deployment_file: Path, data_dir: Path, port: int, price_out: int, *,
                   first_token_ms: int = 0, tokens_per_second: float = 0) -> NodeProcess:
    """A paid synthetic node process (funded), its first token `first_token_ms` after each request."""
    data_dir.mkdir(parents=True, exist_ok=True)
    cfg = paid_config(data_dir, port, deployment_file, price_out=price_out)
    cfg["engine.options"] = {"first_token_ms": first_token_ms, "tokens_per_second": tokens_per_second}
    config = data_dir / "node.toml"
    config.write_text(to_toml(cfg))
    node = NodeProcess(config, port, timeout_s=60)
    fund(w3, node.address)
    return node


def node_receipts(node: PaidNode) -> list[SignedReceipt]:
    """Every receipt an in-process node has stored, read from its database."""
    db = sqlite3.connect(node.data_dir / "receipts.sqlite")
    try:
        return [SignedReceipt.from_json(body) for (body,) in db.execute("SELECT body FROM receipts")]
    finally:
        db.close()


def simulated_measurement(provider: AttestationProvider | None = None) -> bytes:
    """The measurement id a simulated node reports (what a publisher's broker allow-lists for it; a real
    publisher reads it from a real build)."""
    identity, nonce = EnclaveIdentity.generate(), os.urandom(32)
    doc = build_attestation_document(identity, provider or SimulatedProvider(), nonce, node_version="demo")
    return measurement_id(verify_attestation(doc, nonce=nonce, policy=Policy(), allow_simulated=True))
