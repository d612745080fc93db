"""`GET /v1/receipts/{id}`: any receipt this node ever issued, from the durable store."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import Response

from node.api.errors import BadRequest, NotFound
from node.api.state import node_state

router = APIRouter()


@router.get("/v1/receipts/{receipt_id}")
async def get_receipt(request: Request, receipt_id: str) -> Response:
    rid = receipt_id.lower()
    if not (rid.startswith("0x") and len(rid) == 66 and all(c in "0123456789abcdef" for c in rid[2:])):
        raise BadRequest("receipt id must be 0x followed by 64 hex digits (the X-DCML-Receipt-Id header)",
                         param="receipt_id", code="invalid_receipt_id")
    signed = await node_state(request).store.get(rid)
    if signed is None:
        raise NotFound(f"No receipt {rid} on this node; check the id (and that you asked the node that served "
                       "the request).", code="receipt_not_found")
    return Response(signed.model_dump_json(by_alias=True), media_type="application/json")
