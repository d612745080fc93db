"""What a Sybil pays per unpaid token (issue 19, finding 8): a fresh channel per attack, the smallest deposit the
node takes, the smallest voucher it admits, an empty prompt, and no voucher ever paid mid-stream. Run against a
real node (synthetic engine) with the payments section of configs/node.toml (prepay, credit, prices, minimums)
on a devnet; counts the tokens served beyond the vouchers and the gas each side spent, then prices the attack at
0.01 and 1 gwei. Run it on two checkouts to compare before and after.

    .venv/bin/python bench/bench_sybil.py [--attacks 3] [--json]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import tomllib
from pathlib import Path

import httpx
from eth_account import Account
from web3 import Web3

from dcml.client.chain.channel import ChannelClient
from dcml.client.chain.contracts import contract
from dcml.client.chain.devnet import REPO, Devnet
from dcml.client.chain.tx import send
from dcml.client.wire.receipts import model_id_for
from dcml.client.wire.x402 import PAYMENT_REQUIRED, PAYMENT_SIGNATURE, PaymentRequired
from dcml.node.api.app import create_app
from dcml.node.api.server import BackgroundServer
from dcml.node.config import load_settings
from dcml.node.engine.synthetic import SyntheticEngine
from dcml.node.identity import EnclaveIdentity
from dcml.node.tee.simulated import SimulatedProvider

MODEL = "dcml-demo"  # the model configs/node.toml prices
GWEI = 10**9


def gas_of(w3: Web3, sender: str, first_block: int) -> int:
    """Gas used by `sender`'s transactions mined after `first_block`."""
    total = 0
    for n in range(first_block + 1, w3.eth.block_number + 1):
        for tx in w3.eth.get_block(n, full_transactions=True)["transactions"]:
            if tx["from"].lower() == sender.lower():
                total += w3.eth.get_transaction_receipt(tx["hash"])["gasUsed"]
    return total


def attack(w3: Web3, dep, node_url: str, payee: str, min_deposit: int, donor) -> dict:
    """One Sybil: fund a fresh wallet, open the smallest channel, pay only what admission demands."""
    wallet = Account.create()
    w3.provider.make_request("anvil_setBalance", [wallet.address, hex(10**20)])
    send(w3, donor, contract(w3, "TestToken", dep.token).functions.transfer(wallet.address, 10**18), action="fund")
    start = w3.eth.block_number
    channels = ChannelClient(w3, dep, wallet)
    session = Account.create()
    cid = channels.open(payee, max(1, min_deposit), session_key=session.address,
                        model_id=bytes.fromhex(model_id_for(MODEL)[2:]))
    open_gas = gas_of(w3, wallet.address, start)
    body = json.dumps({"model": MODEL, "prompt": "", "max_tokens": 256, "stream": True}).encode()
    amount, served = 1, None
    for _ in range(4):
        voucher = channels.sign_voucher(session, cid, amount)
        r = httpx.post(f"{node_url}/v1/completions", content=body, timeout=120,
                       headers={"content-type": "application/json", PAYMENT_SIGNATURE: voucher.to_header()})
        if r.status_code == 200:
            served = r
            break
        if r.status_code != 402:
            raise SystemExit(f"unexpected {r.status_code}: {r.text}")
        required = PaymentRequired.from_header(r.headers[PAYMENT_REQUIRED]).required_cumulative
        if not required or required <= amount:
            break
        amount = required  # the least the node asks for; never a mid-stream voucher
    return {"channel": "0x" + cid.hex(), "open_gas": open_gas, "paid": amount if served else 0,
            "served": served is not None}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--attacks", type=int, default=3)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    payments = tomllib.loads((REPO / "configs/node.toml").read_text())["payments"]
    price_out = payments["prices"][MODEL]["price_per_output_token"]
    with Devnet() as net, tempfile.TemporaryDirectory() as tmp:
        dep = net.deployment
        dep_file = Path(tmp) / "deployment.json"
        dep.save(dep_file)
        w3 = Web3(Web3.HTTPProvider(dep.rpc_url, request_kwargs={"timeout": 60}))
        identity = EnclaveIdentity.generate()
        w3.provider.make_request("anvil_setBalance", [identity.address, hex(10**20)])
        settings = load_settings(None, data_dir=Path(tmp) / "node",
                                 engine={"kind": "synthetic", "served_model_name": MODEL, "model_dir": None},
                                 payments={**payments, "enabled": True, "deployment": dep_file,
                                           "settle_interval_s": 3600, "voucher_timeout_s": 2})
        app = create_app(settings, engine=SyntheticEngine(model_name=MODEL), identity=identity,
                         provider=SimulatedProvider())
        server = BackgroundServer(app).start()
        donor = Account.from_key(dep.accounts["client"].private_key)
        try:
            runs = [attack(w3, dep, server.url, identity.address, payments.get("min_deposit", 0), donor)
                    for _ in range(args.attacks)]
            ledger = app.state.node.gate.payments.ledger
            for run in runs:
                b = ledger.get(run["channel"])
                run["unpaid_tokens"] = 0 if b is None else max(0, b.spent - b.accepted) / price_out
                run["served_tokens"] = 0 if b is None else b.spent / price_out
            start = w3.eth.block_number
            app.state.node.gate.payments.worker.run_once(flush=True)  # what settling the Sybils costs the node
            node_gas = gas_of(w3, identity.address, start)
        finally:
            server.stop()
    unpaid = sum(r["unpaid_tokens"] for r in runs)
    open_gas = sum(r["open_gas"] for r in runs)
    paid = sum(r["paid"] for r in runs)
    out = {"attacks": len(runs), "unpaid_tokens": unpaid, "attacker_open_gas": open_gas, "attacker_paid_wei": paid,
           "node_settle_gas": node_gas, "price_per_output_token": price_out, "per_unpaid_token": {}}
    for gwei in (0.01, 1):
        gas_wei = open_gas * gwei * GWEI
        out["per_unpaid_token"][f"{gwei:g} gwei"] = {
            "attacker_gas_wei": gas_wei / unpaid if unpaid else None,
            "attacker_token_wei": paid / unpaid if unpaid else None,
            "node_gas_wei": node_gas * gwei * GWEI / unpaid if unpaid else None}
    if args.json:
        print(json.dumps(out))
        return
    print(f"{len(runs)} Sybil channels: {unpaid:g} output tokens served unpaid "
          f"(price {price_out} wei/token); attacker: {open_gas} gas to fund+open, {paid} token-wei paid; "
          f"node: {node_gas} gas settling them")
    for label, v in out["per_unpaid_token"].items():
        if v["attacker_gas_wei"] is None:
            print(f"  at {label}: nothing served unpaid (cost per unpaid token: unbounded)")
        else:
            print(f"  at {label}: per unpaid token the attacker pays {v['attacker_gas_wei']:.3g} wei of gas + "
                  f"{v['attacker_token_wei']:.3g} token-wei; the node pays {v['node_gas_wei']:.3g} wei of gas")


if __name__ == "__main__":
    main()
