"""The served OpenAPI document (`GET /openapi.json`), made truthful.

The routes read their bodies themselves (sealed or plain, bounded, hashed byte-exactly for receipts), so FastAPI
sees no request body and would declare none, and it declares a 422 the node never sends (validation errors are
400s). This fills in what the node really does: request bodies with their content types, every status a route
can answer and each answer's content types. The fuzz suite (tests/test_fuzz_openapi.py) is derived from it and
checks that the node keeps to it.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from pydantic import BaseModel

from dcml.client.wire.e2e import SEALED_CONTENT_TYPE
from dcml.client.wire.receipts import SignedReceipt
from dcml.node.api.protocol import ChatCompletionRequest, CompletionRequest

_REF = "#/components/schemas/{model}"
_ERROR = {"$ref": "#/components/schemas/Error"}
_ERROR_SCHEMA = {
    "type": "object", "required": ["error"],
    "properties": {"error": {"type": "object", "required": ["message", "type"], "properties": {
        "message": {"type": "string"}, "type": {"type": "string"},
        "param": {"type": ["string", "null"]}, "code": {"type": ["string", "null"]}}}},
}
_SEALED_ENVELOPE = {  # client.e2e: what a sealed request's body is
    "type": "object", "required": ["v", "kid", "ct"],
    "properties": {"v": {"const": 1}, "kid": {"type": "string", "pattern": "^[0-9a-f]{64}$"},
                   "ct": {"type": "string", "contentEncoding": "base64"}},
}
_VOUCHER = {
    "type": "object", "required": ["channelId", "cumulativeAmount", "signature"],
    "properties": {"channelId": {"type": "string", "pattern": "^0x[0-9a-fA-F]{64}$"},
                   "cumulativeAmount": {"type": "string", "pattern": "^[0-9]{1,39}$"},
                   "signature": {"type": "string", "pattern": "^0x[0-9a-fA-F]+$"}},
}
_BALANCE = {"type": "object", "properties": {"channelId": {"type": "string"}, "accepted": {"type": "string"},
                                             "spent": {"type": "string"}}}
_WHY = {
    400: "Malformed or invalid request (bad JSON, too deep, a bad parameter, a malformed payment payload)",
    401: "Authorisation required: sign the read with the channel's payer or session key (X-DCML-Auth)",
    402: "Payment required: the PAYMENT-REQUIRED header names the terms (paid nodes only)",
    404: "Not found (unknown model, receipt or channel)",
    413: "Request body or prompt too large",
    429: "The engine is at capacity; retry after Retry-After seconds",
    431: "Request headers too large",
    499: "The client closed the connection before the request was read (never seen by the client)",
    503: "The node is at its connection or request limit",
}


def _json(schema: dict) -> dict:
    return {"application/json": {"schema": schema}}


def _errors(*statuses: int, sealed: bool = False) -> dict[str, dict]:
    content = _json(_ERROR)
    if sealed:  # an error to a sealed request is sealed too
        content[SEALED_CONTENT_TYPE] = {"schema": {"type": "object"}}
    return {str(s): {"description": _WHY[s], "content": content} for s in statuses}


def _schema_of(model: type[BaseModel], components: dict[str, Any]) -> dict:
    schema = model.model_json_schema(ref_template=_REF)
    components.update(schema.pop("$defs", {}))
    components[model.__name__] = schema
    return {"$ref": _REF.format(model=model.__name__)}


def build_openapi(app: FastAPI) -> dict[str, Any]:
    doc = get_openapi(title=app.title, version=app.version, routes=app.routes)
    components: dict[str, Any] = doc.setdefault("components", {}).setdefault("schemas", {})
    for name in ("HTTPValidationError", "ValidationError"):  # the 422 the node never sends
        components.pop(name, None)
    components["Error"] = _ERROR_SCHEMA
    node = getattr(app.state, "node", None)

    openai_bodies: dict[str, type[BaseModel]] = {"/v1/chat/completions": ChatCompletionRequest,
                                                 "/v1/completions": CompletionRequest}
    for path, model in openai_bodies.items():
        op = doc["paths"].get(path, {}).get("post")
        if op is None:
            continue
        ref = _schema_of(model, components)
        op["requestBody"] = {"required": True, "content": {
            "application/json": {"schema": ref},
            SEALED_CONTENT_TYPE: {"schema": _SEALED_ENVELOPE}}}
        op["responses"] = {
            "200": {"description": "The answer: JSON, or an SSE stream when `stream` is true; sealed when the "
                                   "request was", "content": {"application/json": {"schema": {"type": "object"}},
                                                              "text/event-stream": {"schema": {"type": "string"}},
                                                              SEALED_CONTENT_TYPE: {"schema": {"type": "object"}}}},
            **_errors(400, 402, 404, 413, 429, sealed=True),
        }
    if node is not None and node.gate is not None:  # a paid node reads the voucher from this header
        for path in openai_bodies:
            op = doc["paths"].get(path, {}).get("post")
            if op is not None:
                op.setdefault("parameters", []).append({
                    "name": "PAYMENT-SIGNATURE", "in": "header", "required": False,
                    "description": "base64 of a voucher {channelId, cumulativeAmount, signature} (x402)",
                    "schema": {"type": "string"}})
    if node is not None:  # the model and token limits of this node, so generated requests are answerable
        served = {"type": "string", "enum": [node.engine.model_name]}
        for model in openai_bodies.values():
            props = components[model.__name__]["properties"]
            props["model"] = served
            for key in ("max_tokens", "max_completion_tokens"):
                if key in props:
                    props[key] = {"anyOf": [{"type": "integer", "minimum": 1,
                                             "maximum": node.settings.limits.max_tokens_cap},
                                            {"type": "null"}]}

    vouchers = doc["paths"].get("/v1/payments/vouchers", {}).get("post")
    if vouchers is not None:
        vouchers["requestBody"] = {"required": True, "content": _json(_VOUCHER)}
        vouchers["responses"] = {"200": {"description": "Accepted and durable", "content": _json(_BALANCE)},
                                 **_errors(400, 402, 413)}
    channel = doc["paths"].get("/v1/payments/channels/{channel_id}", {}).get("get")
    if channel is not None:
        channel["responses"] = {"200": {"description": "The node's account of the channel",
                                        "content": _json(_BALANCE)}, **_errors(400, 401, 404)}
    for path, statuses in (("/v1/receipts", (400, 401, 404)), ("/v1/receipts/{receipt_id}", (400, 404))):
        op = doc["paths"].get(path, {}).get("get")
        if op is not None:
            op["responses"] = {"200": {"description": "The signed receipt",
                                       "content": _json(_schema_of(SignedReceipt, components))},
                               **_errors(*statuses)}
    attestation = doc["paths"].get("/v1/attestation", {}).get("get")
    if attestation is not None:
        attestation["responses"] = {"200": {"description": "The attestation document",
                                            "content": _json({"type": "object"})}, **_errors(400)}
        for p in attestation.get("parameters", []):
            if p["name"] == "nonce":
                p["required"] = True
                p["schema"] = {"type": "string", "pattern": "^[0-9a-fA-F]{64}$"}
    metrics = doc["paths"].get("/metrics", {}).get("get")
    if metrics is not None:
        metrics["responses"] = {"200": {"description": "Prometheus text format",
                                        "content": {"text/plain": {"schema": {"type": "string"}}}}}

    # What any route can answer, before the route runs: the server-wide limits.
    for ops in doc["paths"].values():
        for method, op in ops.items():
            responses = op.setdefault("responses", {})
            responses.pop("422", None)
            if method in ("post", "put", "patch"):
                responses.setdefault("413", _errors(413)["413"])
            responses.setdefault("431", _errors(431)["431"])
            responses["503"] = {"description": _WHY[503], "content": {"text/plain": {"schema": {"type": "string"}},
                                                                      **_json(_ERROR)}}
            if op.get("parameters") and "400" not in responses:
                responses.update(_errors(400))
    return doc


def install_openapi(app: FastAPI) -> None:
    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            app.openapi_schema = build_openapi(app)
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
