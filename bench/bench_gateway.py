"""Gateway overhead: the node daemon (real uvicorn, separate process) in front of SyntheticEngine vs the same
engine called directly in-process, N concurrent streams; tokens/s and TTFT p50/p99 side by side.

The engine is paced like a real decoder (`--rate` tokens/s per stream on a fixed schedule, first token
after one step): against an engine that emits tokens as fast as the CPU allows, any HTTP server loses
by orders of magnitude, which says nothing about serving a model. `--rate 0` measures exactly that
ceiling instead (the gateway's capacity). Everything the daemon does per request is included: parsing,
token counting, SSE framing, metrics, receipt signing and the fsync'd receipt commit.

    .venv/bin/python bench/bench_gateway.py --streams 64 --tokens 256 --rate 50
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import json
import os
import tempfile
import time

import httpx
from _common import MODEL, PacedEngine, RawStream, Report, Result, compare_streams, prompt, report_args, start_server

from dcml.node.engine.base import GenerationRequest, SamplingParams


async def run_direct(streams: int, tokens: int, rate: float, spread_s: float) -> Result:
    engine = PacedEngine(rate)

    async def one(i: int) -> tuple[int, float]:
        await asyncio.sleep(i * spread_s / streams)
        t0 = time.perf_counter()
        ttft, n = None, 0
        req = GenerationRequest(engine.render_chat([{"role": "user", "content": prompt(i)}]),
                                SamplingParams(max_tokens=tokens, seed=i))
        async for c in engine.stream(req):
            if ttft is None and c.text:
                ttft = time.perf_counter() - t0
            n += c.tokens
        return n, ttft or 0.0

    t0 = time.perf_counter()
    out = await asyncio.gather(*(one(i) for i in range(streams)))
    return Result("direct (in-process)" + _suffix(spread_s), sum(n for n, _ in out), time.perf_counter() - t0,
                  [t for _, t in out])


def _suffix(spread_s: float) -> str:
    return f", spread {1000 * spread_s:g} ms" if spread_s else ", burst"


async def run_gateway(url: str, streams: int, tokens: int, spread_s: float) -> Result:
    host, port = url.removeprefix("http://").split(":")
    conns = [RawStream(host, int(port)) for _ in range(streams)]

    async def one(i: int, delay: float = 0.0) -> tuple[int, float]:
        await asyncio.sleep(delay)
        body = json.dumps({"model": MODEL, "messages": [{"role": "user", "content": prompt(i)}],
                           "max_tokens": tokens, "seed": i, "stream": True,
                           "stream_options": {"include_usage": True}}).encode()
        ttft, n = await conns[i].post_stream("/v1/chat/completions", body)
        return n, ttft or 0.0

    try:
        # Warm up: open every connection (a real client keeps them alive) and the server's code paths.
        await asyncio.gather(*(one(i) for i in range(streams)))
        t0 = time.perf_counter()
        out = await asyncio.gather(*(one(i, i * spread_s / streams) for i in range(streams)))
        return Result("daemon (uvicorn+SSE)" + _suffix(spread_s), sum(n for n, _ in out), time.perf_counter() - t0,
                      [t for _, t in out])
    finally:
        for c in conns:
            c.close()


def server_ttft_ms(url: str) -> float:
    """Mean TTFT the daemon measured itself (request accepted -> first token), from /metrics."""
    text = httpx.get(url + "/metrics").text
    values = {}
    for line in text.splitlines():
        if line.startswith("dcml_time_to_first_token_seconds_sum") or line.startswith(
                "dcml_time_to_first_token_seconds_count"):
            values[line.split("{")[0]] = float(line.rsplit(" ", 1)[1])
    return 1000 * values["dcml_time_to_first_token_seconds_sum"] / values["dcml_time_to_first_token_seconds_count"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--streams", type=int, default=64)
    ap.add_argument("--tokens", type=int, default=256)
    ap.add_argument("--rate", type=float, default=50.0, help="tokens/s per stream; 0 = as fast as possible")
    ap.add_argument("--repeat", type=int, default=1, help="runs per side; the best throughput is kept")
    ap.add_argument("--spread-ms", type=float, default=100.0,
                    help="second scenario: stream starts spread evenly over this window (the first is a burst)")
    report_args(ap)
    args = ap.parse_args()

    spreads = [0.0] + ([args.spread_ms / 1000] if args.spread_ms else [])

    def best(results: list[Result]) -> Result:
        return max(results, key=lambda r: r.tokens_per_s)

    with tempfile.TemporaryDirectory() as data_dir:
        proc, url = start_server(args.rate, data_dir)
        try:
            gateway = [best([asyncio.run(run_gateway(url, args.streams, args.tokens, sp))
                             for _ in range(args.repeat)]) for sp in spreads]
            inside = server_ttft_ms(url)
        finally:
            proc.terminate()
            proc.wait(30)
    direct = [best([asyncio.run(run_direct(args.streams, args.tokens, args.rate, sp)) for _ in range(args.repeat)])
              for sp in spreads]

    rate = f"{args.rate:g} tok/s/stream" if args.rate else "unpaced"
    impl = ", ".join(f"{m}: {'yes' if importlib.util.find_spec(m) else 'no'}" for m in ("httptools", "uvloop"))
    print(f"\n{args.streams} concurrent streams x {args.tokens} tokens, engine {rate}, cpus={os.cpu_count()}, {impl}")
    report = Report("gateway overhead: the daemon vs the engine called in-process")
    for d, g in zip(direct, gateway, strict=True):
        compare_streams(report, d, g, goal_lost="3 %", goal_added="5 ms")
    report.print(args)
    print(f"mean TTFT as the daemon measured it (request read -> first token, all runs): {inside:.2f} ms")


if __name__ == "__main__":
    main()
