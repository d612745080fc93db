"""Paying over HTTP: the x402 v2 shapes with a `channel` scheme, as both sides read and write them.

The exchange (ARCHITECTURE.md, "Paying over HTTP"):

1. An unpaid request gets `402` and a `PAYMENT-REQUIRED` header: base64 of `PaymentRequired` JSON,
   whose `accepts[0]` names the escrow, chain, token, payee, model id, prices per input and output
   token, `prepay` (wei the channel must hold beyond the prompt's cost to be admitted) and
   `creditWindow` (wei of output the node serves beyond what is paid before it pauses).
2. The client retries with `PAYMENT-SIGNATURE`: base64 of a voucher (`client.voucher.Voucher.to_header`).
   A voucher equal to the one the node already holds is fine (it names the channel); a lower one is
   refused.
3. Every admitted response carries `PAYMENT-RESPONSE` (base64 `PaymentResponse`: accepted and spent
   cumulative amounts at admission) and `X-DCML-Acceptance` (base64 signed acceptance of the request).
4. While streaming, before output would pass `accepted + creditWindow`, the node sends
   `event: payment-need-voucher` with `NeedVoucher` JSON and waits; the client posts a voucher for at
   least `requiredCumulative` to `POST /v1/payments/vouchers`, and the stream resumes. If none comes in
   time the stream ends with `event: payment-timeout` (then the receipt for what was served).

All amounts are decimal strings: they are uint128 wei and JSON numbers lose precision past 2**53.
"""

from __future__ import annotations

import base64
import json
from typing import Annotated

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, field_serializer

from client.voucher import is_decimal


def _amount(v: object) -> object:
    """An amount is a non-negative integer or a string of ASCII digits (no sign, space, '_' or other script)."""
    ok = (isinstance(v, int) and not isinstance(v, bool) and v >= 0) or (isinstance(v, str) and is_decimal(v))
    if not ok:
        raise ValueError("an amount must be a non-negative integer or a string of ASCII digits 0-9")
    return int(v)


Amount = Annotated[int, BeforeValidator(_amount)]

PAYMENT_REQUIRED = "PAYMENT-REQUIRED"
PAYMENT_SIGNATURE = "PAYMENT-SIGNATURE"
PAYMENT_RESPONSE = "PAYMENT-RESPONSE"
ACCEPTANCE_HEADER = "X-DCML-Acceptance"
NEED_VOUCHER_EVENT = "payment-need-voucher"
PAYMENT_TIMEOUT_EVENT = "payment-timeout"
VOUCHERS_PATH = "/v1/payments/vouchers"
SCHEME = "channel"


class _Wire(BaseModel):
    model_config = ConfigDict(populate_by_name=True, frozen=True)

    def to_header(self) -> str:
        return base64.b64encode(self.model_dump_json(by_alias=True).encode()).decode()

    @classmethod
    def from_header(cls, value: str):
        return cls.model_validate(json.loads(base64.b64decode(value, validate=True)))


class ChannelTerms(_Wire):
    """`accepts[i].extra` for the channel scheme."""

    escrow: str
    model_id: str = Field(alias="modelId")
    price_per_input_token: Amount = Field(alias="pricePerInputToken")
    price_per_output_token: Amount = Field(alias="pricePerOutputToken")
    prepay: Amount
    credit_window: Amount = Field(alias="creditWindow")
    voucher_timeout_s: float = Field(alias="voucherTimeoutSeconds")

    @field_serializer("price_per_input_token", "price_per_output_token", "prepay", "credit_window")
    def _as_decimal(self, v: int) -> str:
        return str(v)

    def cost(self, input_tokens: int, output_tokens: int) -> int:
        return input_tokens * self.price_per_input_token + output_tokens * self.price_per_output_token


class PaymentRequirement(_Wire):
    scheme: str = SCHEME
    network: str  # "eip155:<chainId>"
    asset: str  # token address; the zero address is native ETH
    pay_to: str = Field(alias="payTo")  # the node's payee address: channels must pay it
    max_timeout_seconds: int = Field(alias="maxTimeoutSeconds", default=300)
    extra: ChannelTerms

    @property
    def chain_id(self) -> int:
        return int(self.network.removeprefix("eip155:"))


class PaymentRequired(_Wire):
    x402_version: int = Field(alias="x402Version", default=2)
    error: str | None = None  # why this 402: "payment_required", "insufficient_funds", a voucher rejection code
    message: str | None = None
    accepts: list[PaymentRequirement]
    # When the client named a channel that is short: the cumulative amount that would admit the request.
    required_cumulative: Amount | None = Field(alias="requiredCumulative", default=None)

    @field_serializer("required_cumulative")
    def _as_decimal(self, v: int | None) -> str | None:
        return None if v is None else str(v)


class PaymentResponse(_Wire):
    channel_id: str = Field(alias="channelId")
    accepted: Amount
    spent: Amount

    @field_serializer("accepted", "spent")
    def _as_decimal(self, v: int) -> str:
        return str(v)


class NeedVoucher(_Wire):
    channel_id: str = Field(alias="channelId")
    required_cumulative: Amount = Field(alias="requiredCumulative")
    spent: Amount

    @field_serializer("required_cumulative", "spent")
    def _as_decimal(self, v: int) -> str:
        return str(v)
