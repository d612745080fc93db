"""What a paid request is to the SDK: the `Exchange` a transport fills in as the answer arrives, the `Payer`
that makes its money decisions (`client.sdk.payer`), and the errors a paying transport raises."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Protocol

import httpx

from dcml.client.wire.errors import ErrorType, PaymentError, PaymentReason
from dcml.client.wire.receipts import SignedReceipt
from dcml.client.wire.voucher import Voucher
from dcml.client.wire.x402 import NeedVoucher, PaymentRequired

PAID_PATHS = ("/v1/chat/completions", "/v1/completions")
EXCHANGE_EXTENSION = "dcml.exchange"  # response.extensions key holding the `Exchange`


class PaymentRejected(PaymentError):
    """The node refused a voucher; `code` is its stable reason (e.g. `exceeds_deposit`, `bad_signature`)."""

    reason_in_str = True

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message, reason=code)
        self.code = code


class PaymentTimeout(PaymentError):
    """The node paused the stream for a voucher and ended it because none arrived in time."""

    reason = PaymentReason.PAYMENT_TIMEOUT


class SealedResponseError(PaymentError):
    """A sealed request's answer came unsealed or does not open: altered in transit, or not from the enclave."""

    reason = PaymentReason.SEALED_RESPONSE_INVALID


class ReceiptViolation(PaymentError):
    """A receipt or acceptance failed verification (recorded in the spend store); `reason` says which check."""

    error_type = ErrorType.RECEIPT
    reason_in_str = True

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message, reason=reason)


@dataclass
class Exchange:
    """One paid request as the payer saw it; filled in as the response arrives."""

    request_body: bytes
    model: str
    channel_id: str | None = None
    accepted: int | None = None  # PAYMENT-RESPONSE at admission
    spent_at_admission: int | None = None
    receipt: SignedReceipt | None = None
    vouchers: list[Voucher] = field(default_factory=list)  # signed during this exchange
    finished: bool = False
    started_at: float = field(default_factory=time.time)  # our clock when the request was sent
    request_hash: str | None = None  # set once the node's acceptance of it verified
    sealed: bool = False  # the request went sealed end to end and its answer opened
    offered: str | None = None  # the channel a voucher was sent on, until the node admits (or refuses) the request
    alone_epoch: int | None = None  # the payer's mark that no other request shared the channel since admission

    @property
    def cost(self) -> int:
        return self.receipt.receipt.cost if self.receipt else 0


class Payer(Protocol):
    """What a paying transport needs from its owner. Every method may block (chain, SQLite, HTTP)."""

    def prepare(self, model: str, exchange: Exchange) -> Voucher | None:
        """Attest the node if not yet done; the current voucher of the channel for `model`, if any."""

    def on_payment_required(self, required: PaymentRequired, exchange: Exchange, sent: Voucher | None) -> Voucher:
        """A 402: return the voucher to retry with (opening or topping up a channel as needed)."""

    def seal_key(self) -> bytes | None:
        """The attested node's HPKE public key to seal requests to, or None to send them in clear."""

    def on_admitted(self, headers: httpx.Headers, exchange: Exchange) -> None:
        """Check the acceptance and PAYMENT-RESPONSE of an admitted request (raise ReceiptViolation)."""

    def on_need_voucher(self, need: NeedVoucher, exchange: Exchange) -> Voucher:
        """Mid-stream request for more money: the voucher to post."""

    def on_receipt(self, exchange: Exchange, signed: SignedReceipt | None, *, response_bytes: bytes | None = None,
                   sse_payloads: list[bytes] | None = None) -> Voucher | None:
        """Verify and record; raise ReceiptViolation. Returns a voucher that pays any credit used, to post."""

    def on_aborted(self, exchange: Exchange) -> None:
        """The response ended before its receipt (consumer closed it or the connection broke), or the request
        was never admitted."""
