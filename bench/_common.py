"""What the benchmarks share: one report (each figure beside its baseline from the same run, as a table, JSON or
README rows), and the paced engine, the daemon child process and the raw streaming client that bench_gateway,
bench_payments and bench_sealing measure with. Benchmarks import it as `_common` (their own folder is on sys.path
when run as `python bench/bench_x.py`); it imports nothing from tests/."""

from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

import httpx

from dcml.client.chain.devnet import REPO, free_port
from dcml.node.engine.base import GenerationRequest, TokenChunk
from dcml.node.engine.synthetic import SyntheticEngine

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




@dataclass
class Figure:
    name: str
    value: float
    unit: str
    baseline: str | None = None  # the name of the figure it is compared with
    goal: str = ""


@dataclass
class Report:
    """Figures of one run; each non-baseline figure is printed beside its baseline from the same run."""

    title: str
    figures: list[Figure] = field(default_factory=list)

    def baseline(self, name: str, value: float, unit: str) -> None:
        self.figures.append(Figure(name, value, unit))

    def add(self, name: str, value: float, unit: str, *, vs: str, goal: str = "") -> None:
        assert any(f.name == vs for f in self.figures), f"baseline {vs!r} must be added first"
        self.figures.append(Figure(name, value, unit, vs, goal))

    def _base(self, f: Figure) -> Figure | None:
        return next((b for b in self.figures if b.name == f.baseline), None)

    def comparison(self, f: Figure) -> str:
        base = self._base(f)
        if base is None:
            return "baseline"
        ratio = f"{f.value / base.value:.2f}x" if base.value else "n/a"
        return f"{ratio} baseline ({_fmt(f.value - base.value, sign=True)} {f.unit})"

    def table(self) -> str:
        width = max(len(f.name) for f in self.figures) + 2
        lines = [self.title]
        for f in self.figures:
            goal = f"  goal {f.goal}" if f.goal else ""
            lines.append(f"  {f.name:<{width}}{_fmt(f.value):>12} {f.unit:<10}{self.comparison(f)}{goal}")
        return "\n".join(lines)

    def readme_rows(self) -> str:
        """One Markdown row per compared figure: | what | figure | baseline, same run | comparison | goal |."""
        rows = []
        for f in self.figures:
            base = self._base(f)
            if base is not None:
                rows.append(f"| {self.title}: {f.name} | {_fmt(f.value)} {f.unit} | {base.name}: {_fmt(base.value)} "
                            f"{base.unit} | {self.comparison(f)} | {f.goal or '-'} |")
        return "\n".join(rows)

    def json(self) -> str:
        return json.dumps({"title": self.title, "figures": [f.__dict__ for f in self.figures]})

    def print(self, args: argparse.Namespace | None = None) -> None:
        """As `--json` or `--readme` asked (see `report_args`), else as a table."""
        if args is not None and getattr(args, "json", False):
            print(self.json())
        elif args is not None and getattr(args, "readme", False):
            print(self.readme_rows())
        else:
            print(self.table())


def compare_streams(report: Report, base: Result, run: Result, *, goal_lost: str, goal_added: str) -> None:
    """`run` beside `base` (same run): throughput and TTFT p50/p99."""
    report.baseline(f"{base.name}: throughput", base.tokens_per_s, "tok/s")
    report.add(f"{run.name}: throughput", run.tokens_per_s, "tok/s", vs=f"{base.name}: throughput",
               goal=f"<= {goal_lost} lost")
    for q, goal in ((0.5, f"<= {goal_added} added"), (0.99, "")):
        label = f"TTFT p{round(100 * q)}"
        report.baseline(f"{base.name}: {label}", base.ttft_ms(q), "ms")
        report.add(f"{run.name}: {label}", run.ttft_ms(q), "ms", vs=f"{base.name}: {label}", goal=goal)


def interleaved_latency(report: Report, send: Callable[[str], None], variants: dict[str, str], rounds: int) -> None:
    """Time `send(value)` for each variant, interleaved (so drift hits both alike), `rounds` times each; the
    first variant is the baseline of the others (p50 and p90, ms)."""
    times: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(rounds):
        for name, value in variants.items():
            t0 = time.perf_counter()
            send(value)
            times[name].append((time.perf_counter() - t0) * 1000)
    base = next(iter(variants))
    for q in (0.5, 0.9):
        label = f"p{round(100 * q)}"
        for name, ts in times.items():
            ts.sort()
            value = ts[min(len(ts) - 1, int(q * len(ts)))]
            if name == base:
                report.baseline(f"{name} {label}", value, "ms")
            else:
                report.add(f"{name} {label}", value, "ms", vs=f"{base} {label}")


def report_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("--json", action="store_true", help="print the figures as JSON")
    parser.add_argument("--readme", action="store_true", help="print README table rows (figure | baseline | ratio)")
    return parser


def _fmt(v: float, sign: bool = False) -> str:
    plus = "+" if sign else ""
    return f"{v:{plus},.0f}" if abs(v) >= 100 else f"{v:{plus}.2f}"

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


def serve(port: int, rate: float, data_dir: str) -> None:
    """Child process (`python bench/_common.py PORT RATE DATA_DIR`): the real daemon app on uvicorn, the paced
    engine injected."""
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
                     provider=SimulatedProvider(), freeze_heap=True)  # as the daemon (`dcml-node run`)
    uvicorn.Server(uvicorn_config(app, host="127.0.0.1", port=port, graceful_shutdown_s=5)).run()


def start_server(rate: float, data_dir: str) -> tuple[subprocess.Popen, str]:
    """The daemon with the paced engine in a child process (this file as a script)."""
    port = free_port()
    return spawn_daemon([sys.executable, __file__, str(port), str(rate), data_dir], port)


def spawn_daemon(cmd: list[str], port: int, timeout_s: float = 60) -> tuple[subprocess.Popen, str]:
    """Run `cmd` (a daemon listening on `port`) and wait until its /health answers."""
    proc = subprocess.Popen(cmd, cwd=REPO)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if httpx.get(url + "/health").status_code == 200:
                return proc, url
        except httpx.TransportError:
            time.sleep(0.1)
    proc.kill()
    raise RuntimeError("daemon did not come up")

if __name__ == "__main__":
    serve(int(sys.argv[1]), float(sys.argv[2]), sys.argv[3])
