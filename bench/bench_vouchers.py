"""Vouchers verified per second on one core, next to raw eth_account recovery in the same run.

    .venv/bin/python bench/bench_vouchers.py [--n 5000]

The verifier path is the node's real one (cached channel, ledger lookup, EIP-712 digest, recovery,
every check); `accept` adds the durable SQLite commit and is shown for reference. Goal: >= 10k/s and
within 20 % of raw recovery.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

from _common import Report, report_args
from eth_account import Account
from web3 import Web3

from dcml.client.chain.channel import ChannelClient
from dcml.client.chain.devnet import Devnet
from dcml.client.demo.kit.payments import node_payments


def rate(n: int, fn) -> float:
    start = time.perf_counter()
    fn()
    return n / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--n", type=int, default=5000)
    report_args(parser)
    args = parser.parse_args()
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})  # one core

    with Devnet() as net, tempfile.TemporaryDirectory() as tmp:
        dep = net.deployment
        w3 = Web3(Web3.HTTPProvider(dep.rpc_url))
        payer = Account.from_key(dep.accounts["client"].private_key)
        payee = Account.from_key(dep.accounts["node"].private_key)
        session = Account.create()
        channels = ChannelClient(w3, dep, payer)
        cid = channels.open(payee.address, 10**24, session_key=session.address)
        node = node_payments(w3, dep, payee, Path(tmp))
        vouchers = [channels.sign_voucher(session, cid, 10**9 * (i + 1)) for i in range(args.n)]
        digests = [(node.verifier.domain.digest(cid, v.cumulative_amount), v.signature_bytes) for v in vouchers]
        node.verifier.verify(vouchers[0])  # warm the channel cache: steady state has it

        raw = rate(args.n, lambda: [Account._recover_hash(d, signature=s) for d, s in digests])
        verify = rate(args.n, lambda: [node.verifier.verify(v) for v in vouchers])
        accept_n = min(args.n, 1000)
        accept = rate(accept_n, lambda: [node.verifier.accept(v) for v in vouchers[:accept_n]])

    report = Report("vouchers verified per second, one core")
    report.baseline("raw eth_account recovery", raw, "/s")
    report.add("node verifier (all checks, cached channel)", verify, "/s", vs="raw eth_account recovery",
               goal=">= 10k/s, within 20 % of raw")
    report.add("node accept (verify + fsync commit)", accept, "/s", vs="raw eth_account recovery")
    report.print(args)

if __name__ == "__main__":
    main()
