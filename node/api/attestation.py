"""`GET /v1/attestation?nonce=<64 hex>`: a fresh quote binding the enclave's keys to the verifier's nonce."""

from __future__ import annotations

import asyncio

from fastapi import APIRouter, Request
from fastapi.responses import Response

from dcml.client.wire.identity import NONCE_LEN
from dcml.node.api.errors import BadRequest
from dcml.node.api.state import node_state
from dcml.node.tee.document import build_attestation_document

router = APIRouter()


@router.get("/v1/attestation")
async def attestation(request: Request, nonce: str | None = None) -> Response:
    try:
        raw = bytes.fromhex(nonce or "")
    except ValueError:
        raw = b""
    if len(raw) != NONCE_LEN or nonce is None or len(nonce) != 2 * NONCE_LEN:
        raise BadRequest(f"nonce must be {2 * NONCE_LEN} hex characters ({NONCE_LEN} fresh random bytes, e.g. "
                         "os.urandom(32).hex())", param="nonce", code="invalid_nonce")
    state = node_state(request)
    # Quote generation blocks on configfs or the dstack socket: keep it off the event loop.
    doc = await asyncio.to_thread(build_attestation_document, state.identity, state.provider, raw,
                                  node_version=state.node_version)
    return Response(doc.model_dump_json(), media_type="application/json")
