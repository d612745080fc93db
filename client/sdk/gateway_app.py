"""The gateway's HTTP face: an OpenAI-compatible FastAPI app over a `Gateway`, its error and answer shapes,
and `dcml gateway` (`main`)."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx
import pydantic_core
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response

from dcml.client.sdk.exchange import Exchange
from dcml.client.sdk.gateway_config import GatewayConfig
from dcml.client.sdk.gateway_nodes import Upstream
from dcml.client.wire import sse
from dcml.client.wire.errors import DcmlError, error_object

if TYPE_CHECKING:
    from dcml.client.sdk.gateway import Gateway

log = logging.getLogger("dcml.gateway")

RECEIPT_HEADER = "x-dcml-receipt"
MAX_BODY = 1 << 20


class ClientFault(DcmlError):
    """The node refused the request itself (4xx): another node would too; passed back as is."""

    reason = "client_fault"

    def __init__(self, status: int, body: bytes) -> None:
        super().__init__(f"the node answered {status}")
        self.status, self.body = status, body


def error(status: int, type_: str, code: str, message: str) -> JSONResponse:
    return JSONResponse(error_object(message, type_, code), status_code=status)


def answer_headers(node: Upstream, exchange: Exchange) -> dict[str, str]:
    out = {"x-dcml-node": node.url}
    if exchange.channel_id:
        out["x-dcml-channel"] = exchange.channel_id
    return out


def answer(response: httpx.Response, node: Upstream, exchange: Exchange) -> Response:
    headers = answer_headers(node, exchange)
    if exchange.receipt is not None:
        headers[RECEIPT_HEADER] = exchange.receipt.to_header()
        headers["x-dcml-cost"] = str(exchange.cost)
    return Response(response.content, status_code=response.status_code, headers=headers,
                    media_type=response.headers.get("content-type", "application/json"))


def receipt_chunk(exchange: Exchange, node: Upstream, model: str) -> bytes:
    """A last chunk OpenAI clients ignore (no choices), carrying the verified receipt."""
    receipt = exchange.receipt.model_dump(mode="json") if exchange.receipt is not None else None
    chunk = {"id": "dcml-receipt", "object": "chat.completion.chunk", "created": int(time.time()), "model": model,
             "choices": [], "dcml_receipt": receipt, "dcml_node": node.url, "dcml_cost": str(exchange.cost)}
    return sse.data_event(json.dumps(chunk).encode())


def create_gateway_app(gateway: Gateway) -> FastAPI:
    from contextlib import asynccontextmanager

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        await gateway.refresh(force=True)
        yield
        await gateway.aclose()

    app = FastAPI(title="dcml gateway", lifespan=lifespan, docs_url=None, redoc_url=None)

    async def body_of(request: Request) -> dict[str, Any] | Response:
        raw = await request.body()
        if len(raw) > MAX_BODY:
            return error(413, "invalid_request_error", "body_too_large", f"the body exceeds {MAX_BODY} bytes")
        try:  # pydantic-core's parser: a nesting limit, where json.loads can overflow a thread's C stack
            body = pydantic_core.from_json(raw)
        except ValueError:
            return error(400, "invalid_request_error", "invalid_json", "the body is not JSON")
        if not isinstance(body, dict):
            return error(400, "invalid_request_error", "invalid_json", "the body is not a JSON object")
        return body

    async def route(path: str, request: Request) -> Response:
        body = await body_of(request)
        if isinstance(body, Response):
            return body
        try:
            return await gateway.handle(path, body)
        except ClientFault as exc:
            return Response(exc.body, status_code=exc.status, media_type="application/json")

    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> Response:
        return await route("/v1/chat/completions", request)

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        return await route("/v1/completions", request)

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return await gateway.models()

    @app.get("/dcml/spend")
    async def spend() -> dict[str, Any]:
        return await asyncio.to_thread(gateway.spend)

    return app


def main(config: Path, host: str | None = None, port: int | None = None) -> None:
    import uvicorn
    from eth_account import Account

    cfg = GatewayConfig.load(config, host=host, port=port)
    key = os.environ.get(cfg.wallet_key_env)
    if not key:
        raise SystemExit(f"error: put the paying wallet's key in ${cfg.wallet_key_env}")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from dcml.client.sdk.gateway import Gateway

    gateway = Gateway(cfg, Account.from_key(key))
    log.info("dcml gateway on http://%s:%d/v1 (wallet %s)", cfg.host, cfg.port, gateway.wallet.address)
    uvicorn.run(create_gateway_app(gateway), host=cfg.host, port=cfg.port, log_level="warning")
