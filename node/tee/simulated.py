"""DEVELOPMENT ONLY: a quote-shaped document signed by a local development key. Not confidential."""

from __future__ import annotations

import logging

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from dcml.client.attestation.measurements import build_simulated_quote, dev_signer
from dcml.node.tee.base import Evidence, check_report_data

log = logging.getLogger(__name__)


class SimulatedProvider:
    tee_type = "simulated"

    def __init__(self, signer: Ed25519PrivateKey | None = None) -> None:
        # Default: the well-known dev key (verifiers accept it only with allow_simulated).
        self._signer = signer or dev_signer()
        log.warning(
            "!!! SIMULATED TEE — NOT CONFIDENTIAL !!! No hardware protects this node's keys or prompts; "
            "clients refuse it unless allow_simulated is set. Use the tdx or dstack provider in production."
        )

    def quote(self, report_data: bytes) -> Evidence:
        check_report_data(report_data)
        return Evidence(quote=build_simulated_quote(report_data, self._signer))
