"""Money paths under attack (issue 12): ERC-1271 payers (item 7) refused by default, or, opted in, kept inside
the credit window by settling each voucher before it counts, shown by revoking the signer mid-stream; and
amounts that are not plain ASCII digits refused. Real paid nodes on loopback, a real anvil."""

from __future__ import annotations

import base64
import json
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from eth_account import Account
from web3 import Web3

from dcml.client.chain.channel import ChannelClient
from dcml.client.chain.deployment import Deployment
from dcml.client.demo.kit.nodes import MODEL, PRICE_OUT, PaidNode, funded_wallet, start_paid_node
from dcml.client.demo.kit.raw_payer import RawPayer
from dcml.client.wire.receipts import model_id_for
from dcml.client.wire.voucher import MalformedVoucher, Voucher
from dcml.client.wire.x402 import (
    NEED_VOUCHER_EVENT,
    PAYMENT_REQUIRED,
    PAYMENT_SIGNATURE,
    PAYMENT_TIMEOUT_EVENT,
    NeedVoucher,
)
from tests.fakes.erc1271_wallet import deploy_wallet

CREDIT_TOKENS = 4


def _node(w3: Web3, deployment_file: Path, data_dir: Path, **payments) -> PaidNode:
    node = start_paid_node(w3, deployment_file, data_dir, prepay_tokens=0, credit_tokens=CREDIT_TOKENS,
                           voucher_timeout_s=1.5)
    if payments:  # the settings object is shared with the gate: switch the policy before any request
        node.app.state.node.gate.config = node.app.state.node.gate.config.model_copy(update=payments)
    return node


@pytest.fixture(scope="module")
def node(w3: Web3, deployment_file: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[PaidNode]:
    paid = _node(w3, deployment_file, tmp_path_factory.mktemp("node"))
    yield paid
    paid.server.stop()


@pytest.fixture(scope="module")
def settling_node(w3: Web3, deployment_file: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[PaidNode]:
    paid = _node(w3, deployment_file, tmp_path_factory.mktemp("node"), contract_signers="settle_first")
    yield paid
    paid.server.stop()


class ContractPayer:
    """A payer whose channel's session signer is an ERC-1271 wallet owned by `owner` (who signs vouchers)."""

    def __init__(self, w3: Web3, deployment: Deployment, node: PaidNode) -> None:
        self.wallet_owner = Account.create()
        payer = funded_wallet(w3, deployment)
        self.wallet = deploy_wallet(w3, payer, self.wallet_owner.address)
        self.payer, self.w3, self.node = payer, w3, node
        self.channels = ChannelClient(w3, deployment, payer)
        self.channel_id = self.channels.open(node.identity.address, 10**18, session_key=self.wallet.address,
                                             model_id=bytes.fromhex(model_id_for(MODEL)[2:]))
        self.voucher_status: list[int] = []

    def voucher(self, amount: int) -> Voucher:
        return self.channels.sign_voucher(self.wallet_owner, self.channel_id, amount)

    def revoke(self) -> None:
        from dcml.client.chain.tx import send

        send(self.w3, self.payer, self.wallet.functions.revoke(), action="revoke")

    def stream(self, max_tokens: int, *, first: int, revoke_after: int) -> tuple[int, bool]:
        """A paid stream answering every voucher request; revokes the wallet after `revoke_after` vouchers.
        Returns (status, whether the node ended it for want of a voucher)."""
        body = json.dumps({"model": MODEL, "prompt": "pay me by contract", "max_tokens": max_tokens,
                           "stream": True}).encode()
        headers = {"content-type": "application/json", PAYMENT_SIGNATURE: self.voucher(first).to_header()}
        timed_out, buf = False, b""
        with httpx.Client(timeout=60) as http, http.stream("POST", f"{self.node.url}/v1/completions", content=body,
                                                           headers=headers) as r:
            if r.status_code != 200:
                r.read()
                self.refusal = r.headers.get(PAYMENT_REQUIRED)
                return r.status_code, False
            for piece in r.iter_bytes():
                buf += piece
                while b"\n\n" in buf:
                    block, buf = buf.split(b"\n\n", 1)
                    if block.startswith(b"event: " + NEED_VOUCHER_EVENT.encode()):
                        need = NeedVoucher.model_validate_json(block.split(b"data: ", 1)[1])
                        if len(self.voucher_status) == revoke_after:
                            self.revoke()
                        post = http.post(f"{self.node.url}/v1/payments/vouchers",
                                         json=self.voucher(need.required_cumulative).to_wire())
                        self.voucher_status.append(post.status_code)
                    elif block.startswith(b"event: " + PAYMENT_TIMEOUT_EVENT.encode()):
                        timed_out = True
        return 200, timed_out


def test_contract_signer_refused_by_default(node: PaidNode, w3: Web3, deployment: Deployment) -> None:
    payer = ContractPayer(w3, deployment, node)
    status, _ = payer.stream(10, first=10**15, revoke_after=99)
    assert status == 402 and '"contract_signer"' in base64.b64decode(payer.refusal).decode()
    r = httpx.post(f"{node.url}/v1/payments/vouchers", json=payer.voucher(10**15).to_wire())
    assert r.status_code == 402 and r.json()["error"]["code"] == "contract_signer"
    assert node.ledger.get("0x" + payer.channel_id.hex()) is None  # nothing counted, nothing served


def test_revoked_contract_signer_loses_the_node_at_most_the_credit_window(
        settling_node: PaidNode, w3: Web3, deployment: Deployment) -> None:
    payer = ContractPayer(w3, deployment, settling_node)
    # The first voucher pays the prompt only: the answer runs on credit, asking for vouchers as it goes.
    status, timed_out = payer.stream(60, first=20 * 10**12, revoke_after=3)
    assert status == 200 and timed_out  # the node stopped serving once vouchers stopped settling
    assert payer.voucher_status[:3] == [200, 200, 200] and payer.voucher_status[3] == 402
    cid = "0x" + payer.channel_id.hex()
    balance = settling_node.ledger.get(cid)
    on_chain = payer.channels.get(payer.channel_id)
    assert on_chain.settled == balance.accepted == balance.settled  # every counted voucher is on-chain
    unpaid = balance.spent - on_chain.settled  # served and now uncollectable: the node's loss
    assert 0 < unpaid <= CREDIT_TOKENS * PRICE_OUT


@pytest.mark.parametrize("amount", ["١٢٣", "１２３", "1_000", " 123", "+123", "-1", "0x10", "1e3", "9" * 200])
def test_amounts_must_be_ascii_digits(node: PaidNode, w3: Web3, deployment: Deployment, amount: str) -> None:
    cid = "0x" + "11" * 32
    wire = {"channelId": cid, "cumulativeAmount": amount, "signature": "0x" + "22" * 65}
    with pytest.raises((MalformedVoucher, ValueError)):
        Voucher.model_validate(wire)
    r = httpx.post(f"{node.url}/v1/payments/vouchers", json=wire)
    assert r.status_code == 400 and r.json()["error"]["code"] == "malformed"
    with pytest.raises(ValueError):
        NeedVoucher.model_validate({"channelId": cid, "requiredCumulative": amount, "spent": "0"})


def test_non_ascii_amount_in_the_payment_header_is_refused(node: PaidNode, w3: Web3, deployment: Deployment) -> None:
    payer = RawPayer(w3, deployment, funded_wallet(w3, deployment), node.url, node.identity.address)
    good = payer.voucher(123).to_wire()
    header = base64.b64encode(json.dumps({**good, "cumulativeAmount": "١٢٣"}).encode()).decode()
    body = json.dumps({"model": MODEL, "prompt": "x", "max_tokens": 2}).encode()
    r = httpx.post(f"{node.url}/v1/completions", content=body,
                   headers={"content-type": "application/json", PAYMENT_SIGNATURE: header})
    assert r.status_code == 400 and r.json()["error"]["code"] == "malformed_payment"
    assert node.ledger.get("0x" + payer.channel_id.hex()) is None
