"""The official `openai` SDK, unchanged but for base_url, against a real node (uvicorn + SyntheticEngine)."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

import httpx
import openai
import pytest

from dcml.client.wire.receipts import parse_sse_stream
from dcml.node.api.app import create_app
from dcml.node.api.server import BackgroundServer
from dcml.node.config import load_settings
from dcml.node.engine.base import GenerationRequest, SamplingParams
from dcml.node.engine.synthetic import SyntheticEngine
from dcml.node.identity import EnclaveIdentity
from dcml.node.tee.simulated import SimulatedProvider

MODEL = "synthetic"


@pytest.fixture(scope="module")
def node(tmp_path_factory):
    settings = load_settings(None, data_dir=tmp_path_factory.mktemp("node"),
                             engine={"kind": "synthetic", "served_model_name": MODEL})
    engine = SyntheticEngine(model_name=MODEL, empty_every=5)
    app = create_app(settings, engine=engine, identity=EnclaveIdentity.generate(), provider=SimulatedProvider())
    with BackgroundServer(app) as srv:
        yield SimpleNamespace(url=srv.url, engine=engine)


@pytest.fixture
def sdk(node) -> openai.OpenAI:
    return openai.OpenAI(base_url=node.url + "/v1", api_key="unused", max_retries=0)


def expected_text(prompt: str, max_tokens: int, seed: int | None = None) -> str:
    """What the engine itself produces for this prompt, called directly in-process."""
    engine = SyntheticEngine(model_name=MODEL, empty_every=5)

    async def run() -> str:
        req = GenerationRequest(prompt, SamplingParams(max_tokens=max_tokens, seed=seed))
        return "".join([c.text async for c in engine.stream(req)])

    return asyncio.run(run())


def chat_prompt(messages: list[dict]) -> str:
    return SyntheticEngine().render_chat(messages)


MESSAGES = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello there"}]


def test_chat_non_streamed(sdk):
    r = sdk.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=12, seed=7)
    assert r.object == "chat.completion"
    assert r.id.startswith("chatcmpl-")
    assert r.choices[0].message.role == "assistant"
    assert r.choices[0].message.content == expected_text(chat_prompt(MESSAGES), 12, 7)
    assert r.choices[0].finish_reason == "length"
    assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (len(chat_prompt(MESSAGES).split()), 12)
    assert r.usage.total_tokens == r.usage.prompt_tokens + 12


def test_chat_streamed_with_usage(sdk):
    chunks = list(sdk.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=10, stream=True,
                                              stream_options={"include_usage": True}))
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == expected_text(chat_prompt(MESSAGES), 10)
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 10  # textless tokens count too
    assert len({c.id for c in chunks}) == 1


def test_chat_streamed_without_usage_has_no_usage_chunk(sdk):
    chunks = list(sdk.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=4, stream=True))
    assert all(c.choices for c in chunks) and all(c.usage is None for c in chunks)


def test_completions_non_streamed_and_streamed(sdk):
    r = sdk.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=9, seed=1)
    assert r.object == "text_completion" and r.id.startswith("cmpl-")
    assert r.choices[0].text == expected_text("Once upon a time", 9, 1)
    assert r.usage.completion_tokens == 9
    chunks = list(sdk.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=9, seed=1,
                                         stream=True, stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == r.choices[0].text
    assert chunks[-1].usage.completion_tokens == 9


def test_stop_sequence(sdk):
    full = expected_text("stop test", 20)
    stop = full.split()[3]
    r = sdk.completions.create(model=MODEL, prompt="stop test", max_tokens=20, stop=[stop])
    assert r.choices[0].finish_reason == "stop"
    assert stop not in r.choices[0].text and full.startswith(r.choices[0].text)


def test_models(sdk):
    models = sdk.models.list()
    assert [m.id for m in models.data] == [MODEL]


def test_sse_wire_shape(node):
    """Byte-level shape: `data: {json}\\n\\n` chunks, usage chunk, `data: [DONE]`, then the receipt event."""
    body = {"model": MODEL, "messages": MESSAGES, "max_tokens": 3, "stream": True,
            "stream_options": {"include_usage": True}}
    r = httpx.post(node.url + "/v1/chat/completions", json=body)
    assert r.headers["content-type"].startswith("text/event-stream")
    events = r.content.split(b"\n\n")
    assert events[-1] == b""
    assert all(e.startswith(b"data: {") for e in events[:-3])
    assert events[-3] == b"data: [DONE]"
    assert events[-2].startswith(b"event: dcml-receipt\ndata: {")
    payloads, receipt = parse_sse_stream(r.content)
    assert payloads[-1] == b"[DONE]" and receipt is not None
    assert receipt.receipt.receipt_id == r.headers["x-dcml-receipt-id"]


def test_32_concurrent_streams_are_independent(node):
    async def one(client: openai.AsyncOpenAI, i: int) -> tuple[int, str, int]:
        stream = await client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": f"request number {i}"}], max_tokens=40 + i,
            seed=i, stream=True, stream_options={"include_usage": True})
        text, usage = "", None
        async for c in stream:
            if c.choices:
                text += c.choices[0].delta.content or ""
            if c.usage:
                usage = c.usage.completion_tokens
        return i, text, usage

    async def run():
        async with openai.AsyncOpenAI(base_url=node.url + "/v1", api_key="x", max_retries=0,
                                      http_client=openai.DefaultAsyncHttpxClient(
                                          limits=httpx.Limits(max_connections=64))) as client:
            return await asyncio.gather(*(one(client, i) for i in range(32)))

    results = asyncio.run(run())
    for i, text, usage in results:
        prompt = chat_prompt([{"role": "user", "content": f"request number {i}"}])
        assert text == expected_text(prompt, 40 + i, i), f"stream {i} got another stream's tokens"
        assert usage == 40 + i


def test_streamed_tool_call_deltas_make_the_non_streamed_message():
    """An upstream (vLLM) streams tool calls in pieces, parallel calls interleaved by `index`: a non-streamed answer
    carries them whole, as vLLM's own non-streamed answer does (no `index`); a delta that cannot merge is an
    engine failure, not a silently wrong message."""
    from dcml.node.api.openai_shapes import _message_fields
    from dcml.node.api.openai_shapes import merge_delta as _merge_delta
    from dcml.node.engine.base import EngineFailed

    def call(i: int, **fields) -> dict:
        return {"tool_calls": [{"index": i, **fields}]}

    first = call(0, id="a", type="function", function={"name": "f", "arguments": ""})
    parts = [first, call(1, id="b", type="function", function={"name": "g", "arguments": "{"}),
             call(0, function={"name": None, "arguments": '{"x":'}), call(1, function={"arguments": "}"}),
             call(0, function={"arguments": "1}"}), {"reasoning": "th"}, {"reasoning": "us"}]
    merged = None
    for part in parts:
        merged = _merge_delta(merged, part)
    assert _message_fields(merged) == {"reasoning": "thus", "tool_calls": [
        {"id": "a", "type": "function", "function": {"name": "f", "arguments": '{"x":1}'}},
        {"id": "b", "type": "function", "function": {"name": "g", "arguments": "{}"}}]}
    assert first["tool_calls"][0]["function"]["arguments"] == ""  # the chunks themselves are left as streamed
    with pytest.raises(EngineFailed) as failed:
        _merge_delta({"tool_calls": [{"id": "a"}]}, {"tool_calls": [{"function": {"arguments": '{"secret":1}'}}]})
    assert "secret" not in str(failed.value)  # the failure names no model output (it reaches logs)
