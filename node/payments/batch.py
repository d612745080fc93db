"""x402's own `batch-settlement` EVM scheme, offered beside `channel` so a stock x402 client pays with no code of ours.

The SDK's facilitator part (`BatchSettlementEvmFacilitator`, run in-process with the node's payee key) verifies
payloads (channel config against our offer, voucher signature, on-chain balance, ERC-3009 deposit authorization and
a simulated deposit) and submits the on-chain calls (deposit, `claimWithSignature`, `settle`). What it does not do,
and this module does: meter a request (the SDK's server part prices a request up front; ours is charged per token,
into the same group-committed ledger rules as `channel`, in a ledger of its own so the `channel` settler never sees
these channels), and pay the model publisher's royalty.

Accounting (ARCHITECTURE.md "x402 envelopes"; README "Paying with x402's batch-settlement"):
- `accepts[].amount` is the request's worst case (prompt + all of `max_tokens`): a batch-settlement client cannot
  sign mid-stream, so nothing runs on credit. The client signs `maxClaimableAmount = its cumulative + amount`.
- The ledger's `accepted` is the highest voucher ceiling, `spent` what was served (the signed receipts' costs).
- `PAYMENT-RESPONSE` reports, as the SDK client's bookkeeping expects, `chargedAmount = amount` and
  `chargedCumulativeAmount` = the voucher's ceiling: the reservation. The cost is in the signed receipt, and the node
  claims only `spent`, never a ceiling.
- Royalty: the channel pays the node alone; after each claim the node forwards the model's `publisherBps` share of
  what it claimed to the publisher (an ERC-20 transfer, on-chain, recorded here and in the claim's result).
"""

from __future__ import annotations

import json
import logging
import sqlite3
import threading
from dataclasses import dataclass
from pathlib import Path

from eth_account.messages import encode_typed_data
from eth_account.signers.local import LocalAccount
from eth_utils import keccak
from web3 import Web3
from x402.mechanisms.evm.batch_settlement.authorizer_signer import LocalAuthorizerSigner
from x402.mechanisms.evm.batch_settlement.constants import (
    BATCH_SETTLEMENT_ADDRESS,
    MIN_WITHDRAW_DELAY,
    SCHEME_BATCH_SETTLEMENT,
    VOUCHER_TYPES,
)
from x402.mechanisms.evm.batch_settlement.facilitator.scheme import BatchSettlementEvmFacilitator
from x402.mechanisms.evm.batch_settlement.facilitator.utils import read_channel_state
from x402.mechanisms.evm.batch_settlement.types import (
    ChannelConfig,
    ClaimPayload,
    SettlePayload,
    VoucherClaim,
    is_deposit_payload,
    is_voucher_payload,
)
from x402.mechanisms.evm.batch_settlement.utils import coerce_bytes32, get_batch_settlement_eip712_domain
from x402.mechanisms.evm.signers import FacilitatorWeb3Signer
from x402.schemas import PaymentPayload, PaymentRequirements, SettleResponse

from dcml.client.chain.contracts import contract
from dcml.client.wire.errors import PaymentError
from dcml.node.payments.ledger import Ledger

log = logging.getLogger("dcml.batch_settlement")

SCHEME_BATCH = SCHEME_BATCH_SETTLEMENT


class BatchRejected(PaymentError):
    """A batch-settlement payment the node refuses (402 with the SDK's reason code)."""

    def __init__(self, reason: str, message: str = "") -> None:
        super().__init__(message or reason, reason=reason)


@dataclass(frozen=True)
class BatchVoucher:
    """A verified (and, for a deposit, deposited) batch-settlement voucher."""

    channel_id: str
    max_claimable: int
    signature: str
    payer: str
    config: ChannelConfig
    deposit_tx: str = ""


@dataclass(frozen=True)
class ClaimResult:
    channel_id: str
    claimed: int  # what this claim added on-chain
    total_claimed: int
    publisher: str
    publisher_share: int  # forwarded to the publisher for this claim
    claim_tx: str
    settle_tx: str
    royalty_tx: str


class BatchSettlement:
    """The node's batch-settlement side: offer, verification, metering ledger, claims and royalty forwarding."""

    def __init__(self, w3: Web3, *, chain_id: int, token: str, payee: LocalAccount, rpc_url: str, data_dir: Path,
                 model_registry: str, max_timeout_s: int, withdraw_delay: int = MIN_WITHDRAW_DELAY) -> None:
        self.w3 = w3
        self.network = f"eip155:{chain_id}"
        self.token = Web3.to_checksum_address(token)
        self.payee = payee
        self.model_registry = model_registry
        self.max_timeout_s = max_timeout_s
        self.withdraw_delay = withdraw_delay
        self.erc20 = contract(w3, "TestToken", self.token)
        self.token_name = self.erc20.functions.name().call()  # the token's EIP-712 domain (ERC-3009)
        key = "0x" + payee.key.hex().removeprefix("0x")
        self.signer = FacilitatorWeb3Signer(key, rpc_url)
        self.facilitator = BatchSettlementEvmFacilitator(self.signer, LocalAuthorizerSigner(payee))
        self.ledger = Ledger(data_dir / "batch-ledger.sqlite")
        self._db = sqlite3.connect(data_dir / "batch-channels.sqlite", check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.execute("CREATE TABLE IF NOT EXISTS channels (id TEXT PRIMARY KEY, config TEXT NOT NULL, "
                         "model_id TEXT NOT NULL, forwarded TEXT NOT NULL DEFAULT '0', pending_tx TEXT, "
                         "pending_amount TEXT)")
        self._lock = threading.Lock()
        self._claiming = threading.Lock()

    @staticmethod
    def deployed(w3: Web3) -> bool:
        """Whether the batch-settlement contract has code on this chain."""
        return len(w3.eth.get_code(Web3.to_checksum_address(BATCH_SETTLEMENT_ADDRESS))) > 0

    # -- the offer -------------------------------------------------------------------------------

    def requirement(self, amount: int, channel_state: dict | None = None) -> PaymentRequirements:
        extra: dict = {"receiverAuthorizer": self.payee.address, "withdrawDelay": self.withdraw_delay,
                       "name": self.token_name, "version": "1", "assetTransferMethod": "eip3009"}
        if channel_state is not None:  # a corrective 402: lets the SDK client resync its cumulative
            extra["channelState"] = channel_state
        return PaymentRequirements(scheme=SCHEME_BATCH, network=self.network, asset=self.token, amount=str(amount),
                                   pay_to=self.payee.address, max_timeout_seconds=self.max_timeout_s, extra=extra)

    def channel_state(self, channel_id: str) -> dict:
        """The client-facing snapshot (the SDK's `ChannelStateExtra`); chargedCumulativeAmount = the ceiling."""
        state = read_channel_state(self.signer, channel_id)
        balance = self.ledger.get(channel_id)
        return {"channelId": channel_id, "balance": str(state.balance), "totalClaimed": str(state.total_claimed),
                "withdrawRequestedAt": state.withdraw_requested_at, "refundNonce": str(state.refund_nonce),
                "chargedCumulativeAmount": str(balance.accepted if balance else 0)}

    # -- verification ----------------------------------------------------------------------------

    def verify(self, payment: PaymentPayload, amount: int, model_id: str) -> BatchVoucher:
        """Verify with the SDK's facilitator; a deposit is submitted on-chain (the node pays the gas) before the
        voucher counts. Raises BatchRejected."""
        raw = payment.payload
        if not (is_deposit_payload(raw) or is_voucher_payload(raw)):
            raise BatchRejected("invalid_payload_type", "batch-settlement payload must be a deposit or a voucher")
        requirements = self.requirement(amount)
        result = self.facilitator.verify(payment, requirements)
        if not result.is_valid:
            raise BatchRejected(result.invalid_reason or "invalid_payment", result.invalid_message or "")
        if int((result.extra or {}).get("withdrawRequestedAt") or 0):  # the payer is leaving: the loop claims now
            raise BatchRejected("withdraw_pending", "the payer initiated a withdrawal from this channel; open a new "
                                "one (another salt) or let it finish")
        config = ChannelConfig.from_dict(raw["channelConfig"])
        voucher = raw["voucher"]
        channel_id = voucher["channelId"].lower()
        deposit_tx = ""
        if is_deposit_payload(raw):
            settled: SettleResponse = self.facilitator.settle(payment, requirements)
            if not settled.success:
                raise BatchRejected(settled.error_reason or "deposit_failed", settled.error_message or "")
            deposit_tx = settled.transaction
        self._remember(channel_id, config, model_id)
        return BatchVoucher(channel_id, int(voucher["maxClaimableAmount"]), voucher["signature"],
                            Web3.to_checksum_address(config.payer), config, deposit_tx)

    def voucher_digest(self, channel_id: str, max_claimable: int) -> str:
        """The voucher's EIP-712 digest (the contract's `getVoucherDigest`): the commitment identifier that
        `PAYMENT-RESPONSE.transaction` names, as for the channel scheme."""
        signable = encode_typed_data(domain_data=get_batch_settlement_eip712_domain(int(self.network[7:])),
                                     message_types=VOUCHER_TYPES,
                                     message_data={"channelId": coerce_bytes32(channel_id),
                                                   "maxClaimableAmount": max_claimable})
        return "0x" + keccak(b"\x19\x01" + signable.header + signable.body).hex()

    def _remember(self, channel_id: str, config: ChannelConfig, model_id: str) -> None:
        with self._lock:
            self._db.execute("INSERT OR IGNORE INTO channels (id, config, model_id) VALUES (?, ?, ?)",
                             (channel_id, json.dumps(config.to_dict()), model_id.lower()))

    def _channel(self, channel_id: str) -> tuple[ChannelConfig, str, int]:
        row = self._db.execute("SELECT config, model_id, forwarded FROM channels WHERE id = ?",
                               (channel_id,)).fetchone()
        return ChannelConfig.from_dict(json.loads(row[0])), row[1], int(row[2])

    # -- claims and royalty ----------------------------------------------------------------------

    def claim_once(self) -> list[ClaimResult]:
        """Claim every channel's served amount (`spent`) under its latest voucher, sweep it to the payee, and
        forward the publisher's share. Idempotent: the chain says what is claimed, the store what is forwarded."""
        results: list[ClaimResult] = []
        with self._claiming:
            for balance in self.ledger.open_channels():
                if balance.spent > balance.settled and balance.signature:
                    results.append(self._claim(balance.channel_id, balance.accepted, balance.signature,
                                               balance.spent))
        return results

    def _claim(self, channel_id: str, ceiling: int, signature: str, spent: int) -> ClaimResult:
        config, model_id, forwarded = self._channel(channel_id)
        requirements = self.requirement(0)
        before = read_channel_state(self.signer, channel_id).total_claimed
        claim_tx = settle_tx = ""
        if spent > before:
            claim = ClaimPayload(claims=[VoucherClaim(channel=config, max_claimable_amount=str(ceiling),
                                                      signature=signature, total_claimed=str(spent))])
            done = self.facilitator.settle(PaymentPayload(payload=claim.to_dict(), accepted=requirements),
                                           requirements)
            if not done.success:
                raise RuntimeError(f"claim failed: {done.error_reason} {done.error_message or ''}")
            claim_tx = done.transaction
        total = read_channel_state(self.signer, channel_id).total_claimed
        sweep = SettlePayload(receiver=self.payee.address, token=self.token)
        done = self.facilitator.settle(PaymentPayload(payload=sweep.to_dict(), accepted=requirements), requirements)
        if done.success:
            settle_tx = done.transaction
        self._resolve_pending(channel_id)  # a royalty transfer sent before a crash counts once
        forwarded = self._channel(channel_id)[2]
        registry = contract(self.w3, "ModelRegistry", self.model_registry)
        publisher, bps = registry.functions.terms(bytes.fromhex(model_id[2:])).call()
        owed = total * bps // 10_000 - forwarded
        royalty_tx = ""
        if owed > 0 and int(publisher, 16) != 0:
            royalty_tx = self._forward(channel_id, publisher, owed)
        # Last: a round cut short before here (sweep or royalty failed) is redone whole; each step is idempotent.
        self.ledger.set_settled(channel_id, total)
        log.info("batch_claimed", extra={"channel": channel_id, "claimed": total - before, "royalty": max(owed, 0)})
        return ClaimResult(channel_id, total - before, total, publisher, max(owed, 0), claim_tx, settle_tx, royalty_tx)

    def _forward(self, channel_id: str, publisher: str, amount: int) -> str:
        """Pays the publisher `amount`, exactly once across crashes: the signed transaction's hash is stored
        before it is sent, and a later round settles a stored one from the chain before sending anything new."""
        self._resolve_pending(channel_id)
        if self._db.execute("SELECT pending_tx FROM channels WHERE id = ?", (channel_id,)).fetchone()[0]:
            raise RuntimeError("a royalty transfer is still pending; the next round settles it")
        _, _, forwarded = self._channel(channel_id)
        fn = self.erc20.functions.transfer(Web3.to_checksum_address(publisher), amount)
        tx = fn.build_transaction({"from": self.payee.address, "chainId": self.w3.eth.chain_id,
                                   "nonce": self.w3.eth.get_transaction_count(self.payee.address, "pending"),
                                   "gas": fn.estimate_gas({"from": self.payee.address}) * 2})
        # eth-account's stubs type the dict narrower than web3's TxParams, which is that same dict
        signed = self.payee.sign_transaction(tx)  # type: ignore[arg-type]
        tx_hash = "0x" + bytes(signed.hash).hex().removeprefix("0x")
        with self._lock:
            self._db.execute("UPDATE channels SET pending_tx = ?, pending_amount = ? WHERE id = ?",
                             (tx_hash, str(amount), channel_id))
        self.w3.eth.send_raw_transaction(signed.raw_transaction)
        self._resolve_pending(channel_id, wait=True)
        if self._channel(channel_id)[2] != forwarded + amount:
            raise RuntimeError(f"royalty transfer {tx_hash} failed")
        return tx_hash

    def _resolve_pending(self, channel_id: str, *, wait: bool = False) -> None:
        row = self._db.execute("SELECT pending_tx, pending_amount, forwarded FROM channels WHERE id = ?",
                               (channel_id,)).fetchone()
        if row is None or not row[0]:
            return
        tx_hash, amount, forwarded = row[0], int(row[1]), int(row[2])
        try:
            receipt = (self.w3.eth.wait_for_transaction_receipt(tx_hash, timeout=60) if wait
                       else self.w3.eth.get_transaction_receipt(tx_hash))
        except Exception:  # not mined: still pending (left for a later round) or never sent (forgotten)
            try:
                self.w3.eth.get_transaction(tx_hash)
                return
            except Exception:
                receipt = None
        with self._lock:
            if receipt is not None and receipt["status"] == 1:
                self._db.execute("UPDATE channels SET forwarded = ?, pending_tx = NULL WHERE id = ?",
                                 (str(forwarded + amount), channel_id))
            else:
                self._db.execute("UPDATE channels SET pending_tx = NULL WHERE id = ?", (channel_id,))

    # -- the claim loop --------------------------------------------------------------------------

    def start(self, *, interval: float, threshold: int) -> None:
        """Claim in the background whenever a channel's unclaimed served amount reaches `threshold`."""
        self._stop = threading.Event()

        def loop() -> None:
            while not self._stop.wait(interval):
                try:
                    if any(self._due(b, threshold) for b in self.ledger.open_channels()):
                        self.claim_once()
                except Exception as exc:  # the chain may be briefly unreachable: try again next round
                    log.warning("batch_claim_failed", extra={"error": str(exc)[:200]})

        self._thread: threading.Thread | None = threading.Thread(target=loop, name="batch-claims", daemon=True)
        self._thread.start()

    def _due(self, balance, threshold: int) -> bool:
        """Claim past the threshold, and at once when the payer has initiated a withdrawal: after its delay the
        payer takes whatever is unclaimed (the node's whole exposure is that delay's worth of claims)."""
        if balance.spent <= balance.settled:
            return False
        return (balance.spent - balance.settled >= threshold
                or read_channel_state(self.signer, balance.channel_id).withdraw_requested_at != 0)

    def stop(self, *, flush: bool = True) -> None:
        """Stop the loop and (by default) claim whatever was served and not yet claimed."""
        thread = getattr(self, "_thread", None)
        if thread is not None:
            self._stop.set()
            thread.join()
            self._thread = None
        if flush:
            try:
                self.claim_once()
            except Exception as exc:  # left for the next start: the ledger keeps every voucher
                log.warning("batch_claim_failed", extra={"error": str(exc)[:200]})

    def close(self) -> None:
        self.ledger.close()
        self._db.close()



def parse_batch_payment(data: object) -> PaymentPayload | None:
    """The decoded `PAYMENT-SIGNATURE` JSON as a batch-settlement PaymentPayload, or None when it names another
    scheme. Raises ValueError (a 400) when it names batch-settlement but is not one."""
    if not isinstance(data, dict):
        return None
    accepted = data.get("accepted")
    if not isinstance(accepted, dict) or accepted.get("scheme") != SCHEME_BATCH:
        return None
    try:
        payment = PaymentPayload.model_validate(data)
    except ValueError as exc:
        raise ValueError(f"not a batch-settlement PaymentPayload: {str(exc).splitlines()[0]}") from None
    if payment.x402_version != 2:
        raise ValueError("x402Version must be 2")
    raw = payment.payload
    if not (is_deposit_payload(raw) or is_voucher_payload(raw)):
        raise ValueError("batch-settlement payload must be a deposit or a voucher")
    try:
        ChannelConfig.from_dict(raw["channelConfig"])
        int(str(raw["voucher"]["maxClaimableAmount"]))
        str(raw["voucher"]["channelId"]), str(raw["voucher"]["signature"])
    except (KeyError, TypeError, ValueError) as exc:
        raise ValueError(f"batch-settlement payload is malformed: {exc!r}"[:200]) from None
    return payment
