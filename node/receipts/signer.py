"""Proof of Response on the node: the receipt the node signs for every answer, from what the HTTP layer measured."""

from __future__ import annotations

import os
from dataclasses import dataclass

from eth_account.signers.local import LocalAccount

from dcml.client.wire.receipts import ZERO32, Receipt, ReceiptDomain, SignedReceipt, hex32, sign_receipt


def new_receipt_id() -> str:
    """Random 32 bytes chosen by the node: never derived from anything the client controls."""
    return hex32(os.urandom(32))


@dataclass(frozen=True)
class Measurement:
    """What the HTTP layer measured about one answer."""

    request_hash: str
    response_hash: str
    input_tokens: int
    output_tokens: int
    accepted_at: float  # unix seconds
    ttft_s: float
    duration_s: float
    channel_id: str = ZERO32
    cost: int = 0
    cumulative_spent: int = 0


def _ms(seconds: float) -> int:
    return min(max(round(seconds * 1000), 0), 2**32 - 1)


@dataclass(frozen=True)
class ReceiptSigner:
    account: LocalAccount
    domain: ReceiptDomain
    model_id: str

    def sign(self, receipt_id: str, m: Measurement) -> SignedReceipt:
        receipt = Receipt(
            receipt_id=receipt_id, request_hash=m.request_hash, response_hash=m.response_hash,
            channel_id=m.channel_id, model_id=self.model_id, input_tokens=m.input_tokens,
            output_tokens=m.output_tokens, cost=m.cost, cumulative_spent=m.cumulative_spent,
            accepted_at=int(m.accepted_at), ttft_ms=_ms(m.ttft_s), duration_ms=_ms(m.duration_s),
        )
        return sign_receipt(receipt, self.account, self.domain)
