"""API errors in OpenAI's JSON shape `{"error": {"message", "type", "param", "code"}}`, with their statuses."""

from __future__ import annotations

import json
import uuid

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from dcml.node.logging import get_logger

log = get_logger("dcml.api")


class APIError(Exception):
    status = 400
    type = "invalid_request_error"

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code
        self.headers = headers or {}


class BadRequest(APIError):
    status = 400


class ModelNotFound(APIError):
    status = 404

    def __init__(self, served: str) -> None:
        # The requested name is not quoted back: no error body repeats what the client sent.
        super().__init__(f"The requested model does not exist here; this node serves `{served}` (GET /v1/models).",
                         param="model", code="model_not_found")


class NotFound(APIError):
    status = 404
    code = "not_found"


class PayloadTooLarge(APIError):
    status = 413


class RequestTimeout(APIError):
    status = 408


class Overloaded(APIError):
    status = 429
    type = "rate_limit_error"


class Unavailable(APIError):
    status = 503
    type = "service_unavailable"


class InternalError(APIError):
    status = 500
    type = "internal_server_error"


def error_body(message: str, type_: str, param: str | None = None, code: str | None = None) -> bytes:
    return json.dumps({"error": {"message": message, "type": type_, "param": param, "code": code}},
                      separators=(",", ":")).encode()


def error_response(exc: APIError) -> Response:
    return Response(error_body(exc.message, exc.type, exc.param, exc.code), status_code=exc.status,
                    media_type="application/json", headers=exc.headers)


def internal_error(exc: BaseException, where: str) -> InternalError:
    """Log the real cause with an id; the client gets only the id (never a traceback or path)."""
    error_id = uuid.uuid4().hex[:12]
    log.error("internal_error", where=where, error_id=error_id, exc_info=exc)
    return InternalError(f"The node failed to process the request (error id {error_id}); retry, and report "
                         "the id to the node operator if it persists.", code="internal_error")


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def _api_error(_: Request, exc: APIError) -> Response:
        return error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError) -> Response:
        first = exc.errors()[0] if exc.errors() else {}
        param = ".".join(str(p) for p in first.get("loc", ()) if p not in ("body", "query", "path")) or None
        return error_response(BadRequest(f"Invalid request: {first.get('msg', 'malformed')}", param=param))

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> Response:
        type_ = "invalid_request_error" if exc.status_code < 500 else "internal_server_error"
        return Response(error_body(str(exc.detail), type_), status_code=exc.status_code,
                        media_type="application/json", headers=getattr(exc, "headers", None))

    @app.exception_handler(ClientDisconnect)
    async def _gone(_: Request, exc: ClientDisconnect) -> Response:
        # The client hung up while we read its body: a normal close, nothing to log and nobody to answer
        # (499 is nginx's "client closed request", seen only by the metrics).
        return Response(status_code=499)

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, exc: Exception) -> Response:
        return error_response(internal_error(exc, "handler"))
