"""OpenAIUpstreamEngine against a real HTTP server: the synthetic OpenAI-compatible upstream under uvicorn."""

from __future__ import annotations

import asyncio
import math
import socket
import threading
import time
from pathlib import Path

import pytest
import uvicorn

from dcml.node.engine.base import EngineOverloaded, GenerationRequest, SamplingParams
from dcml.node.engine.openai_upstream import OpenAIUpstreamEngine, UpstreamError
from dcml.node.engine.synthetic import SyntheticEngine, make_upstream_app

MODEL_DIR = Path(__file__).resolve().parent.parent / "models" / "demo"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def upstream():
    """(base_url, synthetic engine) of a live server; every 5th token has no text, as vLLM can stream."""
    synth = SyntheticEngine(model_name="synthetic", max_inflight=64, empty_every=5)
    port = _free_port()
    server = uvicorn.Server(uvicorn.Config(make_upstream_app(synth), host="127.0.0.1", port=port,
                                           log_level="warning", lifespan="off"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        assert time.monotonic() < deadline, "upstream did not start"
        time.sleep(0.01)
    yield f"http://127.0.0.1:{port}", synth
    server.should_exit = True
    thread.join(5)


async def run(eng: OpenAIUpstreamEngine, prompt: str, **params):
    await eng.start()
    try:
        return [c async for c in eng.stream(GenerationRequest(prompt, SamplingParams(**params)))]
    finally:
        await eng.stop()


async def direct(synth: SyntheticEngine, prompt: str, **params) -> str:
    return "".join([c.text async for c in synth.stream(GenerationRequest(prompt, SamplingParams(**params)))])


def test_stream_text_and_exact_usage(upstream):
    url, synth = upstream
    chunks = asyncio.run(run(OpenAIUpstreamEngine(url, "synthetic"), "hello there", max_tokens=23, seed=3))
    assert "".join(c.text for c in chunks) == asyncio.run(direct(synth, "hello there", max_tokens=23, seed=3))
    assert chunks[-1].finish_reason == "length"
    assert all(c.finish_reason is None for c in chunks[:-1])
    # 4 of the 23 tokens produced no chunk; usage.completion_tokens makes the total exact anyway
    assert len(chunks) == 19
    assert sum(c.tokens for c in chunks) == 23


def test_stop_reason(upstream):
    url, synth = upstream
    full = asyncio.run(direct(synth, "p", max_tokens=30))
    word = full.split()[6]
    chunks = asyncio.run(run(OpenAIUpstreamEngine(url, "synthetic"), "p", max_tokens=30, stop=[" " + word]))
    assert chunks[-1].finish_reason == "stop"
    assert "".join(c.text for c in chunks) == full[: full.find(" " + word)]


def test_count_tokens_via_tokenize_endpoint(upstream):
    url, _ = upstream
    eng = OpenAIUpstreamEngine(url, "synthetic")
    try:
        assert eng.count_tokens("one two three four") == 4
    finally:
        asyncio.run(eng.stop())


def test_estimate_only_when_allowed():
    dead = f"http://127.0.0.1:{_free_port()}"
    assert OpenAIUpstreamEngine(dead, "m", estimate_tokens=True).count_tokens("x" * 10) == math.ceil(10 / 4)
    with pytest.raises(UpstreamError):
        OpenAIUpstreamEngine(dead, "m").count_tokens("x")


def test_local_tokenizer_for_chat_and_counts():
    eng = OpenAIUpstreamEngine("http://127.0.0.1:9", "demo", tokenizer_dir=MODEL_DIR)
    assert eng.render_chat([{"role": "user", "content": "Hi"}]) == "USER:\nHi\n\nASSISTANT:\n"
    assert eng.count_tokens("First Citizen:") >= 1
    with pytest.raises(NotImplementedError):
        OpenAIUpstreamEngine("http://127.0.0.1:9", "demo").render_chat([{"role": "user", "content": "Hi"}])


def test_upstream_429_is_overload(upstream):
    url, synth = upstream
    synth.max_inflight, saved = 0, synth.max_inflight
    try:
        with pytest.raises(EngineOverloaded):
            asyncio.run(run(OpenAIUpstreamEngine(url, "synthetic"), "x", max_tokens=3))
    finally:
        synth.max_inflight = saved


def test_unknown_model_is_upstream_error(upstream):
    url, _ = upstream
    with pytest.raises(UpstreamError):
        asyncio.run(run(OpenAIUpstreamEngine(url, "nope"), "x", max_tokens=3))


def test_context_and_model_read_from_upstream_and_pool_sized_from_max_inflight(upstream):
    url, synth = upstream
    eng = OpenAIUpstreamEngine(url + "/v1", "synthetic", max_context=99, max_inflight=300)  # a trailing /v1 is fine

    async def check():
        await eng.start()
        try:
            assert eng.ready and eng.max_context == synth.max_context
            pool = eng._client._transport._pool  # httpx's default (100) would queue streams 101..300
            assert pool._max_connections == 300
            assert eng._streams.connector.limit == 300  # the streams' own pool (aiohttp's default: 100)
        finally:
            await eng.stop()

    asyncio.run(check())


def test_upstream_down_is_unavailable_until_it_answers():
    from dcml.node.engine.base import EngineUnavailable

    eng = OpenAIUpstreamEngine(f"http://127.0.0.1:{_free_port()}", "m")
    with pytest.raises(EngineUnavailable):
        asyncio.run(run(eng, "x", max_tokens=3))
    assert not eng.ready
