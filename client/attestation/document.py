"""The attestation document a node serves (`GET /v1/attestation`) and what a verifier concludes from it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict

from dcml.client.attestation.gpu import GpuResult
from dcml.client.attestation.measurements import (
    EventLogEntry,
    Measurements,
)

SIMULATED_MARKER = "SIMULATED TEE — NOT CONFIDENTIAL"


class AttestationDocument(BaseModel):
    """Body of `GET /v1/attestation?nonce=<64 hex>`. Only the quote is trusted; the rest is checked."""

    model_config = ConfigDict(frozen=True)

    tee_type: Literal["tdx", "dstack", "simulated"]
    quote: str  # hex
    event_log: list[EventLogEntry] | None = None
    signing_address: str
    hpke_public_key: str  # hex
    nonce: str  # hex, 32 bytes
    report_data: str  # hex; informational, the verifier reads report_data from the quote body
    node_version: str
    measurements: Measurements  # informational, re-parsed from the quote by the verifier
    gpu_evidence: dict[str, Any] | None = None
    app_info: dict[str, Any] | None = None  # dstack: app_id, compose_hash, tcb_info.app_compose, ...


@dataclass(frozen=True)
class VerifiedNode:
    signing_address: str
    hpke_public_key: bytes
    tee_type: str
    tcb_status: str
    measurements: Measurements
    simulated: bool = False
    advisory_ids: tuple[str, ...] = ()
    compose_hash: str | None = None
    gpu_evidence_verified: bool = False  # every stapled GPU report verified offline (client/attestation/gpu.py)
    gpus: tuple[GpuResult, ...] = ()

    @property
    def marker(self) -> str:
        return SIMULATED_MARKER if self.simulated else "TDX attested"
