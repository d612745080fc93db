"""OpenAI-compatible routes (`/v1/chat/completions`, `/v1/completions`, `/v1/models`) in vLLM's exact shapes.

Every answer is metered and ends with a signed receipt (`node.receipts`): non-streamed in the
`X-DCML-Receipt` header, streamed as an `event: dcml-receipt` SSE event after `data: [DONE]`, where
the official OpenAI SDK has already stopped reading. For a sealed request (`client.e2e`) the receipt and
the acceptance are sealed too and no receipt id travels in clear: their requestHash would let anyone on
the path test a guess of the prompt.
"""

from __future__ import annotations

import asyncio
import base64
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import anyio
from fastapi import APIRouter, Request
from fastapi.responses import Response, StreamingResponse

from dcml.client.wire.e2e import SEALED_CONTENT_TYPE, ResponseKey
from dcml.client.wire.errors import ErrorType, PaymentReason
from dcml.client.wire.receipts import (
    RECEIPT_EVENT,
    RECEIPT_HEADER,
    RECEIPT_ID_HEADER,
    StreamHasher,
    request_hash,
    response_hash,
)
from dcml.client.wire.x402 import ACCEPTANCE_HEADER, NEED_VOUCHER_EVENT, PAYMENT_TIMEOUT_EVENT
from dcml.node.api.errors import APIError, Overloaded, RequestTimeout, Unavailable, error_body, internal_error
from dcml.node.api.openai_plan import Kind, Plan, parse
from dcml.node.api.openai_shapes import Shapes, merge_delta, merge_logprobs
from dcml.node.api.payments import PaymentAPIError
from dcml.node.api.sealing import OpenedBody, open_body
from dcml.node.api.sse import DONE, SSE_HEADERS, data_event, named_event
from dcml.node.api.state import NodeState, node_state
from dcml.node.engine.base import EngineFailed, EngineOverloaded, EngineRejected, EngineUnavailable, TokenChunk
from dcml.node.logging import get_logger
from dcml.node.payments.errors import PaymentNeeded
from dcml.node.payments.gate import Admission
from dcml.node.payments.metering import OutputMeter
from dcml.node.receipts.signer import Measurement, new_receipt_id

log = get_logger("dcml.api")
router = APIRouter()


async def _aclose(stream: AsyncIterator[TokenChunk]) -> None:
    """Close the engine's stream (an async generator), which frees its engine slot at once."""
    close = getattr(stream, "aclose", None)
    if close is not None:
        await close()


async def _first_chunk(stream: AsyncIterator[TokenChunk]) -> TokenChunk | None:
    """Pull the first chunk before answering, so overload is a clean 429 rather than a broken 200 stream."""
    try:
        return await anext(stream)
    except StopAsyncIteration:
        return None
    except EngineOverloaded as exc:
        raise Overloaded(f"The node is at capacity ({exc}); retry after a short wait.", code="overloaded",
                         headers={"Retry-After": "1"}) from None
    except EngineUnavailable as exc:
        raise Unavailable(f"The node's inference server is not ready ({exc}); retry shortly.",
                          code="engine_unavailable", headers={"Retry-After": "5"}) from None
    except EngineRejected as exc:  # the upstream's own 4xx, with its message (e.g. context length, bad value)
        raise _Rejected(exc) from None


class _Rejected(APIError):
    def __init__(self, exc: EngineRejected) -> None:
        super().__init__(exc.message, param=exc.param, code="invalid_value" if exc.status == 400 else None)
        self.status = exc.status
        if exc.status == 404:
            self.reason = "not_found"


async def _start(stream: AsyncIterator[TokenChunk],
                 admission: Admission | None) -> tuple[OutputMeter, TokenChunk | None]:
    """The engine's first chunk, with the paid request's charge committed meanwhile: the commit (fsync,
    acceptance signature) runs while the engine reads the prompt, so the first token waits for the later of the
    two, not for both. Nothing is sent before the commit is durable. The check reserved the funds
    (`PaymentGate.check`), so a commit is refused only by a failing disk or by a running stream of the same
    channel charging what the check saw; then the engine is stopped. A start that fails refunds the commit."""
    if admission is None:
        try:
            return OutputMeter(), await _first_chunk(stream)
        except BaseException:
            await _aclose(stream)
            raise
    commit = asyncio.ensure_future(admission.commit())  # its own task: a client's disconnect cannot cut it
    try:
        first = await _first_chunk(stream)
    except BaseException:
        await _aclose(stream)
        meter = (await asyncio.gather(commit, return_exceptions=True))[0]
        if isinstance(meter, OutputMeter):
            await meter.refund()  # nothing was served: the prompt is not charged
        raise
    try:
        return await commit, first
    except BaseException:
        await _aclose(stream)
        raise


async def _read_body(request: Request, timeout_s: float) -> bytes:
    """The whole body within `timeout_s`: a client trickling it ties up a connection, never the node's clocks."""
    try:
        with anyio.fail_after(timeout_s):
            return await request.body()
    except TimeoutError:
        raise RequestTimeout(f"the request body did not arrive within {timeout_s:g} s; send it at once",
                             code="body_timeout") from None


async def _serve(request: Request, kind: Kind) -> Response:
    state = node_state(request)
    accepted_at = time.time()
    raw = await _read_body(request, state.settings.limits.body_read_timeout_s)
    opened = open_body(request, raw, state.identity, state.replay)  # sealing errors before opening stay plaintext
    try:
        plan = parse(kind, opened.body, state)
        req_hash = request_hash(opened.body)
        admission = None
        if state.gate is not None:  # paid node: every payment check passes before any compute
            admission = await state.gate.check(headers=request.headers, model=plan.model, request_hash=req_hash,
                                               prompt_tokens=plan.prompt_tokens,
                                               max_tokens=plan.generation.params.max_tokens, stream=plan.stream,
                                               accepted_at=accepted_at, resource=str(request.url))
        # The SLA clock starts once the whole body is read and the request checked: a client that trickles
        # its body (or a slow payment check it caused) must not be able to inflate the node's TTFT.
        t0 = time.perf_counter()
        stream = state.engine.stream(plan.generation)
        meter, first = await _start(stream, admission)
        ttft = time.perf_counter() - t0
        state.metrics.ttft.labels(plan.model).observe(ttft)
        state.metrics.prompt_tokens.labels(plan.model).inc(plan.prompt_tokens)
        answer = _Answer(state, plan, req_hash, accepted_at, t0, ttft, meter, sealing=opened)
        if plan.stream:
            return _streaming_response(answer, first, stream, opened.key)
        return await _full_response(answer, first, stream, opened.key)
    except Exception as exc:
        err = (exc if isinstance(exc, APIError) else PaymentAPIError(exc) if isinstance(exc, PaymentNeeded)
               else internal_error(exc, kind))
        if opened.key is None:
            raise err from None
        # The request was sealed: even the error may reveal something about it, so it is sealed too.
        body = error_body(err.message, err.type, err.param, err.code)
        return Response(opened.key.seal(body, 0, True), status_code=err.status, media_type=SEALED_CONTENT_TYPE,
                        headers={**err.headers, **opened.headers})


@dataclass
class _Answer:
    """One admitted request on its way out: what the receipt will say, and its payment meter."""

    state: NodeState
    plan: Plan
    request_hash: str
    accepted_at: float
    t0: float
    ttft: float
    meter: OutputMeter
    sealing: OpenedBody | None = None
    signed_json: str | None = None  # the receipt, once signed and stored: one per request

    def check_usage(self, chunk: TokenChunk) -> None:
        """Cross-check an upstream's prompt count with the node's own. Billing keeps the node's count (charged at
        admission, before the upstream saw the request; a client can recompute it with the model's tokenizer);
        a mismatch is logged and counted in `dcml_upstream_token_mismatch_total`."""
        upstream = (chunk.usage or {}).get("prompt_tokens")
        if upstream is None or upstream == self.plan.prompt_tokens:
            return
        self.state.metrics.token_mismatch.labels("prompt").inc()
        log.warning("upstream_token_mismatch", kind="prompt", node=self.plan.prompt_tokens, upstream=upstream)

    async def receipt(self, receipt_id: str, response_hash_: str) -> str:
        """Sign and durably store the receipt (once: a second call returns the first); returns its wire JSON.
        Shielded from the client's hang-up, so a receipt is either wholly written and counted or not started.
        Its duration (and so the decode rate the court derives from it) leaves out the pauses spent waiting for
        the payer's vouchers."""
        if self.signed_json is not None:
            return self.signed_json
        with anyio.CancelScope(shield=True):
            output_tokens = self.meter.output_tokens  # a paid request's: what was charged, to the token
            duration = time.perf_counter() - self.t0 - self.meter.paused_s
            signed = self.state.signer.sign(receipt_id, Measurement(
                request_hash=self.request_hash, response_hash=response_hash_, input_tokens=self.plan.prompt_tokens,
                output_tokens=output_tokens, accepted_at=self.accepted_at, ttft_s=self.ttft, duration_s=duration,
                **self.meter.receipt_fields()))
            await self.state.store.put(signed)
            m = self.state.metrics  # counted once the receipt is durable: metrics equal the receipts
            m.output_tokens.labels(self.plan.model).inc(output_tokens)
            m.generation_seconds.labels(self.plan.model).observe(duration)
            self.signed_json = signed_json = signed.model_dump_json(by_alias=True)
        log.debug("answered", receipt_id=receipt_id, model=self.plan.model, input_tokens=self.plan.prompt_tokens,
                  output_tokens=output_tokens, ttft_ms=round(1000 * self.ttft, 1),
                  duration_ms=round(1000 * duration, 1))
        return signed_json

    def headers(self) -> dict[str, str]:
        """Payment headers (the acceptance sealed when the request was) and, when sealed, the salt and flag."""
        headers = dict(self.meter.headers)
        if self.sealing is not None and self.sealing.key is not None:
            if ACCEPTANCE_HEADER in headers:
                headers[ACCEPTANCE_HEADER] = self.sealing.seal_header("acceptance", headers[ACCEPTANCE_HEADER])
            headers.update(self.sealing.headers)
        return headers


async def _full_response(answer: _Answer, first: TokenChunk | None, stream: AsyncIterator[TokenChunk],
                         key: ResponseKey | None) -> Response:
    parts: list[str] = []
    last: TokenChunk | None = None
    logprobs: Any = None
    extra: dict | None = None  # tool_calls and other message fields, as vLLM streamed them
    chunk = first
    output_tokens = 0
    meter = answer.meter
    try:
        while chunk is not None:
            parts.append(chunk.text)
            output_tokens += chunk.tokens
            logprobs = merge_logprobs(logprobs, chunk.logprobs)
            extra = merge_delta(extra, chunk.delta)
            if chunk.finish_reason is not None:
                last = chunk
            answer.check_usage(chunk)
            chunk = await anext(stream, None)
    except Exception:
        await meter.refund()  # the answer broke before any of it was delivered: nothing is charged
        raise
    finally:
        await _aclose(stream)
    await meter.charge_all(output_tokens)  # PaymentNeeded: refunded, nothing is delivered and nothing charged
    body = Shapes(answer.plan).full("".join(parts), last, meter.output_tokens, logprobs, extra)
    receipt_id = new_receipt_id()
    receipt_json = await answer.receipt(receipt_id, response_hash(body))
    headers = answer.headers()
    if key is not None:
        headers[RECEIPT_HEADER] = base64.b64encode(key.seal_aux("receipt", receipt_json.encode())).decode()
        return Response(key.seal(body, 0, True), media_type=SEALED_CONTENT_TYPE, headers=headers)
    headers.update({RECEIPT_ID_HEADER: receipt_id, RECEIPT_HEADER: base64.b64encode(receipt_json.encode()).decode()})
    return Response(body, media_type="application/json", headers=headers)


def _streaming_response(answer: _Answer, first: TokenChunk | None, stream: AsyncIterator[TokenChunk],
                        key: ResponseKey | None) -> StreamingResponse:
    shapes = Shapes(answer.plan)
    receipt_id = new_receipt_id()
    hasher = StreamHasher()
    meter = answer.meter
    seq = 0

    def emit(payload: bytes) -> bytes:
        # responseHash covers the plaintext payloads in order, [DONE] included (client.receipts).
        nonlocal seq
        hasher.update(payload)
        if key is not None:
            payload = key.seal(payload, seq, payload == DONE)
            seq += 1
        return data_event(payload)

    async def body() -> AsyncIterator[bytes]:
        try:
            if answer.plan.kind == "chat":
                yield emit(shapes.role_chunk())
            chunk = first
            try:
                while chunk is not None:
                    # The meter persists the cost before the tokens leave; past accepted + credit it asks for a
                    # voucher and pauses the stream until one comes, or stops it.
                    while True:
                        verdict = await meter.on_chunk(chunk.tokens)
                        if verdict.ask is not None:
                            yield named_event(NEED_VOUCHER_EVENT, verdict.ask.model_dump_json(by_alias=True).encode())
                        if verdict.paid or verdict.stop:
                            break
                    if verdict.stop:
                        answer.state.metrics.errors.labels("payment_timeout").inc()
                        yield named_event(PAYMENT_TIMEOUT_EVENT, error_body(
                            f"no voucher came within {meter.voucher_timeout_s:g} s; the stream ends here and the "
                            "tokens already sent are paid from your vouchers", ErrorType.PAYMENT, None,
                            PaymentReason.PAYMENT_TIMEOUT))
                        break
                    answer.check_usage(chunk)
                    if chunk.text or chunk.finish_reason is not None or chunk.delta or chunk.logprobs:
                        yield emit(shapes.chunk(chunk))  # like vLLM: no chunk for textless tokens
                    chunk = await anext(stream, None)
            except Exception as exc:  # mid-stream failure: vLLM sends an error event, then [DONE]
                answer.state.metrics.errors.labels("stream_aborted").inc()
                if isinstance(exc, EngineFailed):
                    log.error("engine_failed_mid_stream", receipt_id=receipt_id, output_tokens=meter.output_tokens,
                              error=str(exc))
                    body_ = error_body(f"The inference server failed mid-answer after {meter.output_tokens} "
                                       "tokens; those are in the receipt and are all that is charged. Retry.",
                                       ErrorType.INTERNAL, None, "engine_failed")
                else:
                    err = internal_error(exc, "stream")
                    body_ = error_body(err.message, err.type, None, err.code)
                yield emit(body_)
            await meter.finish()  # e.g. an answer with no output token: nothing to pay for it
            if answer.plan.include_usage:
                yield emit(shapes.usage_chunk(meter.output_tokens))
            yield emit(DONE)
            receipt_json = await answer.receipt(receipt_id, hasher.hexdigest())
            yield named_event(RECEIPT_EVENT, receipt_json.encode() if key is None
                              else key.seal_aux("receipt", receipt_json.encode()))
        finally:
            with anyio.CancelScope(shield=True):  # the client's disconnect cancels us; finish the bookkeeping
                await _aclose(stream)  # frees the engine slot when the client disconnects
                if answer.signed_json is None:  # hung up before the receipt: one is still written, exactly one
                    await meter.finish()
                    await _receipt_after_disconnect(answer, receipt_id, hasher)

    headers = {**SSE_HEADERS, **answer.headers()}
    if key is None:
        headers[RECEIPT_ID_HEADER] = receipt_id
    return StreamingResponse(body(), media_type="text/event-stream", headers=headers)


async def _receipt_after_disconnect(answer: _Answer, receipt_id: str, hasher: StreamHasher) -> None:
    """The client went away mid-answer: still sign and keep a receipt for what was served (a prefix of the
    stream, no [DONE]), so a no-response dispute over this accepted request can be answered with it. The
    client can fetch it at /v1/receipts?request_hash=."""
    try:
        await answer.receipt(receipt_id, hasher.hexdigest())
        log.debug("receipt_after_disconnect", receipt_id=receipt_id, output_tokens=answer.meter.output_tokens)
    except Exception:
        log.exception("receipt_after_disconnect_failed", receipt_id=receipt_id)


@router.post("/v1/chat/completions")
async def chat_completions(request: Request) -> Response:
    return await _serve(request, "chat")


@router.post("/v1/completions")
async def completions(request: Request) -> Response:
    return await _serve(request, "completion")


@router.get("/v1/models")
async def models(request: Request) -> dict:
    engine = node_state(request).engine
    return {"object": "list", "data": [{
        "id": engine.model_name, "object": "model", "created": int(time.time()), "owned_by": "dcml",
        "root": engine.model_name, "parent": None, "max_model_len": engine.max_context, "permission": []}]}
