"""What the exact x402 v2 envelopes cost: header sizes before (the pre-v2 shapes, rebuilt from the same
values) and after, and the latency of one paid request with a v2 `PaymentPayload` beside the old bare voucher
(still accepted), interleaved against the same node in the same run.

    .venv/bin/python bench/bench_x402.py --requests 300
"""

from __future__ import annotations

import argparse
import base64
import json
import tempfile
from pathlib import Path

import httpx
from _common import Report, interleaved_latency, report_args
from eth_account import Account
from web3 import Web3

from dcml.client.chain.channel import ChannelClient
from dcml.client.chain.devnet import Devnet
from dcml.client.demo.kit.nodes import MODEL, start_paid_node
from dcml.client.wire.receipts import model_id_for
from dcml.client.wire.x402 import PAYMENT_REQUIRED, PAYMENT_RESPONSE, PAYMENT_SIGNATURE, PaymentPayload, PaymentRequired


def b64(obj: dict) -> str:
    return base64.b64encode(json.dumps(obj, separators=(",", ":")).encode()).decode()


def old_shapes(required: PaymentRequired, voucher_wire: dict, settle: dict) -> dict[str, int]:
    """The pre-v2 headers for the same values: no resource/amount, message and requiredCumulative at the top,
    the bare voucher, `{channelId, accepted, spent}`."""
    req = required.accepts[0].to_json()
    req.pop("amount")
    req["extra"] = {k: v for k, v in req["extra"].items() if k not in ("channelId", "requiredCumulative")}
    old_402 = {"x402Version": 2, "error": "payment_required", "message": "this request must be paid: open a channel "
               "to payTo and send a voucher in the PAYMENT-SIGNATURE header", "accepts": [req]}
    figures = settle["extensions"]["channel"]
    old_response = {"channelId": figures["channelId"], "accepted": figures["accepted"], "spent": figures["spent"]}
    return {PAYMENT_REQUIRED: len(b64(old_402)), PAYMENT_SIGNATURE: len(b64(voucher_wire)),
            PAYMENT_RESPONSE: len(b64(old_response))}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--requests", type=int, default=300)
    report_args(ap)
    args = ap.parse_args()
    with Devnet() as net, tempfile.TemporaryDirectory() as tmp:
        dep = net.deployment
        path = Path(tmp) / "deployment.json"
        dep.save(path)
        w3 = Web3(Web3.HTTPProvider(dep.rpc_url))
        node = start_paid_node(w3, path, Path(tmp) / "node")
        try:
            wallet = Account.from_key(dep.accounts["client"].private_key)
            session = Account.create()
            chain = ChannelClient(w3, dep, wallet)
            cid = chain.open(node.identity.address, 10**18, session_key=session.address,
                             model_id=bytes.fromhex(model_id_for(MODEL)[2:]))
            http = httpx.Client(base_url=node.url, timeout=30)
            body = json.dumps({"model": MODEL, "prompt": "a b", "max_tokens": 1}).encode()
            headers = {"content-type": "application/json"}
            r402 = http.post("/v1/completions", content=body, headers=headers)
            required = PaymentRequired.from_header(r402.headers[PAYMENT_REQUIRED])
            offer = required.accepts[0]
            voucher = chain.sign_voucher(session, cid, 10**17)  # one voucher covers every request
            v2 = PaymentPayload(accepted=offer, payload=voucher).to_header()
            bare = voucher.to_header()
            paid = http.post("/v1/completions", content=body, headers={**headers, PAYMENT_SIGNATURE: v2})
            assert paid.status_code == 200, paid.text
            settle = json.loads(base64.b64decode(paid.headers[PAYMENT_RESPONSE]))
            before = old_shapes(required, voucher.to_wire(), settle)
            after = {PAYMENT_REQUIRED: len(r402.headers[PAYMENT_REQUIRED]), PAYMENT_SIGNATURE: len(v2),
                     PAYMENT_RESPONSE: len(paid.headers[PAYMENT_RESPONSE])}
            print("header bytes (base64)        before(pre-v2)  after(v2)")
            for name in (PAYMENT_REQUIRED, PAYMENT_SIGNATURE, PAYMENT_RESPONSE):
                print(f"  {name:26s} {before[name]:>14d} {after[name]:>10d}")
            def send(value: str) -> None:
                r = http.post("/v1/completions", content=body, headers={**headers, PAYMENT_SIGNATURE: value})
                assert r.status_code == 200, r.text

            report = Report(f"paid non-streamed request, max_tokens=1, {args.requests} each, interleaved, one node")
            interleaved_latency(report, send, {"bare voucher": bare, "v2 PaymentPayload": v2}, args.requests)
            report.print(args)
        finally:
            node.server.stop()


if __name__ == "__main__":
    main()
