"""What the payment side refuses with, independent of HTTP: the API layer (`node.api`) turns it into its answer."""

from __future__ import annotations


class PaymentNeeded(Exception):
    """402 with the x402 `PAYMENT-REQUIRED` header (in `headers`) saying what would admit the request; `code` is
    the machine-readable reason."""

    status = 402
    type = "payment_required"

    def __init__(self, message: str, *, code: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.code = code
        self.headers = headers or {}


class PaymentMalformed(PaymentNeeded):
    """400: the payment header cannot be read (x402 transport: malformed input is a bad request)."""

    status = 400
    type = "invalid_request_error"
