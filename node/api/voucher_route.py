"""`POST /v1/payments/vouchers` as a pure ASGI handler, dispatched before FastAPI (`app.NodeApp`).

It is the node's hottest money route: a client streaming micropayments posts one voucher every few tokens.
Through FastAPI's middleware, router, endpoint wrapper and exception handlers a ~300-byte voucher cost the event
loop more than its verification; here it is read and answered by the same code as the FastAPI route of the
standalone payments app (`node.api.payments.voucher_answer`), inside the app's own metrics and body-limit
middleware (so `/metrics` and the 413s are the same), with nothing else on the way.
"""

from __future__ import annotations

import json
from types import SimpleNamespace

from starlette.types import Receive, Scope, Send

from dcml.node.api.body_limit import BodyLimitMiddleware
from dcml.node.api.errors import APIError, error_response, internal_error
from dcml.node.api.metrics import MetricsMiddleware, NodeMetrics
from dcml.node.api.payments import MAX_VOUCHER_BODY, VOUCHERS_PATH, AcceptVoucher, voucher_answer

_JSON = [(b"content-type", b"application/json")]
_ROUTE = SimpleNamespace(path=VOUCHERS_PATH)  # what the metrics label a request by, as FastAPI's route would


class VoucherRoute:
    def __init__(self, accept: AcceptVoucher, metrics: NodeMetrics, max_body_bytes: int) -> None:
        self.accept = accept
        self._app = MetricsMiddleware(BodyLimitMiddleware(self._serve, max_bytes=max_body_bytes), metrics=metrics)

    @staticmethod
    def matches(scope: Scope) -> bool:
        return scope["type"] == "http" and scope["path"] == VOUCHERS_PATH and scope["method"] == "POST"

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        scope["route"] = _ROUTE
        await self._app(scope, receive, send)

    async def _serve(self, scope: Scope, receive: Receive, send: Send) -> None:
        body, more = bytearray(), True
        try:
            while more:
                message = await receive()  # BodyLimitMiddleware's: raises past the node's body limit
                if message["type"] == "http.disconnect":  # hung up mid-body: nobody to answer (499, as the app)
                    await send({"type": "http.response.start", "status": 499, "headers": []})
                    await send({"type": "http.response.body", "body": b""})
                    return
                if len(body) <= MAX_VOUCHER_BODY:  # past it: drained, not kept (the parser refuses it as too large)
                    body += message.get("body", b"")
                more = message.get("more_body", False)
            status, answer = await voucher_answer(bytes(body), self.accept)
        except APIError as exc:  # the body limit's 413
            await error_response(exc)(scope, receive, send)
            return
        except Exception as exc:  # as the app's own handler: an id for the operator, no detail for the client
            await error_response(internal_error(exc, "vouchers"))(scope, receive, send)
            return
        raw = json.dumps(answer, separators=(",", ":")).encode()
        await send({"type": "http.response.start", "status": status,
                    "headers": [*_JSON, (b"content-length", str(len(raw)).encode())]})
        await send({"type": "http.response.body", "body": raw})
