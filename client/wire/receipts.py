"""Proof of Response wire format: the EIP-712 `Receipt` and `Acceptance` a node signs, and their checks.

Both sides use these definitions; nothing here knows about the node. All hashes are sha256 and are
recomputed by the client from the bytes it actually sent and received:

* ``requestHash`` = sha256 of the exact HTTP request body the enclave processed. For an end-to-end
  sealed request (`client.e2e`) that is the *decrypted* inner body, i.e. what the client sealed.
* ``responseHash``, non-streamed = sha256 of the exact response body bytes delivered (for a sealed
  response: the plaintext the client opens, before sealing).
* ``responseHash``, streamed = sha256 over the ordered SSE ``data:`` payloads of the stream, each
  payload's bytes (UTF-8, without the ``data: `` prefix and without the blank-line terminator)
  followed by a single ``b"\\n"``; the closing ``[DONE]`` payload **is** included (so a truncated
  stream never matches). Only unnamed events (the answer itself) count: named control events
  (``dcml-receipt``, and the payment events ``payment-need-voucher`` / ``payment-timeout``) do **not**.
  For a sealed stream the payloads are the opened plaintexts. See `stream_response_hash`.

The signing domain is ``{name: "dcml-receipts", version: "1", chainId, verifyingContract}``: the SLA court
(`contracts/src/SLACourt.sol`) of the deployment, which verifies the same types on-chain. A node that has
no court deployment (payments and registry off) signs with chainId 31337 and the zero address
(`DEFAULT_DOMAIN`); clients verify against the domain of the deployment they pay through.

On the wire a receipt travels as `SignedReceipt` JSON: in the ``X-DCML-Receipt`` header (base64 of
that JSON, non-streamed), as the ``event: dcml-receipt`` SSE event after ``data: [DONE]`` (streamed;
the official OpenAI SDK stops at ``[DONE]`` and never sees it), and at ``GET /v1/receipts/{id}``.
"""

from __future__ import annotations

import base64
import hashlib
from collections.abc import Iterable
from dataclasses import dataclass
from functools import cached_property

from eth_account.messages import SignableMessage
from eth_account.signers.local import LocalAccount
from eth_utils import to_checksum_address
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_serializer, field_validator

from dcml.client.wire import eip712, sse
from dcml.client.wire.errors import DcmlError, ErrorType, ReceiptReason
from dcml.client.wire.hexutil import ZERO32, ZERO_ADDRESS, check_hex32, hex32
from dcml.client.wire.keccak import keccak

DOMAIN_NAME = "dcml-receipts"
DOMAIN_VERSION = "1"
RECEIPT_HEADER = "X-DCML-Receipt"
RECEIPT_ID_HEADER = "X-DCML-Receipt-Id"
RECEIPT_EVENT = "dcml-receipt"
DONE_PAYLOAD = b"[DONE]"

# Defined once; SLACourt hashes exactly these strings (test_sla_court checks the digests).
RECEIPT = eip712.struct("Receipt", [
    ("receiptId", "bytes32"), ("requestHash", "bytes32"), ("responseHash", "bytes32"), ("channelId", "bytes32"),
    ("modelId", "bytes32"), ("inputTokens", "uint32"), ("outputTokens", "uint32"), ("cost", "uint128"),
    ("cumulativeSpent", "uint128"), ("acceptedAt", "uint64"), ("ttftMs", "uint32"), ("durationMs", "uint32"),
])
ACCEPTANCE = eip712.struct("Acceptance", [
    ("requestHash", "bytes32"), ("channelId", "bytes32"), ("acceptedAt", "uint64"), ("deadline", "uint64"),
])
RECEIPT_FIELDS = RECEIPT.types()
ACCEPTANCE_FIELDS = ACCEPTANCE.types()
RECEIPT_TYPEHASH = RECEIPT.typehash
ACCEPTANCE_TYPEHASH = ACCEPTANCE.typehash


class ReceiptError(DcmlError):
    """A receipt (or acceptance) that must not be trusted; `reason` says which check failed."""

    error_type = ErrorType.RECEIPT
    reason_in_str = True
    reason: ReceiptReason

    def __init__(self, reason: ReceiptReason, message: str) -> None:
        super().__init__(message, reason=reason)


@dataclass(frozen=True)
class ReceiptDomain:
    """Where a receipt is meant to be judged: the SLA contract on one chain."""

    chain_id: int = 31337
    verifying_contract: str = ZERO_ADDRESS

    @cached_property
    def eip712_domain(self) -> eip712.Domain:
        return eip712.Domain(DOMAIN_NAME, DOMAIN_VERSION, self.chain_id, to_checksum_address(self.verifying_contract))

    def as_eip712(self) -> dict:
        return self.eip712_domain.as_dict()


DEFAULT_DOMAIN = ReceiptDomain()


@dataclass(frozen=True)
class Price:
    """Price per token in the channel's smallest unit; cost = input × input price + output × output price."""

    per_input_token: int
    per_output_token: int

    def cost(self, input_tokens: int, output_tokens: int) -> int:
        return input_tokens * self.per_input_token + output_tokens * self.per_output_token


def _uint_in(v: object) -> object:
    """uints arrive as decimal strings (the wire form) or, for one release, JSON integers."""
    if isinstance(v, bool | float) or (isinstance(v, str) and not (v.isascii() and v.isdigit())):
        raise ValueError("must be a decimal integer string")
    return v


class _Typed(BaseModel):
    """An EIP-712 struct. In JSON every uint is a decimal string (JSON numbers lose precision past 2**53 in
    JavaScript) and every bytes32 is 0x hex; decimal strings and integers are both read, for one release."""

    model_config = ConfigDict(frozen=True, populate_by_name=True, extra="forbid")

    @field_validator("*", mode="before")
    @classmethod
    def _uints(cls, v: object, info) -> object:
        return _uint_in(v) if cls.model_fields[info.field_name].annotation in (int, "int") else v

    @field_serializer("*", when_used="json")
    def _uints_as_decimal(self, v: object) -> object:
        return str(v) if isinstance(v, int) and not isinstance(v, bool) else v

    def eip712_message(self) -> dict:
        return {k: (bytes.fromhex(v[2:]) if isinstance(v, str) else v)
                for k, v in self.model_dump(by_alias=True).items()}


class Receipt(_Typed):
    """The signed facts about one answered request (field names follow the EIP-712 struct)."""

    receipt_id: str = Field(alias="receiptId")
    request_hash: str = Field(alias="requestHash")
    response_hash: str = Field(alias="responseHash")
    channel_id: str = Field(ZERO32, alias="channelId")
    model_id: str = Field(alias="modelId")
    input_tokens: int = Field(alias="inputTokens", ge=0, lt=2**32)
    output_tokens: int = Field(alias="outputTokens", ge=0, lt=2**32)
    cost: int = Field(0, ge=0, lt=2**128)
    cumulative_spent: int = Field(0, alias="cumulativeSpent", ge=0, lt=2**128)
    accepted_at: int = Field(alias="acceptedAt", ge=0, lt=2**64)
    ttft_ms: int = Field(alias="ttftMs", ge=0, lt=2**32)
    duration_ms: int = Field(alias="durationMs", ge=0, lt=2**32)

    @field_validator("receipt_id", "request_hash", "response_hash", "channel_id", "model_id")
    @classmethod
    def _hex32(cls, v: str, info) -> str:
        return check_hex32(v, info.field_name)


class Acceptance(_Typed):
    """The node's promise, when it admits a paid request at `acceptedAt`, to answer it before `deadline`
    (unix seconds). `acceptedAt` picks the SLA terms in force for the request, as a receipt's does."""

    request_hash: str = Field(alias="requestHash")
    channel_id: str = Field(alias="channelId")
    accepted_at: int = Field(alias="acceptedAt", ge=0, lt=2**64)
    deadline: int = Field(ge=0, lt=2**64)

    @field_validator("request_hash", "channel_id")
    @classmethod
    def _hex32(cls, v: str, info) -> str:
        return check_hex32(v, info.field_name)


class SignedReceipt(BaseModel):
    """A receipt as it travels: the struct, the 65-byte signature and the signer's address."""

    model_config = ConfigDict(frozen=True)

    receipt: Receipt
    signature: str
    signer: str

    def to_header(self) -> str:
        return base64.b64encode(self.model_dump_json(by_alias=True).encode()).decode()

    @classmethod
    def from_header(cls, value: str) -> SignedReceipt:
        try:
            return cls.model_validate_json(base64.b64decode(value, validate=True))
        except (ValueError, ValidationError) as exc:
            raise ReceiptError(ReceiptReason.MALFORMED, f"X-DCML-Receipt is not a signed receipt: {exc}") from exc

    @classmethod
    def from_json(cls, data: str | bytes) -> SignedReceipt:
        try:
            return cls.model_validate_json(data)
        except ValidationError as exc:
            raise ReceiptError(ReceiptReason.MALFORMED, f"not a signed receipt: {exc}") from exc


class SignedAcceptance(BaseModel):
    model_config = ConfigDict(frozen=True)

    acceptance: Acceptance
    signature: str
    signer: str


# ---- hashes ---------------------------------------------------------------------------------

def request_hash(body: bytes) -> str:
    return hex32(hashlib.sha256(body).digest())


def response_hash(body: bytes) -> str:
    return hex32(hashlib.sha256(body).digest())


class StreamHasher:
    """Incremental `stream_response_hash`: feed each SSE data payload in order."""

    def __init__(self) -> None:
        self._h = hashlib.sha256()

    def update(self, payload: bytes) -> None:
        self._h.update(payload)
        self._h.update(b"\n")

    def hexdigest(self) -> str:
        return hex32(self._h.digest())


def stream_response_hash(payloads: Iterable[bytes | str]) -> str:
    """sha256(p1 ‖ "\\n" ‖ p2 ‖ "\\n" ‖ … ‖ "[DONE]" ‖ "\\n") over the SSE data payloads, in order."""
    h = StreamHasher()
    for p in payloads:
        h.update(p.encode() if isinstance(p, str) else p)
    return h.hexdigest()


def model_id_for(served_name: str) -> str:
    """Default modelId: keccak256 of the served model name (until the model registry assigns ids)."""
    return hex32(keccak(served_name.encode()))


def parse_sse_stream(raw: bytes) -> tuple[list[bytes], SignedReceipt | None]:
    """Split a raw SSE body (read by `client.wire.sse`) into its content payloads (unnamed events: what
    responseHash covers) and the receipt, if any. Other named events (payment control messages) are skipped."""
    payloads: list[bytes] = []
    receipt = None
    for event in sse.parse(raw):
        if event.name == RECEIPT_EVENT:
            receipt = SignedReceipt.from_json(event.data)
        elif event.unnamed:
            payloads.append(event.data)
    return payloads, receipt


# ---- signing ----------------------------------------------------------------------------------

def receipt_digest(receipt: Receipt, domain: ReceiptDomain = DEFAULT_DOMAIN) -> bytes:
    return domain.eip712_domain.digest(RECEIPT.hash_message(receipt.model_dump(by_alias=True)))


def acceptance_digest(acceptance: Acceptance, domain: ReceiptDomain = DEFAULT_DOMAIN) -> bytes:
    return domain.eip712_domain.digest(ACCEPTANCE.hash_message(acceptance.model_dump(by_alias=True)))


def receipt_signable(receipt: Receipt, domain: ReceiptDomain = DEFAULT_DOMAIN) -> SignableMessage:
    """The same digest as eth_account's SignableMessage (`Account.sign_message`, `recover_message`)."""
    return domain.eip712_domain.signable(RECEIPT.hash_message(receipt.model_dump(by_alias=True)))


def acceptance_signable(acceptance: Acceptance, domain: ReceiptDomain = DEFAULT_DOMAIN) -> SignableMessage:
    return domain.eip712_domain.signable(ACCEPTANCE.hash_message(acceptance.model_dump(by_alias=True)))


def sign_receipt(receipt: Receipt, account: LocalAccount, domain: ReceiptDomain = DEFAULT_DOMAIN) -> SignedReceipt:
    return SignedReceipt(receipt=receipt, signature=eip712.sign_hex(receipt_digest(receipt, domain), account),
                         signer=account.address)


def sign_acceptance(
    acceptance: Acceptance, account: LocalAccount, domain: ReceiptDomain = DEFAULT_DOMAIN
) -> SignedAcceptance:
    return SignedAcceptance(acceptance=acceptance, signer=account.address,
                            signature=eip712.sign_hex(acceptance_digest(acceptance, domain), account))


def _recover(digest: bytes, signature: str) -> str:
    """`eip712.recover`: 65-byte r‖s‖v, v in {27, 28}, low s (OpenZeppelin's on-chain rules)."""
    try:
        return eip712.recover(digest, signature)
    except eip712.SignatureError as exc:
        raise ReceiptError(ReceiptReason.BAD_SIGNATURE, f"bad signature: {exc}") from exc


def recover_receipt_signer(receipt: Receipt, signature: str, domain: ReceiptDomain = DEFAULT_DOMAIN) -> str:
    """Who signed `receipt` under `domain` (raises `ReceiptError` BAD_SIGNATURE for a malformed signature)."""
    return _recover(receipt_digest(receipt, domain), signature)


def _check_signer(recovered: str, expected_signer: str) -> None:
    if recovered.lower() != expected_signer.lower():
        raise ReceiptError(
            ReceiptReason.WRONG_SIGNER,
            f"signed by {recovered}, not by the attested node key {expected_signer}; "
            "the receipt was tampered with or comes from another node",
        )


def verify_receipt(
    receipt: Receipt,
    signature: str,
    *,
    expected_signer: str,
    request_bytes: bytes,
    response_bytes: bytes | None = None,
    sse_payloads: Iterable[bytes | str] | None = None,
    price: Price | None = None,
    previous_cumulative: int | None = None,
    domain: ReceiptDomain = DEFAULT_DOMAIN,
) -> None:
    """Raise `ReceiptError` unless `receipt` is signed by `expected_signer` (the attested key) and
    commits to exactly these request and response bytes (and, with `price`, to a consistent cost)."""
    if (response_bytes is None) == (sse_payloads is None):
        raise TypeError("pass exactly one of response_bytes (non-streamed) or sse_payloads (streamed)")
    _check_signer(recover_receipt_signer(receipt, signature, domain), expected_signer)
    if request_hash(request_bytes) != receipt.request_hash:
        raise ReceiptError(ReceiptReason.REQUEST_HASH_MISMATCH,
                           "requestHash is not sha256 of the body you sent; do not pay for this answer")
    got = response_hash(response_bytes) if response_bytes is not None else stream_response_hash(sse_payloads or [])
    if got != receipt.response_hash:
        raise ReceiptError(ReceiptReason.RESPONSE_HASH_MISMATCH,
                           "responseHash does not match the response you received; it was altered or truncated")
    if price is not None:
        expected = price.cost(receipt.input_tokens, receipt.output_tokens)
        if receipt.cost != expected:
            raise ReceiptError(ReceiptReason.COST_MISMATCH,
                               f"cost {receipt.cost} != {receipt.input_tokens}×{price.per_input_token} + "
                               f"{receipt.output_tokens}×{price.per_output_token} = {expected}")
    if previous_cumulative is not None and receipt.cumulative_spent != previous_cumulative + receipt.cost:
        raise ReceiptError(ReceiptReason.CUMULATIVE_MISMATCH,
                           f"cumulativeSpent {receipt.cumulative_spent} != previous {previous_cumulative} "
                           f"+ cost {receipt.cost}")


def verify_signed_receipt(signed: SignedReceipt, **kwargs) -> None:
    """`verify_receipt` on the wire object; the embedded `signer` field is informational only."""
    verify_receipt(signed.receipt, signed.signature, **kwargs)


def verify_acceptance(
    acceptance: Acceptance, signature: str, *, expected_signer: str, domain: ReceiptDomain = DEFAULT_DOMAIN
) -> None:
    _check_signer(_recover(acceptance_digest(acceptance, domain), signature), expected_signer)
