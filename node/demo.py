"""`make demo`: the payment channel's whole story on a local chain, printed step by step.

Start anvil and deploy; a publisher registers a model with a royalty; a client opens a channel to a
node and pays it with signed vouchers over HTTP; the node verifies and stores each one, its
settlement worker settles on-chain, the channel is closed; balances before and after are printed
and checked to the wei against the vouchers.
"""

from __future__ import annotations

import shutil
import tempfile
import threading
import time
from pathlib import Path

import httpx
import uvicorn
from eth_account import Account
from rich.console import Console
from rich.table import Table
from web3 import Web3

from client.channel import ChannelClient
from client.contracts import contract
from client.model_registry import model_id, register_model
from node.devnet import Devnet, free_port
from node.payments.service import Payments, PaymentSettings, create_payments_app

console = Console(width=120)
MODEL = "dcml-demo-llama"
ROYALTY_BPS = 250  # 2.5 % of every payment to the model's publisher
PRICE_PER_TOKEN = 3 * 10**13  # 0.00003 dUSD per output token


def main() -> None:
    started = time.monotonic()
    data_dir = Path(tempfile.mkdtemp(prefix="dcml-demo-"))
    with Devnet(close_grace_period=900) as net:
        dep = net.deployment
        w3 = Web3(Web3.HTTPProvider(dep.rpc_url))
        client_wallet = Account.from_key(dep.accounts["client"].private_key)
        node_key = Account.from_key(dep.accounts["node"].private_key)
        publisher = Account.from_key(dep.accounts["publisher"].private_key)
        token = contract(w3, "TestToken", dep.token)
        people = {"client": client_wallet.address, "node": node_key.address, "publisher": publisher.address,
                  "escrow": dep.payment_channels}
        console.rule("[bold]dcml demo: a payment channel on a local chain")
        console.print(f"anvil at {dep.rpc_url}, chain {dep.chain_id}; PaymentChannels {dep.payment_channels}")

        model = model_id(MODEL)
        register_model(w3, dep, publisher, model, ROYALTY_BPS)
        console.print(f"publisher registered [cyan]{MODEL}[/] with a {ROYALTY_BPS / 100:.1f} % royalty")
        before = {who: token.functions.balanceOf(addr).call() for who, addr in people.items()}

        deployment_file = data_dir / "deployment.json"
        dep.save(deployment_file)
        payments = Payments(PaymentSettings(deployment_file, data_dir, settle_threshold=10**30), node_key)
        port = free_port()
        server = uvicorn.Server(uvicorn.Config(create_payments_app(payments), host="127.0.0.1", port=port,
                                               log_level="warning"))
        thread = threading.Thread(target=server.run, daemon=True)
        thread.start()
        while not server.started:
            time.sleep(0.05)
        console.print(f"node payment endpoint up at http://127.0.0.1:{port}/v1/payments/vouchers")

        session = Account.create()
        channels = ChannelClient(w3, dep, client_wallet)
        deposit = 10 * 10**18
        channel_id = channels.open(node_key.address, deposit, session_key=session.address, model_id=model)
        console.print(f"client opened channel 0x{channel_id.hex()[:16]}… with {deposit / 1e18:g} dUSD "
                      f"(vouchers signed by session key {session.address[:10]}…)")

        cumulative, vouchers = 0, 0
        with httpx.Client(timeout=30) as http:
            for tokens in (17, 42, 8, 64, 33, 120, 5, 90):  # a stream's worth of per-chunk payments
                cumulative += tokens * PRICE_PER_TOKEN
                voucher = channels.sign_voucher(session, channel_id, cumulative)
                reply = http.post(f"http://127.0.0.1:{port}/v1/payments/vouchers", json=voucher.to_wire())
                reply.raise_for_status()
                vouchers += 1
            replay = http.post(f"http://127.0.0.1:{port}/v1/payments/vouchers", json=voucher.to_wire())
        console.print(f"client paid {vouchers} vouchers, cumulative {cumulative / 1e18:.6f} dUSD; "
                      f"a replayed voucher was refused: [yellow]{replay.json()['error']['code']}[/]")

        channels.request_close(channel_id)
        console.print("client requested close; the node's settlement worker settles and closes on its own…")
        deadline = time.monotonic() + 30
        while not channels.get(channel_id).finalized:
            if time.monotonic() > deadline:
                raise SystemExit("the node did not close the channel within 30 s")
            time.sleep(0.2)
        server.should_exit = True
        thread.join()
        channels.claim_earnings()  # the client's refund
        ChannelClient(w3, dep, publisher).claim_earnings()  # the royalty
        after = {who: token.functions.balanceOf(addr).call() for who, addr in people.items()}

        royalty = cumulative * ROYALTY_BPS // 10_000
        expected = {"client": -cumulative, "node": cumulative - royalty, "publisher": royalty, "escrow": 0}
        table = Table(title="token balances (dUSD, exact wei in the last column)")
        for col in ("account", "before", "after", "change (wei)", "expected (wei)"):
            table.add_column(col, justify="right" if col != "account" else "left")
        ok = True
        for who in people:
            change = after[who] - before[who]
            ok &= change == expected[who]
            table.add_row(who, f"{before[who] / 1e18:,.6f}", f"{after[who] / 1e18:,.6f}", f"{change:+,}",
                          f"{expected[who]:+,}")
        console.print(table)
        if not ok:
            raise SystemExit("balances do not match the vouchers")
        console.print(f"[green]on-chain movements equal the vouchers to the wei[/] "
                      f"({time.monotonic() - started:.1f} s)")
    shutil.rmtree(data_dir, ignore_errors=True)


if __name__ == "__main__":
    main()
