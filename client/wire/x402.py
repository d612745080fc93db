"""Paying over HTTP: the exact x402 v2 envelopes with a `channel` scheme, as both sides read and write them.

The exchange (ARCHITECTURE.md, "Paying over HTTP" and "x402 envelopes"; the scheme's specification is
`client/wire/x402-scheme-channel-evm.md`):

1. An unpaid request gets `402` and a `PAYMENT-REQUIRED` header: base64 of a v2 `PaymentRequired` whose
   `accepts[0]` (`scheme: "channel"`) names the chain, token, payee and `amount` (atomic units, decimal
   string: what admitting this request needs now), and under `extra` the escrow, model id, prices per input
   and output token, `prepay`, `creditWindow` and, when the client named a short channel, `channelId` and
   `requiredCumulative` (the cumulative voucher that would admit the request).
2. The client retries with `PAYMENT-SIGNATURE`: base64 of a v2 `PaymentPayload` (`accepted` = the chosen
   requirement, `payload` = the voucher `{channelId, cumulativeAmount, signature}`). For one release the
   node also takes the old bare voucher as the whole header. Malformed input gets 400 with the reason; a
   payment that does not cover the request gets 402.
3. Every admitted response carries `PAYMENT-RESPONSE` (base64 v2 `SettlementResponse`: `success`,
   `transaction` = the EIP-712 digest of the channel's accepted voucher, `network`, `payer`, `amount` = what
   this request was charged, and under `extensions.channel` the channel's figures) and
   `X-DCML-Acceptance`. A non-streamed answer's header carries the request's final figures; a stream's
   header goes out before the answer, so it carries the admission figures and the receipt the final ones.
4. While streaming, before output would pass `accepted + creditWindow`, the node sends
   `event: payment-need-voucher` with `NeedVoucher` JSON and waits; the client posts a voucher for at
   least `requiredCumulative` to `POST /v1/payments/vouchers`, and the stream resumes. If none comes in
   time the stream ends with `event: payment-timeout` (then the receipt for what was served).

All amounts are decimal strings (uint128 wei; JSON numbers lose precision past 2**53); bytes are 0x hex.
"""

from __future__ import annotations

import base64
import binascii
from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, PlainSerializer, ValidationError, field_serializer

from dcml.client.wire import safejson
from dcml.client.wire.errors import PaymentError, PaymentReason
from dcml.client.wire.voucher import MalformedVoucher, Voucher, is_decimal

PAYMENT_REQUIRED = "PAYMENT-REQUIRED"
PAYMENT_SIGNATURE = "PAYMENT-SIGNATURE"
PAYMENT_RESPONSE = "PAYMENT-RESPONSE"
ACCEPTANCE_HEADER = "X-DCML-Acceptance"
NEED_VOUCHER_EVENT = "payment-need-voucher"
PAYMENT_TIMEOUT_EVENT = "payment-timeout"
VOUCHERS_PATH = "/v1/payments/vouchers"
SCHEME: Literal["channel"] = "channel"
X402_VERSION = 2
MAX_HEADER_BYTES = 8192  # a PaymentPayload is ~1 KiB; anything far larger is refused before decoding


class MalformedPayment(PaymentError, ValueError):
    """`PAYMENT-SIGNATURE` is not a PaymentPayload (nor an old-shape voucher): answered 400 with this reason."""

    reason = PaymentReason.MALFORMED_PAYMENT


def _uint(v: object) -> int:
    """A uint from the wire: a decimal string (the wire form) or, for one release, a JSON integer."""
    if isinstance(v, bool) or not isinstance(v, int | str):
        raise ValueError("must be a decimal string")
    if isinstance(v, str):
        if not is_decimal(v):
            raise ValueError("must be a decimal integer string (ASCII digits 0-9)")
        v = int(v)
    if v < 0:
        raise ValueError("must not be negative")
    return v


# A uint on the wire: written as a decimal string, read from a decimal string or (one release) a JSON integer.
Uint = Annotated[int, BeforeValidator(_uint), PlainSerializer(str, return_type=str)]


class _Wire(BaseModel):
    model_config = ConfigDict(populate_by_name=True, frozen=True)

    def to_json(self) -> dict[str, Any]:
        return self.model_dump(mode="json", by_alias=True, exclude_none=True)

    def to_header(self) -> str:
        return base64.b64encode(self.model_dump_json(by_alias=True, exclude_none=True).encode()).decode()

    @classmethod
    def from_header(cls, value: str):
        if len(value) > MAX_HEADER_BYTES * 2:  # a PAYMENT-REQUIRED/RESPONSE header; bounded before decoding
            raise ValueError(f"x402 header is {len(value)} characters; at most {MAX_HEADER_BYTES * 2} are read")
        raw = base64.b64decode(value, validate=True)
        return cls.model_validate(safejson.loads(raw, max_bytes=MAX_HEADER_BYTES * 2))


class ChannelTerms(_Wire):
    """`accepts[i].extra` for the channel scheme."""

    escrow: str
    model_id: str = Field(alias="modelId")
    price_per_input_token: Uint = Field(alias="pricePerInputToken")
    price_per_output_token: Uint = Field(alias="pricePerOutputToken")
    prepay: Uint
    credit_window: Uint = Field(alias="creditWindow")
    voucher_timeout_s: float = Field(alias="voucherTimeoutSeconds")
    # Set when the client named a channel that is short: that channel and the cumulative amount admitting it.
    channel_id: str | None = Field(alias="channelId", default=None)
    required_cumulative: Uint | None = Field(alias="requiredCumulative", default=None)

    def cost(self, input_tokens: int, output_tokens: int) -> int:
        return input_tokens * self.price_per_input_token + output_tokens * self.price_per_output_token


class PaymentRequirement(_Wire):
    """x402 v2 `PaymentRequirements` for the channel scheme."""

    scheme: Literal["channel"] = SCHEME
    network: str  # "eip155:<chainId>"
    amount: Uint  # atomic units: what admitting this request needs now
    asset: str  # token address; the zero address is native ETH
    pay_to: str = Field(alias="payTo")  # the node's payee address: channels must pay it
    max_timeout_seconds: int = Field(alias="maxTimeoutSeconds", default=300)
    extra: ChannelTerms

    @property
    def chain_id(self) -> int:
        return int(self.network.removeprefix("eip155:"))

    def matches(self, other: PaymentRequirement) -> bool:
        """Whether `other` (a client's `accepted`) names this offer: same scheme, chain, token, payee,
        escrow and model. The amount and prices may differ (the client may pay more; prices are re-read)."""
        a, b = self, other
        return (a.scheme == b.scheme and a.network == b.network and a.asset.lower() == b.asset.lower()
                and a.pay_to.lower() == b.pay_to.lower() and a.extra.escrow.lower() == b.extra.escrow.lower()
                and a.extra.model_id.lower() == b.extra.model_id.lower())


class OtherRequirement(_Wire):
    """An offer of another scheme (e.g. x402's `batch-settlement`): kept as it came, never paid by this package."""

    scheme: str
    network: str
    amount: str
    asset: str
    pay_to: str = Field(alias="payTo")
    max_timeout_seconds: int = Field(alias="maxTimeoutSeconds")
    extra: dict[str, Any] = Field(default_factory=dict)


class ResourceInfo(_Wire):
    url: str
    description: str | None = None
    mime_type: str | None = Field(alias="mimeType", default=None)


class PaymentRequired(_Wire):
    x402_version: int = Field(alias="x402Version", default=X402_VERSION)
    error: str | None = None  # why this 402: "payment_required", "insufficient_funds", a voucher rejection code
    resource: ResourceInfo | None = None
    accepts: list[PaymentRequirement | OtherRequirement]
    extensions: dict[str, Any] | None = None
    # Not on the wire: the human-readable reason travels in the JSON error body beside the header.
    message: str | None = Field(default=None, exclude=True)

    @property
    def required_cumulative(self) -> int | None:
        ours = next((r for r in self.accepts if isinstance(r, PaymentRequirement)), None)
        return None if ours is None else ours.extra.required_cumulative


class PaymentPayload(_Wire):
    """x402 v2 `PaymentPayload` for the channel scheme: `payload` is the voucher."""

    x402_version: int = Field(alias="x402Version", default=X402_VERSION)
    accepted: PaymentRequirement
    payload: Voucher
    resource: ResourceInfo | None = None
    extensions: dict[str, Any] | None = None

    @field_serializer("payload")
    def _voucher(self, v: Voucher) -> dict[str, str]:
        return v.to_wire()


def parse_payment(value: str) -> tuple[Voucher, PaymentRequirement | None]:
    """The voucher in a `PAYMENT-SIGNATURE` header and the requirement it says it accepts (None for an
    old-shape bare voucher, taken for one release). Raises MalformedPayment with the reason."""
    if len(value) > MAX_HEADER_BYTES:
        raise MalformedPayment(f"{PAYMENT_SIGNATURE} is {len(value)} bytes; at most {MAX_HEADER_BYTES}")
    try:
        data = safejson.loads(base64.b64decode(value, validate=True), max_bytes=MAX_HEADER_BYTES)
    except (ValueError, binascii.Error, RecursionError) as exc:
        raise MalformedPayment(f"{PAYMENT_SIGNATURE} is not base64-encoded JSON") from exc
    if not isinstance(data, dict):
        raise MalformedPayment(f"{PAYMENT_SIGNATURE} must be a JSON object (an x402 PaymentPayload)")
    try:
        if "x402Version" not in data and "channelId" in data:  # the old shape: a bare voucher
            return Voucher.model_validate(data), None
        if data.get("x402Version") != X402_VERSION:
            raise MalformedPayment(f"x402Version must be {X402_VERSION}, got {data.get('x402Version')!r}")
        accepted = data.get("accepted")
        if isinstance(accepted, dict) and accepted.get("scheme") != SCHEME:
            raise MalformedPayment(f"accepted.scheme {accepted.get('scheme')!r} is not offered; this node "
                                   f"takes '{SCHEME}'")
        payload = PaymentPayload.model_validate(data)
    except (ValidationError, MalformedVoucher) as exc:
        raise MalformedPayment(f"{PAYMENT_SIGNATURE} is not a channel PaymentPayload: {_first_error(exc)}") from None
    return payload.payload, payload.accepted


def _first_error(exc: Exception) -> str:
    if isinstance(exc, ValidationError):
        err = exc.errors(include_url=False)[0]
        return f"{'.'.join(str(p) for p in err['loc'])}: {err['msg']}"
    return str(exc)


class ChannelFigures(_Wire):
    """`SettlementResponse.extensions.channel`: the channel's cumulative figures after this request."""

    channel_id: str = Field(alias="channelId")
    accepted: Uint
    spent: Uint
    cost: Uint  # what this request was charged (final on a non-streamed answer)


class SettlementResponse(_Wire):
    """x402 v2 `SettlementResponse` (the `PAYMENT-RESPONSE` header)."""

    success: bool = True
    transaction: str  # the EIP-712 digest of the channel's highest accepted voucher (a commitment, not a tx)
    network: str
    payer: str | None = None
    amount: str | None = None  # this request's charge, decimal
    error_reason: str | None = Field(alias="errorReason", default=None)
    extensions: dict[str, Any] | None = None

    @property
    def figures(self) -> ChannelFigures:
        return ChannelFigures.model_validate((self.extensions or {})[SCHEME])

    # The figures as the old `PaymentResponse` named them (client code reads these).
    @property
    def channel_id(self) -> str:
        return self.figures.channel_id

    @property
    def accepted(self) -> int:
        return self.figures.accepted

    @property
    def spent(self) -> int:
        return self.figures.spent


PaymentResponse = SettlementResponse  # the pre-v2 name, for one release


class NeedVoucher(_Wire):
    channel_id: str = Field(alias="channelId")
    required_cumulative: Uint = Field(alias="requiredCumulative")
    spent: Uint
