"""`POST /v1/payments/vouchers` as a pure ASGI handler, dispatched before FastAPI (`app.NodeApp`).

It is the node's hottest money route: a client streaming micropayments posts one voucher every few tokens.
Through FastAPI's middleware, router, endpoint wrapper and exception handlers a ~300-byte voucher cost the event
loop more than its verification; here it is read, answered (`node.api.payments.voucher_answer`, the same code
as the FastAPI route of the standalone payments app), bounded by the body limit and counted in `/metrics` exactly
as the middleware would, with nothing else on the way.
"""

from __future__ import annotations

import json
import time

from starlette.types import Receive, Scope, Send

from dcml.node.api.body_limit import too_large
from dcml.node.api.errors import error_response, internal_error
from dcml.node.api.metrics import NodeMetrics
from dcml.node.api.payments import MAX_VOUCHER_BODY, VOUCHERS_PATH, AcceptVoucher, voucher_answer

_JSON = [(b"content-type", b"application/json")]


class VoucherRoute:
    def __init__(self, accept: AcceptVoucher, metrics: NodeMetrics, max_body_bytes: int) -> None:
        self.accept, self.metrics, self.max_body_bytes = accept, metrics, max_body_bytes
        # The common answer's counters, looked up once (a label lookup costs as much as the increment).
        self._ok = metrics.requests.labels(VOUCHERS_PATH, "POST", "200")
        self._seconds = metrics.request_seconds.labels(VOUCHERS_PATH)

    @staticmethod
    def matches(scope: Scope) -> bool:
        return scope["type"] == "http" and scope["path"] == VOUCHERS_PATH and scope["method"] == "POST"

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        start = time.perf_counter()
        self.metrics.in_flight.inc()
        status = 500
        try:
            status = await self._serve(scope, receive, send)
        finally:
            self.metrics.in_flight.dec()
            if status == 200:
                self._ok.inc()
                self._seconds.observe(time.perf_counter() - start)
            else:
                self.metrics.count(VOUCHERS_PATH, "POST", status, time.perf_counter() - start)

    async def _serve(self, scope: Scope, receive: Receive, send: Send) -> int:
        for name, value in scope["headers"]:
            if name == b"content-length" and value.isdigit() and int(value) > self.max_body_bytes:
                return await _answer(send, error_response(too_large(self.max_body_bytes)), scope, receive)
        body, seen, more = bytearray(), 0, True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":  # hung up mid-body: nobody to answer (499, as the app does)
                await send({"type": "http.response.start", "status": 499, "headers": []})
                await send({"type": "http.response.body", "body": b""})
                return 499
            chunk = message.get("body", b"")
            seen += len(chunk)
            if seen > self.max_body_bytes:  # chunked, without (or lying about) Content-Length
                return await _answer(send, error_response(too_large(self.max_body_bytes)), scope, receive)
            if len(body) <= MAX_VOUCHER_BODY:  # past it: drained, not kept (the parser refuses it as too large)
                body += chunk
            more = message.get("more_body", False)
        try:
            status, answer = await voucher_answer(bytes(body), self.accept)
        except Exception as exc:  # as the app's own handler: an id for the operator, no detail for the client
            return await _answer(send, error_response(internal_error(exc, "vouchers")), scope, receive)
        raw = json.dumps(answer, separators=(",", ":")).encode()
        await send({"type": "http.response.start", "status": status,
                    "headers": [*_JSON, (b"content-length", str(len(raw)).encode())]})
        await send({"type": "http.response.body", "body": raw})
        return status


async def _answer(send: Send, response, scope: Scope, receive: Receive) -> int:
    await response(scope, receive, send)
    return response.status_code
