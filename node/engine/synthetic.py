"""A model-free engine that emits words as fast as it can, and a tiny OpenAI-compatible server around it.

* `SyntheticEngine` measures everything that is not the model (gateway, payments, HTTP) and lets
  tests drive the API without torch. One "token" is one word; the output is deterministic per
  (prompt, seed). By default it runs flat out; `first_token_ms` and `tokens_per_second` make it behave
  like a model of known speed (SLA tests, demos).
* `make_upstream_app(engine)` serves `/v1/completions` (streamed or not, with `usage` and
  `stream_options.include_usage`) and vLLM's `/tokenize`, so `OpenAIUpstreamEngine` is tested against
  a real HTTP server. Like vLLM, the stream skips chunks with no text (a token that completes no
  character), so a client that counts chunks undercounts and must trust `usage`: the synthetic engine
  produces such a token every `empty_every` tokens on purpose.
"""


import asyncio
import hashlib
import json
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from dcml.node.engine.base import EngineOverloaded, GenerationRequest, SamplingParams, TokenChunk

_WORDS = (
    "the of and to in is that for it as with was on be by this are or at from his an which have not they "
    "but had one all their were can there been if more when will would who so no out up into than them"
)
WORDS = tuple(_WORDS.split(" "))


class SyntheticEngine:
    def __init__(self, *, model_name: str = "synthetic", max_context: int = 8192, max_inflight: int = 1024,
                 empty_every: int = 0, yield_every: int = 16, first_token_ms: float = 0,
                 tokens_per_second: float = 0) -> None:
        if first_token_ms < 0 or tokens_per_second < 0:
            raise ValueError("first_token_ms and tokens_per_second must be >= 0 (0 = no delay / flat out)")
        self.model_name = model_name
        self.max_context = max_context
        self.max_inflight = max_inflight
        self.empty_every = empty_every  # every n-th token carries no text (0 = never)
        self.yield_every = yield_every  # give the event loop a turn every n tokens, else run flat out
        self.first_token_s = first_token_ms / 1000  # sleep before the first token (0 = none)
        self.token_interval_s = 1 / tokens_per_second if tokens_per_second else 0.0  # 0 = flat out
        self._inflight = 0

    async def start(self) -> None:
        return None

    async def stop(self) -> None:
        return None

    def count_tokens(self, text: str) -> int:
        return len(text.split())

    def render_chat(self, messages: list[dict[str, str]]) -> str:
        return "".join(f"{m['role']}: {m['content']}\n" for m in messages) + "assistant:"

    def queue_depth(self) -> int:
        return 0  # nothing ever waits: each stream runs as soon as it is accepted

    async def stream(self, request: GenerationRequest) -> AsyncIterator[TokenChunk]:
        if self._inflight >= self.max_inflight:
            raise EngineOverloaded(f"{self._inflight} streams in flight")
        self._inflight += 1
        try:
            p = request.params
            start = int.from_bytes(hashlib.sha256(f"{p.seed}|{request.prompt}".encode()).digest()[:4], "big")
            text = ""
            loop = asyncio.get_running_loop()
            if self.first_token_s:
                await asyncio.sleep(self.first_token_s)
            first_at = loop.time()
            for i in range(p.max_tokens):
                if self.token_interval_s and i:
                    # Token i is due i intervals after the first: sleeps' overshoot does not accumulate.
                    delay = first_at + i * self.token_interval_s - loop.time()
                    if delay > 0:
                        await asyncio.sleep(delay)
                piece = "" if self.empty_every and (i + 1) % self.empty_every == 0 else " " + WORDS[
                    (start + i) % len(WORDS)]
                text += piece
                hit = min((j for j in (text.find(s) for s in p.stop if s) if j >= 0), default=-1)
                if hit >= 0:
                    yield TokenChunk(text=piece[: max(0, hit - (len(text) - len(piece)))], finish_reason="stop")
                    return
                last = i + 1 == p.max_tokens
                yield TokenChunk(text=piece, finish_reason="length" if last else None)
                if self.yield_every and (i + 1) % self.yield_every == 0:
                    await asyncio.sleep(0)
        finally:
            self._inflight -= 1


# ---------------------------------------------------------------------- OpenAI-compatible test upstream


def make_upstream_app(engine: Any):  # -> fastapi.FastAPI (imported lazily: only tests and benches need it)
    from fastapi import FastAPI, HTTPException, Request
    from fastapi.responses import JSONResponse, StreamingResponse

    app = FastAPI(title="synthetic OpenAI-compatible upstream")

    def params_of(body: dict) -> SamplingParams:
        stop = body.get("stop") or ()
        return SamplingParams(
            max_tokens=int(body.get("max_tokens") or 16), temperature=float(body.get("temperature", 1.0)),
            top_p=float(body.get("top_p", 1.0)), seed=body.get("seed"),
            stop=(stop,) if isinstance(stop, str) else tuple(stop),
        )

    @app.get("/v1/models")
    async def models() -> dict:
        return {"object": "list", "data": [{"id": engine.model_name, "object": "model",
                                            "max_model_len": engine.max_context}]}

    @app.post("/tokenize")
    async def tokenize(request: Request) -> dict:
        body = await request.json()
        n = engine.count_tokens(body["prompt"])
        return {"count": n, "max_model_len": engine.max_context, "tokens": list(range(n))}

    @app.post("/v1/completions")
    async def completions(request: Request):
        body = await request.json()
        if body.get("model") != engine.model_name:
            raise HTTPException(404, f"model {body.get('model')!r} not served")
        prompt = body["prompt"]
        gen = GenerationRequest(prompt=prompt, params=params_of(body))
        prompt_tokens = engine.count_tokens(prompt)
        cid, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())

        def usage(n: int) -> dict:
            return {"prompt_tokens": prompt_tokens, "completion_tokens": n, "total_tokens": prompt_tokens + n}

        agen = engine.stream(gen)
        try:
            first = await anext(agen)  # surfaces EngineOverloaded before any bytes are sent
        except EngineOverloaded as exc:
            return JSONResponse({"error": {"message": str(exc), "type": "overloaded"}}, status_code=429)

        async def chunks() -> AsyncIterator[TokenChunk]:
            yield first
            async for c in agen:
                yield c

        if not body.get("stream"):
            text, n, finish = "", 0, None
            async for c in chunks():
                text, n, finish = text + c.text, n + c.tokens, c.finish_reason or finish
            return {"id": cid, "object": "text_completion", "created": created, "model": engine.model_name,
                    "choices": [{"index": 0, "text": text, "finish_reason": finish, "logprobs": None}],
                    "usage": usage(n)}

        include_usage = bool((body.get("stream_options") or {}).get("include_usage"))

        async def sse() -> AsyncIterator[bytes]:
            n = 0
            async for c in chunks():
                n += c.tokens
                if not c.text and c.finish_reason is None:
                    continue  # like vLLM: no chunk for a token without text
                obj = {"id": cid, "object": "text_completion", "created": created, "model": engine.model_name,
                       "choices": [{"index": 0, "text": c.text, "finish_reason": c.finish_reason,
                                    "logprobs": None}]}
                if include_usage:
                    obj["usage"] = None
                yield f"data: {json.dumps(obj)}\n\n".encode()
            if include_usage:
                obj = {"id": cid, "object": "text_completion", "created": created, "model": engine.model_name,
                       "choices": [], "usage": usage(n)}
                yield f"data: {json.dumps(obj)}\n\n".encode()
            yield b"data: [DONE]\n\n"

        return StreamingResponse(sse(), media_type="text/event-stream")

    return app
