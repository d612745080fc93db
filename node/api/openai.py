"""OpenAI-compatible routes (`/v1/chat/completions`, `/v1/completions`, `/v1/models`) in vLLM's exact shapes.

Every answer is metered and ends with a signed receipt (`node.receipts`): non-streamed in the
`X-DCML-Receipt` header, streamed as an `event: dcml-receipt` SSE event after `data: [DONE]`, where
the official OpenAI SDK has already stopped reading. For a sealed request (`client.e2e`) the receipt and
the acceptance are sealed too and no receipt id travels in clear: their requestHash would let anyone on
the path test a guess of the prompt.
"""

from __future__ import annotations

import base64
import copy
import json
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any, Literal

import anyio
from fastapi import APIRouter, Request
from fastapi.responses import Response, StreamingResponse
from pydantic import ValidationError

from client.e2e import SEALED_CONTENT_TYPE, ResponseKey
from client.receipts import (
    RECEIPT_EVENT,
    RECEIPT_HEADER,
    RECEIPT_ID_HEADER,
    StreamHasher,
    request_hash,
    response_hash,
)
from client.x402 import ACCEPTANCE_HEADER, NEED_VOUCHER_EVENT, PAYMENT_TIMEOUT_EVENT
from node.api.errors import (
    APIError,
    BadRequest,
    ModelNotFound,
    Overloaded,
    PayloadTooLarge,
    RequestTimeout,
    Unavailable,
    error_body,
    internal_error,
)
from node.api.protocol import ChatCompletionRequest, CompletionRequest
from node.api.sealing import OpenedBody, open_body
from node.api.sse import DONE, SSE_HEADERS, data_event, named_event
from node.api.state import NodeState, node_state
from node.engine.base import (
    EngineFailed,
    EngineOverloaded,
    EngineRejected,
    EngineUnavailable,
    GenerationRequest,
    SamplingParams,
    TokenChunk,
)
from node.logging import get_logger
from node.payments.gate import PaidRequest
from node.receipts import Metering, new_receipt_id

log = get_logger("dcml.api")
router = APIRouter()
Kind = Literal["chat", "completion"]
_REASK_S = 1.0  # a stream paused for funds asks again this often (other streams of its channel may spend them)
# Fields the node decides or reads itself; every other field a client sets goes to the engine as sent.
_NODE_FIELDS = frozenset({"model", "messages", "prompt", "stream", "stream_options", "max_tokens",
                          "max_completion_tokens"})
# Values that ask for nothing: an engine that does not implement the field still takes them.
_NEUTRAL = {"n": 1, "echo": False, "logprobs": False, "presence_penalty": 0, "frequency_penalty": 0,
            "repetition_penalty": 1, "parallel_tool_calls": True}
_MISSING = object()


def _json(obj: dict) -> bytes:
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode()


@dataclass
class _Plan:
    """A validated request, ready for the engine."""

    kind: Kind
    model: str
    generation: GenerationRequest
    prompt_tokens: int
    stream: bool
    include_usage: bool


def _parse(kind: Kind, body: bytes, state: NodeState) -> _Plan:
    model_cls = ChatCompletionRequest if kind == "chat" else CompletionRequest
    try:
        req = model_cls.model_validate_json(body)
        prompt = (state.engine.render_chat([{"role": m.role, "content": m.text()} for m in req.messages])
                  if isinstance(req, ChatCompletionRequest) else req.prompt_text())
    except ValidationError as exc:
        err = exc.errors()[0]
        if err["type"] == "json_invalid":
            raise BadRequest("Request body is not valid JSON: " + err["msg"], code="invalid_json") from None
        param = ".".join(str(p) for p in err["loc"]) or None
        raise BadRequest(f"Invalid value for {param or 'the request'}: {err['msg']}", param=param) from None
    except ValueError as exc:
        raise BadRequest(str(exc), param="prompt") from None
    engine, limits = state.engine, state.settings.limits
    if req.model != engine.model_name:
        raise ModelNotFound(engine.model_name)
    fields = {k: v for k, v in req.model_dump(exclude_unset=True).items() if k not in _NODE_FIELDS}
    _refuse_unsupported(engine, fields)

    prompt_tokens = engine.count_tokens(prompt)
    prompt_cap = min(limits.max_prompt_tokens, engine.max_context - 1)
    if prompt_tokens > prompt_cap:
        raise PayloadTooLarge(f"The prompt has {prompt_tokens} tokens; this node accepts at most {prompt_cap}. "
                              "Shorten the prompt or the conversation.", param="messages" if kind == "chat"
                              else "prompt", code="prompt_too_long")
    room = engine.max_context - prompt_tokens
    requested = req.requested_max_tokens()
    if requested is None:
        max_tokens = min(limits.default_max_tokens, limits.max_tokens_cap, room)
    elif requested > limits.max_tokens_cap:
        raise BadRequest(f"max_tokens={requested} is above this node's cap of {limits.max_tokens_cap}; ask for "
                         "fewer tokens.", param="max_tokens", code="max_tokens_too_large")
    elif requested > room:
        raise BadRequest(f"This model's maximum context length is {engine.max_context} tokens. However, you "
                         f"requested {prompt_tokens + requested} tokens ({prompt_tokens} in the prompt, "
                         f"{requested} in the completion). Reduce max_tokens or the prompt.",
                         param="max_tokens", code="context_length_exceeded")
    else:
        max_tokens = requested
    params = SamplingParams(max_tokens=max_tokens,
                            temperature=1.0 if req.temperature is None else req.temperature,
                            top_p=1.0 if req.top_p is None else req.top_p,
                            seed=req.seed, stop=req.stop_tuple())
    messages = ([m.model_dump(exclude_unset=True) for m in req.messages]
                if isinstance(req, ChatCompletionRequest) else None)
    generation = GenerationRequest(prompt=prompt, params=params, upstream=fields, messages=messages)
    return _Plan(kind, req.model, generation, prompt_tokens, req.stream, req.include_usage)


def _refuse_unsupported(engine: object, fields: dict) -> None:
    """An engine that lists what it implements (`supported_params`) gets a 400 naming any other field a client
    sets, rather than silently ignoring it; None (the openai/vLLM engine) forwards them all."""
    supported = getattr(engine, "supported_params", None)
    if supported is None:
        return
    for name, value in fields.items():
        neutral = _NEUTRAL.get(name, _MISSING)
        # bool-ness must match too: completions' `logprobs: 0` asks for the sampled token's logprob
        if name in supported or value is None or (value == neutral and isinstance(value, bool) == isinstance(
                neutral, bool)):
            continue
        raise BadRequest(f"`{name}` is not supported by this node's engine; remove it (supported: "
                         f"{', '.join(sorted(supported | _NODE_FIELDS))}).", param=name, code="unsupported_parameter")


class _Shapes:
    """vLLM's response and chunk objects for one answer."""

    def __init__(self, plan: _Plan) -> None:
        self.plan = plan
        self.created = int(time.time())
        # Node-generated, never from the client (a client-chosen id could collide with another's).
        self.id = ("chatcmpl-" if plan.kind == "chat" else "cmpl-") + uuid.uuid4().hex

    def _head(self, obj: str) -> dict:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.plan.model}

    def usage(self, output_tokens: int) -> dict:
        p = self.plan.prompt_tokens
        return {"prompt_tokens": p, "total_tokens": p + output_tokens, "completion_tokens": output_tokens}

    def role_chunk(self) -> bytes:
        return _json({**self._head("chat.completion.chunk"), "choices": [
            {"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}]})

    def chunk(self, c: TokenChunk) -> bytes:
        if self.plan.kind == "chat":
            choice = {"index": 0, "delta": {"content": c.text, **(c.delta or {})}, "logprobs": c.logprobs,
                      "finish_reason": c.finish_reason}
            if c.finish_reason is not None:
                choice["stop_reason"] = c.stop_reason
            return _json({**self._head("chat.completion.chunk"), "choices": [choice]})
        choice = {"index": 0, "text": c.text, "logprobs": c.logprobs, "finish_reason": c.finish_reason,
                  "stop_reason": c.stop_reason}
        return _json({**self._head("text_completion"), "choices": [choice]})

    def usage_chunk(self, output_tokens: int) -> bytes:
        obj = "chat.completion.chunk" if self.plan.kind == "chat" else "text_completion"
        return _json({**self._head(obj), "choices": [], "usage": self.usage(output_tokens)})

    def full(self, text: str, last: TokenChunk | None, output_tokens: int, logprobs: Any,
             extra: dict | None = None) -> bytes:
        finish, stop_reason = (last.finish_reason, last.stop_reason) if last is not None else (None, None)
        if self.plan.kind == "chat":
            message = {"role": "assistant", "content": text, **_message_fields(extra)}
            choice = {"index": 0, "message": message, "logprobs": logprobs, "finish_reason": finish,
                      "stop_reason": stop_reason}
            return _json({**self._head("chat.completion"), "choices": [choice], "usage": self.usage(output_tokens)})
        choice = {"index": 0, "text": text, "logprobs": logprobs, "finish_reason": finish, "stop_reason": stop_reason}
        return _json({**self._head("text_completion"), "choices": [choice], "usage": self.usage(output_tokens)})


def _merge_logprobs(acc: Any, part: Any) -> Any:
    """Streamed logprobs pieces into one answer's: chat `{"content": [...]}`, completions a dict of lists."""
    if part is None:
        return acc
    if acc is None:
        return {k: list(v) if isinstance(v, list) else v for k, v in part.items()}
    for k, v in part.items():
        if isinstance(v, list) and isinstance(acc.get(k), list):
            acc[k].extend(v)
    return acc


def _merge_delta(acc: dict | None, part: dict | None) -> dict | None:
    """Streamed chat deltas beyond the text (tool_calls, reasoning, ...) into one message's fields, by the OpenAI
    SDK's own rules (strings concatenate, list entries merge by their `index`): vLLM's streamed tool call arrives
    as an id and name, then pieces of its arguments."""
    if not part:
        return acc
    # Imported here: the openai package costs ~0.4 s at start, and only upstream deltas need it (openai is pinned).
    from openai.lib.streaming._deltas import accumulate_delta

    try:
        return accumulate_delta(acc if acc is not None else {}, copy.deepcopy(part))
    except (TypeError, RuntimeError) as exc:  # entries without an integer index: not an OpenAI delta
        raise EngineFailed(f"the inference server sent a delta that cannot be merged: {exc}") from None


def _message_fields(merged: dict | None) -> dict:
    """Merged deltas as a non-streamed message's fields: tool calls lose the `index` that only streaming uses."""
    if not merged:
        return {}
    out = dict(merged)
    if isinstance(out.get("tool_calls"), list):
        out["tool_calls"] = [{k: v for k, v in tc.items() if k != "index"} if isinstance(tc, dict) else tc
                             for tc in out["tool_calls"]]
    return out


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
            self.code = "not_found"


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
    paid: PaidRequest | None = None
    try:
        plan = _parse(kind, opened.body, state)
        req_hash = request_hash(opened.body)
        if state.gate is not None:  # paid node: admit (and charge the prompt) before any compute
            paid = await state.gate.admit(headers=request.headers, model=plan.model, request_hash=req_hash,
                                          prompt_tokens=plan.prompt_tokens,
                                          max_tokens=plan.generation.params.max_tokens, stream=plan.stream,
                                          accepted_at=accepted_at, resource=str(request.url))
        # The SLA clock starts once the whole body is read and the request admitted: a client that trickles
        # its body (or a slow payment check it caused) must not be able to inflate the node's TTFT.
        t0 = time.perf_counter()
        stream = state.engine.stream(plan.generation)
        try:
            first = await _first_chunk(stream)
        except BaseException:
            await stream.aclose()
            if paid is not None:
                await state.gate.refund(paid)  # nothing was served: the prompt is not charged
            raise
        ttft = time.perf_counter() - t0
        state.metrics.ttft.labels(plan.model).observe(ttft)
        state.metrics.prompt_tokens.labels(plan.model).inc(plan.prompt_tokens)
        meter = _Meter(state, plan, req_hash, accepted_at, t0, ttft, paid, sealing=opened)
        if plan.stream:
            return _streaming_response(meter, first, stream, opened.key)
        return await _full_response(meter, first, stream, opened.key)
    except Exception as exc:
        err = exc if isinstance(exc, APIError) else internal_error(exc, kind)
        if opened.key is None:
            raise err from None
        # The request was sealed: even the error may reveal something about it, so it is sealed too.
        body = error_body(err.message, err.type, err.param, err.code)
        return Response(opened.key.seal(body, 0, True), status_code=err.status, media_type=SEALED_CONTENT_TYPE,
                        headers={**err.headers, **opened.headers})


@dataclass
class _Meter:
    state: NodeState
    plan: _Plan
    request_hash: str
    accepted_at: float
    t0: float
    ttft: float
    paid: PaidRequest | None = None
    output_tokens: int = 0
    paused_s: float = 0.0  # time the stream waited for the payer's voucher: the client's, not the node's
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
            # A paid request's receipt counts what was charged, to the token (gate.charge_output).
            output_tokens = self.paid.output_tokens if self.paid is not None else self.output_tokens
            duration = time.perf_counter() - self.t0 - self.paused_s
            signed = self.state.signer.sign(receipt_id, Metering(
                request_hash=self.request_hash, response_hash=response_hash_, input_tokens=self.plan.prompt_tokens,
                output_tokens=output_tokens, accepted_at=self.accepted_at, ttft_s=self.ttft, duration_s=duration,
                **_paid_fields(self.paid)))
            await self.state.store.put(signed)
            self.signed_json = signed.model_dump_json(by_alias=True)
            m = self.state.metrics  # counted once the receipt is durable: metrics equal the receipts
            m.output_tokens.labels(self.plan.model).inc(output_tokens)
            m.generation_seconds.labels(self.plan.model).observe(duration)
        log.debug("answered", receipt_id=receipt_id, model=self.plan.model, input_tokens=self.plan.prompt_tokens,
                  output_tokens=output_tokens, ttft_ms=round(1000 * self.ttft, 1),
                  duration_ms=round(1000 * duration, 1))
        return self.signed_json


def _paid_fields(paid: PaidRequest | None) -> dict:
    if paid is None:
        return {}
    return {"channel_id": paid.channel_id, "cost": paid.cost, "cumulative_spent": paid.spent}


def _paid_headers(meter: _Meter) -> dict[str, str]:
    """Payment headers (the acceptance sealed when the request was) and, when sealed, the salt and flag."""
    headers = dict(meter.paid.headers) if meter.paid is not None else {}
    if meter.sealing is not None and meter.sealing.key is not None:
        if ACCEPTANCE_HEADER in headers:
            headers[ACCEPTANCE_HEADER] = meter.sealing.seal_header("acceptance", headers[ACCEPTANCE_HEADER])
        headers.update(meter.sealing.headers)
    return headers


async def _full_response(meter: _Meter, first: TokenChunk | None, stream: AsyncIterator[TokenChunk],
                         key: ResponseKey | None) -> Response:
    parts: list[str] = []
    last: TokenChunk | None = None
    logprobs: Any = None
    extra: dict | None = None  # tool_calls and other message fields, as vLLM streamed them
    chunk = first
    paid, gate = meter.paid, meter.state.gate
    try:
        while chunk is not None:
            parts.append(chunk.text)
            meter.output_tokens += chunk.tokens
            logprobs = _merge_logprobs(logprobs, chunk.logprobs)
            extra = _merge_delta(extra, chunk.delta)
            if chunk.finish_reason is not None:
                last = chunk
            meter.check_usage(chunk)
            chunk = await anext(stream, None)
    except Exception:
        if paid is not None:
            await gate.refund(paid)  # the answer broke before any of it was delivered: nothing is charged
        raise
    finally:
        await stream.aclose()
    if paid is not None and meter.output_tokens and not (await gate.charge_output(paid, meter.output_tokens))[0]:
        # Admission reserved max_tokens, so only a concurrent request on the same channel gets here.
        await gate.refund(paid)  # nothing is delivered, so nothing is charged
        raise gate.needed(meter.plan.model, "insufficient_funds", "the channel ran out while answering (a "
                          "concurrent request spent it); top it up with a higher voucher and retry")
    body = _Shapes(meter.plan).full("".join(parts), last, meter.output_tokens, logprobs, extra)
    receipt_id = new_receipt_id()
    receipt_json = await meter.receipt(receipt_id, response_hash(body))
    headers = _paid_headers(meter)
    if key is not None:
        headers[RECEIPT_HEADER] = base64.b64encode(key.seal_aux("receipt", receipt_json.encode())).decode()
        return Response(key.seal(body, 0, True), media_type=SEALED_CONTENT_TYPE, headers=headers)
    headers.update({RECEIPT_ID_HEADER: receipt_id, RECEIPT_HEADER: base64.b64encode(receipt_json.encode()).decode()})
    return Response(body, media_type="application/json", headers=headers)


def _streaming_response(meter: _Meter, first: TokenChunk | None, stream: AsyncIterator[TokenChunk],
                        key: ResponseKey | None) -> StreamingResponse:
    shapes = _Shapes(meter.plan)
    receipt_id = new_receipt_id()
    hasher = StreamHasher()
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
        paid, gate = meter.paid, meter.state.gate
        try:
            if meter.plan.kind == "chat":
                yield emit(shapes.role_chunk())
            chunk = first
            try:
                while chunk is not None:
                    if paid is not None and chunk.tokens:
                        # Persist the cost before the tokens leave; past accepted + credit, ask and wait.
                        charged, ask = await gate.charge_output(paid, chunk.tokens)
                        if ask is not None:
                            yield named_event(NEED_VOUCHER_EVENT, ask.model_dump_json(by_alias=True).encode())
                        if not charged:
                            paused_at = time.perf_counter()
                            deadline = time.monotonic() + paid.price.voucher_timeout_s
                            while not isinstance(waited := await gate.wait_and_charge(
                                    paid, chunk.tokens, deadline=deadline, ask_after=_REASK_S,
                                    asked=ask.required_cumulative if ask else 0), bool):
                                ask = waited  # other streams of the channel spent what we asked for: ask again
                                yield named_event(NEED_VOUCHER_EVENT, ask.model_dump_json(by_alias=True).encode())
                            charged = waited
                            meter.paused_s += time.perf_counter() - paused_at
                        if not charged:
                            meter.state.metrics.errors.labels("payment_timeout").inc()
                            yield named_event(PAYMENT_TIMEOUT_EVENT, error_body(
                                f"no voucher came within {paid.price.voucher_timeout_s:g} s; the stream "
                                "ends here and the tokens already sent are paid from your vouchers",
                                "payment_required", None, "payment_timeout"))
                            break
                    meter.output_tokens += chunk.tokens
                    meter.check_usage(chunk)
                    if chunk.text or chunk.finish_reason is not None or chunk.delta or chunk.logprobs:
                        yield emit(shapes.chunk(chunk))  # like vLLM: no chunk for textless tokens
                    chunk = await anext(stream, None)
            except Exception as exc:  # mid-stream failure: vLLM sends an error event, then [DONE]
                meter.state.metrics.errors.labels("stream_aborted").inc()
                if isinstance(exc, EngineFailed):
                    log.error("engine_failed_mid_stream", receipt_id=receipt_id, output_tokens=meter.output_tokens,
                              error=str(exc))
                    body_ = error_body(f"The inference server failed mid-answer after {meter.output_tokens} "
                                       "tokens; those are in the receipt and are all that is charged. Retry.",
                                       "internal_server_error", None, "engine_failed")
                else:
                    err = internal_error(exc, "stream")
                    body_ = error_body(err.message, err.type, None, err.code)
                yield emit(body_)
            if paid is not None:
                await gate.refund_unused(paid)  # e.g. an answer with no output token: nothing to pay for it
            if meter.plan.include_usage:
                yield emit(shapes.usage_chunk(meter.output_tokens))
            yield emit(DONE)
            receipt_json = await meter.receipt(receipt_id, hasher.hexdigest())
            yield named_event(RECEIPT_EVENT, receipt_json.encode() if key is None
                              else key.seal_aux("receipt", receipt_json.encode()))
        finally:
            with anyio.CancelScope(shield=True):  # the client's disconnect cancels us; finish the bookkeeping
                await stream.aclose()  # frees the engine slot when the client disconnects
                if meter.signed_json is None:  # hung up before the receipt: one is still written, exactly one
                    if paid is not None:
                        await gate.refund_unused(paid)
                    await _receipt_after_disconnect(meter, receipt_id, hasher)

    headers = {**SSE_HEADERS, **_paid_headers(meter)}
    if key is None:
        headers[RECEIPT_ID_HEADER] = receipt_id
    return StreamingResponse(body(), media_type="text/event-stream", headers=headers)


async def _receipt_after_disconnect(meter: _Meter, receipt_id: str, hasher: StreamHasher) -> None:
    """The client went away mid-answer: still sign and keep a receipt for what was served (a prefix of the
    stream, no [DONE]), so a no-response dispute over this accepted request can be answered with it. The
    client can fetch it at /v1/receipts?request_hash=."""
    try:
        await meter.receipt(receipt_id, hasher.hexdigest())
        log.debug("receipt_after_disconnect", receipt_id=receipt_id, output_tokens=meter.output_tokens)
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
