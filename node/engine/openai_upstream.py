"""Engine backed by any OpenAI-compatible server; meant for vLLM running beside the daemon in the CVM.

Run vLLM offline, on loopback only, from the model directory baked into (or mounted in) the CVM::

    HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 vllm serve /models/Llama-3.1-8B-Instruct \\
        --host 127.0.0.1 --port 8000 \\
        --served-model-name llama-3.1-8b-instruct \\
        --max-model-len 8192 --gpu-memory-utilization 0.90

and point the node at it::

    OpenAIUpstreamEngine("http://127.0.0.1:8000", "llama-3.1-8b-instruct",
                         tokenizer_dir="/models/Llama-3.1-8B-Instruct", max_context=8192)

Choices:
* Generation uses streamed `/v1/completions` with `stream_options.include_usage`, so billing uses
  the server's exact `usage.completion_tokens`: text chunks go out at once with tokens=1 each, and
  the last chunk (the one carrying finish_reason) is held until the usage chunk arrives and carries
  the difference, so the tokens of a stream always add up to the server's count (vLLM sends no chunk
  for a token that completes no character, and may merge several tokens into one chunk).
* `count_tokens` and `render_chat` are synchronous in the Engine protocol. With `tokenizer_dir`
  (the same directory vLLM serves) both run locally: exact, and no network on the request path.
  Without it, `count_tokens` asks the upstream's `/tokenize` (vLLM has it) over a blocking loopback
  call, and falls back to a chars/4 estimate only if `estimate_tokens=True`; `render_chat` needs
  the tokenizer's chat template and so requires `tokenizer_dir`.
* Upstream 429/503 and our own in-flight cap raise EngineOverloaded (the API answers 429).
"""

from __future__ import annotations

import json
import math
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx

from node.engine.base import EngineOverloaded, GenerationRequest, TokenChunk


class UpstreamError(RuntimeError):
    """The upstream server failed or answered something we can't use."""


class OpenAIUpstreamEngine:
    def __init__(
        self,
        base_url: str,
        model: str,
        *,
        api_key: str | None = None,
        tokenizer_dir: str | Path | None = None,
        max_context: int = 8192,
        max_inflight: int = 256,
        estimate_tokens: bool = False,
        timeout_s: float = 300.0,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.model_name = model
        self.max_context = max_context
        self.max_inflight = max_inflight
        self.estimate_tokens = estimate_tokens
        self._headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        # connect fast, but allow long gaps between streamed chunks (a busy GPU batch)
        self._timeout = httpx.Timeout(timeout_s, connect=5.0)
        self._tokenizer: Any = None
        if tokenizer_dir is not None:
            from transformers import AutoTokenizer

            self._tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
        self._client: httpx.AsyncClient | None = None
        self._sync: httpx.Client | None = None
        self._inflight = 0

    async def start(self) -> None:
        if self._client is None:
            self._client = httpx.AsyncClient(base_url=self.base_url, headers=self._headers, timeout=self._timeout)

    async def stop(self) -> None:
        if self._client is not None:
            await self._client.aclose()
            self._client = None
        if self._sync is not None:
            self._sync.close()
            self._sync = None

    def queue_depth(self) -> int:
        return self._inflight  # the upstream's own queue is not visible to us: report what we have sent

    # ------------------------------------------------------------------ tokens and chat

    def count_tokens(self, text: str) -> int:
        if self._tokenizer is not None:
            return len(self._tokenizer.encode(text, add_special_tokens=False))
        try:
            if self._sync is None:
                self._sync = httpx.Client(base_url=self.base_url, headers=self._headers, timeout=self._timeout)
            r = self._sync.post("/tokenize", json={"model": self.model_name, "prompt": text,
                                                   "add_special_tokens": False})
            r.raise_for_status()
            return int(r.json()["count"])
        except (httpx.HTTPError, KeyError, ValueError) as exc:
            if self.estimate_tokens:
                return math.ceil(len(text) / 4)
            raise UpstreamError(f"/tokenize failed: {exc}") from exc

    def render_chat(self, messages: list[dict[str, str]]) -> str:
        if self._tokenizer is None:
            raise NotImplementedError("render_chat needs tokenizer_dir (the model directory vLLM serves)")
        return self._tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)

    # ------------------------------------------------------------------ generation

    async def stream(self, request: GenerationRequest) -> AsyncIterator[TokenChunk]:
        if self._client is None:
            raise RuntimeError("engine not started")
        if self._inflight >= self.max_inflight:
            raise EngineOverloaded(f"{self._inflight} upstream streams in flight")
        p = request.params
        body: dict[str, Any] = {
            "model": self.model_name, "prompt": request.prompt, "max_tokens": p.max_tokens,
            "temperature": p.temperature, "top_p": p.top_p, "stream": True,
            "stream_options": {"include_usage": True},
        }
        if p.seed is not None:
            body["seed"] = p.seed
        if p.stop:
            body["stop"] = list(p.stop)
        self._inflight += 1
        try:
            async with self._client.stream("POST", "/v1/completions", json=body) as resp:
                if resp.status_code in (429, 503):
                    raise EngineOverloaded(f"upstream answered {resp.status_code}")
                if resp.status_code >= 400:
                    detail = (await resp.aread()).decode(errors="replace")[:500]
                    raise UpstreamError(f"upstream answered {resp.status_code}: {detail}")
                async for chunk in _parse_stream(resp):
                    yield chunk
        finally:
            self._inflight -= 1  # leaving the `async with` early closes the connection: vLLM aborts the request


async def _parse_stream(resp: httpx.Response) -> AsyncIterator[TokenChunk]:
    sent = 0  # tokens already attributed to chunks we yielded
    last: tuple[str, str] | None = None  # (text, finish_reason) of the final choice chunk, held for usage
    usage: int | None = None
    async for line in resp.aiter_lines():
        if not line.startswith("data:"):
            continue
        data = line[5:].strip()
        if data == "[DONE]":
            break
        obj = json.loads(data)
        if obj.get("usage"):
            usage = int(obj["usage"]["completion_tokens"])
        for choice in obj.get("choices") or []:
            text, finish = choice.get("text") or "", choice.get("finish_reason")
            if finish is not None:
                last = (text, finish)
            elif text:
                sent += 1
                yield TokenChunk(text=text, tokens=1)
    if last is None:
        raise UpstreamError("stream ended without a finish_reason")
    text, finish = last
    tokens = max(0, usage - sent) if usage is not None else 1
    yield TokenChunk(text=text, tokens=tokens, finish_reason="length" if finish == "length" else "stop")
