"""The node's payment gate end to end: anvil, a real node on loopback (synthetic engine), raw HTTP.

Every charge is checked against signed receipts and, after settlement, against the chain, to the wei.
"""

from __future__ import annotations

import json
import threading

import httpx
import pytest

from dcml.client.demo.kit.nodes import MODEL, PRICE_IN, PRICE_OUT, start_paid_node
from dcml.client.demo.kit.raw_payer import RawPayer
from dcml.client.wire.receipts import Price, ReceiptDomain, verify_signed_receipt
from dcml.client.wire.x402 import PAYMENT_REQUIRED, PaymentRequired


@pytest.fixture
def node(w3, deployment_file, tmp_path):
    paid = start_paid_node(w3, deployment_file, tmp_path / "node")
    yield paid
    paid.server.stop()


def test_unpaid_request_gets_402_with_the_channel_terms(node, deployment) -> None:
    r = httpx.post(f"{node.url}/v1/completions", json={"model": MODEL, "prompt": "hello", "max_tokens": 5})
    assert r.status_code == 402
    assert r.json()["error"]["code"] == "payment_required"
    required = PaymentRequired.from_header(r.headers[PAYMENT_REQUIRED])
    req, batch = required.accepts  # x402's batch-settlement beside channel (tests/test_x402_batch.py)
    assert batch.scheme == "batch-settlement"
    assert req.scheme == "channel" and req.network == f"eip155:{deployment.chain_id}"
    assert req.pay_to == node.identity.address and req.asset == deployment.token
    terms = req.extra
    assert terms.escrow == deployment.payment_channels
    assert (terms.price_per_input_token, terms.price_per_output_token) == (PRICE_IN, PRICE_OUT)
    assert terms.prepay == 8 * PRICE_OUT and terms.credit_window == 4 * PRICE_OUT
    assert httpx.get(f"{node.url}/health").json()["status"] == "ok"


def test_paid_stream_pays_mid_stream_and_the_receipts_match(w3, deployment, payer, node) -> None:
    client = RawPayer(w3, deployment, payer, node.url, node.identity.address)
    answer = client.ask("one two three", max_tokens=40)
    assert answer.status == 200 and not answer.timed_out
    assert answer.need_events >= 1  # 40 tokens > prepay 8 + credit 4: it had to pay while streaming
    receipt = answer.receipt.receipt
    assert receipt.output_tokens == 40 and receipt.input_tokens == 3
    assert receipt.cost == 3 * PRICE_IN + 40 * PRICE_OUT
    assert receipt.cumulative_spent == receipt.cost
    verify_signed_receipt(answer.receipt, expected_signer=node.identity.address, request_bytes=answer.request,
                          sse_payloads=answer.payloads, price=Price(PRICE_IN, PRICE_OUT),
                          domain=ReceiptDomain(deployment.chain_id, deployment.sla_court))
    balance = node.ledger.get("0x" + client.channel_id.hex())
    assert balance.spent == receipt.cumulative_spent
    assert balance.spent - balance.accepted <= 4 * PRICE_OUT  # never beyond the credit window


def test_client_that_stops_paying_is_cut_off_at_the_credit_window(w3, deployment, payer, node) -> None:
    client = RawPayer(w3, deployment, payer, node.url, node.identity.address)
    answer = client.ask("a b", max_tokens=200, pay_mid_stream=False)
    assert answer.status == 200 and answer.timed_out
    receipt = answer.receipt.receipt
    balance = node.ledger.get("0x" + client.channel_id.hex())
    # served: the prepaid part plus at most the credit window, and every served token is in the receipt
    assert receipt.output_tokens < 200
    assert balance.spent == receipt.cost <= balance.accepted + 4 * PRICE_OUT
    assert balance.accepted == client.cumulative  # what the client paid stays accepted and will be settled
    content = [p for p in answer.payloads if p != b"[DONE]" and json.loads(p).get("choices")]
    assert sum(1 for _ in content) <= receipt.output_tokens


def test_vouchers_replayed_out_of_order_or_for_another_channel_are_refused(w3, deployment, payer, node) -> None:
    client = RawPayer(w3, deployment, payer, node.url, node.identity.address)
    assert client.post_voucher(10**15).status_code == 200
    v = client.voucher(2 * 10**15)
    assert httpx.post(f"{node.url}/v1/payments/vouchers", json=v.to_wire()).status_code == 200
    for replay in (v, client.voucher(10**15)):
        r = httpx.post(f"{node.url}/v1/payments/vouchers", json=replay.to_wire())
        assert r.status_code == 402 and r.json()["error"]["code"] == "not_increasing"
    other = RawPayer(w3, deployment, payer, node.url, node.identity.address)
    forged = other.voucher(5 * 10**15).model_copy(update={"channel_id": "0x" + client.channel_id.hex()})
    r = httpx.post(f"{node.url}/v1/payments/vouchers", json=forged.to_wire())
    assert r.status_code == 402 and r.json()["error"]["code"] == "bad_signature"
    r = httpx.post(f"{node.url}/v1/payments/vouchers", content=b"{not json")
    assert r.status_code == 400
    assert node.ledger.get("0x" + client.channel_id.hex()).accepted == 2 * 10**15  # nothing lost or added


def test_a_forged_receipt_is_rejected_by_the_client(w3, deployment, payer, node) -> None:
    from dcml.client.wire.receipts import ReceiptError

    client = RawPayer(w3, deployment, payer, node.url, node.identity.address)
    answer = client.ask("x y z", max_tokens=5, stream=False)
    assert answer.status == 200
    body = answer.request
    verify_signed_receipt(answer.receipt, expected_signer=node.identity.address, request_bytes=body,
                          response_bytes=answer.raw, price=Price(PRICE_IN, PRICE_OUT),
                          domain=ReceiptDomain(deployment.chain_id, deployment.sla_court))
    cheaper = answer.receipt.model_copy(update={"receipt": answer.receipt.receipt.model_copy(update={"cost": 1})})
    with pytest.raises(ReceiptError):
        verify_signed_receipt(cheaper, expected_signer=node.identity.address, request_bytes=body,
                              response_bytes=answer.raw,
                              domain=ReceiptDomain(deployment.chain_id, deployment.sla_court))


def test_two_clients_on_one_node_and_one_client_on_two_nodes_keep_exact_accounts(
    w3, deployment, deployment_file, payer, node, tmp_path
) -> None:
    from eth_account import Account

    other_wallet = Account.from_key(deployment.accounts["client2"].private_key)
    second = start_paid_node(w3, deployment_file, tmp_path / "node-b")
    try:
        a = RawPayer(w3, deployment, payer, node.url, node.identity.address)
        b = RawPayer(w3, deployment, other_wallet, node.url, node.identity.address)
        a2 = RawPayer(w3, deployment, payer, second.url, second.identity.address)
        costs: dict[str, int] = {}
        for who, client, n in (("a", a, 30), ("b", b, 17), ("a2", a2, 23), ("a", a, 12)):
            answer = client.ask("p q", max_tokens=n)
            assert answer.status == 200
            costs[who] = costs.get(who, 0) + answer.receipt.receipt.cost
        assert node.ledger.get("0x" + a.channel_id.hex()).spent == costs["a"]
        assert node.ledger.get("0x" + b.channel_id.hex()).spent == costs["b"]
        assert second.ledger.get("0x" + a2.channel_id.hex()).spent == costs["a2"]
        assert node.ledger.get("0x" + a2.channel_id.hex()) is None
        assert second.ledger.get("0x" + a.channel_id.hex()) is None
    finally:
        second.server.stop()


def test_fifty_paid_streams_at_once_settle_exactly_the_sum_of_receipts(w3, deployment, deployment_file,
                                                                       tmp_path) -> None:
    from eth_account import Account

    node = start_paid_node(w3, deployment_file, tmp_path / "node50")
    wallets = [Account.from_key(deployment.accounts[r].private_key) for r in ("client", "client2", "client3")]
    payers = [RawPayer(w3, deployment, wallets[i % 3], node.url, node.identity.address) for i in range(50)]
    answers: list = [None] * 50

    def run(i: int) -> None:
        answers[i] = payers[i].ask(f"stream {i}", max_tokens=20 + i % 7)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(50)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    total = 0
    for payer_, answer in zip(payers, answers, strict=True):
        assert answer.status == 200 and not answer.timed_out
        receipt = answer.receipt.receipt
        # settle up: the client pays what its receipt says it owes (the credit it used), nothing more
        if receipt.cumulative_spent > payer_.cumulative:
            assert payer_.post_voucher(receipt.cumulative_spent).status_code == 200
        assert payer_.cumulative == receipt.cumulative_spent
        total += receipt.cost
    node.server.stop()  # graceful: the worker settles everything before exiting
    settled = sum(payer_.channels.get(payer_.channel_id).settled for payer_ in payers)
    assert settled == total
