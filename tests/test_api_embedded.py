"""The official OpenAI SDK against a node serving the real demo checkpoint (EmbeddedEngine, CPU)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import openai
import pytest

from dcml.node.api.app import create_app
from dcml.node.api.server import BackgroundServer
from dcml.node.config import load_settings
from dcml.node.identity import EnclaveIdentity
from dcml.node.tee.simulated import SimulatedProvider

MODEL_DIR = Path(__file__).resolve().parent.parent / "models" / "demo"
pytestmark = pytest.mark.skipif(not (MODEL_DIR / "config.json").is_file(), reason="models/demo not built")
MESSAGES = [{"role": "user", "content": "MENENIUS:\nWhat work's, my countrymen, in hand?"}]


@pytest.fixture(scope="module")
def sdk(tmp_path_factory):
    from dcml.node.engine.embedded import EmbeddedEngine  # torch: only when the model is there

    engine = EmbeddedEngine(MODEL_DIR, model_name="demo", device="cpu", max_batch=8, max_queue=16, threads=1)
    settings = load_settings(None, data_dir=tmp_path_factory.mktemp("node"))
    app = create_app(settings, engine=engine, identity=EnclaveIdentity.generate(), provider=SimulatedProvider())
    with BackgroundServer(app) as srv:
        yield openai.OpenAI(base_url=srv.url + "/v1", api_key="x", max_retries=0), srv.url


def test_greedy_chat_streamed_equals_non_streamed(sdk):
    client, _ = sdk
    full = client.chat.completions.create(model="demo", messages=MESSAGES, max_tokens=12, temperature=0)
    assert full.usage.completion_tokens >= 1 and full.choices[0].finish_reason in ("stop", "length")
    chunks = list(client.chat.completions.create(model="demo", messages=MESSAGES, max_tokens=12, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == full.choices[0].message.content
    assert chunks[-1].usage.completion_tokens == full.usage.completion_tokens


def test_concurrent_completions(sdk):
    _, url = sdk

    async def run():
        async with openai.AsyncOpenAI(base_url=url + "/v1", api_key="x", max_retries=0) as client:
            return await asyncio.gather(*(client.completions.create(
                model="demo", prompt=p, max_tokens=8, temperature=0) for p in ("The gods", "Rome", "All:\n")))

    alone = openai.OpenAI(base_url=url + "/v1", api_key="x").completions.create(
        model="demo", prompt="Rome", max_tokens=8, temperature=0)
    together = asyncio.run(run())
    assert together[1].choices[0].text == alone.choices[0].text  # batching does not change greedy output


def test_tiny_temperature_is_a_400_beside_healthy_streams(sdk):
    """Positive temperatures that float32 cannot sample with are refused (400); streams already running finish."""
    client, url = sdk
    solo = client.completions.create(model="demo", prompt="Rome", max_tokens=16, temperature=0).choices[0].text

    async def run():
        async with openai.AsyncOpenAI(base_url=url + "/v1", api_key="x", max_retries=0) as aclient:
            async def healthy() -> str:
                stream = await aclient.completions.create(model="demo", prompt="Rome", max_tokens=16, temperature=0,
                                                          stream=True)
                return "".join([c.choices[0].text async for c in stream if c.choices])

            tasks = [asyncio.create_task(healthy()) for _ in range(3)]
            await asyncio.sleep(0.05)
            for bad in ({"temperature": 1e-46}, {"temperature": 1e-30}, {"top_p": 1e-46}, {"seed": 2**64}):
                with pytest.raises(openai.BadRequestError):
                    await aclient.completions.create(model="demo", prompt="Rome", max_tokens=16, **bad)
            return await asyncio.wait_for(asyncio.gather(*tasks), 120)

    assert asyncio.run(run()) == [solo] * 3


# Each field the embedded engine does not implement, with a value that would change the answer, sent with the
# official SDK (typed arguments or extra_body): a 400 naming it, never silently ignored.
UNSUPPORTED = [
    ("chat", {"logprobs": True, "top_logprobs": 2}, "logprobs"),
    ("chat", {"response_format": {"type": "json_object"}}, "response_format"),
    ("chat", {"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]}, "tools"),
    ("chat", {"tool_choice": "none"}, "tool_choice"),
    ("chat", {"presence_penalty": 0.5}, "presence_penalty"),
    ("chat", {"frequency_penalty": 0.5}, "frequency_penalty"),
    ("chat", {"logit_bias": {"5": 10}}, "logit_bias"),
    ("completion", {"echo": True}, "echo"),
    ("completion", {"best_of": 2}, "best_of"),
    ("completion", {"suffix": "!"}, "suffix"),
    ("completion", {"logprobs": 1}, "logprobs"),
    ("completion", {"logprobs": 0}, "logprobs"),  # 0 is not "no logprobs": the sampled token's own
    ("completion", {"extra_body": {"ignore_eos": True}}, "ignore_eos"),
    ("completion", {"extra_body": {"min_tokens": 4}}, "min_tokens"),
    ("completion", {"extra_body": {"top_k": 5}}, "top_k"),
    ("completion", {"extra_body": {"repetition_penalty": 1.2}}, "repetition_penalty"),
    ("completion", {"extra_body": {"stop_token_ids": [3]}}, "stop_token_ids"),
]


@pytest.mark.parametrize("kind,kwargs,name", UNSUPPORTED, ids=[f"{u[2]}-{u[0]}-{i}" for i, u in enumerate(UNSUPPORTED)])
def test_unimplemented_parameters_are_refused_by_name(sdk, kind, kwargs, name):
    client, _ = sdk
    with pytest.raises(openai.BadRequestError) as err:
        if kind == "chat":
            client.chat.completions.create(model="demo", messages=MESSAGES, max_tokens=4, **kwargs)
        else:
            client.completions.create(model="demo", prompt="Rome", max_tokens=4, **kwargs)
    body = err.value.body
    assert body["param"] == name and body["code"] == "unsupported_parameter" and f"`{name}`" in body["message"]


def test_implemented_and_neutral_parameters_are_accepted(sdk):
    client, _ = sdk
    r = client.completions.create(model="demo", prompt="Rome", max_tokens=4, temperature=0.5, top_p=0.9, seed=3,
                                  stop=["\n\n"], user="u1", n=1, echo=False, presence_penalty=0,
                                  frequency_penalty=0.0, logprobs=None)
    assert r.usage.completion_tokens >= 1
