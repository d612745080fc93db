"""`dcml gateway` overhead and failover, on anvil with real paid nodes (synthetic engine, paced like a decoder).

1. TTFT p50/p99 of C concurrent paid streams, R rounds (see `ttfts`): the SDK used directly
   (`Client.async_openai()`, one client per concurrent stream: the baseline) vs the official `openai` client
   through the gateway (same node, same run, rounds alternating). Warm-up first (attestation, channel
   openings), so both measure steady-state paid requests.
2. Failover: the cheapest node (a real process) is SIGKILLed while the gateway waits for its first token;
   reported: kill -> first token from the next node.
3. CPU per 1,000 streamed tokens: the SDK in the app's process (baseline) vs the gateway's own process
   (the real `dcml gateway`) plus the app's plain openai client; the node runs in its own process.

    .venv/bin/python bench/bench_local_gateway.py --concurrency 8 --rounds 4 --tokens 32
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import openai
from eth_account import Account
from web3 import Web3

from dcml.client.chain.devnet import Devnet, free_port
from dcml.client.demo.kit.gateway import start_gateway, start_node
from dcml.client.demo.kit.nodes import MODEL, PRICE_IN, synthetic_node
from dcml.client.sdk.client import Client
from dcml.node.engine.synthetic import SyntheticEngine


def start_paced_node(w3, path: Path, data: Path, price_out: int, rate: float):
    engine = SyntheticEngine(model_name=MODEL, tokens_per_second=rate, first_token_ms=1000 / rate)
    return start_node(w3, path, data, price_out, engine=engine)[0]


async def one(oai: openai.AsyncOpenAI, i: int, tokens: int) -> float:
    start = time.perf_counter()
    first = None
    stream = await oai.completions.create(model=MODEL, prompt=f"bench {i}", max_tokens=tokens, stream=True)
    async for chunk in stream:
        if first is None and chunk.choices and chunk.choices[0].text:
            first = time.perf_counter() - start
    return first or float("nan")


async def ttfts(direct: list[openai.AsyncOpenAI], via: openai.AsyncOpenAI, concurrency: int, rounds: int,
                tokens: int) -> tuple[list[float], list[float]]:
    """`concurrency` streams at once, `rounds` times, alternating sides. Direct: one SDK client (own
    channel) per concurrent stream, as one SDK Client carries one request at a time; the gateway gets as many
    channels (`channels_per_node`). Warm-up first: attestation and channel openings are not measured."""
    for d in direct:
        await one(d, -1, tokens)
    await asyncio.gather(*(one(via, -1, tokens) for _ in range(concurrency)))
    a, b = [], []
    for r in range(rounds):
        a += await asyncio.gather(*(one(direct[i], r * concurrency + i, tokens) for i in range(concurrency)))
        b += await asyncio.gather(*(one(via, r * concurrency + i, tokens) for i in range(concurrency)))
    return a, b


def p(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=100)[int(q) - 1] * 1000 if len(values) > 1 else values[0] * 1000


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--rate", type=float, default=50.0, help="tokens/s per stream of the synthetic engine")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="bench-gw-"))
    with Devnet() as net:
        dep = net.deployment
        path = tmp / "deployment.json"
        dep.save(path)
        w3 = Web3(Web3.HTTPProvider(dep.rpc_url))
        node = start_paced_node(w3, path, tmp / "node", 3 * 10**12, args.rate)
        direct_wallet = Account.from_key(dep.accounts["client"].private_key)
        gw_wallet = Account.from_key(dep.accounts["client2"].private_key)

        sdks = [Client(node.url, direct_wallet, deployment=dep, allow_simulated=True,
                       store=tmp / f"direct-{i}.sqlite", deposit=10**17) for i in range(args.concurrency)]
        server, _ = start_gateway(gw_wallet, dep, tmp / "gw", [node.url], deposit=10**17,
                                  channels_per_node=args.concurrency)
        direct, via = asyncio.run(ttfts([c.async_openai(max_retries=0) for c in sdks],
                                        openai.AsyncOpenAI(base_url=f"{server.url}/v1", api_key="x", max_retries=0),
                                        args.concurrency, args.rounds, args.tokens))
        print(f"TTFT, {args.concurrency} concurrent paid streams x {args.rounds} rounds x {args.tokens} tokens, "
              f"engine {args.rate:g} tok/s:")
        print(f"  SDK direct (baseline): p50 {p(direct, 50):7.1f} ms  p99 {p(direct, 99):7.1f} ms")
        print(f"  through dcml gateway : p50 {p(via, 50):7.1f} ms  p99 {p(via, 99):7.1f} ms  "
              f"(added p50 {p(via, 50) - p(direct, 50):+.1f} ms)")
        server.stop()
        for c in sdks:
            c.close()

        # Failover: a cheaper node that dies before its first token.
        slow = synthetic_node(w3, path, tmp / "slow", free_port(), 2 * 10**12, first_token_ms=3000)
        server, _ = start_gateway(Account.from_key(dep.accounts["client3"].private_key), dep, tmp / "gw2",
                                  [slow.url, node.url], first_token_timeout_s=30)
        killed_at: list[float] = []

        def kill() -> None:
            killed_at.append(time.perf_counter())
            slow.kill()

        oai = openai.OpenAI(base_url=f"{server.url}/v1", api_key="x", max_retries=0)
        timer = threading.Timer(1.0, kill)
        timer.start()
        first = None
        for chunk in oai.completions.create(model=MODEL, prompt="fail over", max_tokens=8, stream=True):
            if first is None and chunk.choices and chunk.choices[0].text:
                first = time.perf_counter()
        timer.join()
        print(f"failover: node SIGKILLed before its first token -> first token from the next node in "
              f"{(first - killed_at[0]) * 1000:.1f} ms (includes the backup's own TTFT {1000 / args.rate:.0f} ms "
              f"and its payment round trips)")
        server.stop()
        node.stop()
        cpu(args, w3, dep, path, tmp)
    _ = PRICE_IN


def _proc_cpu(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


def cpu(args, w3, dep, path: Path, tmp: Path) -> None:
    """CPU per 1,000 tokens: node and gateway each in their own process, the apps in this one."""
    node = synthetic_node(w3, path, tmp / "cpu-node", free_port(), 3 * 10**12, first_token_ms=int(1000 / args.rate),
                       tokens_per_second=args.rate)
    port = free_port()
    config = tmp / "gateway.toml"
    config.write_text(f'port = {port}\ndeployment = "{path}"\nstore_dir = "{tmp / "cpu-gw"}"\n'
                      f'allow_simulated = true\nnodes = ["{node.url}"]\ndeposit = {10**17}\n'
                      f"channels_per_node = {args.concurrency}\n")
    gw = subprocess.Popen([sys.executable, "-c", "from dcml.client.sdk.cli import app; app()", "gateway", "--config",
                           str(config)], env={**os.environ, "DCML_WALLET_KEY": dep.accounts["client2"].private_key},
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        for _ in range(300):
            try:
                httpx.get(f"http://127.0.0.1:{port}/v1/models", timeout=2)
                break
            except httpx.TransportError:
                time.sleep(0.2)
        wallet = Account.from_key(dep.accounts["client3"].private_key)
        sdks = [Client(node.url, wallet, deployment=dep, allow_simulated=True, store=tmp / f"cpu-direct-{i}.sqlite",
                       deposit=10**17) for i in range(args.concurrency)]
        direct = [c.async_openai(max_retries=0) for c in sdks]
        via = openai.AsyncOpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="x", max_retries=0)
        tokens = args.rounds * args.concurrency * args.tokens

        async def run(clients: list[openai.AsyncOpenAI]) -> None:
            for r in range(args.rounds):
                await asyncio.gather(*(one(clients[i], r, args.tokens) for i in range(args.concurrency)))

        async def measure() -> tuple[float, float, float]:
            for c in direct:  # warm-up, one at a time: each opens its channel from the same wallet
                await one(c, -1, args.tokens)
            await run([via] * args.concurrency)
            t0 = time.process_time()
            await run(direct)
            direct_cpu = time.process_time() - t0
            t0, g0 = time.process_time(), _proc_cpu(gw.pid)
            await run([via] * args.concurrency)
            return direct_cpu, time.process_time() - t0, _proc_cpu(gw.pid) - g0

        direct_cpu, app_cpu, gw_cpu = asyncio.run(measure())
        k = 1000 / tokens
        print(f"CPU per 1,000 streamed tokens ({args.concurrency} concurrent streams, {tokens} tokens):")
        print(f"  SDK direct (baseline), the app's process: {direct_cpu * k * 1000:6.1f} ms")
        print(f"  through dcml gateway: gateway process {gw_cpu * k * 1000:6.1f} ms + the app's plain openai client "
              f"{app_cpu * k * 1000:6.1f} ms")
        for c in sdks:
            c.close()
    finally:
        gw.terminate()
        gw.wait(timeout=30)
        node.kill()


if __name__ == "__main__":
    main()
