"""Attestation documents over the shared vectors, as an operator's policy would pin them: shared by the vector
and the hostile-input attestation tests."""

from __future__ import annotations

from dcml.client.attestation.measurements import parse_tdx_quote
from dcml.client.attestation.verify import AttestationDocument, DstackPolicy, MeasurementPolicy, Policy, TcbPolicy
from dcml.client.demo.kit.vectors import DSTACK_COMPOSE_HASH, ts
from dcml.node.identity import EnclaveIdentity

TDX_NOW = ts("2025-06-20T10:16:03Z")
DSTACK_NOW = ts("2025-09-03T00:00:00Z")
NONCE = bytes(range(32))
IDENTITY = EnclaveIdentity.from_seed(b"vector-tests".ljust(32, b"\0"))


def _policy_for(quote: bytes, *, compose_hashes: list[str] | None = None, **tcb: list[str]) -> Policy:
    """A policy allowing exactly this quote's MRTD and RTMR0-3 (what an operator would pin)."""
    m = parse_tdx_quote(quote).measurements()
    return Policy(
        tcb=TcbPolicy(**tcb),
        measurements=MeasurementPolicy(
            mrtd=[m.mrtd], rtmr0=[m.rtmr0], rtmr1=[m.rtmr1], rtmr2=[m.rtmr2], rtmr3=[m.rtmr3]
        ),
        dstack=DstackPolicy(compose_hashes=compose_hashes if compose_hashes is not None else [DSTACK_COMPOSE_HASH]),
    )


def _doc(quote: bytes, tee_type: str = "tdx", **extra) -> AttestationDocument:
    parsed = parse_tdx_quote(quote)
    fields = dict(
        tee_type=tee_type,
        quote=quote.hex(),
        signing_address=IDENTITY.address,
        hpke_public_key=IDENTITY.hpke_public_bytes().hex(),
        nonce=NONCE.hex(),
        report_data=parsed.report_data.hex(),
        node_version="test",
        measurements=parsed.measurements(),
    )
    fields.update(extra)
    return AttestationDocument.model_validate(fields)


def _dstack_doc(quote, events, app_info) -> AttestationDocument:
    return _doc(quote, "dstack", event_log=events, app_info=app_info)


ONES = b"\x01" * 64

