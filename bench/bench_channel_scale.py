"""Channel state at scale (issue 17): what first contact and the number of open channels cost the node.

1. first contact: `--clients` channels opened in ONE block just before their first requests arrive together (the
   node's index poller is slowed so that none of them is indexed yet: every admission is a cold miss), TTFT p50/p95
   beside the same channels' second request (warm) in the same run. Real node process, paced engine, real anvil.
2. scale: `--small` vs `--large` open channels paying the node on anvil (opened by pre-signed transactions sent in
   JSON-RPC batches into blocks with a raised gas limit), every one with a voucher in the node's ledger; with each,
   side by side: the index's catch-up at start, an admission (`VoucherVerifier.verify`: time and RPCs), a cold
   admission (a channel opened after the last sync) and a settlement round (time and RPCs; none due).

Run it on two checkouts to compare designs (it uses only APIs both have):

    .venv/bin/python bench/bench_channel_scale.py [--clients 200] [--small 10 --large 10000]
"""

from __future__ import annotations

import argparse
import asyncio
import inspect
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import MODEL, spawn_daemon
from bench_payments import CREDIT_TOKENS, PRICE_IN, PRICE_OUT, PaidStream
from eth_account import Account
from web3 import Web3
from web3.logs import DISCARD

from dcml.client.chain.channel import ChannelClient
from dcml.client.chain.contracts import contract
from dcml.client.chain.devnet import Devnet, free_port
from dcml.client.wire.receipts import model_id_for
from dcml.client.wire.voucher import VoucherDomain

SEED = b"bench-node-identity-seed-32bytes"


class RpcCounter:
    """Counts JSON-RPC calls and HTTP round trips (a batch is one round trip) made through a Web3."""

    def __init__(self, w3: Web3) -> None:
        self.calls = self.trips = 0
        provider = w3.provider
        single, batch = provider.make_request, provider.make_batch_request

        def make_request(method, params):
            self.calls += 1
            self.trips += 1
            return single(method, params)

        def make_batch_request(requests):
            self.calls += len(requests)
            self.trips += 1
            return batch(requests)

        provider.make_request, provider.make_batch_request = make_request, make_batch_request

    def take(self) -> tuple[int, int]:
        out = (self.calls, self.trips)
        self.calls = self.trips = 0
        return out


def open_many(w3: Web3, dep, payee: str, n: int, deposit: int, model: bytes) -> list[tuple[bytes, object]]:
    """`n` channels from one funded payer, each with its own session key: pre-signed `open` transactions sent
    in JSON-RPC batches with automine off, then mined in as few blocks as the raised gas limit allows."""
    payer = Account.from_key(dep.accounts["client"].private_key)
    escrow = contract(w3, "PaymentChannels", dep.payment_channels)
    token = contract(w3, "TestToken", dep.token)
    bps = contract(w3, "ModelRegistry", dep.model_registry).functions.terms(model).call()[1]
    ChannelClient(w3, dep, payer)._approve(dep.token, deposit * n)
    if token.functions.balanceOf(payer.address).call() < deposit * n:
        raise SystemExit("the devnet payer holds too few tokens for this many channels")
    keys = [Account.create() for _ in range(n)]
    nonce = w3.eth.get_transaction_count(payer.address)
    gas_price = w3.eth.gas_price * 2
    raw = []
    for i, key in enumerate(keys):
        data = escrow.encode_abi("open", args=[payee, dep.token, deposit, os.urandom(32), key.address, model, bps])
        tx = {"to": escrow.address, "data": data, "gas": 200_000, "gasPrice": gas_price, "nonce": nonce + i,
              "chainId": dep.chain_id, "value": 0}
        raw.append(payer.sign_transaction(tx).raw_transaction)
    w3.provider.make_request("evm_setAutomine", [False])
    w3.provider.make_request("evm_setBlockGasLimit", [hex(200_000_000)])
    try:
        hashes = []
        for i in range(0, n, 500):  # 500 openings a block (anvil mines one huge block far slower)
            # (web3 refuses eth_sendRawTransaction in its batches: the provider's raw batch call)
            answers = w3.provider.make_batch_request([("eth_sendRawTransaction", ["0x" + tx.hex()])
                                                      for tx in raw[i:i + 500]])
            hashes += [a["result"] for a in answers]
            w3.provider.make_request("evm_mine", [])
        while w3.eth.get_transaction_receipt(hashes[-1]) is None:  # pragma: no cover (each block holds 500)
            w3.provider.make_request("evm_mine", [])
    finally:
        w3.provider.make_request("evm_setAutomine", [True])
    ids = []
    for i in range(0, n, 500):
        with w3.batch_requests() as batch:
            for h in hashes[i:i + 500]:
                batch.add(w3.eth.get_transaction_receipt(h))
            receipts = batch.execute()
        for r in receipts:
            assert r["status"] == 1, r
            (event,) = escrow.events.ChannelOpened().process_receipt(r, errors=DISCARD)
            ids.append(bytes(event["args"]["channelId"]))
    return list(zip(ids, keys, strict=True))


# -- 1. first contact -----------------------------------------------------------------------------------------


async def first_requests(url: str, conns: list[PaidStream], tokens: int) -> list[float]:
    async def one(i: int, header: str) -> float:
        body = json.dumps({"model": MODEL, "messages": [{"role": "user", "content": f"first contact {i}"}],
                           "max_tokens": tokens, "seed": i, "stream": True,
                           "stream_options": {"include_usage": True}}).encode()
        ttft, _ = await conns[i].post_paid("/v1/chat/completions", body, header)
        return ttft or 0.0

    headers = [c.header(c.cumulative + 64 * PRICE_IN + CREDIT_TOKENS * PRICE_OUT) for c in conns]  # before the clock
    out = list(await asyncio.gather(*(one(i, h) for i, h in enumerate(headers))))
    for c in conns:  # each round on new connections, so both include the connect
        c.close()
        c.reader = c.writer = None
        if c.side is not None:
            c.side[1].close()
            c.side = None
    return out


def serve(port: int, data_dir: str, deployment: str) -> None:
    """Child process: bench_payments' paid node, with the index poller slowed where the config has one."""
    import uvicorn
    from bench_gateway import PacedEngine

    from dcml.node.api.app import create_app
    from dcml.node.api.server import uvicorn_config
    from dcml.node.config import PaymentsConfig, load_settings
    from dcml.node.identity import EnclaveIdentity
    from dcml.node.logging import configure_logging
    from dcml.node.tee.simulated import SimulatedProvider

    configure_logging("warning")
    payments = {"enabled": True, "deployment": deployment, "prepay_tokens": 0, "credit_tokens": CREDIT_TOKENS,
                "settle_threshold": 10**30,
                "prices": {MODEL: {"price_per_input_token": PRICE_IN, "price_per_output_token": PRICE_OUT}}}
    if "index_poll_s" in PaymentsConfig.model_fields:  # none of the channels is indexed before it is used
        payments["index_poll_s"] = 3600
    settings = load_settings(None, data_dir=data_dir, limits={"max_tokens_cap": 100_000}, payments=payments)
    app = create_app(settings, engine=PacedEngine(50.0, max_context=200_000), identity=EnclaveIdentity.from_seed(SEED),
                     provider=SimulatedProvider(), freeze_heap=True)  # as the daemon (`dcml-node run`)
    uvicorn.Server(uvicorn_config(app, host="127.0.0.1", port=port, graceful_shutdown_s=5)).run()


def start(data_dir: str, deployment: str) -> tuple[subprocess.Popen, str]:
    port = free_port()
    return spawn_daemon([sys.executable, __file__, "--serve", str(port), "--data-dir", data_dir, "--deployment",
                         deployment], port, timeout_s=120)


def first_contact(net: Devnet, tmp: Path, clients: int, tokens: int) -> None:
    from dcml.node.config import PaymentsConfig
    from dcml.node.identity import EnclaveIdentity

    dep = net.deployment
    dep_file = tmp / "deployment.json"
    dep.save(dep_file)
    w3 = Web3(Web3.HTTPProvider(dep.rpc_url, request_kwargs={"timeout": 120}))
    payee = EnclaveIdentity.from_seed(SEED).address
    w3.provider.make_request("anvil_setBalance", [payee, hex(10**20)])
    slow_index = "index_poll_s" in PaymentsConfig.model_fields
    proc, url = start(str(tmp / "node-first"), str(dep_file))
    try:
        model = bytes.fromhex(model_id_for(MODEL)[2:])
        channels = open_many(w3, dep, payee, clients, 10**20, model)  # one block, after the node's last sync
        domain = VoucherDomain(dep.chain_id, dep.payment_channels)
        host, port = url.removeprefix("http://").split(":")
        conns = [PaidStream(host, int(port), cid, key, domain) for cid, key in channels]
        cold = asyncio.run(first_requests(url, conns, tokens))
        warm = asyncio.run(first_requests(url, conns, tokens))
    finally:
        proc.terminate()
        proc.wait(30)

    def q(xs: list[float], p: float) -> float:
        return 1000 * statistics.quantiles(xs, n=20)[round(p * 20) - 1]

    print(f"\n1. first contact: {clients} channels opened in one block, their first requests arriving together "
          f"(index poller {'slowed: every admission a cold miss' if slow_index else 'absent (old design)'}), "
          f"cpus={os.cpu_count()}")
    print(f"{'':34}{'TTFT p50 ms':>12}{'TTFT p95 ms':>12}")
    print(f"{'cold (first request per channel)':34}{1000 * statistics.median(cold):12.1f}{q(cold, 0.95):12.1f}")
    print(f"{'warm (same channels again)':34}{1000 * statistics.median(warm):12.1f}{q(warm, 0.95):12.1f}")
    print(f"  -> cold / warm p50 = {statistics.median(cold) / statistics.median(warm):.2f}x (goal <= 2x)")


# -- 2. scale in open channels ------------------------------------------------------------------------------------


def measure(net: Devnet, tmp: Path, channels: list[tuple[bytes, object]], label: str) -> dict:
    from dcml.node.payments.chain import ChannelChain
    from dcml.node.payments.ledger import Ledger, VoucherOp
    from dcml.node.payments.settlement import SettlementWorker
    from dcml.node.payments.verifier import VoucherVerifier

    dep = net.deployment
    w3 = Web3(Web3.HTTPProvider(dep.rpc_url, request_kwargs={"timeout": 120}))
    payee = Account.from_key(dep.accounts["node"].private_key)
    counter = RpcCounter(w3)
    data = tmp / f"scale-{label}"
    data.mkdir()
    kw = {}
    if "store" in inspect.signature(ChannelChain).parameters:  # the index design (issue 17)
        kw = {"payee": payee.address, "store": data / "channel_index.sqlite"}
    ledger = Ledger(data / "ledger.sqlite")
    domain = VoucherDomain(dep.chain_id, dep.payment_channels)
    # Every channel holds a voucher in the ledger (the signatures of those never settled need not be real).
    fake = "0x" + "11" * 65
    ledger.apply_groups([[VoucherOp("0x" + cid.hex(), 10**12, fake)] for cid, _ in channels])
    out: dict = {"channels": len(channels)}

    t0 = time.perf_counter()
    chain = ChannelChain(w3, dep, ttl=30.0, **kw)
    if hasattr(chain, "sync"):
        chain.sync()  # catch-up at start (what Payments does before admitting)
    out["start_s"] = time.perf_counter() - t0
    out["start_rpc"] = counter.take()
    verifier = VoucherVerifier(domain, chain, ledger, payee.address)
    worker = SettlementWorker(chain, ledger, payee, threshold=10**30, interval=5.0)

    sample = channels[:: max(1, len(channels) // 50)][:50]
    vouchers = [domain.sign(key, cid, 10**13) for cid, key in sample]
    for v in vouchers:  # first read of each (the old design's cache fills here)
        verifier.verify(v)
    counter.take()
    t0 = time.perf_counter()
    for v in vouchers:
        verifier.verify(v)
    out["admit_ms"] = 1000 * (time.perf_counter() - t0) / len(vouchers)
    out["admit_rpc"] = tuple(x / len(vouchers) for x in counter.take())

    (fresh_id, fresh_key), = open_many(w3, dep, payee.address, 1, 10**15, b"\0" * 32)
    counter.take()
    t0 = time.perf_counter()
    verifier.verify(domain.sign(fresh_key, fresh_id, 10**13))
    out["cold_ms"] = 1000 * (time.perf_counter() - t0)
    out["cold_rpc"] = counter.take()

    worker.run_once()  # warm-up (the first round after a start is a full pass)
    time.sleep(6)  # steady state: the ledger writes above are older than the worker's 5 s overlap ...
    worker.run_once()  # ... and than the previous round
    if hasattr(chain, "sync"):
        chain.sync()  # what the node's poller does every index_poll_s: the round itself then needs no RPC
    counter.take()
    t0 = time.perf_counter()
    worker.run_once()
    out["round_ms"] = 1000 * (time.perf_counter() - t0)
    out["round_rpc"] = counter.take()
    out["full_ms"], out["full_rpc"] = out["round_ms"], out["round_rpc"]
    if hasattr(worker, "full_scan_every"):  # the index design also makes a full pass every so many rounds
        worker._rounds = 0
        t0 = time.perf_counter()
        worker.run_once()
        out["full_ms"] = 1000 * (time.perf_counter() - t0)
        out["full_rpc"] = counter.take()
    if hasattr(chain, "stop"):
        chain.stop()
    ledger.close()
    return out


def scale(net: Devnet, tmp: Path, small: int, large: int) -> None:
    dep = net.deployment
    w3 = Web3(Web3.HTTPProvider(dep.rpc_url, request_kwargs={"timeout": 300}))
    payee = Account.from_key(dep.accounts["node"].private_key).address
    t0 = time.perf_counter()
    channels = open_many(w3, dep, payee, small, 10**15, b"\0" * 32)
    for _ in range(16):  # the openings are history (deeper than the index's reorg window), in both cases
        w3.provider.make_request("evm_mine", [])
    a = measure(net, tmp, channels, "small")
    channels += open_many(w3, dep, payee, large - small, 10**15, b"\0" * 32)
    opened_s = time.perf_counter() - t0
    for _ in range(16):
        w3.provider.make_request("evm_mine", [])
    b = measure(net, tmp, channels, "large")
    print(f"\n2. scale: {small} vs {large} open channels paying the node, each with a voucher in its ledger "
          f"({large} opened in {opened_s:.0f} s by batched pre-signed transactions)")
    print(f"{'':34}{small:>30,}{large:>30,}   (time, RPC calls/HTTP round trips)")

    def row(name: str, key: str, unit: str, rpc: str | None) -> None:
        cells = ""
        for r in (a, b):
            extra = f" {r[rpc][0]:g}/{r[rpc][1]:g}" if rpc else ""
            cells += f"{f'{r[key]:.2f} {unit}{extra}':>30}"
        print(f"{name:34}{cells}")

    row("start: index catch-up", "start_s", "s", "start_rpc")
    row("admission (indexed channel)", "admit_ms", "ms", "admit_rpc")
    row("admission (opened after last sync)", "cold_ms", "ms", "cold_rpc")
    row("settlement round (none due)", "round_ms", "ms", "round_rpc")
    row("  its periodic full pass", "full_ms", "ms", "full_rpc")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--clients", type=int, default=200)
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--small", type=int, default=10)
    ap.add_argument("--large", type=int, default=10_000)
    ap.add_argument("--skip", choices=["first", "scale"])
    ap.add_argument("--serve", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--data-dir", help=argparse.SUPPRESS)
    ap.add_argument("--deployment", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.serve:
        serve(args.serve, args.data_dir, args.deployment)
        return
    with tempfile.TemporaryDirectory() as tmp:
        if args.skip != "first":
            with Devnet() as net:
                first_contact(net, Path(tmp), args.clients, args.tokens)
        if args.skip != "scale":
            with Devnet() as net:
                scale(net, Path(tmp), args.small, args.large)


if __name__ == "__main__":
    main()
