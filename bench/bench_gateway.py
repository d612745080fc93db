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
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from dcml.node.engine.base import GenerationRequest, SamplingParams, TokenChunk  # noqa: E402
from dcml.node.engine.synthetic import SyntheticEngine  # noqa: E402

MODEL = "synthetic"


class PacedEngine(SyntheticEngine):
    """SyntheticEngine whose tokens arrive at `rate` per second per stream (0 = flat out)."""

    def __init__(self, rate: float, **kw) -> None:
        super().__init__(model_name=MODEL, max_inflight=100_000, **kw)
        self.step = 1.0 / rate if rate > 0 else 0.0

    async def stream(self, request: GenerationRequest) -> AsyncIterator[TokenChunk]:
        # Token i is ready at start + (i+1)·step whether or not the consumer has read token i-1, as in a
        # real engine that decodes on its own and queues output (vLLM, EmbeddedEngine's scheduler thread).
        start, i = time.perf_counter(), 0
        async for chunk in super().stream(request):
            i += 1
            if self.step:
                await asyncio.sleep(max(0.0, start + i * self.step - time.perf_counter()))
            yield chunk


@dataclass
class Result:
    name: str
    tokens: int
    wall_s: float
    ttfts: list[float]

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.wall_s

    def ttft_ms(self, q: float) -> float:
        xs = sorted(self.ttfts)
        return 1000 * xs[min(len(xs) - 1, round(q * (len(xs) - 1)))]


def prompt(i: int) -> str:
    return f"benchmark stream {i} says hello"


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


class RawStream:
    """A minimal keep-alive HTTP/1.1 client on one connection: the load generator must cost far less than
    the server it measures (httpx + json per chunk would, on a small machine, dominate the numbers)."""

    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def post_stream(self, path: str, body: bytes) -> tuple[float | None, int]:
        if self.writer is None:
            self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
        assert self.reader is not None
        t0 = time.perf_counter()
        self.writer.write(f"POST {path} HTTP/1.1\r\nHost: {self.host}\r\nContent-Type: application/json\r\n"
                          f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
        head = await self.reader.readuntil(b"\r\n\r\n")
        if not head.startswith(b"HTTP/1.1 200") or b"chunked" not in head.lower():
            raise RuntimeError(head.decode())
        ttft, data = None, bytearray()
        while True:  # chunked transfer coding: <hex size>\r\n<data>\r\n ... 0\r\n\r\n
            size = int((await self.reader.readuntil(b"\r\n"))[:-2], 16)
            if size == 0:
                await self.reader.readuntil(b"\r\n")
                break
            piece = await self.reader.readexactly(size + 2)
            if ttft is None and b'"delta":{"content":"' in piece:
                ttft = time.perf_counter() - t0
            data += piece[:-2]
        usage = data.rfind(b'"completion_tokens":')
        tokens = int(data[usage + 20:data.index(b"}", usage)]) if usage >= 0 else 0
        return ttft, tokens

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


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


def serve(port: int, rate: float, data_dir: str) -> None:
    """Child process: the real daemon app on uvicorn with the paced engine injected."""
    import uvicorn

    from dcml.node.api.app import create_app
    from dcml.node.api.server import uvicorn_config
    from dcml.node.config import load_settings
    from dcml.node.identity import EnclaveIdentity
    from dcml.node.logging import configure_logging
    from dcml.node.tee.simulated import SimulatedProvider

    configure_logging("warning")
    settings = load_settings(None, data_dir=data_dir, limits={"max_tokens_cap": 100_000})
    app = create_app(settings, engine=PacedEngine(rate, max_context=200_000), identity=EnclaveIdentity.generate(),
                     provider=SimulatedProvider())
    uvicorn.Server(uvicorn_config(app, host="127.0.0.1", port=port, graceful_shutdown_s=5)).run()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(rate: float, data_dir: str) -> tuple[subprocess.Popen, str]:
    port = free_port()
    path = os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])
    proc = subprocess.Popen([sys.executable, __file__, "--serve", str(port), "--rate", str(rate),
                             "--data-dir", data_dir], cwd=ROOT, env={**os.environ, "PYTHONPATH": path})
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            if httpx.get(url + "/health").status_code == 200:
                return proc, url
        except httpx.TransportError:
            time.sleep(0.1)
    proc.kill()
    raise RuntimeError("daemon did not come up")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--streams", type=int, default=64)
    ap.add_argument("--tokens", type=int, default=256)
    ap.add_argument("--rate", type=float, default=50.0, help="tokens/s per stream; 0 = as fast as possible")
    ap.add_argument("--repeat", type=int, default=1, help="runs per side; the best throughput is kept")
    ap.add_argument("--spread-ms", type=float, default=100.0,
                    help="second scenario: stream starts spread evenly over this window (the first is a burst)")
    ap.add_argument("--serve", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--data-dir", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.serve:
        serve(args.serve, args.rate, args.data_dir)
        return

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
    print(f"{'':40}{'tokens/s':>10}{'TTFT p50 ms':>13}{'TTFT p99 ms':>13}{'wall s':>8}")
    for d, g in zip(direct, gateway, strict=True):
        for r in (d, g):
            print(f"{r.name:40}{r.tokens_per_s:10.0f}{r.ttft_ms(0.5):13.2f}{r.ttft_ms(0.99):13.2f}{r.wall_s:8.2f}")
        lost = 100 * (1 - g.tokens_per_s / d.tokens_per_s)
        added = g.ttft_ms(0.5) - d.ttft_ms(0.5)
        print(f"  -> throughput lost {lost:.2f} % (goal <= 3 %), p50 TTFT added {added:.2f} ms (goal <= 5 ms)")
    print(f"mean TTFT as the daemon measured it (request read -> first token, all runs): {inside:.2f} ms")


if __name__ == "__main__":
    main()
