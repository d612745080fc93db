"""The one interface every TEE provider implements: produce a quote over 64 bytes of report_data."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

from dcml.client.wire.errors import DcmlError, ErrorType

REPORT_DATA_LEN = 64


class TeeError(DcmlError, RuntimeError):
    """The TEE could not produce evidence; the message says what to check on the host."""

    reason = "tee_unavailable"
    error_type = ErrorType.UNAVAILABLE


@dataclass(frozen=True)
class Evidence:
    quote: bytes
    event_log: list[dict[str, Any]] | None = None
    extra: dict[str, Any] = field(default_factory=dict)  # e.g. dstack "app_info"


class AttestationProvider(Protocol):
    tee_type: str  # "tdx" | "dstack" | "simulated"

    def quote(self, report_data: bytes) -> Evidence: ...


def check_report_data(report_data: bytes) -> None:
    if len(report_data) != REPORT_DATA_LEN:
        raise ValueError(f"report_data is {len(report_data)} bytes; a TDX quote carries exactly 64")
