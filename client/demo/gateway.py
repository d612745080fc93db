"""`make demo-gateway`: three paid nodes at different prices behind one `dcml gateway`, printed step by step.

A local chain; three nodes (synthetic engine, simulated TEE) asking 1, 2 and 3 x 10^12 wei per output
token; the gateway attests each and routes to the cheapest; the official `openai` client asks through it;
the cheapest node is stopped mid-demo and the next request fails over to the next cheapest; at the end every
node settles and each channel's on-chain settlement is checked against the receipts the gateway verified,
to the wei (settled = sum of receipts + prepaid credit the node holds but did not spend).
"""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path

import openai
from eth_account import Account
from fastapi import FastAPI
from rich.console import Console
from rich.table import Table
from web3 import Web3

from dcml.client.chain.connect import connect
from dcml.client.chain.devnet import Devnet
from dcml.client.demo.kit.nodes import start_paid_node
from dcml.client.sdk.gateway import Gateway, GatewayConfig, create_gateway_app
from dcml.client.wire.receipts import SignedReceipt
from dcml.node.api.server import BackgroundServer
from dcml.node.engine.synthetic import SyntheticEngine
from dcml.node.payments.ledger import Ledger

MODEL = "dcml-demo"
PRICES = (10**12, 2 * 10**12, 3 * 10**12)  # output; input is 10^12 everywhere


def start_node(w3: Web3, deployment_file: Path, data_dir: Path, price_out: int) -> tuple[BackgroundServer, FastAPI]:
    engine = SyntheticEngine(model_name=MODEL, tokens_per_second=200)
    node = start_paid_node(w3, deployment_file, data_dir, engine=engine, model=MODEL, price_in=10**12,
                           price_out=price_out, voucher_timeout_s=30)
    return node.server, node.app


def main() -> None:
    console = Console()
    started = time.monotonic()
    work = Path(tempfile.mkdtemp(prefix="dcml-demo-gateway-"))
    with Devnet() as net:
        dep = net.deployment
        if dep is None:
            raise SystemExit("the local chain came up without the contracts")
        deployment_file = work / "deployment.json"
        dep.save(deployment_file)
        w3 = connect(dep.rpc_url)
        console.print(f"1. local chain at {dep.rpc_url}; starting three nodes at {', '.join(map(str, PRICES))} "
                      "wei per output token")
        nodes = [start_node(w3, deployment_file, work / f"node{i}", p) for i, p in enumerate(PRICES)]
        wallet = Account.from_key(dep.accounts["client"].private_key)
        cfg = GatewayConfig(nodes=[s.url for s, _ in nodes], store_dir=work / "gateway", allow_simulated=True,
                            deposit=10**17, first_token_timeout_s=10, limits={"per_request": 10**15})
        gateway = Gateway(cfg, wallet, deployment=dep)
        server = BackgroundServer(create_gateway_app(gateway)).start()
        console.print(f"2. dcml gateway on {server.url}/v1; it attested every node and reads their prices:")
        oai = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)
        for offer in (oai.models.list().data[0].model_extra or {})["dcml"]["offers"]:
            console.print(f"   {offer['node']}: {offer['price_per_output_token']} wei/output token")
        receipts: dict[str, list[SignedReceipt]] = {}

        def ask(step: str, prompt: str) -> None:
            text, receipt, node = "", None, None
            for chunk in oai.completions.create(model=MODEL, prompt=prompt, max_tokens=24, stream=True):
                text += chunk.choices[0].text if chunk.choices else ""
                extra = chunk.model_extra or {}  # the gateway's own fields on the last chunk
                if extra.get("dcml_receipt"):
                    receipt = SignedReceipt.model_validate(extra["dcml_receipt"])
                    node = extra.get("dcml_node")
            if receipt is None:
                raise SystemExit(f"{step} the answer came without a receipt")
            r = receipt.receipt
            receipts.setdefault(r.channel_id.lower(), []).append(receipt)
            console.print(f"{step} answered by {node}: {r.output_tokens} tokens, {r.cost} wei (receipt verified "
                          f"by the gateway) {text[:40]!r}…")

        ask("3.", "the cheapest node answers")
        ask("4.", "and again")
        console.print(f"5. stopping the cheapest node {nodes[0][0].url} (it settles what it holds on the way out)")
        nodes[0][0].stop()
        ask("6. failover:", "who answers now?")
        ask("7.", "the dead node is backed off")
        try:
            oai.completions.create(model=MODEL, prompt="too much", max_tokens=1000)
        except openai.APIStatusError as exc:
            console.print(f"8. a request over the per-request limit: HTTP {exc.status_code} {exc.code}: nothing paid")
        server.stop()
        for s, _ in nodes[1:]:
            s.stop()  # each settles everything it holds before it exits
        console.print("9. every node stopped and settled; checking each channel against the receipts:")
        table = Table("channel", "node", "receipts (wei)", "prepaid, unspent", "settled on-chain", "ok")
        ok = True
        for i, (_, app) in enumerate(nodes):
            payments = app.state.node.gate.payments
            ledger = Ledger(work / f"node{i}" / "ledger.sqlite")  # the node's own, reopened after it stopped
            for bal in ledger.channels():
                state = payments.chain.channel(bytes.fromhex(bal.channel_id[2:]), fresh=True)
                billed = sum(r.receipt.cost for r in receipts.get(bal.channel_id, []))
                good = billed == bal.spent and state.settled == bal.accepted == billed + bal.available
                ok &= good
                table.add_row(bal.channel_id[:12] + "…", app.state.node.identity.address[:10] + "…", f"{billed:,}",
                              f"{bal.available:,}", f"{state.settled:,}", "✓" if good else "✗")
            ledger.close()
        console.print(table)
        if not ok:
            raise SystemExit("a channel's settlement does not match its receipts")
        console.print(f"[green]every channel settled exactly its receipts plus the credit prepaid to it, to the "
                      f"wei[/] ({time.monotonic() - started:.1f} s)")


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "2")
    main()
