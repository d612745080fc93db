"""EmbeddedEngine on the real demo checkpoint in models/demo: batching, sampling, stops, overload."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import pytest

from dcml.node.engine.base import EngineOverloaded, GenerationRequest, SamplingParams, TokenChunk
from dcml.node.engine.embedded import EmbeddedEngine, RequestFailed, _held_back, _Request

MODEL_DIR = Path(__file__).resolve().parent.parent / "models" / "demo"
DEVICE = os.environ.get("DCML_TEST_DEVICE", "cpu")  # "cuda" to run the same checks on a GPU
PROMPTS = [
    "First Citizen:\n",
    "MENENIUS:\nWhat work's, my countrymen, in hand?",
    "The gods",
    "CORIOLANUS:\nI will go wash;\nAnd when my face is fair,",
    "Rome",
    "VOLUMNIA:\nI pray you, daughter, sing; or express yourself in a",
    "All:\n",
    "BRUTUS:\nHe has no equal.\n\nSICINIUS:\n",
]


@pytest.fixture(scope="module")
def engine():
    eng = EmbeddedEngine(MODEL_DIR, model_name="demo", device=DEVICE, max_batch=32, max_queue=64, threads=2)
    asyncio.run(eng.start())
    yield eng
    asyncio.run(eng.stop())


async def collect(eng: EmbeddedEngine, prompt: str, **params) -> tuple[str, list[TokenChunk]]:
    chunks = [c async for c in eng.stream(GenerationRequest(prompt, SamplingParams(**params)))]
    return "".join(c.text for c in chunks), chunks


def greedy(eng: EmbeddedEngine, prompt: str, n: int = 24) -> str:
    return asyncio.run(collect(eng, prompt, max_tokens=n, temperature=0))[0]


def test_model_loads_from_hf_layout(engine):
    assert engine.max_context == 512
    assert engine.model.config.model_type == "llama"
    assert engine.count_tokens("") == 0
    assert engine.count_tokens("First Citizen:") == len(engine.tokenizer.encode("First Citizen:"))
    chat = engine.render_chat([{"role": "user", "content": "Speak."}])
    assert chat == "USER:\nSpeak.\n\nASSISTANT:\n"


def test_max_tokens_gives_length_and_exact_token_count(engine):
    text, chunks = asyncio.run(collect(engine, PROMPTS[0], max_tokens=17, temperature=0))
    assert chunks[-1].finish_reason == "length"
    assert all(c.finish_reason is None for c in chunks[:-1])
    assert sum(c.tokens for c in chunks) == 17
    assert text.strip()  # the model says something


def test_greedy_same_alone_and_with_31_batch_mates(engine):
    solo = {p: greedy(engine, p) for p in PROMPTS}

    async def crowd():
        tasks = []
        for i in range(32):
            p = PROMPTS[i % len(PROMPTS)]
            # odd batch-mates sample, so the batch mixes greedy and random rows of different lengths
            params = {"max_tokens": 24, "temperature": 0} if i % 2 == 0 else {
                "max_tokens": 6 + i, "temperature": 1.0, "seed": i}
            tasks.append((p, i % 2 == 0, asyncio.create_task(collect(engine, p, **params))))
            if i % 8 == 7:
                await asyncio.sleep(0.02)  # staggered arrivals: rows join a batch that is already decoding
        return [(p, g, await t) for p, g, t in tasks]

    for prompt, is_greedy, (text, chunks) in asyncio.run(crowd()):
        assert chunks[-1].finish_reason is not None
        if is_greedy:
            assert text == solo[prompt], prompt


def test_32_concurrent_streams_share_forward_passes(engine):
    solo = {p: greedy(engine, p, 20) for p in PROMPTS}

    async def all_at_once():
        return await asyncio.gather(
            *(collect(engine, PROMPTS[i % len(PROMPTS)], max_tokens=20, temperature=0) for i in range(32))
        )

    steps0 = engine.steps
    results = asyncio.run(all_at_once())
    steps = engine.steps - steps0
    for i, (text, chunks) in enumerate(results):
        assert text == solo[PROMPTS[i % len(PROMPTS)]]
        n = sum(c.tokens for c in chunks)  # one chunk per token; an EOS may end a stream early
        assert n == len(chunks) and (n == 20) == (chunks[-1].finish_reason == "length")
    # 32 x 19 decode tokens (the first comes from each prefill) in far fewer forward passes
    assert steps < 32 * 19 / 4, steps


def test_stop_string_is_not_emitted(engine):
    full = greedy(engine, PROMPTS[1], 30)
    stop = full[8:12]
    cut = full.find(stop)
    text, chunks = asyncio.run(collect(engine, PROMPTS[1], max_tokens=30, temperature=0, stop=(stop, "\x00zz")))
    assert text == full[:cut]
    assert chunks[-1].finish_reason == "stop"


def test_stop_prefix_held_back_then_released(engine):
    full = greedy(engine, PROMPTS[2], 20)
    # a stop string that starts like real output but never completes: nothing may be lost
    never = full[3:5] + "\x00"
    text, chunks = asyncio.run(collect(engine, PROMPTS[2], max_tokens=20, temperature=0, stop=(never,)))
    assert text == full
    assert chunks[-1].finish_reason == "length"


def test_eos_finishes_with_stop(engine):
    full = greedy(engine, PROMPTS[0], 12)
    full_ids = engine.tokenizer.encode(full, add_special_tokens=False)
    fake_eos = full_ids[4]  # pretend a token the model emits greedily is EOS
    saved = set(engine.eos_token_ids)
    engine.eos_token_ids.add(fake_eos)
    try:
        text, chunks = asyncio.run(collect(engine, PROMPTS[0], max_tokens=12, temperature=0))
    finally:
        engine.eos_token_ids.clear()
        engine.eos_token_ids.update(saved)
    assert chunks[-1].finish_reason == "stop"
    assert len(chunks) <= 5 and sum(c.tokens for c in chunks) == len(chunks)
    assert full.startswith(text)


def test_seed_reproducible_regardless_of_batch_mates(engine):
    kw = {"max_tokens": 24, "temperature": 0.9, "top_p": 0.95, "seed": 7}
    a = asyncio.run(collect(engine, PROMPTS[0], **kw))[0]
    b = asyncio.run(collect(engine, PROMPTS[0], **kw))[0]

    async def with_mates():
        mates = [collect(engine, p, max_tokens=24, temperature=1.0) for p in PROMPTS]
        return (await asyncio.gather(collect(engine, PROMPTS[0], **kw), *mates))[0][0]

    c = asyncio.run(with_mates())
    other = asyncio.run(collect(engine, PROMPTS[0], **{**kw, "seed": 8}))[0]
    assert a == b == c
    assert other != a


def test_overload_raises_before_first_chunk():
    eng = EmbeddedEngine(MODEL_DIR, device=DEVICE, max_batch=1, max_queue=1)

    async def scenario():
        await eng.start()
        try:
            running = eng.stream(GenerationRequest(PROMPTS[0], SamplingParams(max_tokens=400, temperature=0)))
            await anext(running)  # occupies the only batch slot
            waiting = asyncio.create_task(collect(eng, PROMPTS[1], max_tokens=2, temperature=0))
            while eng.queue_depth() < 1:
                await asyncio.sleep(0.001)
            with pytest.raises(EngineOverloaded):
                await anext(eng.stream(GenerationRequest(PROMPTS[2], SamplingParams(max_tokens=2))))
            await running.aclose()  # a client that goes away frees its slot
            _, chunks = await asyncio.wait_for(waiting, 30)
            assert chunks[-1].finish_reason == "length"
        finally:
            await eng.stop()

    asyncio.run(scenario())


def test_incremental_detokenization_multibyte(engine):
    text = "héllo wörld — ✓ 日本語 🎭 First Citizen:\nSpeak, speak."
    ids = engine.tokenizer.encode(text, add_special_tokens=False)
    req = _Request(prompt_ids=[], params=SamplingParams(), max_new=len(ids), loop=None, queue=None)  # type: ignore[arg-type]
    out = ""
    for tok in ids:
        req.tokens.append(tok)
        piece = engine._detok(req, final=False)
        assert "\ufffd" not in piece
        out += piece
    out += engine._detok(req, final=True)
    assert out == text


def test_held_back():
    assert _held_back("abc", ("cd",), 0) == 1
    assert _held_back("abc", ("xyz",), 0) == 0
    assert _held_back("abc", ("bcd", "c"), 0) == 2
    assert _held_back("xab", ("abz",), 0) == 2
    assert _held_back("xab", ("abz",), 2) == 0  # never reaches back before what was already sent


def test_a_request_that_cannot_be_sampled_fails_alone(engine):
    """A temperature that rounds to zero in float32 (the API refuses it; the engine must survive it anyway):
    that request fails at once with RequestFailed, its batch neighbours finish unchanged, nothing hangs."""
    solo = greedy(engine, PROMPTS[1], 20)

    async def mixed():
        healthy = [asyncio.create_task(collect(engine, PROMPTS[1], max_tokens=20, temperature=0)) for _ in range(3)]
        await asyncio.sleep(0.05)  # the healthy ones are decoding when the bad one joins the batch
        with pytest.raises(RequestFailed):
            await asyncio.wait_for(collect(engine, "Rome", max_tokens=20, temperature=1e-46), 30)
        return await asyncio.wait_for(asyncio.gather(*healthy), 60)

    for text, _ in asyncio.run(mixed()):
        assert text == solo
    assert greedy(engine, PROMPTS[1], 20) == solo  # and the engine goes on serving
