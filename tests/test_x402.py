"""x402 v2 exactly: every header the node emits or accepts validates under the official `x402` SDK's models,
malformed payment input is a 400 with a reason, and the SDK's own httpx client, with our `channel` scheme
registered through its extension point, pays a real node on anvil (streamed and not); receipts verify and
what the node settles on-chain equals the receipts to the wei."""

from __future__ import annotations

import asyncio
import base64
import json

import httpx
import pytest
from x402.http.clients import x402HttpxClient
from x402.http.utils import (
    decode_payment_required_header,
    decode_payment_response_header,
    decode_payment_signature_header,
)
from x402.schemas import PaymentRequired as SdkPaymentRequired

from dcml.client.demo.kit.nodes import MODEL, PRICE_IN, PRICE_OUT, start_paid_node
from dcml.client.demo.kit.raw_payer import RawPayer
from dcml.client.sdk.x402_channel import ChannelEvmScheme, channel_x402_client
from dcml.client.wire.receipts import Price, ReceiptDomain, SignedReceipt, parse_sse_stream, verify_signed_receipt
from dcml.client.wire.x402 import (
    PAYMENT_REQUIRED,
    PAYMENT_RESPONSE,
    PAYMENT_SIGNATURE,
    PaymentPayload,
    PaymentRequired,
    SettlementResponse,
)


@pytest.fixture
def node(w3, deployment_file, tmp_path):
    paid = start_paid_node(w3, deployment_file, tmp_path / "node")
    yield paid
    paid.server.stop()


def _completion(node, headers: dict | None = None, *, max_tokens: int = 5, stream: bool = False) -> httpx.Response:
    return httpx.post(f"{node.url}/v1/completions", headers=headers or {}, timeout=30,
                      json={"model": MODEL, "prompt": "a b c", "max_tokens": max_tokens, "stream": stream})


def _sdk_402(r: httpx.Response) -> SdkPaymentRequired:
    required = decode_payment_required_header(r.headers[PAYMENT_REQUIRED])
    assert isinstance(required, SdkPaymentRequired) and required.x402_version == 2
    assert required.resource is not None and required.resource.url.endswith("/v1/completions")
    req, *others = required.accepts  # channel first; x402's batch-settlement beside it (tests/test_x402_batch.py)
    assert [o.scheme for o in others] == ["batch-settlement"]
    assert req.scheme == "channel" and req.amount.isdigit()
    assert all(isinstance(v, str) for k, v in req.extra.items() if k != "voucherTimeoutSeconds")
    return required


def test_unpaid_402_is_an_sdk_payment_required_with_amount_and_resource(node, deployment) -> None:
    r = _completion(node, max_tokens=5)
    assert r.status_code == 402 and r.json()["error"]["code"] == "payment_required"
    required = _sdk_402(r)
    req = required.accepts[0]
    assert req.network == f"eip155:{deployment.chain_id}" and req.pay_to == node.identity.address
    assert int(req.amount) == 3 * PRICE_IN + 5 * PRICE_OUT  # what admitting this request needs now
    assert req.extra["escrow"] == deployment.payment_channels
    assert set(json.loads(base64.b64decode(r.headers[PAYMENT_REQUIRED]))) <= {
        "x402Version", "error", "resource", "accepts", "extensions"}  # nothing outside the standard


def test_error_paths_validate_under_the_sdk(w3, deployment, payer, node) -> None:
    client = RawPayer(w3, deployment, payer, node.url, node.identity.address)
    offer = PaymentRequired.from_header(_completion(node).headers[PAYMENT_REQUIRED]).accepts[0]
    # insufficient: 402 naming the channel and the cumulative amount that admits the request
    short = PaymentPayload(accepted=offer, payload=client.voucher(1)).to_header()
    assert decode_payment_signature_header(short).accepted.scheme == "channel"
    r = _completion(node, {PAYMENT_SIGNATURE: short})
    assert r.status_code == 402 and r.json()["error"]["code"] == "insufficient_funds"
    extra = _sdk_402(r).accepts[0].extra
    assert extra["channelId"] == "0x" + client.channel_id.hex()
    assert int(extra["requiredCumulative"]) == 3 * PRICE_IN + 5 * PRICE_OUT
    # another offer (wrong payee) echoed in `accepted`: refused with the right offer
    wrong = offer.model_copy(update={"pay_to": payer.address})
    r = _completion(node, {PAYMENT_SIGNATURE: PaymentPayload(accepted=wrong, payload=client.voucher(10**15))
                           .to_header()})
    assert r.status_code == 402 and r.json()["error"]["code"] == "accepted_mismatch"
    _sdk_402(r)
    # paid, then a stream that runs out of credit ends with payment-timeout: its PAYMENT-RESPONSE still validates
    other = RawPayer(w3, deployment, payer, node.url, node.identity.address)
    answer = other.ask("x y", max_tokens=100, pay_mid_stream=False)
    assert answer.timed_out
    settle = decode_payment_response_header(answer.headers[PAYMENT_RESPONSE.lower()])
    assert settle.success and settle.network == f"eip155:{deployment.chain_id}"
    assert node.ledger.get("0x" + other.channel_id.hex()).accepted == other.cumulative


MALFORMED = [
    b"not base64 at all!",
    base64.b64encode(b"{not json"),
    base64.b64encode(b"[1, 2, 3]"),
    base64.b64encode(b"[" * 100_000 + b"]" * 100_000)[:8000],  # deep nesting, cut
    base64.b64encode(b"{" + b'"a":' * 10 + b"1}"),
    base64.b64encode(json.dumps({"x402Version": 1, "payload": {}}).encode()),
    base64.b64encode(json.dumps({"x402Version": 2, "accepted": {"scheme": "exact"}, "payload": {}}).encode()),
    base64.b64encode(json.dumps({"channelId": "0x12", "cumulativeAmount": "1", "signature": "0x"}).encode()),
    b"A" * 20_000,  # huge
]


@pytest.mark.parametrize("value", MALFORMED, ids=range(len(MALFORMED)))
def test_malformed_payment_is_400_with_a_reason_and_the_offer(node, value: bytes) -> None:
    r = _completion(node, {PAYMENT_SIGNATURE: value.decode()})
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["code"] == "malformed_payment" and err["message"]
    _sdk_402(r)  # the offer rides along, so a client can fix its payment


def test_a_payload_with_a_bad_voucher_field_is_400(w3, deployment, payer, node) -> None:
    client = RawPayer(w3, deployment, payer, node.url, node.identity.address)
    offer = PaymentRequired.from_header(_completion(node).headers[PAYMENT_REQUIRED]).accepts[0]
    good = json.loads(base64.b64decode(PaymentPayload(accepted=offer, payload=client.voucher(10**15)).to_header()))
    for field, value in (("cumulativeAmount", "-1"), ("cumulativeAmount", str(2**128)), ("channelId", "0xzz"),
                         ("signature", 12)):
        bad = {**good, "payload": {**good["payload"], field: value}}
        r = _completion(node, {PAYMENT_SIGNATURE: base64.b64encode(json.dumps(bad).encode()).decode()})
        assert r.status_code == 400 and field in r.json()["error"]["message"], (field, r.text)
    assert node.ledger.get("0x" + client.channel_id.hex()) is None  # nothing recorded


def test_old_shape_bare_voucher_is_still_accepted(w3, deployment, payer, node) -> None:
    client = RawPayer(w3, deployment, payer, node.url, node.identity.address)
    r = _completion(node, {PAYMENT_SIGNATURE: client.voucher(10**15).to_header()})
    assert r.status_code == 200
    assert decode_payment_response_header(r.headers[PAYMENT_RESPONSE]).success


def test_non_streamed_payment_response_carries_the_final_figures(w3, deployment, payer, node) -> None:
    client = RawPayer(w3, deployment, payer, node.url, node.identity.address)
    offer = PaymentRequired.from_header(_completion(node).headers[PAYMENT_REQUIRED]).accepts[0]
    r = _completion(node, {PAYMENT_SIGNATURE: PaymentPayload(accepted=offer, payload=client.voucher(10**15))
                           .to_header()}, max_tokens=7)
    assert r.status_code == 200
    receipt = SignedReceipt.from_header(r.headers["x-dcml-receipt"]).receipt
    sdk = decode_payment_response_header(r.headers[PAYMENT_RESPONSE])
    ours = SettlementResponse.from_header(r.headers[PAYMENT_RESPONSE])
    assert sdk.amount == str(receipt.cost) and ours.spent == receipt.cumulative_spent
    assert ours.figures.cost == receipt.cost and ours.accepted == 10**15
    assert sdk.payer.lower() == payer.address.lower()
    digest = node.app.state.node.gate.payments.verifier.domain.digest(client.channel_id, 10**15)
    assert sdk.transaction == "0x" + digest.hex()  # the commitment of the accepted voucher


def test_the_sdk_httpx_client_pays_streamed_and_non_streamed_answers(w3, deployment, payer, node) -> None:
    scheme = ChannelEvmScheme(w3, deployment, payer, deposit=10**17, payee=node.identity.address)
    x402 = channel_x402_client(scheme)
    domain = ReceiptDomain(deployment.chain_id, deployment.sla_court)
    price = Price(PRICE_IN, PRICE_OUT)

    async def run() -> list[int]:
        costs = []
        async with x402HttpxClient(x402, timeout=30) as http:
            for i, stream in enumerate((False, True, True, False)):
                body = json.dumps({"model": MODEL, "prompt": f"hello {i}", "max_tokens": 6, "stream": stream}).encode()
                async with http.stream("POST", f"{node.url}/v1/completions", content=body,
                                       headers={"content-type": "application/json"}) as r:
                    raw = await r.aread()
                    assert r.status_code == 200, raw
                    settle = decode_payment_response_header(r.headers[PAYMENT_RESPONSE])
                    assert settle.success and settle.payer.lower() == payer.address.lower()
                    if stream:
                        payloads, signed = parse_sse_stream(raw)
                        verify_signed_receipt(signed, expected_signer=node.identity.address, request_bytes=body,
                                              sse_payloads=payloads, price=price, domain=domain)
                    else:
                        signed = SignedReceipt.from_header(r.headers["x-dcml-receipt"])
                        verify_signed_receipt(signed, expected_signer=node.identity.address, request_bytes=body,
                                              response_bytes=raw, price=price, domain=domain)
                        assert settle.amount == str(signed.receipt.cost)
                    costs.append(signed.receipt.cost)
        return costs

    costs = asyncio.run(run())
    assert len(scheme._by_id) == 1  # one channel, opened on the first offer
    (channel_id,) = scheme._by_id
    balance = node.ledger.get(channel_id)
    assert balance.spent == sum(costs) == balance.accepted  # paid exactly what the receipts say
    node.server.stop()  # graceful: the worker settles everything before exiting
    assert scheme.chain.get(bytes.fromhex(channel_id[2:])).settled == sum(costs)


def test_receipts_and_acceptances_carry_uints_as_decimal_strings(w3, deployment, payer, node) -> None:
    """Above 2**53 a JSON number is rounded by JavaScript: every uint on the wire is a decimal string, and the
    Python models still read the old integer form (one release)."""
    from dcml.client.wire.receipts import Receipt, SignedAcceptance, receipt_digest

    node.app.state.node.gate.terms_in_force_from[MODEL] = 0  # as if SLA terms were in force: it signs acceptances
    client = RawPayer(w3, deployment, payer, node.url, node.identity.address)
    offer = PaymentRequired.from_header(_completion(node).headers[PAYMENT_REQUIRED]).accepts[0]
    voucher = client.voucher(10**17)
    for _ in range(3):
        r = _completion(node, {PAYMENT_SIGNATURE: PaymentPayload(accepted=offer, payload=voucher).to_header()},
                        max_tokens=1024)
        assert r.status_code == 200, r.text
    fetched = httpx.get(f"{node.url}/v1/receipts/{r.headers['x-dcml-receipt-id']}").json()["receipt"]
    assert int(fetched["cumulativeSpent"]) == 3 * (3 * PRICE_IN + 1024 * PRICE_OUT) > 2**53
    assert all(isinstance(fetched[k], str) for k in ("cost", "cumulativeSpent", "inputTokens", "acceptedAt"))
    acceptance = json.loads(base64.b64decode(r.headers["x-dcml-acceptance"]))["acceptance"]
    assert isinstance(acceptance["acceptedAt"], str) and isinstance(acceptance["deadline"], str)
    old = {k: int(v) if v.isdigit() else v for k, v in fetched.items()}  # the pre-release integer form
    domain = ReceiptDomain(deployment.chain_id, deployment.sla_court)
    assert receipt_digest(Receipt.model_validate(old), domain) == receipt_digest(Receipt.model_validate(fetched),
                                                                                 domain)
    SignedAcceptance.model_validate_json(base64.b64decode(r.headers["x-dcml-acceptance"]))
    with pytest.raises(ValueError):
        Receipt.model_validate({**fetched, "cost": "1e20"})


def test_readme_gives_the_eip712_type_strings_the_code_signs() -> None:
    from pathlib import Path

    from dcml.client.chain import registration as registry
    from dcml.client.publisher import bundle as model_bundle
    from dcml.client.wire import advert, receipts, voucher

    def type_string(name: str, fields: list[dict]) -> str:
        return f"{name}(" + ",".join(f"{f['type']} {f['name']}" for f in fields) + ")"

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    for name, fields in (("Voucher", voucher.EIP712_TYPES["Voucher"]), ("Receipt", receipts.RECEIPT_FIELDS),
                         ("Acceptance", receipts.ACCEPTANCE_FIELDS),
                         ("Registration", registry.EIP712_TYPES["Registration"]),
                         ("Reattestation", registry.EIP712_TYPES["Reattestation"]), ("Advert", advert.ADVERT_FIELDS),
                         ("BundleManifest", model_bundle.MANIFEST_TYPES["BundleManifest"])):
        assert f"`{type_string(name, fields)}`" in readme, name
    assert f'name: "{advert.DOMAIN_NAME}", version: "{advert.DOMAIN_VERSION}"' in readme
    assert f'name: "{registry.DOMAIN_NAME}", version: "{registry.DOMAIN_VERSION}"' in readme
    assert f'name: "{receipts.DOMAIN_NAME}", version: "{receipts.DOMAIN_VERSION}"' in readme
    assert 'name: "{name}", version: "{version}"'.format(**model_bundle.MANIFEST_DOMAIN) in readme


def test_an_offer_with_another_scheme_beside_channel_still_parses() -> None:
    """A 402 may offer x402's `batch-settlement` beside `channel`: our models keep it and our clients pick ours."""
    channel = {"scheme": "channel", "network": "eip155:1", "amount": "5", "asset": "0x" + "1" * 40,
               "payTo": "0x" + "2" * 40, "maxTimeoutSeconds": 60,
               "extra": {"escrow": "0x" + "3" * 40, "modelId": "0x" + "4" * 64, "pricePerInputToken": "1",
                         "pricePerOutputToken": "2", "prepay": "3", "creditWindow": "4",
                         "voucherTimeoutSeconds": 2}}
    batch = {**channel, "scheme": "batch-settlement", "extra": {"receiverAuthorizer": "0x" + "5" * 40,
                                                               "withdrawDelay": 900, "name": "T", "version": "1"}}
    header = base64.b64encode(json.dumps({"x402Version": 2, "accepts": [batch, channel]}).encode()).decode()
    required = PaymentRequired.from_header(header)
    assert [r.scheme for r in required.accepts] == ["batch-settlement", "channel"]
    assert required.accepts[1].extra.prepay == 3 and required.accepts[0].extra["withdrawDelay"] == 900
    assert json.loads(base64.b64decode(required.to_header()))["accepts"] == [batch, channel]
    assert decode_payment_required_header(required.to_header()).accepts[1].scheme == "channel"


def test_cli_json_rows_carry_no_json_numbers_for_uints() -> None:
    from dcml.client.sdk.disputes import DisputeRow
    from dcml.client.sdk.spend_store import StoredChannel

    big = 2**100
    ch = StoredChannel(channel_id="0x" + "1" * 64, node_url="http://n", model="m", model_id="0x" + "2" * 64,
                       payer="0xa", payee="0xb", escrow="0xc", chain_id=2**60, token="0xd", session_address="0xe",
                       deposit=big, accepted=big, spent=big, price_in=big, price_out=big, prepay=big,
                       credit_window=big, status="open", opened_at=1.5)
    row = DisputeRow(kind="no_response", id="0x1", status="due", due=True, node="0xn", node_url="http://n",
                  channel_id="0x2", request_hash="0x3", expected=big, amount=None, tx=None, reason=None,
                  deadline=2**40, answer_by=2**40)
    for out in (ch.as_json(), row.as_json()):
        assert not [k for k, v in out.items() if isinstance(v, int) and not isinstance(v, bool)], out
