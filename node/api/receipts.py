"""Receipts this node issued, from the durable store: by receipt id (`GET /v1/receipts/{id}`) and by the
request's hash (`GET /v1/receipts?request_hash=0x…`), for a client whose stream broke before its receipt came."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import Response

from node.api.errors import BadRequest, NotFound
from node.api.state import node_state

router = APIRouter()


def _hex32(value: str) -> bool:
    return value.startswith("0x") and len(value) == 66 and all(c in "0123456789abcdef" for c in value[2:])


@router.get("/v1/receipts")
async def find_receipt(request: Request, request_hash: str | None = None) -> Response:
    """The newest receipt for the request whose exact body hashes (sha256) to `request_hash`."""
    h = (request_hash or "").lower()
    if not _hex32(h):
        raise BadRequest("request_hash must be 0x followed by 64 hex digits: sha256 of the request body you sent",
                         param="request_hash", code="invalid_request_hash")
    signed = await node_state(request).store.get_by_request(h)
    if signed is None:
        raise NotFound(f"No receipt for request {h} on this node: it was never answered here (if it was accepted "
                       "and its deadline passed, the SLA court's no-response dispute applies).",
                       code="receipt_not_found")
    return Response(signed.model_dump_json(by_alias=True), media_type="application/json")


@router.get("/v1/receipts/{receipt_id}")
async def get_receipt(request: Request, receipt_id: str) -> Response:
    rid = receipt_id.lower()
    if not _hex32(rid):
        raise BadRequest("receipt id must be 0x followed by 64 hex digits (the X-DCML-Receipt-Id header)",
                         param="receipt_id", code="invalid_receipt_id")
    signed = await node_state(request).store.get(rid)
    if signed is None:
        raise NotFound(f"No receipt {rid} on this node; check the id (and that you asked the node that served "
                       "the request).", code="receipt_not_found")
    return Response(signed.model_dump_json(by_alias=True), media_type="application/json")
