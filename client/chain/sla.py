"""The SLA court (`contracts/src/SLACourt.sol`): a node's service terms and the two disputes over them.

* **Broken terms**: a receipt the node signed whose own figures break the terms in force at its
  ``acceptedAt`` (TTFT above ``maxTtftMs``, decode rate below ``minTokensPerSec``, duration above
  ``maxDurationMs``) pays ``breachFixed + cost × breachCostBps / 10000`` from the node's stake, once per
  (node, requestHash). `broken_terms` applies the same rule off-chain, so a client knows before it pays gas.
* **No response** (Proof of Response): after an acceptance's deadline the client opens a dispute (with the
  court's ETH ``disputeBond``); the node closes it by posting the receipt for the same request and channel
  within ``responseWindow`` (the bond goes to whoever answers); otherwise anyone finalizes it and the node's
  stake pays ``noResponseCompensation`` to the disputer, whose bond is returned.

Claims are bound to the channel's payer: both disputes carry the channel's `client.channel.ChannelParams`,
the court re-derives the channel id as PaymentChannels does (with the escrow's address and the chain id),
requires it to equal the signed ``channelId`` and requires the sender to be ``params.payer``, who is paid.
So the claim must be sent from the payer wallet (not the session key), and a copy sent by anyone else
reverts (``NotPayer``). The court verifies signatures with the EIP-712 types of `client.receipts` under
``ReceiptDomain(chain_id, court_address)``; the signer must be the node's registered enclave address.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from enum import IntEnum, IntFlag
from pathlib import Path

from eth_account.signers.local import LocalAccount
from eth_utils import to_checksum_address
from pydantic import BaseModel, ConfigDict, Field
from web3 import Web3
from web3.exceptions import ContractCustomError, ContractLogicError
from web3.types import TxReceipt

from dcml.client.chain.channel import ChannelParams
from dcml.client.chain.tx import ContractClient, TransactionFailed
from dcml.client.wire.hexutil import from_hex as _b32
from dcml.client.wire.hexutil import from_hex as _sig
from dcml.client.wire.receipts import Acceptance, Receipt, ReceiptDomain, SignedAcceptance, SignedReceipt

_BUILD = Path(__file__).resolve().parents[3] / "contracts" / "out" / "SLACourt.sol" / "SLACourt.json"


def court_abi() -> list[dict]:
    """The shipped ABI (client/chain/abi/SLACourt.json) or, before it is exported, the Foundry build's."""
    from dcml.client.chain.contracts import ABI_DIR

    shipped = ABI_DIR / "SLACourt.json"
    if shipped.exists():
        return json.loads(shipped.read_text())
    return json.loads(_BUILD.read_text())["abi"]


PUBLISH_TERMS_GAS = 260_000


class Broken(IntFlag):
    """Which terms a receipt breaks (the bit set `SLACourt.brokenTerms` returns)."""

    NONE = 0
    TTFT = 1
    RATE = 2
    DURATION = 4


class DisputeStatus(IntEnum):
    NONE = 0
    OPEN = 1
    ANSWERED = 2
    FINALIZED = 3


class Terms(BaseModel):
    """One version of a node's terms for one model; zero bounds are no bounds."""

    model_config = ConfigDict(frozen=True)

    max_ttft_ms: int = Field(0, ge=0, lt=2**32)
    min_tokens_per_sec: int = Field(0, ge=0, lt=2**32)
    max_duration_ms: int = Field(0, ge=0, lt=2**32)
    response_window: int = Field(3600, gt=0, le=7 * 86400)
    breach_cost_bps: int = Field(0, ge=0, le=1_000_000)
    valid_from: int = 0  # set by the court
    breach_fixed: int = Field(0, ge=0, lt=2**128)
    no_response_compensation: int = Field(0, ge=0, lt=2**128)

    def as_tuple(self) -> tuple:
        return (self.max_ttft_ms, self.min_tokens_per_sec, self.max_duration_ms, self.response_window,
                self.breach_cost_bps, self.valid_from, self.breach_fixed, self.no_response_compensation)

    @classmethod
    def from_tuple(cls, t) -> Terms:
        keys = ("max_ttft_ms", "min_tokens_per_sec", "max_duration_ms", "response_window", "breach_cost_bps",
                "valid_from", "breach_fixed", "no_response_compensation")
        return cls(**dict(zip(keys, t, strict=True)))

    def compensation(self, receipt: Receipt) -> int:
        """What a broken-terms claim on `receipt` pays (before the cap by the node's stake)."""
        return self.breach_fixed + receipt.cost * self.breach_cost_bps // 10_000


def broken_terms(terms: Terms, receipt: Receipt) -> Broken:
    """The court's rule, off-chain: which of `terms` the receipt's own figures break."""
    broken = Broken.NONE
    if terms.max_ttft_ms and receipt.ttft_ms > terms.max_ttft_ms:
        broken |= Broken.TTFT
    decode_ms = receipt.duration_ms - receipt.ttft_ms
    if (terms.min_tokens_per_sec and receipt.output_tokens > 1 and decode_ms > 0
            and (receipt.output_tokens - 1) * 1000 < terms.min_tokens_per_sec * decode_ms):
        broken |= Broken.RATE
    if terms.max_duration_ms and receipt.duration_ms > terms.max_duration_ms:
        broken |= Broken.DURATION
    return broken


@dataclass(frozen=True)
class Dispute:
    id: bytes
    disputer: str
    status: DisputeStatus
    answer_by: int
    node: str
    compensation: int
    bond: int
    request_hash: bytes
    channel_id: bytes
    model_id: bytes


def receipt_tuple(r: Receipt) -> tuple:
    return (_b32(r.receipt_id), _b32(r.request_hash), _b32(r.response_hash), _b32(r.channel_id), _b32(r.model_id),
            r.input_tokens, r.output_tokens, r.cost, r.cumulative_spent, r.accepted_at, r.ttft_ms, r.duration_ms)


def acceptance_tuple(a: Acceptance) -> tuple:
    return (_b32(a.request_hash), _b32(a.channel_id), a.accepted_at, a.deadline)


class SLAError(TransactionFailed):
    """The court refused a call; `reason` is its custom error name when known."""

    template = "SLA court refused {action}: {reason}"


class SLACourtClient(ContractClient):
    """Reads and writes one SLACourt."""

    error = SLAError

    def __init__(self, w3: Web3, address: str) -> None:
        super().__init__(w3, address, court_abi())

    @property
    def domain(self) -> ReceiptDomain:
        return ReceiptDomain(self.w3.eth.chain_id, self.address)

    # ---- writes

    def publish_terms(self, operator: LocalAccount, node: str, model_id: str, terms: Terms) -> TxReceipt:
        fn = self.contract.functions.publishTerms(to_checksum_address(node), _b32(model_id), terms.as_tuple())
        # Estimated in the same second as the previous version, the cheap "replace" path is priced; mined in
        # the next second the transaction pushes a new version (~210k gas): floor the limit at that.
        return self._send(operator, fn, "publishTerms", min_gas=PUBLISH_TERMS_GAS)

    def claim_breach(self, account: LocalAccount, node: str, params: ChannelParams,
                     signed: SignedReceipt) -> TxReceipt:
        """Claim as `account`, which must be `params.payer` (the channel's payer is the one paid)."""
        fn = self.contract.functions.claimBreach(to_checksum_address(node), params.as_struct(),
                                                 receipt_tuple(signed.receipt), _sig(signed.signature))
        return self._send(account, fn, "claimBreach")

    def open_no_response(self, account: LocalAccount, node: str, model_id: str, params: ChannelParams,
                         signed: SignedAcceptance) -> bytes:
        """Open as `account`, which must be `params.payer`; returns the dispute id."""
        return self.open_no_response_tx(account, node, model_id, params, signed)[0]

    def open_no_response_tx(self, account: LocalAccount, node: str, model_id: str, params: ChannelParams,
                            signed: SignedAcceptance) -> tuple[bytes, TxReceipt]:
        """`open_no_response`, also returning the transaction's receipt (the bond is sent with it)."""
        a = signed.acceptance
        fn = self.contract.functions.openNoResponse(
            to_checksum_address(node), _b32(model_id), params.as_struct(),
            acceptance_tuple(a), _sig(signed.signature))
        tx = self._send(account, fn, "openNoResponse", value=self.dispute_bond())
        return self.dispute_id(node, a.request_hash), tx

    def answer(self, account: LocalAccount, dispute_id: bytes, signed: SignedReceipt) -> TxReceipt:
        fn = self.contract.functions.answer(dispute_id, receipt_tuple(signed.receipt), _sig(signed.signature))
        return self._send(account, fn, "answer")

    def finalize(self, account: LocalAccount, dispute_id: bytes) -> TxReceipt:
        return self._send(account, self.contract.functions.finalize(dispute_id), "finalize")

    # ---- reads

    def escrow(self) -> str:
        return self.contract.functions.escrow().call()

    def channel_id_of(self, params: ChannelParams) -> bytes:
        return bytes(self.contract.functions.channelIdOf(params.as_struct()).call())

    def dispute_bond(self) -> int:
        return self.contract.functions.disputeBond().call()

    def terms_at(self, node: str, model_id: str, time: int) -> Terms | None:
        try:
            t = self.contract.functions.termsAt(to_checksum_address(node), _b32(model_id), time).call()
        except (ContractCustomError, ContractLogicError):
            return None
        return Terms.from_tuple(t)

    def terms_versions(self, node: str, model_id: str) -> list[Terms]:
        f = self.contract.functions
        n = f.termsCount(to_checksum_address(node), _b32(model_id)).call()
        return [Terms.from_tuple(f.termsVersion(to_checksum_address(node), _b32(model_id), i).call())
                for i in range(n)]

    def latest_terms(self, node: str, model_id: str) -> Terms | None:
        """The newest published version (possibly not yet in force), or None if the node never published."""
        f = self.contract.functions
        count = f.termsCount(to_checksum_address(node), _b32(model_id)).call()
        if not count:
            return None
        return Terms.from_tuple(f.termsVersion(to_checksum_address(node), _b32(model_id), count - 1).call())

    def check_receipt(self, node: str, receipt: Receipt) -> Broken:
        """Off-chain: the terms the receipt breaks under the node's terms at its acceptedAt (NONE if no terms)."""
        terms = self.terms_at(node, receipt.model_id, receipt.accepted_at)
        return Broken.NONE if terms is None else broken_terms(terms, receipt)

    def dispute_id(self, node: str, request_hash: str) -> bytes:
        return bytes(self.contract.functions.disputeId(to_checksum_address(node), _b32(request_hash)).call())

    def dispute(self, dispute_id: bytes) -> Dispute:
        d = self.contract.functions.getDispute(dispute_id).call()
        return Dispute(dispute_id, d[0], DisputeStatus(d[1]), d[2], d[3], d[4], d[5], bytes(d[6]), bytes(d[7]),
                       bytes(d[8]))

    def breach_claimed(self, node: str, request_hash: str) -> bool:
        key = self.contract.functions.claimKey(to_checksum_address(node), _b32(request_hash)).call()
        return self.contract.functions.breachClaimed(key).call()

    def events(self, name: str, from_block: int = 0) -> list[dict]:
        """Decoded logs of one court event (TermsPublished, BreachCompensated, NoResponseDisputeOpened,
        DisputeAnswered, DisputeFinalized)."""
        return [dict(e["args"]) for e in getattr(self.contract.events, name)().get_logs(from_block=from_block)]
