"""Builds the attestation document a node serves at `GET /v1/attestation?nonce=<64 hex>`."""

from __future__ import annotations

from typing import Any

from dcml.client.attestation.measurements import parse_tdx_quote
from dcml.client.attestation.verify import AttestationDocument
from dcml.client.wire.identity import NONCE_LEN
from dcml.node.identity import EnclaveIdentity
from dcml.node.tee.base import AttestationProvider


def build_attestation_document(
    identity: EnclaveIdentity,
    provider: AttestationProvider,
    nonce: bytes,
    *,
    node_version: str,
    gpu_evidence: dict[str, Any] | None = None,
) -> AttestationDocument:
    """Quote over identity_hash || nonce and wrap it with what a verifier needs to check it."""
    if len(nonce) != NONCE_LEN:
        raise ValueError(f"nonce must be {NONCE_LEN} bytes (64 hex characters)")
    report_data = identity.report_data(nonce)
    evidence = provider.quote(report_data)
    parsed = parse_tdx_quote(evidence.quote)
    return AttestationDocument(
        tee_type=provider.tee_type,
        quote=evidence.quote.hex(),
        event_log=evidence.event_log,
        signing_address=identity.address,
        hpke_public_key=identity.hpke_public_bytes().hex(),
        nonce=nonce.hex(),
        report_data=parsed.report_data.hex(),
        node_version=node_version,
        measurements=parsed.measurements(),
        gpu_evidence=gpu_evidence or evidence.extra.get("gpu_evidence"),  # stapled by GpuAttestingProvider
        app_info=evidence.extra.get("app_info"),
    )
