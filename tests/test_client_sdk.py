"""The SDK against a real paid node (synthetic engine, simulated TEE) and a real anvil: paying,
verifying, persisting, and the official OpenAI client through the paying transport."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from eth_account import Account
from eth_account.signers.local import LocalAccount
from web3 import Web3

from dcml.client.chain.deployment import Deployment
from dcml.client.demo.kit.nodes import MODEL, PRICE_IN, PRICE_OUT, PaidNode, start_paid_node
from dcml.client.sdk.client import ChatResult, ChatStream, Client, UntrustedTerms
from dcml.client.sdk.spend_store import SpendStore
from dcml.client.sdk.transport import PayingTransport, ReceiptViolation
from dcml.client.wire.receipts import RECEIPT_HEADER

DEPOSIT = 10**17


@pytest.fixture(scope="module")
def node(w3: Web3, deployment_file: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[PaidNode]:
    # prepay 0: every voucher the client signs is exactly what the receipts charge (to the wei).
    paid = start_paid_node(w3, deployment_file, tmp_path_factory.mktemp("node"), prepay_tokens=0, credit_tokens=4)
    yield paid
    paid.server.stop()


@pytest.fixture
def wallet(w3: Web3) -> LocalAccount:
    """A fresh funded payer per test, so channels and balances never mix between tests."""
    acct = Account.create()
    w3.provider.make_request("anvil_setBalance", [acct.address, hex(10**20)])
    return acct


def _fund_tokens(w3: Web3, deployment: Deployment, wallet: LocalAccount) -> None:
    from dcml.client.chain.contracts import contract
    from dcml.client.chain.tx import send

    donor = Account.from_key(deployment.accounts["client"].private_key)
    token = contract(w3, "TestToken", deployment.token)
    send(w3, donor, token.functions.transfer(wallet.address, 10**19), action="fund")


@pytest.fixture
def client(node: PaidNode, wallet: LocalAccount, w3: Web3, deployment: Deployment, tmp_path: Path
           ) -> Iterator[Client]:
    _fund_tokens(w3, deployment, wallet)
    with Client(node.url, wallet, deployment=deployment, allow_simulated=True, store=tmp_path / "spend.sqlite",
                deposit=DEPOSIT, w3=w3) as c:
        yield c


def test_chat_pays_verifies_and_settles_to_the_wei(client: Client, node: PaidNode) -> None:
    r1 = client.chat([{"role": "user", "content": "hello there"}], MODEL, max_tokens=12)
    assert isinstance(r1, ChatResult) and r1.text and r1.receipt is not None
    rec = r1.receipt.receipt
    assert rec.cost == rec.input_tokens * PRICE_IN + rec.output_tokens * PRICE_OUT == r1.cost
    assert r1.receipt.signer.lower() == node.identity.address.lower()
    s = client.chat([{"role": "user", "content": "stream a longer answer please"}], MODEL, stream=True,
                    max_tokens=30)
    assert isinstance(s, ChatStream)
    text = "".join(s)
    assert s.result is not None and text == s.result.text and s.result.cost > 0
    r3 = client.complete("once upon a time", MODEL, max_tokens=5)
    assert isinstance(r3, ChatResult) and r3.cost > 0
    receipts = client.receipts()
    assert [r.cost for r in receipts] == [r1.cost, s.result.cost, r3.cost]
    total = sum(r.cost for r in receipts)
    assert receipts[-1].cumulative_spent == total
    (ch,) = client.channels()
    assert ch.spent == total and ch.accepted == total  # the credit each answer used was paid right after it
    assert client.violations() == []
    # The node settles what it holds: exactly the receipts' sum, on-chain.
    node.app.state.node.gate.payments.worker.run_once(flush=True)
    assert client.channel_state(ch.channel_id).settled == total


def test_mid_stream_voucher_is_answered(client: Client) -> None:
    # credit 4 tokens, prepay 0: a 60-token stream pauses many times for vouchers.
    s = client.chat([{"role": "user", "content": "go"}], MODEL, stream=True, max_tokens=60)
    assert isinstance(s, ChatStream)
    text = "".join(s)
    assert s.result is not None and s.result.receipt is not None
    assert s.result.receipt.receipt.output_tokens == 60 and len(text.split()) >= 50
    (ch,) = client.channels()
    assert len(client.store.vouchers(ch.channel_id)) > 5
    assert ch.accepted == ch.spent == s.result.cost


def test_official_openai_client_streaming_and_not(client: Client) -> None:
    oai = client.openai()
    full = oai.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=8)
    assert full.choices[0].message.content and full.usage.completion_tokens == 8
    chunks = list(oai.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}],
                                              max_tokens=20, stream=True, stream_options={"include_usage": True}))
    # Only real chunks reach the SDK: no payment or receipt events parsed as chunks.
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 20
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert len(client.receipts()) == 2 and client.violations() == []


def test_async_openai_client(client: Client) -> None:
    async def run() -> str:
        oai = client.async_openai()
        stream = await oai.completions.create(model=MODEL, prompt="tell me", max_tokens=15, stream=True)
        return "".join([c.choices[0].text async for c in stream if c.choices])

    assert asyncio.run(run())
    (r,) = client.receipts()
    assert r.output_tokens == 15


class _Tamper(httpx.BaseTransport):
    """A man in the middle between the paying transport and the network: rewrites answer bytes."""

    def __init__(self) -> None:
        self.inner = httpx.HTTPTransport()

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        response = self.inner.handle_request(request)
        if request.url.path.endswith("/completions") and response.status_code == 200:
            body = response.read().replace(b'"content":"', b'"content":"FORGED ', 1)
            return httpx.Response(200, headers=response.headers, content=body)
        return response


def test_tampered_answer_is_rejected_and_recorded(client: Client) -> None:
    client.seal = False  # the man in the middle plays a cheating node: on the clear path it can rewrite
    http = httpx.Client(base_url=client.node_url, transport=PayingTransport(client, inner=_Tamper()))
    body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
    with pytest.raises(ReceiptViolation, match="response_hash_mismatch"):
        http.post("/v1/chat/completions", json=body)
    body["stream"] = True
    with pytest.raises(ReceiptViolation, match="response_hash_mismatch"), \
            http.stream("POST", "/v1/chat/completions", json=body) as response:
        for _ in response.iter_bytes():
            pass
    assert [v.reason for v in client.violations()] == ["response_hash_mismatch"] * 2
    assert client.receipts() == []  # a forged answer's receipt is evidence, not a record of good spend


def test_forged_receipt_signer_is_rejected(client: Client) -> None:
    client.seal = False  # the man in the middle plays a cheating node: on the clear path it can rewrite
    forger = Account.create()

    class Forge(httpx.BaseTransport):
        def __init__(self) -> None:
            self.inner = httpx.HTTPTransport()

        def handle_request(self, request: httpx.Request) -> httpx.Response:
            response = self.inner.handle_request(request)
            if RECEIPT_HEADER in response.headers:
                from dcml.client.wire.receipts import SignedReceipt, sign_receipt

                signed = SignedReceipt.from_header(response.headers[RECEIPT_HEADER])
                headers = httpx.Headers(response.headers)
                headers[RECEIPT_HEADER] = sign_receipt(signed.receipt, forger).to_header()
                return httpx.Response(200, headers=headers, content=response.read())
            return response

    http = httpx.Client(base_url=client.node_url, transport=PayingTransport(client, inner=Forge()))
    with pytest.raises(ReceiptViolation, match="wrong_signer"):
        http.post("/v1/chat/completions", json={"model": MODEL, "messages": [{"role": "user", "content": "x"}],
                                                "max_tokens": 3})


def test_acceptance_dated_far_from_our_clock_is_a_violation(client: Client, node: PaidNode) -> None:
    """A node that signs acceptedAt an hour back (under older, laxer SLA terms) is caught at admission."""
    client.seal = False  # the man in the middle plays a cheating node: on the clear path it can rewrite
    import base64

    from dcml.client.wire.receipts import SignedAcceptance, sign_acceptance
    from dcml.client.wire.x402 import ACCEPTANCE_HEADER

    node.app.state.node.gate.terms_in_force_from[MODEL] = 0  # as if SLA terms were in force: it signs acceptances

    class Backdate(httpx.BaseTransport):
        def __init__(self) -> None:
            self.inner = httpx.HTTPTransport()

        def handle_request(self, request: httpx.Request) -> httpx.Response:
            response = self.inner.handle_request(request)
            if ACCEPTANCE_HEADER in response.headers:
                a = SignedAcceptance.model_validate_json(base64.b64decode(response.headers[ACCEPTANCE_HEADER]))
                moved = a.acceptance.model_copy(update={"accepted_at": a.acceptance.accepted_at - 3600})
                headers = httpx.Headers(response.headers)
                resigned = sign_acceptance(moved, node.identity.account, client.receipt_domain)
                headers[ACCEPTANCE_HEADER] = base64.b64encode(resigned.model_dump_json(by_alias=True).encode()).decode()
                return httpx.Response(200, headers=headers, content=response.read())
            return response

    http = httpx.Client(base_url=client.node_url, transport=PayingTransport(client, inner=Backdate()))
    with pytest.raises(ReceiptViolation, match="accepted_at_skew"):
        http.post("/v1/chat/completions", json={"model": MODEL, "messages": [{"role": "user", "content": "x"}],
                                                "max_tokens": 3})
    assert [v.reason for v in client.violations()] == ["accepted_at_skew"]


def test_channel_is_reused_by_a_later_process(client: Client, node: PaidNode, wallet: LocalAccount,
                                              deployment: Deployment, w3: Web3) -> None:
    first = client.chat([{"role": "user", "content": "a"}], MODEL, max_tokens=3)
    client.close()
    with Client(node.url, wallet, deployment=deployment, allow_simulated=True, store=client.store.path,
                deposit=DEPOSIT, w3=w3) as again:
        second = again.chat([{"role": "user", "content": "b"}], MODEL, max_tokens=3)
        assert second.channel_id == first.channel_id
        assert len(again.channels()) == 1 and len(again.receipts()) == 2
        assert again.violations() == []


def test_refuses_expensive_or_simulated_nodes(node: PaidNode, wallet: LocalAccount, deployment: Deployment,
                                             w3: Web3, tmp_path: Path) -> None:
    from dcml.client.attestation.verify import AttestationError

    with Client(node.url, wallet, deployment=deployment, store=tmp_path / "s.sqlite", deposit=DEPOSIT, w3=w3) as c, \
            pytest.raises(AttestationError, match="simulated"):
        c.chat([{"role": "user", "content": "a"}], MODEL)
    with Client(node.url, wallet, deployment=deployment, allow_simulated=True, store=tmp_path / "s.sqlite",
                deposit=DEPOSIT, w3=w3, max_price_per_token=PRICE_OUT - 1) as c, \
            pytest.raises(UntrustedTerms, match="max_price_per_token"):
        c.chat([{"role": "user", "content": "a"}], MODEL)
    assert SpendStore(tmp_path / "s.sqlite").channels() == []  # nothing opened, nothing paid


@pytest.mark.parametrize("auto_top_up", [True, False])
def test_short_deposit_tops_up_or_fails_clearly(node: PaidNode, wallet: LocalAccount, deployment: Deployment,
                                                w3: Web3, tmp_path: Path, auto_top_up: bool) -> None:
    _fund_tokens(w3, deployment, wallet)
    small = 20 * PRICE_OUT  # about 20 tokens: a 60-token stream outruns it
    with Client(node.url, wallet, deployment=deployment, allow_simulated=True, store=tmp_path / "s.sqlite",
                deposit=small, w3=w3, auto_top_up=auto_top_up) as c:
        s = c.chat([{"role": "user", "content": "go"}], MODEL, stream=True, max_tokens=60)
        assert isinstance(s, ChatStream)
        if auto_top_up:
            "".join(s)
            (ch,) = c.channels()
            assert ch.deposit > small and c.channel_state(ch.channel_id).deposit == ch.deposit
            assert s.result is not None and s.result.receipt.receipt.output_tokens == 60
        else:
            from dcml.client.sdk.client import InsufficientDeposit

            with pytest.raises(InsufficientDeposit, match="channel topup"):
                "".join(s)


def test_sse_filter_strips_control_events_and_holds_done() -> None:
    from dcml.client.sdk.transport import SseFilter
    from dcml.client.wire.x402 import NeedVoucher

    f = SseFilter()
    raw = (b'data: {"a":1}\n\nevent: payment-need-voucher\ndata: {"channelId":"0x' + b"ab" * 32
           + b'","requiredCumulative":"7","spent":"3"}\n\ndata: {"b":2}\r\n\r\ndata: [DONE]\n\nevent: payment-timeout\n'
           b"data: {}\n\n: keep-alive\n\n")
    items = [i for k in range(0, len(raw), 7) for i in f.feed(raw[k:k + 7])]  # split anywhere, even inside \r\n
    assert items[0] == b'data: {"a":1}\n\n' and items[2] == b'data: {"b":2}\n\n'
    assert isinstance(items[1], NeedVoucher) and items[1].required_cumulative == 7
    assert f.payloads == [b'{"a":1}', b'{"b":2}', b"[DONE]"] and f.done_block == b"data: [DONE]\n\n"
    assert f.timed_out


def test_a_node_asking_for_more_than_the_request_can_cost_is_not_paid(client: Client) -> None:
    """A lying node's payment-need-voucher beyond spent-at-admission + max_tokens x price is refused."""
    import json

    from dcml.client.sdk.transport import Exchange
    from dcml.client.wire.x402 import NeedVoucher

    client.chat([{"role": "user", "content": "open the channel"}], MODEL, max_tokens=3)
    (ch,) = client.channels()
    exchange = Exchange(request_body=json.dumps({"model": MODEL, "max_tokens": 10}).encode(), model=MODEL,
                        channel_id=ch.channel_id, spent_at_admission=ch.spent)
    client._live[ch.channel_id].inflight = 1
    exchange.alone_epoch = client._live[ch.channel_id].epoch  # what on_admitted marks: alone on the channel since
    honest = NeedVoucher(channelId=ch.channel_id, spent=ch.spent, requiredCumulative=ch.spent + 10 * PRICE_OUT)
    assert client.on_need_voucher(honest, exchange).cumulative_amount == ch.spent + 10 * PRICE_OUT
    greedy = NeedVoucher(channelId=ch.channel_id, spent=ch.spent, requiredCumulative=ch.spent + 11 * PRICE_OUT)
    with pytest.raises(ReceiptViolation, match="overcharge"):
        client.on_need_voucher(greedy, exchange)
    assert client.store.highest_voucher(ch.channel_id)[0] == ch.spent + 10 * PRICE_OUT
    assert [v.reason for v in client.violations()] == ["overcharge"]


def test_a_voucher_the_node_already_holds_better_is_not_an_error() -> None:
    """A concurrent stream's higher voucher can reach the node first: ours then reads as a stale voucher
    (`not_increasing`) or a release below what was served (`bad_release`), adds nothing, and must not kill the
    stream. Any other refusal is raised."""
    from dcml.client.sdk.envelope import voucher_answer
    from dcml.client.sdk.transport import PaymentRejected

    for code in ("not_increasing", "bad_release"):
        assert voucher_answer(402, b'{"error":{"code":"%s","message":"m"}}' % code.encode()) is None
    with pytest.raises(PaymentRejected, match="exceeds_deposit"):
        voucher_answer(402, b'{"error":{"code":"exceeds_deposit","message":"m"}}')
