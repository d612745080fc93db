"""Issue 19 attack tests (SLA, registry, credit, settlement), each written as the attacker would play it against a
real node on loopback, real vouchers and the devnet's contracts on anvil.

- trickled body / withheld voucher (finding 1): the receipt's figures measure the node, so no breach is claimable;
- a paid node without SLA terms in force (finding 10) signs no acceptance the court could not judge;
- 1-wei Sybil channels (finding 8): no unpaid output, no gas spent on dust, small deposits refused;
- non-streamed settlement (finding 11): with prepay 0 what is settled equals the receipts;
- a squatted model id (finding 5): the SDK and the node both refuse channels whose royalty goes to a squatter;
- exit during a dispute (finding 6): Foundry tests in contracts/test/SLACourt.exit.t.sol; here, the SDK refuses an
  acceptance whose deadline would outlast the unbonding.
"""

from __future__ import annotations

import json
import time

import httpx
import pytest

from dcml.client.chain.sla import Broken, Terms, broken_terms
from dcml.client.demo.kit.nodes import MODEL, PRICE_IN, PRICE_OUT, serve_node, start_paid_node
from dcml.client.demo.kit.raw_payer import RawPayer
from dcml.client.wire.receipts import parse_sse_stream
from dcml.client.wire.x402 import ACCEPTANCE_HEADER, PAYMENT_SIGNATURE
from dcml.node.engine.synthetic import SyntheticEngine

# The terms of the review's victim node: TTFT 1 s, 3 s per answer, 5 tokens/s.
TERMS = Terms(max_ttft_ms=1000, min_tokens_per_sec=5, max_duration_ms=3000, response_window=600)


def _trickled(body: bytes, pieces: int, pause_s: float):
    step = -(-len(body) // pieces)
    for i in range(0, len(body), step):
        yield body[i:i + step]
        time.sleep(pause_s)


def test_trickled_body_does_not_count_against_the_nodes_ttft(w3, deployment, deployment_file, payer, tmp_path):
    node = start_paid_node(w3, deployment_file, tmp_path / "node")
    try:
        client = RawPayer(w3, deployment, payer, node.url, node.identity.address)
        body = json.dumps({"model": MODEL, "prompt": "a b c d", "max_tokens": 4, "stream": True}).encode()
        voucher = client.voucher(4 * PRICE_IN + 8 * PRICE_OUT).to_header()
        started = time.monotonic()
        with httpx.stream("POST", f"{node.url}/v1/completions", content=_trickled(body, 6, 0.3), timeout=30,
                          headers={"content-type": "application/json", PAYMENT_SIGNATURE: voucher}) as r:
            raw = r.read()
        wall_ms = 1000 * (time.monotonic() - started)
        assert r.status_code == 200, raw
        _, signed = parse_sse_stream(raw)
        receipt = signed.receipt
        assert wall_ms > 1500  # the client took its time sending the body...
        assert receipt.ttft_ms < 500 and receipt.duration_ms < 500  # ...which the node's figures leave out
        assert broken_terms(TERMS, receipt) == Broken(0)  # so the court has nothing to compensate
    finally:
        node.server.stop()


def test_body_that_never_finishes_gets_408(w3, deployment_file, tmp_path):
    from dcml.node.api.app import create_app
    from dcml.node.api.server import BackgroundServer
    from dcml.node.config import load_settings
    from dcml.node.identity import EnclaveIdentity
    from dcml.node.tee.simulated import SimulatedProvider

    settings = load_settings(None, data_dir=tmp_path / "free", limits={"body_read_timeout_s": 0.5},
                             engine={"kind": "synthetic", "served_model_name": MODEL, "model_dir": None})
    server = BackgroundServer(create_app(settings, engine=SyntheticEngine(model_name=MODEL),
                                         identity=EnclaveIdentity.generate(), provider=SimulatedProvider())).start()
    try:
        body = json.dumps({"model": MODEL, "prompt": "a b", "max_tokens": 2}).encode()
        r = httpx.post(f"{server.url}/v1/completions", content=_trickled(body, 4, 0.4), timeout=30,
                       headers={"content-type": "application/json"})
        assert r.status_code == 408 and r.json()["error"]["code"] == "body_timeout"
    finally:
        server.stop()


def test_withheld_voucher_does_not_count_against_the_nodes_duration_or_rate(w3, deployment, deployment_file, payer,
                                                                            tmp_path):
    # 40 tokens at 100 tokens/s: 0.4 s of decoding, well inside the terms, with two voucher pauses on the way.
    engine = SyntheticEngine(model_name=MODEL, tokens_per_second=100)
    node = start_paid_node(w3, deployment_file, tmp_path / "node", engine=engine, prepay_tokens=0, credit_tokens=16,
                           voucher_timeout_s=5)
    try:
        client = RawPayer(w3, deployment, payer, node.url, node.identity.address)
        post = client.post_voucher
        held = []

        def withhold(cumulative: int):  # the attacker pays each voucher as late as the node allows
            held.append(cumulative)
            time.sleep(1.0)
            return post(cumulative)

        client.post_voucher = withhold
        started = time.monotonic()
        answer = client.ask("a b c d", max_tokens=40)
        wall_ms = 1000 * (time.monotonic() - started)
        assert answer.status == 200 and not answer.timed_out
        receipt = answer.receipt.receipt
        assert receipt.output_tokens == 40 and len(held) >= 2
        assert wall_ms > 1000 * len(held)  # the stream really waited for the attacker
        assert receipt.duration_ms < 2000  # but the receipt signs only the node's own time
        assert broken_terms(TERMS, receipt) == Broken(0)
    finally:
        node.server.stop()


def test_no_acceptance_is_signed_without_terms_in_force(w3, deployment, deployment_file, payer, tmp_path):
    """Finding 10: a paid node with [sla] off (or before its terms' validFrom) signed acceptances under the court's
    domain that the court cannot judge (`openNoResponse` reverts NoTerms): it must sign none."""
    node = start_paid_node(w3, deployment_file, tmp_path / "node")  # [sla] off, as by default
    try:
        client = RawPayer(w3, deployment, payer, node.url, node.identity.address)
        gate = node.app.state.node.gate
        for stream in (True, False):
            answer = client.ask("no terms here", max_tokens=3, stream=stream)
            assert answer.status == 200 and ACCEPTANCE_HEADER.lower() not in answer.headers
        gate.terms_in_force_from[MODEL] = int(time.time()) + 3600  # published, not yet in force
        answer = client.ask("not yet", max_tokens=3)
        assert answer.status == 200 and ACCEPTANCE_HEADER.lower() not in answer.headers
        gate.terms_in_force_from[MODEL] = int(time.time()) - 1  # in force: the promise is judgeable, so made
        answer = client.ask("now", max_tokens=3)
        assert answer.status == 200 and ACCEPTANCE_HEADER.lower() in answer.headers
    finally:
        node.server.stop()


def _wallet(w3, deployment):
    """A fresh payer with gas and tokens (channels and balances never mix between tests)."""
    from eth_account import Account

    from dcml.client.chain.contracts import contract
    from dcml.client.chain.tx import send

    acct = Account.create()
    w3.provider.make_request("anvil_setBalance", [acct.address, hex(10**20)])
    donor = Account.from_key(deployment.accounts["client"].private_key)
    send(w3, donor, contract(w3, "TestToken", deployment.token).functions.transfer(acct.address, 10**19),
         action="fund")
    return acct


def test_sybil_one_wei_channel_gets_nothing_unpaid_and_costs_the_node_no_gas(w3, deployment, deployment_file,
                                                                           tmp_path):
    """Finding 8: a 1-wei channel, a 1-wei voucher and an empty prompt got 32 output tokens unpaid, and the node then
    spent ~47.6k gas settling the 1 wei. Credit is now earned (never more than the channel paid) and dust is never
    settled."""
    node = start_paid_node(w3, deployment_file, tmp_path / "node", prepay_tokens=0, credit_tokens=32,
                           min_settle_value=10**15)
    try:
        sybil = RawPayer(w3, deployment, _wallet(w3, deployment), node.url, node.identity.address, deposit=1)
        body = json.dumps({"model": MODEL, "prompt": "", "max_tokens": 32, "stream": True}).encode()
        headers = {"content-type": "application/json", PAYMENT_SIGNATURE: sybil.voucher(1).to_header()}
        r = httpx.post(f"{node.url}/v1/completions", content=body, headers=headers, timeout=30)
        assert r.status_code == 402  # the first token must be paid: a 1-wei channel has earned no credit
        balance = node.ledger.get("0x" + sybil.channel_id.hex())
        assert balance is None or balance.spent <= balance.accepted  # nothing served unpaid
        # A payer who pays what is asked, then stops paying, gets at most as much unpaid as it paid.
        payer = RawPayer(w3, deployment, _wallet(w3, deployment), node.url, node.identity.address)
        answer = payer.ask("a", max_tokens=200, pay_mid_stream=False)
        assert answer.status == 200 and answer.timed_out
        b = node.ledger.get("0x" + payer.channel_id.hex())
        assert b.spent == answer.receipt.receipt.cost and b.spent - b.accepted <= b.accepted
        # The 1-wei voucher is dust: the node spends no gas on it, not even at shutdown.
        dust = RawPayer(w3, deployment, _wallet(w3, deployment), node.url, node.identity.address, deposit=10)
        assert dust.post_voucher(1).status_code == 200
        gate = node.app.state.node.gate
        actions = gate.payments.worker.run_once(flush=True)
        assert "0x" + dust.channel_id.hex() not in {a.channel_id for a in actions}
        assert dust.channels.get(dust.channel_id).settled == 0
    finally:
        node.server.stop()


def test_channels_below_the_minimum_deposit_are_refused(w3, deployment, deployment_file, tmp_path):
    node = start_paid_node(w3, deployment_file, tmp_path / "node", min_deposit=10**16)
    try:
        small = RawPayer(w3, deployment, _wallet(w3, deployment), node.url, node.identity.address, deposit=10**16 - 1)
        answer = small.ask("a b", max_tokens=4)
        assert answer.status == 402 and "deposit_too_small" in answer.raw.decode()
        big = RawPayer(w3, deployment, _wallet(w3, deployment), node.url, node.identity.address, deposit=10**16)
        assert big.ask("a b", max_tokens=4).status == 200
    finally:
        node.server.stop()


def test_non_streamed_settlement_equals_the_receipts(w3, deployment, deployment_file, tmp_path):
    """Finding 11: a non-streamed request reserves max_tokens in the voucher; answers that stop early left the
    reservation to be settled (1.92e15 settled against 1.56e15 of receipts). The SDK now re-signs down to the
    receipts after each answer and the node settles that release: with prepay 0, settled == receipts."""
    from dcml.client.sdk.client import Client

    node = start_paid_node(w3, deployment_file, tmp_path / "node", prepay_tokens=0, credit_tokens=4)
    try:
        with Client(node.url, _wallet(w3, deployment), deployment=deployment, allow_simulated=True, w3=w3,
                    store=tmp_path / "spend.sqlite", deposit=10**17) as client:
            for i in range(3):  # each stops after its first token, far below max_tokens
                r = client.chat([{"role": "user", "content": f"short {i}"}], MODEL, max_tokens=40, stop=[" "])
                assert r.receipt.receipt.output_tokens < 40
            s = client.chat([{"role": "user", "content": "then a stream"}], MODEL, max_tokens=10, stream=True)
            "".join(s)
            r = client.complete("and a last one", MODEL, max_tokens=30, stop=[" "])
            receipts = client.receipts()
            total = sum(x.cost for x in receipts)
            assert receipts[-1].cumulative_spent == total and client.violations() == []
            (ch,) = client.channels()
            assert ch.accepted > total  # it did reserve more than the answers used...
            node.app.state.node.gate.payments.worker.run_once(flush=True)
            assert client.channel_state(ch.channel_id).settled == total  # ...and only the receipts were settled
    finally:
        node.server.stop()


def test_a_release_covers_what_was_served_and_a_higher_voucher_supersedes_it(tmp_path):
    from dcml.node.payments.ledger import ChargeOp, Ledger, LedgerConflict, ReleaseOp, VoucherOp

    ledger, cid = Ledger(tmp_path / "ledger.sqlite"), "0x" + "ab" * 32
    ledger.apply_groups([[VoucherOp(cid, 1000, "0xhigh"), ChargeOp(cid, 300)]])
    for bad in (299, 1000, 1200):  # below what was served; not below the accepted voucher
        (result,) = ledger.apply_groups([[ReleaseOp(cid, bad, "0xr")]])
        assert isinstance(result, LedgerConflict)
    ledger.apply_groups([[ReleaseOp(cid, 300, "0xexact")]])
    assert ledger.get(cid).settle_target == (300, "0xexact")
    ledger.apply_groups([[ChargeOp(cid, 50)]])  # served past the release: the full voucher is owed again
    assert ledger.get(cid).settle_target == (1000, "0xhigh")
    ledger.apply_groups([[ReleaseOp(cid, 350, "0xr2")]])
    assert ledger.get(cid).settle_target == (350, "0xr2")
    ledger.apply_groups([[VoucherOp(cid, 2000, "0xnext")]])  # a new reservation supersedes the release
    assert ledger.get(cid).settle_target == (2000, "0xnext")
    (replayed,) = ledger.apply_groups([[ReleaseOp(cid, 1000, "0xhigh")]])  # an old voucher is no release
    assert isinstance(replayed, LedgerConflict) and replayed.reason == "not_increasing"


def test_squatted_model_id_takes_nothing_from_the_node(w3, deployment, deployment_file, tmp_path):
    """Finding 5: ModelRegistry is first come, first served and a model's id is keccak(served name); a squatter
    registered it with a 100 % royalty, the SDK paid whatever the registry showed and the node's gate never looked:
    the node received 0 and the squatter 1.92e15. Now the client's policy and the node's config name the publisher
    and the royalty they accept, and both refuse the squatted channel."""
    from eth_account import Account

    from dcml.client.attestation.verify import ModelTrust, Policy
    from dcml.client.chain.channel import ChannelClient
    from dcml.client.chain.contracts import contract
    from dcml.client.chain.tx import send
    from dcml.client.demo.kit.nodes import paid_settings
    from dcml.client.sdk.client import Client, UntrustedTerms
    from dcml.client.wire.receipts import model_id_for

    served = f"squat-{time.time_ns()}"  # its own model id: the session chain is shared with other tests
    squatter, publisher = Account.create(), Account.create()
    for who in (squatter, publisher):
        w3.provider.make_request("anvil_setBalance", [who.address, hex(10**20)])
    registry = contract(w3, "ModelRegistry", deployment.model_registry)
    send(w3, squatter, registry.functions.register(bytes.fromhex(model_id_for(served)[2:]), 10_000), action="squat")

    settings = paid_settings(deployment_file, tmp_path / "node", prepay_tokens=0)
    price = settings.payments.prices[MODEL].model_copy(update={"publisher": publisher.address,
                                                               "max_royalty_bps": 300})
    settings = settings.model_copy(update={"payments": settings.payments.model_copy(
        update={"prices": {served: price}})})
    node = serve_node(w3, settings, engine=SyntheticEngine(model_name=served))
    server, identity, app = node.server, node.identity, node.app
    try:
        victim = _wallet(w3, deployment)
        # The real SDK, policy naming the real publisher: it refuses to lock money in the squatted id's channel.
        policy = Policy(models={served: ModelTrust(publisher=publisher.address, max_royalty_bps=300)})
        with Client(server.url, victim, deployment=deployment, allow_simulated=True, w3=w3, policy=policy,
                    store=tmp_path / "spend.sqlite", deposit=10**17) as client:
            with pytest.raises(UntrustedTerms, match="squatted"):
                client.chat([{"role": "user", "content": "hi"}], served, max_tokens=4)
            assert client.channels() == []
        # Without a policy entry the SDK pays no royalty at all, so it refuses too.
        with Client(server.url, victim, deployment=deployment, allow_simulated=True, w3=w3,
                    store=tmp_path / "spend2.sqlite", deposit=10**17) as client, \
                pytest.raises(UntrustedTerms, match="10000 bps"):
            client.chat([{"role": "user", "content": "hi"}], served, max_tokens=4)
        # A client that opens the squatted channel anyway is refused by the node: it serves nothing through it,
        # so nothing is ever settled there and the squatter's royalty is 0.
        channels = ChannelClient(w3, deployment, victim)
        session = Account.create()
        cid = channels.open(identity.address, 10**17, session_key=session.address,
                            model_id=bytes.fromhex(model_id_for(served)[2:]))
        body = json.dumps({"model": served, "prompt": "a b", "max_tokens": 4, "stream": True}).encode()
        voucher = channels.sign_voucher(session, cid, 10**15)
        r = httpx.post(f"{server.url}/v1/completions", content=body, timeout=30,
                       headers={"content-type": "application/json", PAYMENT_SIGNATURE: voucher.to_header()})
        assert r.status_code == 402 and "untrusted_publisher" in r.text
        assert app.state.node.gate.payments.ledger.get("0x" + cid.hex()) is None
    finally:
        server.stop()


def test_sdk_refuses_an_acceptance_whose_deadline_outlasts_the_unbonding(w3, deployment, deployment_file, tmp_path):
    """Finding 6, client side: a node that promises a deadline longer than the registry's unbonding delay could
    exit as it accepts and withdraw before a no-response dispute can even be opened; the SDK refuses it."""
    from dcml.client.sdk.client import Client
    from dcml.client.sdk.transport import ReceiptViolation

    unbonding = _unbonding_delay(w3, deployment)
    node = start_paid_node(w3, deployment_file, tmp_path / "node", prepay_tokens=0, response_deadline_s=unbonding)
    node.app.state.node.gate.terms_in_force_from[MODEL] = 0  # as if its SLA terms were in force
    try:
        with Client(node.url, _wallet(w3, deployment), deployment=deployment, allow_simulated=True, w3=w3,
                    store=tmp_path / "spend.sqlite", deposit=10**17) as client:
            with pytest.raises(ReceiptViolation, match="deadline_too_far"):
                client.chat([{"role": "user", "content": "hi"}], MODEL, max_tokens=3)
            assert [v.reason for v in client.violations()] == ["deadline_too_far"]
    finally:
        node.server.stop()


def _unbonding_delay(w3, deployment) -> int:
    from dcml.client.chain.contracts import contract

    return contract(w3, "NodeRegistry", deployment.node_registry).functions.unbondingDelay().call()
