"""One error model for node and client: a root exception with a machine-readable `reason`, the reason enums
of the protocols both sides speak (payments, attestation, receipts), and the one JSON error shape on the wire.

On the wire every error is OpenAI's object, `{"error": {"message", "type", "param", "code"}}`, with the
reason as `code`: a client branches on `code` (an enum member's value) and shows `message` to a person.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from enum import StrEnum
from typing import Any, ClassVar


class ErrorType(StrEnum):
    """The error object's `type`: OpenAI's categories, plus one per protocol of ours."""

    INVALID_REQUEST = "invalid_request_error"
    UNAUTHORIZED = "authentication_error"
    RATE_LIMIT = "rate_limit_error"
    UNAVAILABLE = "service_unavailable"
    INTERNAL = "internal_server_error"
    PAYMENT = "payment_error"
    ATTESTATION = "attestation_error"
    RECEIPT = "receipt_error"
    CHAIN = "chain_error"


class PaymentReason(StrEnum):
    """Why a payment (a 402, a refused voucher, a stream cut for want of one) did not go through."""

    PAYMENT_REQUIRED = "payment_required"  # no payment sent
    MALFORMED = "malformed"  # the voucher body does not parse
    MALFORMED_PAYMENT = "malformed_payment"  # the PAYMENT-SIGNATURE header does not parse
    MALFORMED_SIGNATURE = "malformed_signature"
    ACCEPTED_MISMATCH = "accepted_mismatch"  # the payload's `accepted` is not the node's offer
    BAD_SIGNATURE = "bad_signature"
    UNKNOWN_CHANNEL = "unknown_channel"
    CHANNEL_UNCONFIRMED = "channel_unconfirmed"
    CHANNEL_FINALIZED = "channel_finalized"
    CHANNEL_CLOSING = "channel_closing"
    WRONG_PAYEE = "wrong_payee"
    WRONG_TOKEN = "wrong_token"
    WRONG_MODEL = "wrong_model"
    UNTRUSTED_PUBLISHER = "untrusted_publisher"  # the channel's royalty terms are refused
    DEPOSIT_TOO_SMALL = "deposit_too_small"
    EXCEEDS_DEPOSIT = "exceeds_deposit"
    NOT_INCREASING = "not_increasing"  # replayed or out of order
    INSUFFICIENT_FUNDS = "insufficient_funds"
    BAD_RELEASE = "bad_release"
    CONTRACT_SIGNER = "contract_signer"  # an ERC-1271 signer, refused by this node
    SIGNER_REFUSED = "signer_refused"  # a contract signer's voucher did not settle
    PAYMENT_TIMEOUT = "payment_timeout"  # a paused stream got no voucher in time
    AUTH_REQUIRED = "auth_required"  # a channel read without the payer's signature
    # The payer's own (client side):
    REJECTED = "rejected"  # the node refused without a readable reason
    UNTRUSTED_TERMS = "untrusted_terms"  # the node's terms are not what this client verified or allows
    INSUFFICIENT_DEPOSIT = "insufficient_deposit"  # the deposit cannot cover the ask and top-up is off
    SEALED_RESPONSE_INVALID = "sealed_response_invalid"  # a sealed answer came unsealed or does not open


# Reasons after which the channel named can never admit a request: the payer opens another one.
DEAD_CHANNEL = frozenset({PaymentReason.UNKNOWN_CHANNEL, PaymentReason.CHANNEL_FINALIZED,
                          PaymentReason.CHANNEL_CLOSING, PaymentReason.WRONG_PAYEE, PaymentReason.WRONG_MODEL,
                          PaymentReason.WRONG_TOKEN})


class AttestationReason(StrEnum):
    """Why an attestation document was refused (`client.attestation.verify`)."""

    BAD_DOCUMENT = "bad_document"
    NONCE_MISMATCH = "nonce_mismatch"
    SIMULATED_REFUSED = "simulated_refused"
    SIMULATED_INVALID = "simulated_invalid"
    COLLATERAL_MISSING = "collateral_missing"
    NOT_TDX = "not_tdx"
    QUOTE_MALFORMED = "quote_malformed"
    QUOTE_INVALID = "quote_invalid"
    TCB_STATUS = "tcb_status"
    ADVISORY = "advisory"
    DEBUG_ENABLED = "debug_enabled"
    MEASUREMENT_NOT_ALLOWED = "measurement_not_allowed"
    EVENT_LOG_INVALID = "event_log_invalid"
    EVENT_LOG_MISMATCH = "event_log_mismatch"
    COMPOSE_HASH_MISMATCH = "compose_hash_mismatch"
    COMPOSE_HASH_NOT_ALLOWED = "compose_hash_not_allowed"
    REPORT_DATA_MISMATCH = "report_data_mismatch"
    GPU_EVIDENCE = "gpu_evidence"  # the stapled GPU evidence fails verification (a GpuReason says how)
    GPU_EVIDENCE_MISSING = "gpu_evidence_missing"
    GPU_NOT_ALLOWED = "gpu_not_allowed"  # verified, but the policy refuses its architecture/driver/VBIOS


class GpuReason(StrEnum):
    """How GPU evidence failed: the detail under `AttestationReason.GPU_EVIDENCE`."""

    MALFORMED = "malformed"  # the report or a field does not parse
    NONCE_MISMATCH = "nonce_mismatch"
    CHAIN_INVALID = "chain_invalid"  # device certificate chain does not verify to the pinned root
    EXPIRED = "expired"  # a certificate (either chain) is outside its validity at the given time
    SIGNATURE_INVALID = "signature_invalid"  # the report's signature under the leaf key
    FWID_MISMATCH = "fwid_mismatch"
    RIM_MISSING = "rim_missing"
    RIM_MALFORMED = "rim_malformed"  # not a RIM, or hostile XML (DTD, entities, oversized)
    RIM_CHAIN_INVALID = "rim_chain_invalid"
    RIM_SIGNATURE_INVALID = "rim_signature_invalid"
    RIM_VERSION_MISMATCH = "rim_version_mismatch"  # RIM is for another driver/VBIOS version or chip
    RIM_MISMATCH = "rim_mismatch"  # golden measurements differ at `indices`
    REVOKED = "revoked"
    REVOCATION_INVALID = "revocation_invalid"  # supplied OCSP/CRL data does not verify or is stale


class ReceiptReason(StrEnum):
    """Why a receipt or acceptance must not be trusted (`client.wire.receipts`, the SDK's checks)."""

    MALFORMED = "malformed"
    BAD_SIGNATURE = "bad_signature"
    WRONG_SIGNER = "wrong_signer"
    REQUEST_HASH_MISMATCH = "request_hash_mismatch"
    RESPONSE_HASH_MISMATCH = "response_hash_mismatch"
    COST_MISMATCH = "cost_mismatch"
    CUMULATIVE_MISMATCH = "cumulative_mismatch"
    # The payer's own checks of what a node signs for a request (the SDK):
    ACCEPTED_AT_SKEW = "accepted_at_skew"  # the node's acceptedAt is far from when we sent the request
    DEADLINE_TOO_FAR = "deadline_too_far"
    CHANNEL_MISMATCH = "channel_mismatch"
    UNKNOWN_CHANNEL = "unknown_channel"
    OVERCHARGE = "overcharge"
    MISSING_ACCEPTANCE = "missing_acceptance"
    MISSING_RECEIPT = "missing_receipt"


class DcmlError(Exception):
    """Root of every error this project raises on purpose. `reason` is machine-readable (an enum member of
    its protocol, or a contract's custom error name), `message` says what to do next. Subclasses set
    `error_type` (the wire `type`) and whether `str()` leads with the reason."""

    reason: str = "error"
    error_type: ClassVar[str] = ErrorType.INVALID_REQUEST
    reason_in_str: ClassVar[bool] = False

    def __init__(self, message: str = "", *, reason: str | None = None) -> None:
        if reason is not None:
            self.reason = reason
        self.message = message
        super().__init__(f"{self.reason}: {message}" if self.reason_in_str else message)

    def to_wire(self, param: str | None = None) -> dict[str, Any]:
        """This error as the wire's JSON object."""
        return error_object(self.message, self.error_type, self.reason, param)


class PaymentError(DcmlError):
    """A payment did not go through, on either side; `reason` is a PaymentReason (or, for x402's
    batch-settlement, the x402 SDK's own reason string)."""

    reason = PaymentReason.REJECTED
    error_type = ErrorType.PAYMENT


class ChainError(DcmlError):
    """A contract call or transaction failed; `reason` is the contract's custom error name when known."""

    reason = "failed"
    error_type = ErrorType.CHAIN


def error_object(message: str, type_: str, code: str | None = None, param: str | None = None) -> dict[str, Any]:
    """OpenAI's error object: `{"error": {"message", "type", "param", "code"}}`."""
    return {"error": {"message": message, "type": str(type_), "param": param,
                      "code": None if code is None else str(code)}}


def error_body(message: str, type_: str, param: str | None = None, code: str | None = None) -> bytes:
    """`error_object` as compact JSON bytes (HTTP bodies, SSE error events)."""
    return json.dumps(error_object(message, type_, code, param), separators=(",", ":")).encode()


def read_error(body: bytes | str | Mapping[str, Any] | None, default_code: str | None = None,
               ) -> tuple[str | None, str | None]:
    """(code, message) of a wire error; (default_code, None) when `body` is not an error object."""
    try:
        obj = json.loads(body) if isinstance(body, (bytes, str)) else body
        err = obj["error"] if isinstance(obj, Mapping) else None
    except (ValueError, KeyError, TypeError, RecursionError):
        err = None
    if not isinstance(err, Mapping):
        return default_code, None
    code, message = err.get("code"), err.get("message")
    return (str(code) if code is not None else default_code), (None if message is None else str(message))
