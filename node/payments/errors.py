"""What the payment side refuses with, independent of HTTP: the API layer (`node.api`) turns it into its answer."""

from __future__ import annotations

from dcml.client.wire.errors import ErrorType, PaymentError, PaymentReason


class PaymentNeeded(PaymentError):
    """402 with the x402 `PAYMENT-REQUIRED` header (in `headers`) saying what would admit the request; `reason`
    (also `code`) is a PaymentReason."""

    status = 402
    reason = PaymentReason.PAYMENT_REQUIRED
    error_type = ErrorType.PAYMENT

    def __init__(self, message: str, *, code: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message, reason=code)
        self.headers = headers or {}

    @property
    def code(self) -> str:
        return self.reason


class PaymentMalformed(PaymentNeeded):
    """400: the payment header cannot be read (x402 transport: malformed input is a bad request)."""

    status = 400
    reason = PaymentReason.MALFORMED_PAYMENT
