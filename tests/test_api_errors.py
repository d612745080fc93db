"""Malformed, oversized and unlucky requests get OpenAI-shaped errors with the right status; the node stays up."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from types import SimpleNamespace

import httpx
import openai
import pytest

from dcml.node.api.app import create_app
from dcml.node.api.server import BackgroundServer
from dcml.node.config import load_settings
from dcml.node.engine.base import GenerationRequest, TokenChunk
from dcml.node.engine.synthetic import SyntheticEngine
from dcml.node.identity import EnclaveIdentity
from dcml.node.tee.simulated import SimulatedProvider

MODEL = "synthetic"
SECRET = "/opt/secret/weights.key"


class FlakyEngine(SyntheticEngine):
    """Fails on command: before the first token, or in the middle of a stream."""

    async def stream(self, request: GenerationRequest) -> AsyncIterator[TokenChunk]:
        if "boom-early" in request.prompt:
            raise RuntimeError(f"cannot open {SECRET}")
        n = 0
        async for chunk in super().stream(request):
            yield chunk
            n += 1
            if "boom-late" in request.prompt and n == 2:
                raise RuntimeError(f"lost {SECRET}")


def start_node(tmp_path_factory, engine) -> BackgroundServer:
    settings = load_settings(None, data_dir=tmp_path_factory.mktemp("node"),
                             limits={"max_prompt_tokens": 64, "max_tokens_cap": 150, "max_body_bytes": 16384})
    app = create_app(settings, engine=engine, identity=EnclaveIdentity.generate(), provider=SimulatedProvider())
    return BackgroundServer(app).start()


@pytest.fixture(scope="module")
def node(tmp_path_factory):
    srv = start_node(tmp_path_factory, FlakyEngine(model_name=MODEL, max_context=200))
    yield SimpleNamespace(url=srv.url, http=httpx.Client(base_url=srv.url))
    srv.stop()


def assert_openai_error(r: httpx.Response, status: int, code: str | None = None, param: str | None = None) -> dict:
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith("application/json")
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert isinstance(err["message"], str) and err["message"]
    if code is not None:
        assert err["code"] == code
    if param is not None:
        assert err["param"] == param
    return err


@pytest.fixture(autouse=True)
def health_after(request):
    yield
    if "node" in request.fixturenames:
        node = request.getfixturevalue("node")
        assert node.http.get("/health").json()["status"] == "ok"


def chat(**extra) -> dict:
    return {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], **extra}


def post(node, body, path="/v1/chat/completions", **kw) -> httpx.Response:
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    return node.http.post(path, content=content, headers={"content-type": "application/json"}, **kw)


def test_bad_json(node):
    assert_openai_error(post(node, b'{"model": "synthetic", "messages": ['), 400, "invalid_json")
    assert_openai_error(post(node, b"", "/v1/completions"), 400, "invalid_json")


@pytest.mark.parametrize(("body", "param"), [
    (chat(messages="hi"), "messages"),
    (chat(max_tokens="5"), "max_tokens"),
    (chat(temperature="hot"), "temperature"),
    (chat(stream="yes"), "stream"),
    (chat(n=2), "n"),
    (chat(messages=[{"role": "wizard", "content": "x"}]), "messages.0.role"),
    ({"messages": [{"role": "user", "content": "x"}]}, "model"),
    ({"model": MODEL, "prompt": 42}, "prompt"),
])
def test_wrong_types_are_400(node, body, param):
    path = "/v1/completions" if "prompt" in body else "/v1/chat/completions"
    err = assert_openai_error(post(node, body, path), 400)
    assert err["param"] is not None and err["param"].startswith(param)
    assert err["type"] == "invalid_request_error"


def test_stream_options_without_stream(node):
    assert_openai_error(post(node, chat(stream_options={"include_usage": True})), 400)


def test_unknown_extra_fields_are_tolerated(node):
    r = post(node, chat(max_tokens=2, logit_bias={"1": 2}, user="u", frobnicate=True))
    assert r.status_code == 200


def test_unknown_model_is_404_for_the_sdk_too(node):
    assert_openai_error(post(node, {**chat(), "model": "gpt-9"}), 404, "model_not_found", "model")
    sdk = openai.OpenAI(base_url=node.url + "/v1", api_key="x", max_retries=0)
    with pytest.raises(openai.NotFoundError):
        sdk.chat.completions.create(model="gpt-9", messages=[{"role": "user", "content": "x"}])


def test_prompt_too_long_is_413(node):
    assert_openai_error(post(node, chat(messages=[{"role": "user", "content": "word " * 100}])), 413,
                        "prompt_too_long")


def test_max_tokens_too_large(node):
    assert_openai_error(post(node, chat(max_tokens=151)), 400, "max_tokens_too_large", "max_tokens")
    # 150 is under the cap, but the 200-token context cannot hold prompt + 150 with this prompt.
    long = chat(messages=[{"role": "user", "content": "word " * 60}], max_tokens=150)
    assert_openai_error(post(node, long), 400, "context_length_exceeded", "max_tokens")


def test_oversized_body_is_413(node):
    big = chat(messages=[{"role": "user", "content": "x" * 20000}])
    assert_openai_error(post(node, big), 413, "body_too_large")

    def chunked():  # no Content-Length: the limit must still hold while reading
        yield b'{"model": "synthetic", "messages": [{"role": "user", "content": "'
        for _ in range(40):
            yield b"y" * 1000
        yield b'"}]}'

    r = node.http.post("/v1/chat/completions", content=chunked(), headers={"content-type": "application/json"})
    assert_openai_error(r, 413, "body_too_large")


def test_engine_failure_is_500_without_internals(node):
    err = assert_openai_error(post(node, chat(messages=[{"role": "user", "content": "boom-early"}])), 500)
    assert SECRET not in json.dumps(err) and "Traceback" not in err["message"]
    assert "error id" in err["message"]


def test_mid_stream_failure_sends_error_event_then_done(node):
    r = post(node, chat(messages=[{"role": "user", "content": "boom-late"}], stream=True, max_tokens=20))
    assert r.status_code == 200
    assert SECRET.encode() not in r.content
    events = [e for e in r.content.split(b"\n\n") if e]
    assert events[-2] == b"data: [DONE]"
    assert json.loads(events[-3].removeprefix(b"data: "))["error"]["type"] == "internal_server_error"


def test_unknown_route_is_openai_shaped_404(node):
    assert_openai_error(node.http.get("/v1/nothing"), 404)


def test_overloaded_engine_is_429(tmp_path_factory):
    srv = start_node(tmp_path_factory, SyntheticEngine(model_name=MODEL, max_inflight=0))
    try:
        r = httpx.post(srv.url + "/v1/chat/completions", json=chat(stream=True))
        assert_openai_error(r, 429, "overloaded")
        assert r.headers["retry-after"] == "1"
        sdk = openai.OpenAI(base_url=srv.url + "/v1", api_key="x", max_retries=0)
        with pytest.raises(openai.RateLimitError):
            sdk.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x"}])
        assert httpx.get(srv.url + "/health").status_code == 200
    finally:
        srv.stop()
