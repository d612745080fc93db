"""SLACourt against a real anvil: Proof of Response and broken-terms disputes, signed by client.receipts.

The module runs its own anvil (it moves the chain's clock) and deploys its own NodeRegistry + SLACourt,
bound to the devnet's PaymentChannels escrow.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from eth_account import Account
from web3 import Web3

from dcml.client.chain.devnet import artifact, deploy_contract, dev_accounts
from dcml.client.chain.sla import Broken, DisputeStatus, SLACourtClient, SLAError, Terms, broken_terms
from dcml.client.wire.receipts import (
    Acceptance,
    Receipt,
    ReceiptDomain,
    model_id_for,
    request_hash,
    sign_acceptance,
    sign_receipt,
)
from dcml.node.identity import EnclaveIdentity
from dcml.node.network.registration import ensure_registered
from dcml.node.tee.simulated import SimulatedProvider
from tests.sla_helpers import channel_params, escrow_chain

STAKE = 10**18
BOND = 10**15
MODEL = model_id_for("tiny")
PEER_ID = bytes.fromhex("002408011220") + b"\x11" * 32
TERMS = Terms(max_ttft_ms=2000, min_tokens_per_sec=10, max_duration_ms=60_000, response_window=600,
              breach_cost_bps=20_000, breach_fixed=10**16, no_response_compensation=5 * 10**16)


@pytest.fixture(scope="module")
def env() -> Iterator[dict]:
    with escrow_chain() as (w3, escrow):
        accounts = dev_accounts()
        deployer, operator, client = accounts["deployer"], accounts["node"], accounts["client"]
        registry = deploy_contract(w3, deployer, "NodeRegistry", "0x" + "00" * 20, STAKE, 3600, 600, deployer.address)
        court = deploy_contract(w3, deployer, "SLACourt", registry, escrow, BOND)
        reg = w3.eth.contract(address=registry, abi=artifact("NodeRegistry")["abi"])
        reg.functions.setSlasher(court).transact({"from": deployer.address})
        nodes = []
        for _ in range(2):
            identity = EnclaveIdentity.generate()
            ensure_registered(w3, registry, identity, SimulatedProvider(), operator, endpoint="https://n.example",
                              peer_id=PEER_ID, stake=STAKE, node_version="test")
            nodes.append(identity.account)
        sla = SLACourtClient(w3, court)
        for n in nodes:
            sla.publish_terms(operator, n.address, MODEL, TERMS)
        _travel(w3, 2 * 3600)
        params = channel_params(client.address, operator.address)
        yield dict(w3=w3, sla=sla, reg=reg, node=nodes[0], other=nodes[1], client=client, operator=operator,
                   escrow=escrow, params=params, channel="0x" + params.channel_id(escrow, w3.eth.chain_id).hex(),
                   thief=accounts["client2"])


def _travel(w3: Web3, seconds: int) -> None:
    w3.provider.make_request("evm_increaseTime", [seconds])
    w3.provider.make_request("evm_mine", [])


def _now(w3: Web3) -> int:
    return w3.eth.get_block("latest")["timestamp"]


def _stake(env: dict, node) -> int:
    return env["reg"].functions.getNode(node.address).call()[6]


def _receipt(env: dict, body: bytes, **kw) -> Receipt:
    fields = dict(receiptId="0x" + "01" * 32, requestHash=request_hash(body), responseHash="0x" + "02" * 32,
                  channelId=env["channel"], modelId=MODEL, inputTokens=5, outputTokens=101, cost=10**15,
                  cumulativeSpent=10**15, acceptedAt=_now(env["w3"]) - 5, ttftMs=400, durationMs=5400)
    return Receipt(**{**fields, **kw})


def _acceptance(env: dict, body: bytes) -> Acceptance:
    now = _now(env["w3"])
    return Acceptance(requestHash=request_hash(body), channelId=env["channel"], acceptedAt=now, deadline=now + 300)


def test_digests_match_the_contract(env: dict) -> None:
    from dcml.client.wire.receipts import acceptance_digest, receipt_digest
    sla = env["sla"]
    r, a = _receipt(env, b"d"), _acceptance(env, b"d")
    from dcml.client.chain.sla import acceptance_tuple, receipt_tuple
    assert receipt_digest(r, sla.domain) == bytes(sla.contract.functions.hashReceipt(receipt_tuple(r)).call())
    assert acceptance_digest(a, sla.domain) == bytes(sla.contract.functions.hashAcceptance(
        acceptance_tuple(a)).call())


def test_answering_node_closes_the_dispute_and_keeps_its_stake(env: dict) -> None:
    sla, node, client, operator = env["sla"], env["node"], env["client"], env["operator"]
    acc = sign_acceptance(_acceptance(env, b"answered"), node, sla.domain)
    _travel(env["w3"], 301)
    before = _stake(env, node)
    dispute_id = sla.open_no_response(client, node.address, MODEL, env["params"], acc)
    assert sla.dispute(dispute_id).status == DisputeStatus.OPEN
    receipt = sign_receipt(_receipt(env, b"answered"), node, sla.domain)
    sla.answer(operator, dispute_id, receipt)
    assert sla.dispute(dispute_id).status == DisputeStatus.ANSWERED
    _travel(env["w3"], 3600)
    with pytest.raises(SLAError, match="DisputeNotOpen"):
        sla.finalize(client, dispute_id)
    assert _stake(env, node) == before
    assert sla.events("DisputeAnswered")[-1]["answeredBy"] == operator.address


def test_silent_node_is_slashed_to_the_wei(env: dict) -> None:
    sla, node, client, w3 = env["sla"], env["node"], env["client"], env["w3"]
    acc = sign_acceptance(_acceptance(env, b"silent"), node, sla.domain)
    _travel(w3, 301)
    dispute_id = sla.open_no_response(client, node.address, MODEL, env["params"], acc)
    with pytest.raises(SLAError, match="WindowOpen"):
        sla.finalize(client, dispute_id)
    _travel(w3, 601)
    stake, balance = _stake(env, node), w3.eth.get_balance(client.address)
    tx = sla.finalize(client, dispute_id)
    gas = tx["gasUsed"] * tx["effectiveGasPrice"]
    assert _stake(env, node) == stake - TERMS.no_response_compensation
    # ETH stake: compensation + bond back, minus the finalize gas, to the wei
    assert w3.eth.get_balance(client.address) == balance + TERMS.no_response_compensation + BOND - gas
    assert sla.dispute(dispute_id).status == DisputeStatus.FINALIZED


def test_ttft_breach_compensated_once(env: dict) -> None:
    sla, node, client = env["sla"], env["node"], env["client"]
    r = _receipt(env, b"slow-first-token", ttftMs=2500, durationMs=7500)
    assert broken_terms(TERMS, r) == Broken.TTFT and sla.check_receipt(node.address, r) == Broken.TTFT
    signed = sign_receipt(r, node, sla.domain)
    before = _stake(env, node)
    sla.claim_breach(client, node.address, env["params"], signed)
    assert _stake(env, node) == before - TERMS.compensation(r)
    assert sla.breach_claimed(node.address, r.request_hash)
    with pytest.raises(SLAError, match="AlreadyClaimed"):
        sla.claim_breach(client, node.address, env["params"], signed)


def test_forgeries_are_refused_on_chain(env: dict) -> None:
    sla, node, other, client = env["sla"], env["node"], env["other"], env["client"]
    r = _receipt(env, b"forged", ttftMs=9000)
    good = sign_receipt(r, node, sla.domain)
    altered = good.model_copy(update={"receipt": r.model_copy(update={"cost": r.cost * 100})})
    with pytest.raises(SLAError, match=r"WrongSigner|InvalidSignature"):
        sla.claim_breach(client, node.address, env["params"], altered)
    with pytest.raises(SLAError, match="WrongSigner"):
        sla.claim_breach(client, node.address, env["params"], sign_receipt(r, other, sla.domain))
    with pytest.raises(SLAError, match="WrongSigner"):
        sla.claim_breach(client, node.address, env["params"], sign_receipt(r, node, ReceiptDomain(1, sla.address)))
    with pytest.raises(SLAError, match="WrongSigner"):
        sla.claim_breach(client, node.address, env["params"], sign_receipt(r, Account.create(), sla.domain))
    acc = _acceptance(env, b"forged-acc")
    _travel(env["w3"], 301)
    signed = sign_acceptance(acc, node, sla.domain)
    tampered = signed.model_copy(update={"acceptance": acc.model_copy(update={"deadline": acc.deadline - 1})})
    for bad in (tampered, sign_acceptance(acc, other, sla.domain),
                sign_acceptance(acc, node, ReceiptDomain(1, sla.address))):
        with pytest.raises(SLAError, match=r"WrongSigner|InvalidSignature"):
            sla.open_no_response(client, node.address, MODEL, env["params"], bad)
    assert not sla.breach_claimed(node.address, r.request_hash)


def test_channel_id_matches_the_escrow(env: dict) -> None:
    sla, w3, params = env["sla"], env["w3"], env["params"]
    escrow = w3.eth.contract(address=env["escrow"], abi=artifact("PaymentChannels")["abi"])
    assert sla.escrow() == env["escrow"]
    expected = params.channel_id(env["escrow"], w3.eth.chain_id)
    assert sla.channel_id_of(params) == expected == bytes(escrow.functions.channelIdOf(params.as_struct()).call())


def test_copied_claims_are_refused_and_the_payer_is_paid(env: dict) -> None:
    sla, node, client, thief, w3 = env["sla"], env["node"], env["client"], env["thief"], env["w3"]
    signed = sign_receipt(_receipt(env, b"copied", ttftMs=3000), node, sla.domain)
    # a mempool watcher replays the client's exact claim: not the payer
    with pytest.raises(SLAError, match="NotPayer"):
        sla.claim_breach(thief, node.address, env["params"], signed)
    # or names itself payer: the channel id no longer matches the one the node signed
    with pytest.raises(SLAError, match="ChannelMismatch"):
        sla.claim_breach(thief, node.address, channel_params(thief.address, env["operator"].address), signed)
    acc = sign_acceptance(_acceptance(env, b"copied-open"), node, sla.domain)
    _travel(w3, 301)
    with pytest.raises(SLAError, match="NotPayer"):
        sla.open_no_response(thief, node.address, MODEL, env["params"], acc)
    balance = w3.eth.get_balance(client.address)
    tx = sla.claim_breach(client, node.address, env["params"], signed)
    paid = sla.events("BreachCompensated")[-1]
    assert paid["disputer"] == client.address
    assert w3.eth.get_balance(client.address) == balance + paid["amount"] - tx["gasUsed"] * tx["effectiveGasPrice"]
    dispute_id = sla.open_no_response(client, node.address, MODEL, env["params"], acc)
    assert sla.dispute(dispute_id).disputer == client.address
