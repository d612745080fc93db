"""Publisher-side calls to the on-chain ModelRegistry (model id -> publisher and royalty)."""

from __future__ import annotations

from eth_account.signers.local import LocalAccount
from web3 import Web3
from web3.types import TxReceipt

from dcml.client.chain.contracts import contract
from dcml.client.chain.deployment import Deployment
from dcml.client.chain.tx import send


def model_id(name: str) -> bytes:
    """A model's on-chain id: keccak256 of its published name."""
    return bytes(Web3.keccak(text=name))


def register_model(
    w3: Web3, deployment: Deployment, publisher: LocalAccount, model: bytes, royalty_bps: int
) -> TxReceipt:
    registry = contract(w3, "ModelRegistry", deployment.model_registry)
    return send(w3, publisher, registry.functions.register(model, royalty_bps), action="register model")


def model_terms(w3: Web3, deployment: Deployment, model: bytes) -> tuple[str, int]:
    """(publisher, royalty bps); (zero address, 0) for an unregistered id."""
    publisher, bps = contract(w3, "ModelRegistry", deployment.model_registry).functions.terms(model).call()
    return publisher, bps
