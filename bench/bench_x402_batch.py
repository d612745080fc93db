"""What offering x402's batch-settlement costs: header sizes (the 402 with and without the second offer, the
SDK client's deposit and voucher payloads) and the latency of one paid request paid with a batch-settlement
voucher beside the same request paid with a `channel` voucher (the baseline), interleaved against one node.

    .venv/bin/python bench/bench_x402_batch.py --requests 200
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import tempfile
from pathlib import Path

import httpx
from _common import Report, interleaved_latency, report_args
from eth_account import Account
from web3 import Web3
from x402 import x402Client
from x402.http.clients.httpx import x402AsyncTransport
from x402.mechanisms.evm.batch_settlement.client.config import BatchSettlementEvmSchemeOptions
from x402.mechanisms.evm.batch_settlement.client.scheme import BatchSettlementEvmScheme
from x402.mechanisms.evm.batch_settlement.client.voucher import sign_voucher
from x402.mechanisms.evm.signers import EthAccountSigner

from dcml.client.chain.channel import ChannelClient
from dcml.client.chain.devnet import Devnet
from dcml.client.demo.kit.nodes import MODEL, start_paid_node
from dcml.client.wire.receipts import model_id_for
from dcml.client.wire.x402 import PAYMENT_REQUIRED, PAYMENT_SIGNATURE, PaymentPayload, PaymentRequired

DEPOSIT = 10**17


class _Recording(httpx.AsyncHTTPTransport):
    def __init__(self) -> None:
        super().__init__()
        self.sent: list[str] = []

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        if PAYMENT_SIGNATURE in request.headers:
            self.sent.append(request.headers[PAYMENT_SIGNATURE])
        return await super().handle_async_request(request)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--requests", type=int, default=200)
    report_args(ap)
    args = ap.parse_args()
    with Devnet() as net, tempfile.TemporaryDirectory() as tmp:
        dep = net.deployment
        path = Path(tmp) / "deployment.json"
        dep.save(path)
        w3 = Web3(Web3.HTTPProvider(dep.rpc_url))
        node = start_paid_node(w3, path, Path(tmp) / "node")
        try:
            body = json.dumps({"model": MODEL, "prompt": "a b", "max_tokens": 1}).encode()
            headers = {"content-type": "application/json"}
            http = httpx.Client(base_url=node.url, timeout=30)
            r402 = http.post("/v1/completions", content=body, headers=headers)
            both = json.loads(base64.b64decode(r402.headers[PAYMENT_REQUIRED]))
            one = len(base64.b64encode(json.dumps({**both, "accepts": both["accepts"][:1]},
                                                  separators=(",", ":")).encode()))
            # The SDK's unmodified client opens the batch channel (a deposit payload); we keep what it sent.
            wallet = Account.from_key(dep.accounts["client2"].private_key)
            scheme = BatchSettlementEvmScheme(wallet, BatchSettlementEvmSchemeOptions(
                deposit_strategy=lambda ctx: str(DEPOSIT)))
            client = x402Client().register(f"eip155:{dep.chain_id}", scheme)
            client.set_spend_controls({"allowed_assets": [{"network": f"eip155:{dep.chain_id}", "asset": dep.token}]})
            rec = _Recording()

            async def open_batch() -> None:
                async with httpx.AsyncClient(transport=x402AsyncTransport(client, rec), timeout=60) as h:
                    r = await h.post(f"{node.url}/v1/completions", content=body, headers=headers)
                    assert r.status_code == 200, r.text

            asyncio.run(open_batch())
            deposit_payload = json.loads(base64.b64decode(rec.sent[0]))
            offer = deposit_payload["accepted"]
            vp = scheme._create_voucher_payload(  # one voucher, ceiling = the deposit, covers every request
                deposit_payload["payload"]["voucher"]["channelId"], str(DEPOSIT), offer["network"],
                scheme.build_channel_config(__import__("x402.schemas", fromlist=["_"]).PaymentRequirements
                                            .model_validate(offer)))
            vp["voucher"] = sign_voucher(EthAccountSigner(wallet), vp["voucher"]["channelId"], DEPOSIT,
                                         offer["network"]).to_dict()
            batch = base64.b64encode(json.dumps({"x402Version": 2, "accepted": offer, "payload": vp},
                                                separators=(",", ":")).encode()).decode()
            # The channel baseline, as bench_x402.py pays it.
            payer = Account.from_key(dep.accounts["client"].private_key)
            session = Account.create()
            chain = ChannelClient(w3, dep, payer)
            cid = chain.open(node.identity.address, 10**18, session_key=session.address,
                             model_id=bytes.fromhex(model_id_for(MODEL)[2:]))
            chan_offer = PaymentRequired.from_header(r402.headers[PAYMENT_REQUIRED]).accepts[0]
            channel = PaymentPayload(accepted=chan_offer, payload=chain.sign_voucher(session, cid, 10**17)).to_header()
            print("header bytes (base64)")
            print(f"  PAYMENT-REQUIRED, channel offer only     {one:>6d}")
            print(f"  PAYMENT-REQUIRED, + batch-settlement     {len(r402.headers[PAYMENT_REQUIRED]):>6d}")
            print(f"  PAYMENT-SIGNATURE, channel voucher       {len(channel):>6d}")
            print(f"  PAYMENT-SIGNATURE, batch deposit (SDK)   {len(rec.sent[0]):>6d}")
            print(f"  PAYMENT-SIGNATURE, batch voucher (SDK)   {len(batch):>6d}")
            def send(value: str) -> None:
                r = http.post("/v1/completions", content=body, headers={**headers, PAYMENT_SIGNATURE: value})
                assert r.status_code == 200, r.text

            report = Report(f"paid non-streamed request, max_tokens=1, {args.requests} each, interleaved, one node")
            interleaved_latency(report, send, {"channel voucher": channel, "batch-settlement voucher": batch},
                                args.requests)
            report.print(args)
        finally:
            node.server.stop()


if __name__ == "__main__":
    main()
