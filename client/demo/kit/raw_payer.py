"""A bare-bones paying client (raw HTTP, one voucher at a time), for testing and measuring the node's gate
without the SDK in between."""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import httpx
from eth_account import Account
from eth_account.signers.local import LocalAccount
from web3 import Web3

from dcml.client.chain.channel import ChannelClient
from dcml.client.chain.deployment import Deployment
from dcml.client.demo.kit.nodes import MODEL, PRICE_IN
from dcml.client.wire.access import auth_header
from dcml.client.wire.receipts import SignedReceipt, model_id_for, parse_sse_stream
from dcml.client.wire.voucher import Voucher
from dcml.client.wire.x402 import (
    NEED_VOUCHER_EVENT,
    PAYMENT_REQUIRED,
    PAYMENT_SIGNATURE,
    PAYMENT_TIMEOUT_EVENT,
    PaymentRequired,
)


@dataclass
class Answer:
    status: int
    payloads: list[bytes] = field(default_factory=list)
    receipt: SignedReceipt | None = None
    need_events: int = 0
    timed_out: bool = False
    raw: bytes = b""
    headers: dict = field(default_factory=dict)
    request: bytes = b""  # the exact body sent (what requestHash covers)


class RawPayer:
    """Opens a channel to a node and pays requests voucher by voucher over plain HTTP."""

    def __init__(self, w3: Web3, deployment: Deployment, wallet: LocalAccount, node_url: str, payee: str, *,
                 deposit: int = 10**18, model: str = MODEL) -> None:
        self.model = model
        self.channels = ChannelClient(w3, deployment, wallet)
        self.session = Account.create()
        self.node_url = node_url
        self.payee = payee
        self.channel_id = self.channels.open(payee, deposit, session_key=self.session.address,
                                             model_id=bytes.fromhex(model_id_for(model)[2:]))
        self.cumulative = 0
        self.acked: list[int] = []  # voucher amounts the node acknowledged
        self.on_paid = None  # called after each mid-stream voucher is acknowledged (tests crash the node there)
        self.http = httpx.Client(timeout=60)

    def auth(self, resource: str) -> dict[str, str]:
        """Reads only the payer may make (`client.access`), signed by this channel's session key."""
        return auth_header(self.session, self.payee, resource)

    def voucher(self, cumulative: int) -> Voucher:
        self.cumulative = max(self.cumulative, cumulative)
        return self.channels.sign_voucher(self.session, self.channel_id, cumulative)

    def post_voucher(self, cumulative: int) -> httpx.Response:
        r = self.http.post(f"{self.node_url}/v1/payments/vouchers", json=self.voucher(cumulative).to_wire())
        if r.status_code == 200:
            self.acked.append(cumulative)
        return r

    def ask(self, prompt: str, *, max_tokens: int = 40, stream: bool = True, pay_mid_stream: bool = True,
            voucher: int | None = None, **fields) -> Answer:
        """Send a completion; on 402 pay what the node asks (`requiredCumulative`, else prompt + prepay)."""
        payload = {"model": self.model, "prompt": prompt, "max_tokens": max_tokens, "stream": stream, **fields}
        if stream:
            payload["stream_options"] = {"include_usage": True}
        body = json.dumps(payload).encode()
        for _ in range(3):
            headers = {"content-type": "application/json"}
            if voucher is not None:
                voucher = max(voucher, self.cumulative)
                headers[PAYMENT_SIGNATURE] = self.voucher(voucher).to_header()
            answer = self._send(body, headers, stream, pay_mid_stream, voucher)
            answer.request = body
            if answer.status != 402:
                return answer
            required = PaymentRequired.from_header(answer.headers[PAYMENT_REQUIRED.lower()])
            terms = required.accepts[0].extra
            ahead = terms.prepay if stream else max_tokens * terms.price_per_output_token
            voucher = required.required_cumulative or self.cumulative + len(prompt.split()) * PRICE_IN + ahead
        return answer

    def _send(self, body: bytes, headers: dict, stream: bool, pay_mid_stream: bool, voucher: int | None) -> Answer:
        url = f"{self.node_url}/v1/completions"

        def admitted(status: int) -> None:  # a 200 means the node holds the voucher we sent
            if status == 200 and voucher is not None and voucher not in self.acked:
                self.acked.append(voucher)

        if not stream:
            r = self.http.post(url, content=body, headers=headers)
            admitted(r.status_code)
            answer = Answer(r.status_code, raw=r.content, headers=dict(r.headers))
            if r.status_code == 200:
                answer.receipt = SignedReceipt.from_header(r.headers["x-dcml-receipt"])
            return answer
        answer = Answer(0)
        with self.http.stream("POST", url, content=body, headers=headers) as r:
            answer.status, answer.headers = r.status_code, dict(r.headers)
            admitted(r.status_code)
            buf = b""
            for piece in r.iter_bytes():
                buf += piece
                answer.raw += piece
                while b"\n\n" in buf:
                    block, buf = buf.split(b"\n\n", 1)
                    event = _event_name(block)
                    if event == NEED_VOUCHER_EVENT:
                        answer.need_events += 1
                        if pay_mid_stream:
                            need = json.loads(_data(block))
                            assert self.post_voucher(int(need["requiredCumulative"])).status_code == 200
                            if self.on_paid:
                                self.on_paid()
                    elif event == PAYMENT_TIMEOUT_EVENT:
                        answer.timed_out = True
        if answer.status == 200:
            answer.payloads, answer.receipt = parse_sse_stream(answer.raw)
        return answer


def _event_name(block: bytes) -> str | None:
    for line in block.split(b"\n"):
        if line.startswith(b"event:"):
            return line[6:].strip().decode()
    return None


def _data(block: bytes) -> bytes:
    return b"\n".join(line[5:].strip() for line in block.split(b"\n") if line.startswith(b"data:"))
