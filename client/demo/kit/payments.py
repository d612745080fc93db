"""A node's payment side (chain view, ledger, verifier, settlement) over a real anvil, without HTTP: for the
payment tests and bench_vouchers."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from eth_account.signers.local import LocalAccount
from web3 import Web3

from dcml.client.chain.deployment import Deployment
from dcml.client.chain.model_registry import register_model
from dcml.client.wire.voucher import VoucherDomain
from dcml.node.payments.chain import ChannelChain
from dcml.node.payments.ledger import Ledger
from dcml.node.payments.settlement import SettlementWorker
from dcml.node.payments.verifier import VoucherVerifier


@dataclass
class NodePayments:
    chain: ChannelChain
    ledger: Ledger
    verifier: VoucherVerifier
    worker: SettlementWorker


def node_payments(w3: Web3, deployment: Deployment, payee: LocalAccount, data_dir: Path, *,
                  threshold: int = 10**30, interval: float = 0.2) -> NodePayments:
    chain = ChannelChain(w3, deployment, ttl=60)
    ledger = Ledger(data_dir / "ledger.sqlite")
    domain = VoucherDomain(deployment.chain_id, deployment.payment_channels)
    verifier = VoucherVerifier(domain, chain, ledger, payee.address)
    worker = SettlementWorker(chain, ledger, payee, threshold=threshold, interval=interval)
    return NodePayments(chain, ledger, verifier, worker)


def new_model(w3: Web3, deployment: Deployment, publisher: LocalAccount, bps: int) -> bytes:
    model = os.urandom(32)
    register_model(w3, deployment, publisher, model, bps)
    return model


def token_balance(w3: Web3, deployment: Deployment, who: str) -> int:
    from dcml.client.chain.contracts import contract

    return contract(w3, "TestToken", deployment.token).functions.balanceOf(who).call()
