"""Receipts this node issued, from the durable store: by receipt id (`GET /v1/receipts/{id}`, the id being a
256-bit capability handed only to the requester) and by the request's hash
(`GET /v1/receipts?request_hash=0x…&channel_id=0x…`, for a client whose stream broke before its receipt
came). The hash lookup answers only the channel's payer or session key (`client.access`): anyone else could
test a guess of a prompt against it. A refusal and "no such receipt" are the same 404."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import Response
from starlette.concurrency import run_in_threadpool

from dcml.client.wire.access import AUTH_HEADER, receipts_resource, recover_auth
from dcml.client.wire.errors import ErrorType
from dcml.node.api.errors import APIError, BadRequest, NotFound
from dcml.node.api.state import node_state
from dcml.node.payments.access import payer_may_read

router = APIRouter()


class Unauthorized(APIError):
    status = 401
    reason = "unauthorized"
    error_type = ErrorType.UNAUTHORIZED


def _hex32(value: str) -> bool:
    return value.startswith("0x") and len(value) == 66 and all(c in "0123456789abcdef" for c in value[2:])


@router.get("/v1/receipts")
async def find_receipt(request: Request, request_hash: str | None = None, channel_id: str | None = None) -> Response:
    """The newest receipt charged to `channel_id` for the request whose exact body hashes (sha256) to
    `request_hash`, for that channel's payer only. The signer is checked against the channel before the
    store is read, so neither the answer nor its timing depends on whether a stranger's guess was served."""
    h, channel = (request_hash or "").lower(), (channel_id or "").lower()
    if not _hex32(h):
        raise BadRequest("request_hash must be 0x followed by 64 hex digits: sha256 of the request body you sent",
                         param="request_hash", code="invalid_request_hash")
    if not _hex32(channel):
        raise BadRequest("channel_id must be 0x followed by 64 hex digits: the channel that paid for the request",
                         param="channel_id", code="invalid_channel_id")
    state = node_state(request)
    signer = recover_auth(request.headers.get(AUTH_HEADER), state.identity.address, receipts_resource(h, channel))
    if signer is None:
        raise Unauthorized(f"Receipts by request hash are for the payer only: sign the query with the channel's "
                           f"payer or session key ({AUTH_HEADER}, see client.access).", code="auth_required")
    allowed = state.gate is not None and await run_in_threadpool(payer_may_read, state.gate.payments.chain,
                                                                 channel, signer)
    signed = await run_in_threadpool(state.store.lookup_request, h, channel) if allowed else None
    if signed is None:
        raise NotFound(f"No receipt for request {h} on channel {channel} that this signer may read: it was never "
                       "answered here, or not on a channel you pay (if it was accepted and its deadline passed, "
                       "the SLA court's no-response dispute applies).", code="receipt_not_found")
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
