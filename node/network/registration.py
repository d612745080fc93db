"""Node side of the NodeRegistry: at start, register or re-attest on-chain.

`ensure_registered` is idempotent across restarts:
  1. if the registry's epoch is over, bump it (`advanceEpoch`, permissionless, paid by the operator),
     so the attestation published now is fresh;
  2. quote an attestation document whose report_data nonce half is the registry's current epoch, and
     hash it (`dcml.client.chain.registration.attestation_hash`);
  3. by the node's on-chain state:
     - never registered, or withdrawn: register with `stake` (the enclave key signs `Registration`);
     - active under this operator: re-attest (the enclave key signs `Reattestation`, which also
       carries the endpoint and peer id, so a node that moved updates them this way), unless the
       registry already holds exactly this attestation hash, endpoint and peer id (nothing to do);
     - active under another operator, or exiting: refuse with a typed error (exit and withdraw
       first; an exiting node cannot serve).
The node must then serve the returned `document` as its published attestation: its hash is the one
on-chain, and clients compare the two.
"""

from __future__ import annotations

import logging
from typing import Literal

from eth_account.signers.local import LocalAccount
from pydantic import BaseModel, ConfigDict
from web3 import Web3

from dcml.client.attestation.verify import AttestationDocument
from dcml.client.chain.registration import TEE_TYPES, Reattestation, Registration, attestation_hash
from dcml.client.chain.registry import NodeRecord, NodeStatus, RegistryClient, RegistryError
from dcml.node.identity import EnclaveIdentity
from dcml.node.tee.base import AttestationProvider
from dcml.node.tee.document import build_attestation_document

log = logging.getLogger(__name__)

SIGNATURE_TTL_S = 15 * 60  # how long a signed registration stays valid if not mined


class NodeRegistrationError(RegistryError):
    """The node cannot be registered in its current on-chain state (the message says why)."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__("node start", reason, message)


class RegisteredNode(BaseModel):
    """What `ensure_registered` did and the node's record after it."""

    model_config = ConfigDict(frozen=True, arbitrary_types_allowed=True)

    action: Literal["registered", "reattested", "unchanged"]
    record: NodeRecord
    document: AttestationDocument  # serve this one: its hash is the registered attestation hash
    attestation_hash: bytes
    active: bool
    tx_hash: str | None = None


def ensure_registered(
    w3: Web3,
    registry_address: str,
    identity: EnclaveIdentity,
    provider: AttestationProvider,
    operator: LocalAccount,
    *,
    endpoint: str,
    peer_id: bytes,
    stake: int,
    node_version: str,
    advance_epoch: bool = True,
) -> RegisteredNode:
    """Registers the node, or re-attests it, so the registry holds a fresh attestation. See module doc."""
    registry = RegistryClient(w3, registry_address)
    tee_type = TEE_TYPES.get(provider.tee_type)
    if tee_type is None:
        raise NodeRegistrationError("InvalidTeeType", f"unknown TEE provider type {provider.tee_type!r}")

    record = registry.node(identity.address)
    if record is not None and record.status == NodeStatus.EXITING:
        raise NodeRegistrationError(
            "NodeExiting",
            f"node {identity.address} is unbonding until {record.unbonding_ends_at}; withdraw its stake "
            "(operator) and start again to register anew",
        )
    if record is not None and record.status == NodeStatus.ACTIVE and record.operator != operator.address:
        raise NodeRegistrationError(
            "OperatorMismatch",
            f"node {identity.address} is registered by operator {record.operator}, not {operator.address}",
        )

    if advance_epoch:
        _advance_epoch_if_due(w3, registry, operator)
    epoch = registry.current_epoch()
    document = build_attestation_document(identity, provider, epoch, node_version=node_version)
    att_hash = attestation_hash(document)
    deadline = w3.eth.get_block("latest")["timestamp"] + SIGNATURE_TTL_S

    if record is None or record.status == NodeStatus.WITHDRAWN:
        registration = Registration(
            node=identity.address, operator=operator.address, endpoint=endpoint, peer_id=peer_id,
            hpke_public_key=identity.hpke_public_bytes(), attestation_hash=att_hash, tee_type=tee_type,
            epoch=epoch, deadline=deadline,
        )
        signature = registry.domain.sign(identity.account, registration)
        receipt = registry.register(operator, registration, signature, stake)
        action: Literal["registered", "reattested", "unchanged"] = "registered"
    elif (record.attestation_hash, record.endpoint, record.peer_id) == (att_hash, endpoint, peer_id):
        receipt, action = None, "unchanged"
    else:
        reattestation = Reattestation(
            node=identity.address, endpoint=endpoint, peer_id=peer_id, attestation_hash=att_hash, epoch=epoch,
            deadline=deadline,
        )
        signature = registry.domain.sign(identity.account, reattestation)
        receipt = registry.reattest(operator, reattestation, signature)
        action = "reattested"

    fresh = registry.node(identity.address)
    assert fresh is not None  # registered or re-attested above
    active = registry.is_active(identity.address)
    if not active:
        log.warning("node %s is registered but not active: its stake %d is below the registry minimum",
                    identity.address, fresh.stake)
    log.info("node %s %s in the registry (epoch %d, attestation %s)", identity.address, action,
             fresh.epoch_index, att_hash.hex())
    return RegisteredNode(
        action=action, record=fresh, document=document, attestation_hash=att_hash, active=active,
        tx_hash=None if receipt is None else "0x" + bytes(receipt["transactionHash"]).hex(),
    )


def _advance_epoch_if_due(w3: Web3, registry: RegistryClient, sender: LocalAccount) -> None:
    if w3.eth.get_block("latest")["timestamp"] < registry.epoch().next_at:
        return
    try:
        registry.advance_epoch(sender)
    except RegistryError as exc:
        if exc.reason != "EpochNotOver":  # someone else bumped it first
            raise
