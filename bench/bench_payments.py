"""What payments cost: the same daemon and paced engine with payments off and on, 64 concurrent streams,
tokens/s and TTFT p50/p99 side by side; then vouchers accepted per second over HTTP, each durable before its 200,
beside the same clients' `GET /health` rate on the same daemon (the HTTP floor).

Paid streams run pay-as-you-go (prepay 0): the node charges every token durably before sending it and
asks for a voucher when half the credit window is used; the load generator answers each ask on a second
keep-alive connection, so the numbers include the node's voucher verification and fsync'd commits and the
client's mid-stream signing (on the same 2 cores); the admission vouchers are signed before the clock starts.

    .venv/bin/python bench/bench_payments.py --streams 64 --tokens 256 --rate 50

Where the time goes: `PROFILE_LOOP=/tmp/loop.prof` cProfiles the daemon's event-loop thread (read it with
`pstats`); `py-spy record --gil -p PID` samples it without code changes.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import MODEL, PacedEngine, RawStream, Report, Result, compare_streams, prompt, report_args, spawn_daemon
from eth_account import Account
from web3 import Web3

from dcml.client.chain.channel import ChannelClient
from dcml.client.chain.devnet import Devnet, free_port
from dcml.client.wire.receipts import model_id_for
from dcml.client.wire.voucher import VoucherDomain
from dcml.client.wire.x402 import NEED_VOUCHER_EVENT, PAYMENT_SIGNATURE

PRICE_IN, PRICE_OUT = 10**9, 10**10
PASSES = 3  # of the 8-client HTTP rates: the median is reported
CREDIT_TOKENS = 32


def serve(port: int, rate: float, data_dir: str, deployment: str | None) -> None:
    """Child process: the daemon with the paced engine, payments on when a deployment is given."""
    import uvicorn

    from dcml.node.api.app import create_app
    from dcml.node.api.server import uvicorn_config
    from dcml.node.config import load_settings
    from dcml.node.identity import EnclaveIdentity
    from dcml.node.logging import configure_logging
    from dcml.node.tee.simulated import SimulatedProvider

    configure_logging("warning")
    payments = {"enabled": False}
    if deployment:
        payments = {"enabled": True, "deployment": deployment, "prepay_tokens": 0, "credit_tokens": CREDIT_TOKENS,
                    "settle_threshold": 10**30,
                    "prices": {MODEL: {"price_per_input_token": PRICE_IN, "price_per_output_token": PRICE_OUT}}}
    settings = load_settings(None, data_dir=data_dir, limits={"max_tokens_cap": 100_000}, payments=payments)
    identity = EnclaveIdentity.from_seed(b"bench-node-identity-seed-32bytes")
    app = create_app(settings, engine=PacedEngine(rate, max_context=200_000), identity=identity,
                     provider=SimulatedProvider(), freeze_heap=True)
    server = uvicorn.Server(uvicorn_config(app, host="127.0.0.1", port=port, graceful_shutdown_s=5))
    if os.environ.get("PROFILE_LOOP"):  # (investigation aid) cProfile the event loop's thread, dumped on exit
        import cProfile
        import signal

        signal.signal(signal.SIGTERM, lambda *_: None)  # uvicorn re-raises the signal after its shutdown
        cProfile.runctx("server.run()", globals(), {"server": server}, os.environ["PROFILE_LOOP"])
        return
    server.run()


def start(rate: float, data_dir: str, deployment: str | None) -> tuple[subprocess.Popen, str]:
    port = free_port()
    args = [sys.executable, __file__, "--serve", str(port), "--rate", str(rate), "--data-dir", data_dir]
    if deployment:
        args += ["--deployment", deployment]
    return spawn_daemon(args, port)


class PaidStream(RawStream):
    """RawStream that sends a voucher header and answers `payment-need-voucher` on a second connection."""

    def __init__(self, host: str, port: int, channel_id: bytes, session, domain: VoucherDomain) -> None:
        super().__init__(host, port)
        self.channel_id, self.session, self.domain = channel_id, session, domain
        self.cumulative = 0
        self.side: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None = None

    def header(self, amount: int) -> str:
        self.cumulative = max(self.cumulative, amount)
        return self.domain.sign(self.session, self.channel_id, self.cumulative).to_header()

    async def pay(self, amount: int) -> None:
        if self.side is None:
            self.side = await asyncio.open_connection(self.host, self.port)
        reader, writer = self.side
        self.cumulative = max(self.cumulative, amount)
        body = json.dumps(self.domain.sign(self.session, self.channel_id, self.cumulative).to_wire()).encode()
        writer.write(f"POST /v1/payments/vouchers HTTP/1.1\r\nHost: {self.host}\r\nContent-Type: application/json"
                     f"\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body)
        head = await reader.readuntil(b"\r\n\r\n")
        length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
        await reader.readexactly(length)
        if not head.startswith(b"HTTP/1.1 200"):
            raise RuntimeError(head.decode())

    async def post_paid(self, path: str, body: bytes, voucher: str) -> tuple[float | None, int]:
        if self.writer is None:
            self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
        t0 = time.perf_counter()
        self.writer.write(f"POST {path} HTTP/1.1\r\nHost: {self.host}\r\nContent-Type: application/json\r\n"
                          f"{PAYMENT_SIGNATURE}: {voucher}\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body)
        head = await self.reader.readuntil(b"\r\n\r\n")
        if not head.startswith(b"HTTP/1.1 200"):
            raise RuntimeError(head.decode()[:300])
        ttft, data, pending = None, bytearray(), b""
        while True:
            size = int((await self.reader.readuntil(b"\r\n"))[:-2], 16)
            if size == 0:
                await self.reader.readuntil(b"\r\n")
                break
            piece = (await self.reader.readexactly(size + 2))[:-2]
            if ttft is None and b'"delta":{"content":"' in piece:
                ttft = time.perf_counter() - t0
            data += piece
            pending += piece
            while b"\n\n" in pending:
                event, pending = pending.split(b"\n\n", 1)
                if event.startswith(f"event: {NEED_VOUCHER_EVENT}".encode()):
                    need = json.loads(event.split(b"data: ", 1)[1])
                    await self.pay(int(need["requiredCumulative"]))
        usage = data.rfind(b'"completion_tokens":')
        tokens = int(data[usage + 20:data.index(b"}", usage)]) if usage >= 0 else 0
        return ttft, tokens


async def run(url: str, streams: int, tokens: int, paid: list[PaidStream] | None, spread_s: float) -> Result:
    host, port = url.removeprefix("http://").split(":")
    conns = paid or [RawStream(host, int(port)) for _ in range(streams)]

    headers: list[str] = []

    def sign_headers() -> None:
        # The client's own signing is done before the clock starts: the figure is the node's cost.
        # (Each covers the prompt and any credit the previous stream left unpaid.)
        headers[:] = [c.header(c.cumulative + 64 * PRICE_IN + CREDIT_TOKENS * PRICE_OUT) for c in paid or []]

    async def one(i: int, delay: float = 0.0) -> tuple[int, float]:
        await asyncio.sleep(delay)
        body = json.dumps({"model": MODEL, "messages": [{"role": "user", "content": prompt(i)}],
                           "max_tokens": tokens, "seed": i, "stream": True,
                           "stream_options": {"include_usage": True}}).encode()
        if paid:
            ttft, n = await paid[i].post_paid("/v1/chat/completions", body, headers[i])
        else:
            ttft, n = await conns[i].post_stream("/v1/chat/completions", body)
        return n, ttft or 0.0

    sign_headers()
    await asyncio.gather(*(one(i) for i in range(streams)))  # warm-up: connections, code paths, channel cache
    sign_headers()
    t0 = time.perf_counter()
    out = await asyncio.gather(*(one(i, i * spread_s / streams) for i in range(streams)))
    for c in conns:
        c.close()
    name = ("paid (pay as you go)" if paid else "unpaid") + (f", spread {spread_s * 1000:g} ms" if spread_s
                                                              else ", burst")
    return Result(name, sum(n for n, _ in out), time.perf_counter() - t0, [t for _, t in out])


async def closed_loop(host: str, port: int, requests: list[list[bytes]]) -> float:
    """Requests/s of `len(requests)` clients, each on its own keep-alive connection with one request in flight
    (the next is sent once the previous answer is read): requests[i] are client i's raw HTTP requests."""
    async def client(reqs: list[bytes]) -> None:
        reader, writer = await asyncio.open_connection(host, port)
        for req in reqs:
            writer.write(req)
            head = await reader.readuntil(b"\r\n\r\n")
            length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
            await reader.readexactly(length)
            if not head.startswith(b"HTTP/1.1 200"):
                raise RuntimeError(head.decode())
        writer.close()

    t0 = time.perf_counter()
    await asyncio.gather(*(client(r) for r in requests))
    return sum(len(r) for r in requests) / (time.perf_counter() - t0)


async def voucher_rate(url: str, channels: list[tuple[bytes, object]], domain: VoucherDomain, n: int) -> float:
    """Vouchers accepted per second over HTTP: `len(channels)` clients posting concurrently, each voucher durable
    before its 200. Pre-signed: the timed loop measures the node, not the client's signing."""
    host, port = url.removeprefix("http://").split(":")
    per = n // len(channels)
    requests = []
    for cid, key in channels:
        bodies = [json.dumps(domain.sign(key, cid, 10**15 + k).to_wire()).encode() for k in range(per)]
        requests.append([f"POST /v1/payments/vouchers HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json"
                         f"\r\nContent-Length: {len(b)}\r\n\r\n".encode() + b for b in bodies])
    return await closed_loop(host, int(port), requests)


async def health_rate(url: str, clients: int, n: int) -> float:
    """The same clients' requests/s on `GET /health`: the HTTP server's floor, with no payment work."""
    host, port = url.removeprefix("http://").split(":")
    req = f"GET /health HTTP/1.1\r\nHost: {host}\r\n\r\n".encode()
    return await closed_loop(host, int(port), [[req] * (n // clients) for _ in range(clients)])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--streams", type=int, default=64)
    ap.add_argument("--tokens", type=int, default=256)
    ap.add_argument("--rate", type=float, default=50.0)
    ap.add_argument("--vouchers", type=int, default=8000, help="vouchers posted by the 8 clients (1 client: 1/4)")
    ap.add_argument("--spread-ms", type=float, default=100.0, help="second scenario: starts spread over this window")
    ap.add_argument("--serve", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--data-dir", help=argparse.SUPPRESS)
    ap.add_argument("--deployment", help=argparse.SUPPRESS)
    report_args(ap)
    args = ap.parse_args()
    if args.serve:
        serve(args.serve, args.rate, args.data_dir, args.deployment)
        return

    with Devnet() as net, tempfile.TemporaryDirectory() as tmp:
        dep = net.deployment
        dep_file = Path(tmp) / "deployment.json"
        dep.save(dep_file)
        w3 = Web3(Web3.HTTPProvider(dep.rpc_url))
        from dcml.node.identity import EnclaveIdentity

        payee = EnclaveIdentity.from_seed(b"bench-node-identity-seed-32bytes").address
        w3.provider.make_request("anvil_setBalance", [payee, hex(10**20)])
        payer = ChannelClient(w3, dep, Account.from_key(dep.accounts["client"].private_key))
        domain = VoucherDomain(dep.chain_id, dep.payment_channels)
        model = bytes.fromhex(model_id_for(MODEL)[2:])
        n_channels = args.streams + 1 + 8 * PASSES
        keys = [Account.create() for _ in range(n_channels)]
        ids = [payer.open(payee, 10**21, session_key=k.address, model_id=model) for k in keys]

        spreads = [0.0, args.spread_ms / 1000]
        proc, url = start(args.rate, str(Path(tmp) / "unpaid"), None)
        try:
            unpaid = [asyncio.run(run(url, args.streams, args.tokens, None, sp)) for sp in spreads]
        finally:
            proc.terminate()
            proc.wait(30)
        proc, url = start(args.rate, str(Path(tmp) / "paid"), str(dep_file))
        try:
            host, port = url.removeprefix("http://").split(":")
            paid = []
            for sp in spreads:
                conns = [PaidStream(host, int(port), ids[i], keys[i], domain) for i in range(args.streams)]
                for c, old in zip(conns, paid[-1][1] if paid else [], strict=False):
                    c.cumulative = old.cumulative  # same channels: continue from the vouchers already signed
                paid.append((asyncio.run(run(url, args.streams, args.tokens, conns, sp)), conns))
            paid = [r for r, _ in paid]
            floor_1 = asyncio.run(health_rate(url, 1, args.vouchers // 4))
            floor_8 = statistics.median(asyncio.run(health_rate(url, 8, args.vouchers)) for _ in range(PASSES))
            rate_1 = asyncio.run(voucher_rate(url, [(ids[args.streams], keys[args.streams])], domain,
                                              args.vouchers // 4))
            rate_8 = statistics.median(  # each pass on 8 channels of its own
                asyncio.run(voucher_rate(url, list(zip(ids[first:first + 8], keys[first:first + 8], strict=True)),
                                         domain, args.vouchers))
                for first in range(args.streams + 1, n_channels, 8))
        finally:
            proc.terminate()
            proc.wait(30)

    print(f"\n{args.streams} concurrent streams x {args.tokens} tokens, engine {args.rate:g} tok/s/stream, "
          f"credit window {CREDIT_TOKENS} tokens, cpus={os.cpu_count()}")
    report = Report("payments: the paid daemon vs the same daemon unpaid")
    for u, p in zip(unpaid, paid, strict=True):
        compare_streams(report, u, p, goal_lost="5 %", goal_added="5 ms")
    report.baseline("GET /health, 1 client", floor_1, "req/s")
    report.add("vouchers accepted, 1 client", rate_1, "req/s", vs="GET /health, 1 client")
    floor_name = f"GET /health, 8 clients (median of {PASSES})"
    report.baseline(floor_name, floor_8, "req/s")
    report.add(f"vouchers accepted, 8 clients (median of {PASSES})", rate_8, "req/s", vs=floor_name,
               goal=">= 5,000/s")
    report.print(args)


if __name__ == "__main__":
    main()
