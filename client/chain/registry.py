"""The on-chain NodeRegistry: records, events and a reading client. Its signed messages (Registration,
Reattestation) and the attestation hash are in `registration.py`.

A client checks that an advert's attestation hash equals the registry's and that the document with that hash
verifies (`RegistryClient.check_attestation`).

The record does not store the endpoint, peer id or HPKE key, only `hpkeKeyHash = keccak256(hpkePublicKey)`:
they come from the node's latest `NodeRegistered`/`NodeReattested` events (`RegistryClient.node` reads them
and checks the key against the hash), and the key also from the attestation document (`key_matches`: a key
that does not hash to the record's is refused). The node list is the `NodeRegistered` events.
"""

from __future__ import annotations

from enum import IntEnum
from typing import Any

from eth_account.signers.local import LocalAccount
from eth_utils import to_checksum_address
from pydantic import BaseModel, ConfigDict
from web3 import Web3
from web3.types import BlockIdentifier, TxReceipt

from dcml.client.attestation.verify import AttestationDocument
from dcml.client.chain.contracts import contract
from dcml.client.chain.registration import (
    TEE_NAMES,
    ZERO_ADDRESS,
    Reattestation,
    Registration,
    RegistryDomain,
    attestation_hash,
)
from dcml.client.chain.tx import ContractClient, TransactionFailed
from dcml.client.wire.hexutil import lower_hex
from dcml.client.wire.identity import HPKE_PUBLIC_KEY_LEN

# What each of the contract's custom errors means for the caller (shown with the error's name).
_HINTS: dict[str, str] = {
    "InvalidSignature": "the message must be signed by the node's enclave key (the `node` address)",
    "NotOperator": "only the operator named in the registration (the node's operator) may do this",
    "StaleEpoch": "the epoch is neither the registry's current nor previous one: read currentEpoch() and sign again",
    "EpochNotNewer": "the node already attested in a later epoch",
    "SignatureReused": "this signed message was already used: sign a new one",
    "SignatureExpired": "the signature's deadline has passed: sign again",
    "StakeBelowMinimum": "the stake is below the registry's minStake()",
    "AlreadyRegistered": "the node is registered (or exiting): re-attest instead, or withdraw first",
    "NotActive": "the node is not registered and active",
    "NotExiting": "requestExit first",
    "UnbondingActive": "the unbonding delay has not passed yet",
    "InvalidHpkeKey": f"the HPKE public key must be {HPKE_PUBLIC_KEY_LEN} bytes (ML-KEM-768 || X25519)",
    "EpochNotOver": "the current epoch is not over yet",
}


class RegistryError(TransactionFailed):
    """A registry call was refused; `reason` is the contract's custom error name when there is one."""

    template = "registry refused {action}: {reason}"


class NodeStatus(IntEnum):
    NONE = 0
    ACTIVE = 1
    EXITING = 2
    WITHDRAWN = 3


# --- records and events -----------------------------------------------------------------------


def key_matches(record: NodeRecord, hpke_public_key: bytes) -> bool:
    """Whether `hpke_public_key` (from an attestation document or an advert) is the one the node registered."""
    return bytes(Web3.keccak(hpke_public_key)) == record.hpke_key_hash


class NodeRecord(BaseModel):
    """A node as the registry holds it (`getNode`), with the endpoint, peer id and HPKE key from its latest
    registry events (the key checked against the record's hash), plus the deployment-wide stake token."""

    model_config = ConfigDict(frozen=True)

    node: str
    operator: str
    tee_type: int
    status: NodeStatus
    registered_at: int
    attested_at: int
    epoch_index: int
    unbonding_ends_at: int
    stake: int
    slashed: int
    attestation_hash: bytes
    epoch: bytes
    hpke_key_hash: bytes
    endpoint: str
    peer_id: bytes
    hpke_public_key: bytes
    stake_token: str

    @property
    def tee_name(self) -> str:
        return TEE_NAMES.get(self.tee_type, f"unknown({self.tee_type})")

    @classmethod
    def from_chain(cls, node: str, raw: tuple, stake_token: str, *, endpoint: str = "", peer_id: bytes = b"",
                   hpke_public_key: bytes = b"") -> NodeRecord:
        """`getNode`'s tuple, with the endpoint, peer id and key the caller read from the events (or empty)."""
        (operator, tee_type, status, registered_at, attested_at, epoch_index, stake, unbonding_ends_at, slashed,
         att_hash, epoch, hpke_hash) = raw
        return cls(
            node=to_checksum_address(node), operator=to_checksum_address(operator), tee_type=tee_type,
            status=NodeStatus(status), registered_at=registered_at, attested_at=attested_at,
            epoch_index=epoch_index, unbonding_ends_at=unbonding_ends_at, stake=stake, slashed=slashed,
            attestation_hash=bytes(att_hash), epoch=bytes(epoch), hpke_key_hash=bytes(hpke_hash), endpoint=endpoint,
            peer_id=bytes(peer_id),
            hpke_public_key=bytes(hpke_public_key), stake_token=to_checksum_address(stake_token),
        )


class RegistryEvent(BaseModel):
    """One registry log: its name, block, transaction and decoded arguments."""

    model_config = ConfigDict(frozen=True)

    name: str
    block_number: int
    tx_hash: str
    log_index: int
    args: dict[str, Any]


EVENT_NAMES = (
    "NodeRegistered", "NodeReattested", "StakeAdded", "ExitRequested", "StakeWithdrawn", "Slashed",
    "SlasherSet", "EpochAdvanced",
)


class EpochInfo(BaseModel):
    model_config = ConfigDict(frozen=True)

    index: int
    value: bytes
    previous: bytes
    started_at: int
    next_at: int


# --- the client -------------------------------------------------------------------------------


class RegistryClient(ContractClient):
    """Reads the registry (nodes, epochs, events) and sends its transactions with readable errors."""

    abi_name = "NodeRegistry"
    error = RegistryError
    hints = _HINTS

    def __init__(self, w3: Web3, address: str) -> None:
        super().__init__(w3, address)
        self._stake_token: str | None = None

    # reads

    @property
    def domain(self) -> RegistryDomain:
        return RegistryDomain(chain_id=self.w3.eth.chain_id, registry=self.address)

    @property
    def stake_token(self) -> str:
        if self._stake_token is None:
            self._stake_token = to_checksum_address(self.contract.functions.stakeToken().call())
        return self._stake_token

    def min_stake(self) -> int:
        return self.contract.functions.minStake().call()

    def unbonding_delay(self) -> int:
        return self.contract.functions.unbondingDelay().call()

    def current_epoch(self) -> bytes:
        return bytes(self.contract.functions.currentEpoch().call())

    def epoch(self) -> EpochInfo:
        f = self.contract.functions
        return EpochInfo(
            index=f.epochIndex().call(), value=bytes(f.currentEpoch().call()),
            previous=bytes(f.previousEpoch().call()), started_at=f.epochStartedAt().call(),
            next_at=f.nextEpochAt().call(),
        )

    def node(self, address: str) -> NodeRecord | None:
        """The record of `address`, or None if it never registered. The endpoint, peer id and HPKE key are
        the latest ones the node's events carry; the key must hash to the record's (else RegistryError
        `RecordMismatch`: an RPC that hides or forges events)."""
        address = to_checksum_address(address)
        raw = self.contract.functions.getNode(address).call()
        if NodeStatus(raw[2]) == NodeStatus.NONE:
            return None
        endpoint, peer_id, key = self._service_from_events(address)
        record = NodeRecord.from_chain(address, raw, self.stake_token, endpoint=endpoint, peer_id=peer_id,
                                       hpke_public_key=key)
        if not key_matches(record, key):
            raise RegistryError("read node", "RecordMismatch",
                                f"the HPKE key in the events of {address} is not its record's; ask another RPC")
        return record

    def _service_from_events(self, address: str) -> tuple[str, bytes, bytes]:
        """Endpoint and peer id of the node's latest registration or re-attestation, key of its latest registration."""
        endpoint, peer_id, key = "", b"", b""
        logs: list[tuple[tuple[int, int], str, Any]] = []
        for name in ("NodeRegistered", "NodeReattested"):
            for log in getattr(self.contract.events, name).get_logs(
                    from_block=0, argument_filters={"node": address}):
                logs.append(((log["blockNumber"], log["logIndex"]), name, log["args"]))
        for _, name, args in sorted(logs, key=lambda x: x[0]):
            endpoint, peer_id = args["endpoint"], bytes(args["peerId"])
            if name == "NodeRegistered":
                key = bytes(args["hpkePublicKey"])
        return endpoint, peer_id, key

    def is_active(self, address: str) -> bool:
        return self.contract.functions.isActive(to_checksum_address(address)).call()

    def nodes(self) -> list[NodeRecord]:
        """Every node that ever registered, in first-registration order (any status), from `NodeRegistered`."""
        seen: dict[str, None] = {}
        for log in self.contract.events.NodeRegistered.get_logs(from_block=0):
            seen.setdefault(to_checksum_address(log["args"]["node"]), None)
        return [r for r in (self.node(a) for a in seen) if r is not None]

    def events(self, from_block: int = 0, to_block: BlockIdentifier = "latest") -> list[RegistryEvent]:
        """Every registry event in the block range, in chain order."""
        logs = self.w3.eth.get_logs({"address": self.address, "fromBlock": from_block, "toBlock": to_block})
        out = []
        for log in logs:
            for name in EVENT_NAMES:
                try:
                    decoded = getattr(self.contract.events, name)().process_log(log)
                except Exception:  # not this event's topic
                    continue
                out.append(RegistryEvent(
                    name=name, block_number=log["blockNumber"], tx_hash="0x" + bytes(log["transactionHash"]).hex(),
                    log_index=log["logIndex"], args=dict(decoded["args"]),
                ))
                break
        return out

    def check_attestation(self, node: str, document: AttestationDocument) -> NodeRecord:
        """The record of an active node whose registered attestation hash is this document's.

        Verifying the document itself (quote, policy, report_data against `record.epoch`) is the
        caller's job, with client.attestation.verify_attestation.
        """
        record = self.node(node)
        if record is None or not self.is_active(node):
            raise RegistryError("attestation check", "NotActive", f"{node} is not an active registered node")
        if attestation_hash(document) != record.attestation_hash:
            raise RegistryError("attestation check", "AttestationHashMismatch",
                                "the document is not the one the node registered; fetch its current attestation")
        if bytes.fromhex(lower_hex(document.nonce)) != record.epoch:
            raise RegistryError("attestation check", "EpochMismatch",
                                "the document's nonce is not the registered epoch")
        return record

    # writes

    def register(self, operator: LocalAccount, registration: Registration, signature: bytes, stake: int) -> TxReceipt:
        """Registers the node with `stake` (approving an ERC-20 stake first when needed)."""
        if to_checksum_address(registration.operator) != operator.address:
            raise self.refused("register", "NotOperator")
        value = stake
        if self.stake_token != ZERO_ADDRESS:
            value = 0
            self._ensure_allowance(operator, stake)
        return self._send(operator, self.contract.functions.register(registration.as_tuple(), stake, signature),
                          value=value, action="register")

    def reattest(self, sender: LocalAccount, reattestation: Reattestation, signature: bytes) -> TxReceipt:
        fn = self.contract.functions.reattest(reattestation.as_tuple(), signature)
        return self._send(sender, fn, action="reattest")

    def advance_epoch(self, sender: LocalAccount) -> TxReceipt:
        return self._send(sender, self.contract.functions.advanceEpoch(), action="advanceEpoch")

    def add_stake(self, operator: LocalAccount, node: str, amount: int) -> TxReceipt:
        value = amount
        if self.stake_token != ZERO_ADDRESS:
            value = 0
            self._ensure_allowance(operator, amount)
        fn = self.contract.functions.addStake(to_checksum_address(node), amount)
        return self._send(operator, fn, value=value, action="addStake")

    def request_exit(self, operator: LocalAccount, node: str) -> TxReceipt:
        fn = self.contract.functions.requestExit(to_checksum_address(node))
        return self._send(operator, fn, action="requestExit")

    def withdraw_stake(self, operator: LocalAccount, node: str) -> TxReceipt:
        fn = self.contract.functions.withdrawStake(to_checksum_address(node))
        return self._send(operator, fn, action="withdrawStake")

    def _ensure_allowance(self, owner: LocalAccount, amount: int) -> None:
        token = contract(self.w3, "TestToken", self.stake_token)  # any ERC-20 ABI will do
        if token.functions.allowance(owner.address, self.address).call() < amount:
            self._send(owner, token.functions.approve(self.address, amount), action="approve stake")

