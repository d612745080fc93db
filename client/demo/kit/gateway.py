"""Paid nodes at chosen prices and a `dcml gateway` in front of them, on loopback."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from eth_account.signers.local import LocalAccount
from fastapi import FastAPI
from web3 import Web3

from dcml.client.chain.deployment import Deployment
from dcml.client.demo.kit.nodes import start_paid_node
from dcml.client.sdk.gateway import Gateway, GatewayConfig, create_gateway_app
from dcml.node.api.server import BackgroundServer
from dcml.node.engine.base import Engine
from dcml.node.identity import EnclaveIdentity
from dcml.node.tee.base import AttestationProvider


def start_node(w3: Web3, deployment_file: Path, data_dir: Path, price_out: int, *,
               provider: AttestationProvider | None = None,
               engine: Engine | None = None) -> tuple[BackgroundServer, EnclaveIdentity, FastAPI]:
    """A paid node in this process at `price_out` wei per output token (prepay 8, credit 4)."""
    node = start_paid_node(w3, deployment_file, data_dir, price_out=price_out, settle_interval_s=0.5,
                           voucher_timeout_s=30, provider=provider,
                           engine=engine)
    return node.server, node.identity, node.app


def start_gateway(wallet: LocalAccount, deployment: Deployment, store_dir: Path, nodes: list[str],
                  **cfg: Any) -> tuple[BackgroundServer, Gateway]:
    cfg = {"deposit": 10**17, "first_token_timeout_s": 20.0, **cfg}
    config = GatewayConfig(nodes=nodes, store_dir=store_dir, allow_simulated=True, **cfg)
    gateway = Gateway(config, wallet, deployment=deployment)
    return BackgroundServer(create_gateway_app(gateway)).start(), gateway
