"""Aggregate decode throughput of EmbeddedEngine at 1, 8 and 32 concurrent streams, next to plain
Hugging Face `generate` (one stream) on the same weights, measured in the same run.

    python bench/bench_engine.py [--model-dir models/demo] [--tokens 128] [--threads 2] [--json]

Greedy decoding; every stream decodes exactly --tokens new tokens: EOS is ignored (as vLLM's
benchmarks do with ignore_eos, and as `generate(min_new_tokens=...)` does for the baseline) so all
rows do the same work; --respect-eos measures the natural lengths instead. Wall time includes prefill,
queueing, detokenization and the thread-to-asyncio hand-off.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from pathlib import Path

import torch

from dcml.node.engine.base import GenerationRequest, SamplingParams
from dcml.node.engine.embedded import EmbeddedEngine

PROMPTS = [
    "First Citizen:\n", "MENENIUS:\nWhat work's, my countrymen, in hand?", "The gods", "Rome",
    "CORIOLANUS:\nI will go wash;\n", "VOLUMNIA:\nI pray you, daughter,", "All:\n", "BRUTUS:\n",
]


async def engine_run(eng: EmbeddedEngine, streams: int, tokens: int) -> dict:
    async def one(i: int) -> tuple[int, float]:
        t0 = time.perf_counter()
        ttft, n = None, 0
        req = GenerationRequest(PROMPTS[i % len(PROMPTS)], SamplingParams(max_tokens=tokens, temperature=0))
        async for c in eng.stream(req):
            ttft = ttft if ttft is not None else time.perf_counter() - t0
            n += c.tokens
        return n, ttft or 0.0

    steps0 = eng.steps
    t0 = time.perf_counter()
    results = await asyncio.gather(*(one(i) for i in range(streams)))
    wall = time.perf_counter() - t0
    total = sum(n for n, _ in results)
    return {"mode": f"engine x{streams}", "streams": streams, "tokens": total, "seconds": round(wall, 3),
            "tok_per_s": round(total / wall, 1), "per_stream_tok_per_s": round(total / wall / streams, 1),
            "ttft_ms_avg": round(1000 * sum(t for _, t in results) / streams, 1), "forward_passes": eng.steps - steps0}


def hf_generate_run(model, tokenizer, tokens: int) -> dict:
    ids = torch.tensor([tokenizer.encode(PROMPTS[0])], device=model.device)
    t0 = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=tokens,
                             min_new_tokens=tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    wall = time.perf_counter() - t0
    n = out.shape[1] - ids.shape[1]
    return {"mode": "hf generate x1", "streams": 1, "tokens": n, "seconds": round(wall, 3),
            "tok_per_s": round(n / wall, 1), "per_stream_tok_per_s": round(n / wall, 1), "ttft_ms_avg": None,
            "forward_passes": n}


async def main() -> None:
    ap = argparse.ArgumentParser(description="EmbeddedEngine throughput vs HF generate")
    ap.add_argument("--model-dir", default=str(Path(__file__).resolve().parent.parent / "models" / "demo"))
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--concurrency", default="1,8,32")
    ap.add_argument("--respect-eos", action="store_true", help="let streams end at EOS")
    ap.add_argument("--json", action="store_true", help="print JSON instead of a table")
    args = ap.parse_args()

    eng = EmbeddedEngine(args.model_dir, device=args.device, max_batch=32, threads=args.threads)
    await eng.start()
    if not args.respect_eos:
        eng.eos_token_ids.clear()  # benchmark-only: fixed-length streams
    try:
        await engine_run(eng, 2, 8)  # warm-up: first-call allocations and kernel selection
        hf_generate_run(eng.model, eng.tokenizer, 8)
        rows = [hf_generate_run(eng.model, eng.tokenizer, args.tokens)]  # same weights object, idle engine
        for c in (int(x) for x in args.concurrency.split(",")):
            rows.append(await engine_run(eng, c, args.tokens))
    finally:
        await eng.stop()
    base = rows[0]["tok_per_s"]
    for r in rows:
        r["vs_hf_generate"] = round(r["tok_per_s"] / base, 2)
    meta = {"device": str(eng.device), "threads": torch.get_num_threads(), "model_dir": args.model_dir,
            "max_new_tokens": args.tokens, "torch": torch.__version__}
    if args.json:
        print(json.dumps({"meta": meta, "results": rows}, indent=2))
        return
    print(f"device={meta['device']} threads={meta['threads']} max_new_tokens={args.tokens}")
    print(f"{'mode':<16}{'tokens':>8}{'seconds':>9}{'tok/s':>9}{'per stream':>12}{'ttft ms':>9}{'fwd':>6}{'x hf':>7}")
    for r in rows:
        ttft = "-" if r["ttft_ms_avg"] is None else f"{r['ttft_ms_avg']:.0f}"
        print(f"{r['mode']:<16}{r['tokens']:>8}{r['seconds']:>9.2f}{r['tok_per_s']:>9.1f}"
              f"{r['per_stream_tok_per_s']:>12.1f}{ttft:>9}{r['forward_passes']:>6}{r['vs_hf_generate']:>7.2f}")


if __name__ == "__main__":
    asyncio.run(main())
