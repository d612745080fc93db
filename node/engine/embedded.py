"""In-process engine: a Hugging Face causal LM loaded from a local directory, with continuous batching.

Why our own scheduler: transformers 5.23 ships continuous batching (`model.init_continuous_batching()`),
but its sampling is configured once per manager (do_sample and the RNG are global: one
`torch.multinomial` without a per-request generator), so it can't give per-request greedy/sampled
mixes or seeds reproducible independently of batch-mates. What we need is small enough to own:

* One scheduler thread owns the model. Between decode steps it admits waiting requests (each is
  prefilled alone, batch of one, so its first token never depends on other traffic) and merges their
  KV cache into the running batch's cache, left-padded to a common length with a 2-D attention mask;
  finished or cancelled rows are dropped (and all-padding columns trimmed) the same way.
* Every decode step is ONE forward pass for all running requests (input [B, 1], per-row position ids).
* Sampling is per row: temperature 0 -> argmax; otherwise temperature, top-p and a per-request
  torch.Generator seeded from the request's seed.
* Text is detokenized incrementally (window of previous tokens, hold back incomplete UTF-8), stop
  strings are matched on the text and never emitted; text that might begin a stop string is held back.
* `stream()` bridges the thread to asyncio with `loop.call_soon_threadsafe` into an asyncio.Queue.

Supports decoder models whose layers all use full attention (Llama, Qwen2, Mistral without sliding
window, ...): the merge logic assumes every cache layer is a plain `DynamicLayer`.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import random
import threading
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import torch
import torch.nn.functional as F
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, DynamicCache
from transformers.cache_utils import DynamicLayer

from dcml.client.wire.errors import DcmlError
from dcml.node.engine.base import EngineOverloaded, GenerationRequest, SamplingParams, TokenChunk
from dcml.node.engine.kv_cache import BufferedLayer, kv, left_pad

_DETOK_CONTEXT = 5  # prompt tokens used as left context so the first output token decodes with its space


class EngineStopped(DcmlError, RuntimeError):
    """The engine was stopped while the request was waiting or running."""

    reason = "engine_stopped"


class RequestFailed(DcmlError, RuntimeError):
    """This request failed inside the engine (its cause is chained); other requests are unaffected."""

    def __init__(self, message: str, cause: BaseException) -> None:
        super().__init__(message, reason="request_failed")
        self.__cause__ = cause


@dataclass(eq=False)
class _Request:
    prompt_ids: list[int]
    params: SamplingParams
    max_new: int
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue
    generator: torch.Generator | None = None
    tokens: list[int] = field(default_factory=list)  # detok window: prompt tail + generated ids
    n_out: int = 0  # generated tokens so far
    prefix_offset: int = 0
    read_offset: int = 0
    text: str = ""  # all decoded output text
    emitted: int = 0  # chars of `text` already sent
    pos: int = 0  # position id of the next token fed to the model
    last_token: int = 0
    cancelled: bool = False  # set by the consumer side; read by the scheduler between steps
    done: bool = False


class EmbeddedEngine:
    # The request fields this engine implements (besides model, messages/prompt, max_tokens, stream): the API
    # answers 400 naming any other field a client sets (logprobs, response_format, tools, penalties, ...).
    supported_params = frozenset({"temperature", "top_p", "seed", "stop", "user"})
    def __init__(
        self,
        model_dir: str | Path,
        *,
        model_name: str | None = None,
        device: str = "auto",
        max_batch: int = 32,
        max_queue: int = 256,
        threads: int | None = None,
    ) -> None:
        self.model_dir = Path(model_dir)
        self.model_name = model_name or self.model_dir.name
        self.device = torch.device("cuda" if device == "auto" and torch.cuda.is_available() else
                                   ("cpu" if device == "auto" else device))
        self.max_batch = max_batch
        self.max_queue = max_queue
        if threads is not None:
            torch.set_num_threads(threads)  # process-wide: torch has no per-model thread pool
        # Tokenizer and config load eagerly (cheap) so count_tokens/render_chat work before start().
        self.tokenizer = AutoTokenizer.from_pretrained(self.model_dir)
        self.config = AutoConfig.from_pretrained(self.model_dir)
        self.max_context: int = int(self.config.max_position_embeddings)
        self.eos_token_ids: set[int] = self._eos_ids()
        # A transformers causal LM: its call signature and outputs are dynamic (the stubs type it as a bare Module).
        self.model: Any = None

        self._waiting: collections.deque[_Request] = collections.deque()
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stopping = False
        self._thread: threading.Thread | None = None
        # running batch state, touched only by the scheduler thread
        self._running: list[_Request] = []
        self._cache: DynamicCache | None = None
        self._mask: torch.Tensor | None = None  # [B, L] 1 = real token, 0 = left padding
        self.steps = 0  # decode forward passes, for tests and metrics

    # ------------------------------------------------------------------ Engine interface

    async def start(self) -> None:
        if self._thread is not None:
            return
        self.model = await asyncio.to_thread(self._load_model)
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name=f"engine-{self.model_name}", daemon=True)
        self._thread.start()

    async def stop(self) -> None:
        if self._thread is None:
            return
        self._stopping = True
        self._wake.set()
        await asyncio.to_thread(self._thread.join)
        self._thread = None

    def count_tokens(self, text: str) -> int:
        return len(self.tokenizer.encode(text, add_special_tokens=False))

    def render_chat(self, messages: list[dict[str, str]]) -> str:
        return cast(str, self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True))

    def queue_depth(self) -> int:
        """Requests waiting for a batch slot (not those already running)."""
        return len(self._waiting)

    def running(self) -> int:
        return len(self._running)

    async def stream(self, request: GenerationRequest) -> AsyncIterator[TokenChunk]:
        req = self._submit(request)
        try:
            while True:
                item = await req.queue.get()
                if isinstance(item, BaseException):
                    raise item
                yield item
                if item.finish_reason is not None:
                    return
        finally:
            req.cancelled = True  # consumer gone (finished, error or disconnect): free the slot

    # ------------------------------------------------------------------ submission

    def _submit(self, request: GenerationRequest) -> _Request:
        if self._thread is None:
            raise RuntimeError("engine not started")
        p = request.params
        ids = self.tokenizer.encode(request.prompt, add_special_tokens=True)
        if not ids:
            # An empty prompt has nothing to condition on: start from BOS/EOS like a fresh document.
            ids = [self.tokenizer.bos_token_id if self.tokenizer.bos_token_id is not None else min(self.eos_token_ids)]
        room = self.max_context - len(ids)
        if room <= 0:
            raise ValueError(f"prompt has {len(ids)} tokens; the context is {self.max_context}")
        gen = None
        if p.temperature > 0:
            gen = torch.Generator(device=self.device)
            gen.manual_seed(p.seed if p.seed is not None else random.SystemRandom().getrandbits(63))
        ctx = ids[-_DETOK_CONTEXT:]
        req = _Request(
            prompt_ids=ids, params=p, max_new=max(1, min(p.max_tokens, room)),
            loop=asyncio.get_running_loop(), queue=asyncio.Queue(), generator=gen,
            tokens=list(ctx), prefix_offset=0, read_offset=len(ctx),
        )
        with self._lock:
            if len(self._waiting) >= self.max_queue:
                raise EngineOverloaded(f"{len(self._waiting)} requests already waiting")
            self._waiting.append(req)
        self._wake.set()
        return req

    # ------------------------------------------------------------------ scheduler thread

    def _load_model(self) -> Any:
        dtype = torch.float32 if self.device.type == "cpu" else "auto"  # bf16/fp16 kernels are slow on CPU
        model: Any = AutoModelForCausalLM.from_pretrained(self.model_dir, dtype=dtype)
        return model.to(self.device).eval()

    def _eos_ids(self) -> set[int]:
        ids: set[int] = set()
        for src in (self.config.eos_token_id, self.tokenizer.eos_token_id):
            if isinstance(src, int):
                ids.add(src)
            elif src:
                ids.update(src)
        with contextlib.suppress(OSError):
            from transformers import GenerationConfig

            g = GenerationConfig.from_pretrained(self.model_dir).eos_token_id
            ids.update([g] if isinstance(g, int) else (g or []))
        return ids

    def _run(self) -> None:
        try:
            with torch.inference_mode():
                while not self._stopping:
                    try:
                        self._admit()
                        if not self._running:
                            self._wake.wait(timeout=0.5)
                            self._wake.clear()
                            continue
                        self._decode_step()
                    except Exception as exc:  # the batch's forward pass failed: no row can go on
                        for r in self._running:
                            self._emit(r, RequestFailed("the engine failed while decoding this batch", exc))
                        self._running, self._cache, self._mask = [], None, None
        finally:  # stopped, or the thread is dying: every waiting or running request gets an answer
            err = EngineStopped("engine stopped")
            with self._lock:
                pending, self._waiting = list(self._waiting), collections.deque()
            for r in pending + self._running:
                if not r.done:
                    self._emit(r, err)
            self._running, self._cache, self._mask = [], None, None

    def _admit(self) -> None:
        while len(self._running) < self.max_batch:
            with self._lock:
                if not self._waiting:
                    return
                req = self._waiting.popleft()
            if req.cancelled:
                continue
            try:
                self._prefill(req)
            except Exception as exc:  # this request's prompt or parameters: it fails alone
                self._emit(req, RequestFailed("the engine could not start this request", exc))

    def _prefill(self, req: _Request) -> None:
        ids = torch.tensor([req.prompt_ids], device=self.device)
        cache = DynamicCache(config=self.model.config)
        out = self.model(input_ids=ids, past_key_values=cache, use_cache=True, logits_to_keep=1)
        req.pos = len(req.prompt_ids)
        tok = self._sample_rows(out.logits[:, -1, :], [req])[0]
        if isinstance(tok, Exception):
            raise tok
        self._on_token(req, tok)
        if req.done:
            return
        mask = torch.ones(1, len(req.prompt_ids), dtype=torch.long, device=self.device)
        self._merge(req, cache, mask)

    def _merge(self, req: _Request, cache: DynamicCache, mask: torch.Tensor) -> None:
        if not all(isinstance(layer, DynamicLayer) for layer in cache.layers):
            raise NotImplementedError("only full-attention models (DynamicLayer caches) are supported")
        if self._cache is None:
            cache.layers = [BufferedLayer(*kv(layer)) for layer in cache.layers]
            self._cache, self._mask, self._running = cache, mask, [req]
            return
        layers, batch_mask = self._batch()
        lb, ln = batch_mask.shape[1], mask.shape[1]
        length = max(lb, ln)
        for dst, src in zip(layers, cache.layers, strict=True):
            (dk, dv), (sk, sv) = kv(dst), kv(src)
            dst.reset_to(torch.cat([left_pad(dk, length), left_pad(sk, length)], dim=0),
                         torch.cat([left_pad(dv, length), left_pad(sv, length)], dim=0))
        self._mask = torch.cat([F.pad(batch_mask, (length - lb, 0)), F.pad(mask, (length - ln, 0))], dim=0)
        self._running.append(req)

    def _decode_step(self) -> None:
        rows = self._running
        input_ids = torch.tensor([[r.last_token] for r in rows], device=self.device)
        position_ids = torch.tensor([[r.pos] for r in rows], device=self.device)
        _, batch_mask = self._batch()
        self._mask = torch.cat([batch_mask, batch_mask.new_ones(len(rows), 1)], dim=1)
        out = self.model(input_ids=input_ids, attention_mask=self._mask, position_ids=position_ids,
                         past_key_values=self._cache, use_cache=True)
        self.steps += 1
        for r, tok in zip(rows, self._sample_rows(out.logits[:, -1, :], rows), strict=True):
            r.pos += 1
            try:
                if isinstance(tok, Exception):
                    raise tok
                self._on_token(r, tok)
            except Exception as exc:  # this row alone: its neighbours keep decoding
                self._emit(r, RequestFailed("the engine failed while sampling this request", exc))
        self._drop_finished()

    def _drop_finished(self) -> None:
        keep = [i for i, r in enumerate(self._running) if not (r.done or r.cancelled)]
        if len(keep) == len(self._running):
            return
        if not keep:
            self._running, self._cache, self._mask = [], None, None
            return
        idx = torch.tensor(keep, device=self.device)
        layers, batch_mask = self._batch()
        self._running = [self._running[i] for i in keep]
        batch_mask = batch_mask[idx]
        # Columns that are padding for every remaining row carry no information: cut them off.
        first = int(batch_mask.any(dim=0).nonzero()[0])
        self._mask = batch_mask[:, first:]
        for layer in layers:
            keys, values = kv(layer)
            layer.reset_to(keys[idx, :, first:], values[idx, :, first:])

    def _batch(self) -> tuple[list[BufferedLayer], torch.Tensor]:
        """The running batch's cache layers (all `BufferedLayer`, see `_merge`) and mask, while a batch runs."""
        assert self._cache is not None and self._mask is not None, "no batch is running"
        return cast(list[BufferedLayer], self._cache.layers), self._mask

    # ------------------------------------------------------------------ sampling and text

    def _sample_rows(self, logits: torch.Tensor, rows: list[_Request]) -> list[int | Exception]:
        """One token per row; a row whose sampling fails gets its exception instead (its neighbours do not)."""
        logits = logits.float()
        picks: list[int | Exception] = logits.argmax(dim=-1).tolist()  # greedy rows, all at once
        for i, r in enumerate(rows):
            p = r.params
            if p.temperature <= 0:
                continue
            try:
                x = logits[i] / p.temperature
                if p.top_p < 1.0:
                    sorted_x, order = torch.sort(x, descending=True)
                    cum = sorted_x.softmax(-1).cumsum(-1)
                    cut = (cum - sorted_x.softmax(-1)) >= p.top_p  # keep the smallest prefix reaching top_p
                    x = x.scatter(0, order[cut], float("-inf"))
                probs = x.softmax(-1)
                # Checked before sampling: on CUDA, multinomial over inf/nan is a device-side assert that
                # poisons the whole context (every request), not an exception for this row.
                if not bool(torch.isfinite(probs).all() & (probs.sum() > 0)):
                    raise ValueError("the sampling distribution is not finite for these parameters")
                picks[i] = int(torch.multinomial(probs, 1, generator=r.generator))
            except Exception as exc:
                picks[i] = exc
        return picks

    def _on_token(self, r: _Request, tok: int) -> None:
        r.n_out += 1
        r.last_token = tok
        if tok in self.eos_token_ids:
            self._finish(r, "stop", flush=True)
            return
        r.tokens.append(tok)
        r.text += self._detok(r, final=False)
        stops = r.params.stop
        if stops:
            hits = [i for i in (r.text.find(s, r.emitted) for s in stops if s) if i >= 0]
            if hits:
                cut = min(hits)
                self._send(r, r.text[r.emitted:cut], "stop")
                return
        if r.n_out >= r.max_new:
            self._finish(r, "length", flush=True)
            return
        safe = len(r.text) - _held_back(r.text, stops, r.emitted)
        self._send(r, r.text[r.emitted:safe], None)

    def _finish(self, r: _Request, reason: str, *, flush: bool) -> None:
        if flush:
            r.text += self._detok(r, final=True)
            # the stop strings can only match now if the flushed bytes completed one
            hits = [i for i in (r.text.find(s, r.emitted) for s in r.params.stop if s) if i >= 0]
            if hits:
                self._send(r, r.text[r.emitted:min(hits)], "stop")
                return
        self._send(r, r.text[r.emitted:], reason)

    def _detok(self, r: _Request, *, final: bool) -> str:
        """Text added by the newest tokens. Decoding a short window keeps it O(1) per token; the window's
        left part is context so tokenizers that drop a leading space (SentencePiece) decode correctly."""
        prefix = str(self.tokenizer.decode(r.tokens[r.prefix_offset:r.read_offset], skip_special_tokens=True))
        full = str(self.tokenizer.decode(r.tokens[r.prefix_offset:], skip_special_tokens=True))
        if len(full) > len(prefix) and (final or not full.endswith("\ufffd")):
            r.prefix_offset, r.read_offset = r.read_offset, len(r.tokens)
            return full[len(prefix):]
        return ""  # an incomplete UTF-8 sequence: wait for the next token

    def _send(self, r: _Request, text: str, finish: str | None) -> None:
        r.emitted += len(text)
        if finish is not None:
            r.done = True
        self._emit(r, TokenChunk(text=text, tokens=1, finish_reason=finish))

    def _emit(self, r: _Request, item: TokenChunk | BaseException) -> None:
        if isinstance(item, BaseException):
            r.done = True
        try:
            r.loop.call_soon_threadsafe(r.queue.put_nowait, item)
        except RuntimeError:  # the consumer's event loop is closed: nobody is listening any more
            r.cancelled = True


def _held_back(text: str, stops: tuple[str, ...], start: int) -> int:
    """Length of the longest suffix of text[start:] that is a proper prefix of a stop string:
    that text can't be sent yet because the next token might complete the stop string."""
    best = 0
    for s in stops:
        for k in range(min(len(s) - 1, len(text) - start), best, -1):
            if text.endswith(s[:k]):
                best = k
                break
    return best
