"""x402's `batch-settlement` scheme: the official SDK's UNMODIFIED client pays a node on anvil (against our
x402BatchSettlement at its canonical address), the node claims on-chain, and the publisher's royalty arrives."""

from __future__ import annotations

import asyncio
import base64
import json

import httpx
import pytest
from eth_account.signers.local import LocalAccount
from web3 import Web3
from x402 import x402Client
from x402.http.clients import x402HttpxClient
from x402.http.utils import decode_payment_required_header, decode_payment_response_header
from x402.mechanisms.evm.batch_settlement.abi import BATCH_SETTLEMENT_ABI
from x402.mechanisms.evm.batch_settlement.client.scheme import BatchSettlementEvmScheme
from x402.mechanisms.evm.batch_settlement.constants import BATCH_SETTLEMENT_ADDRESS
from x402.schemas import PaymentRequired as SdkPaymentRequired
from x402.schemas import PaymentRequirements

from dcml.client.chain.contracts import contract
from dcml.client.chain.model_registry import register_model
from dcml.client.demo.kit.nodes import PRICE_IN, PRICE_OUT, serve_node
from dcml.client.wire.receipts import (
    Price,
    ReceiptDomain,
    SignedReceipt,
    model_id_for,
    parse_sse_stream,
    verify_signed_receipt,
)
from dcml.client.wire.x402 import PAYMENT_REQUIRED, PAYMENT_RESPONSE, PAYMENT_SIGNATURE
from dcml.node.config import load_settings

MODEL = "synthetic-batch"  # its own model id, so its royalty touches no other test's figures
BPS = 750


@pytest.fixture
def node(w3, deployment, publisher, tmp_path):
    model = bytes.fromhex(model_id_for(MODEL)[2:])
    registry = contract(w3, "ModelRegistry", deployment.model_registry)
    if int(registry.functions.terms(model).call()[0], 16) == 0:
        register_model(w3, deployment, publisher, model, BPS)
    path = tmp_path / "deployment.json"
    deployment.save(path)
    settings = load_settings(
        None, data_dir=tmp_path / "node",
        engine={"kind": "synthetic", "served_model_name": MODEL, "model_dir": None},
        payments={"enabled": True, "deployment": path, "settle_threshold": 10**30, "settle_interval_s": 0.2,
                  "prices": {MODEL: {"price_per_input_token": PRICE_IN, "price_per_output_token": PRICE_OUT}}})
    node = serve_node(w3, settings)
    server = node.server
    yield server, node.identity, node.app.state.node.gate
    server.stop()


def _balance(w3: Web3, deployment, who: str) -> int:
    return contract(w3, "TestToken", deployment.token).functions.balanceOf(who).call()


def test_402_offers_batch_settlement_beside_channel(node, deployment) -> None:
    server, identity, _ = node
    r = httpx.post(f"{server.url}/v1/completions", json={"model": MODEL, "prompt": "a b c", "max_tokens": 5})
    assert r.status_code == 402
    required = decode_payment_required_header(r.headers[PAYMENT_REQUIRED])
    assert isinstance(required, SdkPaymentRequired)
    channel, batch = required.accepts
    assert channel.scheme == "channel" and batch.scheme == "batch-settlement"
    assert int(batch.amount) == 3 * PRICE_IN + 5 * PRICE_OUT  # the whole request: no mid-stream top-up
    assert batch.pay_to == identity.address and batch.extra["receiverAuthorizer"] == identity.address
    assert batch.asset == deployment.token and batch.extra["name"] == "Devnet USD" and batch.extra["version"] == "1"


def test_malformed_batch_payload_is_400_and_forged_voucher_402(node, payer) -> None:
    server, _, gate = node
    r = httpx.post(f"{server.url}/v1/completions", json={"model": MODEL, "prompt": "a b c", "max_tokens": 5})
    offer = json.loads(base64.b64decode(r.headers[PAYMENT_REQUIRED]))["accepts"][1]
    bad = base64.b64encode(json.dumps({"x402Version": 2, "accepted": offer,
                                       "payload": {"type": "voucher"}}).encode()).decode()
    r = httpx.post(f"{server.url}/v1/completions", headers={PAYMENT_SIGNATURE: bad},
                   json={"model": MODEL, "prompt": "a b c", "max_tokens": 5})
    assert r.status_code == 400 and r.json()["error"]["code"] == "malformed_payment"
    # A voucher payload for a channel that was never funded, signed by someone else: refused, nothing recorded.
    scheme = BatchSettlementEvmScheme(payer)
    req = PaymentRequirements.model_validate(offer)
    inner = scheme._create_voucher_payload("0x" + "11" * 32, req.amount, req.network, scheme.build_channel_config(req))
    forged = base64.b64encode(json.dumps({"x402Version": 2, "accepted": offer, "payload": inner}).encode()).decode()
    r = httpx.post(f"{server.url}/v1/completions", headers={PAYMENT_SIGNATURE: forged},
                   json={"model": MODEL, "prompt": "a b c", "max_tokens": 5})
    assert r.status_code == 402 and PAYMENT_REQUIRED in r.headers
    assert gate.batch.ledger.open_channels() == []


def test_stock_sdk_client_pays_streamed_answers_node_claims_and_forwards_royalty(
        w3, deployment, payer: LocalAccount, publisher: LocalAccount, node) -> None:
    server, identity, gate = node
    client = x402Client().register(f"eip155:{deployment.chain_id}", BatchSettlementEvmScheme(payer))  # the SDK's own
    # A devnet token is no SDK default asset: allow it (the cap bounds the deposit: 5 x this).
    network = f"eip155:{deployment.chain_id}"
    client.set_spend_controls({"allowed_assets": [{"network": network, "asset": deployment.token,
                                                   "max_amount_per_payment": str(10**15)}]})
    domain = ReceiptDomain(deployment.chain_id, deployment.sla_court)
    price = Price(PRICE_IN, PRICE_OUT)

    async def run() -> list[int]:
        costs = []
        async with x402HttpxClient(client, timeout=60) as http:
            for i, stream in enumerate((True, True, False)):
                body = json.dumps({"model": MODEL, "prompt": f"hello {i}", "max_tokens": 6, "stream": stream}).encode()
                async with http.stream("POST", f"{server.url}/v1/completions", content=body,
                                       headers={"content-type": "application/json"}) as r:
                    raw = await r.aread()
                    assert r.status_code == 200, raw
                    settle = decode_payment_response_header(r.headers[PAYMENT_RESPONSE])
                    assert settle.success and settle.payer.lower() == payer.address.lower()
                    state = settle.extra["channelState"]  # the commitment: the voucher's digest, as on-chain
                    assert settle.transaction == "0x" + bs.functions.getVoucherDigest(
                        bytes.fromhex(state["channelId"][2:]), int(state["chargedCumulativeAmount"])).call().hex()
                    if stream:
                        payloads, signed = parse_sse_stream(raw)
                        verify_signed_receipt(signed, expected_signer=identity.address, request_bytes=body,
                                              sse_payloads=payloads, price=price, domain=domain)
                    else:
                        signed = SignedReceipt.from_header(r.headers["x-dcml-receipt"])
                        verify_signed_receipt(signed, expected_signer=identity.address, request_bytes=body,
                                              response_bytes=raw, price=price, domain=domain)
                    costs.append(signed.receipt.cost)
        return costs

    bs = w3.eth.contract(address=Web3.to_checksum_address(BATCH_SETTLEMENT_ADDRESS), abi=BATCH_SETTLEMENT_ABI)
    before_node = _balance(w3, deployment, identity.address)
    before_pub = _balance(w3, deployment, publisher.address)
    costs = asyncio.run(run())
    (balance,) = gate.batch.ledger.open_channels()
    assert balance.spent == sum(costs) <= balance.accepted  # served = receipts; the ceiling is the reservation
    deposited, claimed = bs.functions.channels(bytes.fromhex(balance.channel_id[2:])).call()
    assert deposited >= balance.accepted and claimed == 0

    (result,) = gate.batch.claim_once()
    royalty = sum(costs) * BPS // 10_000
    assert result.total_claimed == result.claimed == sum(costs)  # claims what was served, never the ceiling
    assert result.publisher == publisher.address and result.publisher_share == royalty and result.royalty_tx
    assert bs.functions.channels(bytes.fromhex(balance.channel_id[2:])).call()[1] == sum(costs)
    assert _balance(w3, deployment, publisher.address) == before_pub + royalty
    assert _balance(w3, deployment, identity.address) == before_node + sum(costs) - royalty
    assert gate.batch.claim_once() == []  # nothing new: no second claim, no second royalty
    assert _balance(w3, deployment, publisher.address) == before_pub + royalty
    # A crash after the royalty transfer was sent but before it was recorded: the next round finds the stored
    # transaction mined and counts it, instead of paying the publisher twice.
    gate.batch._db.execute("UPDATE channels SET forwarded = '0', pending_tx = ?, pending_amount = ? WHERE id = ?",
                           (result.royalty_tx, str(royalty), balance.channel_id))
    again = gate.batch._claim(balance.channel_id, balance.accepted, balance.signature, balance.spent)
    assert again.claimed == 0 and again.publisher_share == 0 and again.royalty_tx == ""
    assert _balance(w3, deployment, publisher.address) == before_pub + royalty


def test_shutdown_claims_what_was_served(w3, deployment, node) -> None:
    """A node stopping claims every served amount (the claim loop's flush), like the channel settler."""
    from eth_account import Account
    server, _, gate = node
    wallet = Account.from_key(deployment.accounts["client2"].private_key)
    client = x402Client().register(f"eip155:{deployment.chain_id}", BatchSettlementEvmScheme(wallet))
    client.set_spend_controls({"allowed_assets": [{"network": f"eip155:{deployment.chain_id}",
                                                   "asset": deployment.token}]})

    async def run() -> int:
        async with x402HttpxClient(client, timeout=60) as http:
            r = await http.post(f"{server.url}/v1/completions", json={"model": MODEL, "prompt": "x", "max_tokens": 4})
            assert r.status_code == 200, r.text
            return SignedReceipt.from_header(r.headers["x-dcml-receipt"]).receipt.cost

    cost = asyncio.run(run())
    (balance,) = gate.batch.ledger.open_channels()
    server.stop()
    bs = w3.eth.contract(address=Web3.to_checksum_address(BATCH_SETTLEMENT_ADDRESS), abi=BATCH_SETTLEMENT_ABI)
    assert bs.functions.channels(bytes.fromhex(balance.channel_id[2:])).call()[1] == cost


class _Recording(httpx.AsyncHTTPTransport):
    """Keeps every PAYMENT-SIGNATURE the SDK sends (an eavesdropper's copy)."""

    def __init__(self) -> None:
        super().__init__()
        self.sent: list[str] = []

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        if PAYMENT_SIGNATURE in request.headers:
            self.sent.append(request.headers[PAYMENT_SIGNATURE])
        return await super().handle_async_request(request)


def test_replayed_deposit_is_refused_and_credits_nothing(w3, deployment, node) -> None:
    from eth_account import Account
    from x402.http.clients.httpx import x402AsyncTransport
    server, _, gate = node
    wallet = Account.from_key(deployment.accounts["client3"].private_key)
    client = x402Client().register(f"eip155:{deployment.chain_id}", BatchSettlementEvmScheme(wallet))
    client.set_spend_controls({"allowed_assets": [{"network": f"eip155:{deployment.chain_id}",
                                                   "asset": deployment.token}]})
    recording = _Recording()
    body = {"model": MODEL, "prompt": "x", "max_tokens": 4}

    async def run() -> None:
        async with httpx.AsyncClient(transport=x402AsyncTransport(client, recording), timeout=60) as http:
            r = await http.post(f"{server.url}/v1/completions", json=body)
            assert r.status_code == 200, r.text

    asyncio.run(run())
    (deposit,) = recording.sent
    assert json.loads(base64.b64decode(deposit))["payload"]["type"] == "deposit"
    (before,) = gate.batch.ledger.open_channels()
    bs = w3.eth.contract(address=Web3.to_checksum_address(BATCH_SETTLEMENT_ADDRESS), abi=BATCH_SETTLEMENT_ABI)
    onchain = bs.functions.channels(bytes.fromhex(before.channel_id[2:])).call()
    r = httpx.post(f"{server.url}/v1/completions", headers={PAYMENT_SIGNATURE: deposit}, json=body, timeout=30)
    assert r.status_code == 402 and PAYMENT_REQUIRED in r.headers  # the ERC-3009 authorization is spent
    assert bs.functions.channels(bytes.fromhex(before.channel_id[2:])).call() == onchain  # no second deposit
    assert gate.batch.ledger.get(before.channel_id) == before  # nothing charged


def test_a_payer_withdrawal_stops_admission_and_is_claimed_at_once(w3, deployment, node) -> None:
    """After `withdrawDelay` the payer takes what is unclaimed: the node claims as soon as it sees the
    withdrawal (not at its threshold) and admits nothing more on that channel."""
    import time

    from eth_account import Account
    from x402.http.clients.httpx import x402AsyncTransport
    from x402.mechanisms.evm.batch_settlement.facilitator.utils import to_contract_channel_config
    from x402.mechanisms.evm.batch_settlement.types import ChannelConfig

    from dcml.client.chain.tx import send
    server, _, gate = node
    wallet = Account.from_key(deployment.accounts["client2"].private_key)
    client = x402Client().register(f"eip155:{deployment.chain_id}", BatchSettlementEvmScheme(wallet))
    client.set_spend_controls({"allowed_assets": [{"network": f"eip155:{deployment.chain_id}",
                                                   "asset": deployment.token}]})
    recording = _Recording()
    body = {"model": MODEL, "prompt": "x", "max_tokens": 4}

    async def pay() -> httpx.Response:
        async with httpx.AsyncClient(transport=x402AsyncTransport(client, recording), timeout=60) as http:
            return await http.post(f"{server.url}/v1/completions", json=body)

    assert asyncio.run(pay()).status_code == 200
    (balance,) = gate.batch.ledger.open_channels()
    config = ChannelConfig.from_dict(json.loads(base64.b64decode(recording.sent[0]))["payload"]["channelConfig"])
    bs = w3.eth.contract(address=Web3.to_checksum_address(BATCH_SETTLEMENT_ADDRESS), abi=BATCH_SETTLEMENT_ABI)
    send(w3, wallet, bs.functions.initiateWithdraw(to_contract_channel_config(config), 10**30 >> 40))
    cid = bytes.fromhex(balance.channel_id[2:])
    deadline = time.monotonic() + 20
    while bs.functions.channels(cid).call()[1] != balance.spent:
        assert time.monotonic() < deadline, "the node did not claim after the payer's withdrawal"
        time.sleep(0.1)
    r = asyncio.run(pay())
    assert r.status_code == 402 and r.json()["error"]["code"] == "withdraw_pending"  # its payer is leaving
    assert gate.batch.ledger.get(balance.channel_id).spent == balance.spent
