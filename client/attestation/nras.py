"""NVIDIA's remote attestation service (NRAS) replies, read as advisory claims (signatures NOT verified):
kept for comparison with the offline GPU verifier (client/attestation/gpu.py), which is what clients trust."""

from __future__ import annotations

import base64
import hashlib
import json
from typing import Any

from pydantic import BaseModel, Field, ValidationError

from dcml.client.attestation.verify import AttestationError, Reason


def jwt_claims_unverified(token: str) -> dict[str, Any]:
    """Decode a JWT's claims WITHOUT checking its signature (NVIDIA's JWKS is not available here)."""
    try:
        payload = token.split(".")[1]
        return json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    except (IndexError, ValueError) as exc:
        raise AttestationError(Reason.GPU_EVIDENCE, "GPU evidence token is not a JWT") from exc


class GpuClaims(BaseModel):
    measres: str
    dbgstat: str
    secboot: bool
    eat_nonce: str = Field(min_length=64, max_length=64)


def parse_nras_response(response: list[Any], nonce: bytes) -> dict[str, GpuClaims]:
    """Check an NRAS reply `[["JWT", overall], {"GPU-n": jwt}]` against `nonce`; return per-GPU claims.

    Proves freshness (eat_nonce) and NVIDIA's verdict only if the ES384 signatures are verified against
    NVIDIA's published keys, which this helper does NOT do: treat the result as advisory.
    """
    try:
        (_, overall_token), gpu_tokens = response
        overall = jwt_claims_unverified(overall_token)
    except (TypeError, ValueError) as exc:
        raise AttestationError(Reason.GPU_EVIDENCE, "NRAS response is not [[\"JWT\", token], {gpu: token}]") from exc
    if overall.get("x-nvidia-overall-att-result") is not True:
        raise AttestationError(Reason.GPU_EVIDENCE, "NRAS overall attestation result is not true")
    if overall.get("eat_nonce") != nonce.hex():
        raise AttestationError(Reason.GPU_EVIDENCE, "GPU evidence answers a different nonce (stale)")
    submods = overall.get("submods", {})
    out: dict[str, GpuClaims] = {}
    for name, token in gpu_tokens.items():
        try:  # submods: {"GPU-n": ["DIGEST", ["SHA-256", hex]]} binds each GPU token to the overall one
            digest = submods[name][1][1]
        except (KeyError, IndexError, TypeError):
            digest = None
        if digest != hashlib.sha256(token.encode()).hexdigest():
            raise AttestationError(Reason.GPU_EVIDENCE, f"{name} token is not the one the overall token names")
        try:
            claims = GpuClaims.model_validate(jwt_claims_unverified(token))
        except ValidationError as exc:
            raise AttestationError(Reason.GPU_EVIDENCE, f"{name} claims incomplete: {exc}") from exc
        if (claims.measres, claims.dbgstat, claims.secboot, claims.eat_nonce) != (
            "success", "disabled", True, nonce.hex()
        ):
            raise AttestationError(Reason.GPU_EVIDENCE, f"{name} failed: {claims.model_dump()}")
        out[name] = claims
    if not out or set(out) != set(submods):
        raise AttestationError(Reason.GPU_EVIDENCE, "NRAS response GPU tokens do not match its submods")
    return out
