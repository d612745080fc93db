"""API errors in the wire's one shape (OpenAI's `{"error": {"message", "type", "param", "code"}}`, see
`client.wire.errors`), with their HTTP statuses."""

from __future__ import annotations

import uuid
from http import HTTPStatus

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from dcml.client.wire.errors import DcmlError, ErrorType, error_body
from dcml.node.logging import get_logger

log = get_logger("dcml.api")


__all__ = ["APIError", "BadRequest", "InternalError", "ModelNotFound", "NotFound", "Overloaded", "PayloadTooLarge",
           "RequestTimeout", "Unavailable", "error_body", "error_response", "install_error_handlers", "internal_error"]


class APIError(DcmlError):
    """An error answered over HTTP with `status`; `code` on the wire is the `reason`."""

    status = 400
    reason = "invalid_request"

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message, reason=code)
        self.param = param
        self.headers = headers or {}

    @property
    def code(self) -> str:
        return self.reason

    @property
    def type(self) -> str:
        return self.error_type


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
    reason = "not_found"


class PayloadTooLarge(APIError):
    status = 413
    reason = "payload_too_large"


class RequestTimeout(APIError):
    status = 408
    reason = "request_timeout"


class Overloaded(APIError):
    status = 429
    reason = "overloaded"
    error_type = ErrorType.RATE_LIMIT


class Unavailable(APIError):
    status = 503
    reason = "unavailable"
    error_type = ErrorType.UNAVAILABLE


class InternalError(APIError):
    status = 500
    reason = "internal_error"
    error_type = ErrorType.INTERNAL


def error_response(exc: APIError) -> Response:
    return Response(error_body(exc.message, exc.error_type, exc.param, exc.reason), status_code=exc.status,
                    media_type="application/json", headers=exc.headers)


def _status_reason(status: int) -> str:
    """A reason for a framework error (404 route, 405 method): its status phrase, snake-cased."""
    try:
        return HTTPStatus(status).phrase.lower().replace(" ", "_").replace("-", "_")
    except ValueError:
        return f"http_{status}"


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
        type_ = ErrorType.INVALID_REQUEST if exc.status_code < 500 else ErrorType.INTERNAL
        return Response(error_body(str(exc.detail), type_, code=_status_reason(exc.status_code)),
                        status_code=exc.status_code,
                        media_type="application/json", headers=getattr(exc, "headers", None))

    @app.exception_handler(ClientDisconnect)
    async def _gone(_: Request, exc: ClientDisconnect) -> Response:
        # The client hung up while we read its body: a normal close, nothing to log and nobody to answer
        # (499 is nginx's "client closed request", seen only by the metrics).
        return Response(status_code=499)

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, exc: Exception) -> Response:
        return error_response(internal_error(exc, "handler"))
