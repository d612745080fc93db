"""SlaWatcher against a real anvil: a node that answered is challenged (even before its receipt was stored),
the watcher posts its receipt."""

from __future__ import annotations

import logging
import time

from dcml.client.chain.devnet import artifact, deploy_contract, dev_accounts
from dcml.client.chain.sla import DisputeStatus, SLACourtClient, Terms
from dcml.client.wire.receipts import Acceptance, Receipt, model_id_for, request_hash, sign_acceptance, sign_receipt
from dcml.node.identity import EnclaveIdentity
from dcml.node.network.registration import ensure_registered
from dcml.node.sla.watcher import SlaWatcher
from dcml.node.tee.simulated import SimulatedProvider
from tests.sla_helpers import channel_params, escrow_chain

STAKE = 10**18
BOND = 10**15
MODEL = model_id_for("tiny")
PEER_ID = bytes.fromhex("002408011220") + b"\x11" * 32
WINDOW = 600


def _travel(w3, seconds: int) -> None:
    w3.provider.make_request("evm_increaseTime", [seconds])
    w3.provider.make_request("evm_mine", [])


def test_watcher_answers_a_dispute_against_an_answering_node(caplog) -> None:
    caplog.set_level(logging.INFO, logger="dcml.node.sla.watcher")
    with escrow_chain() as (w3, escrow):
        accounts = dev_accounts()
        deployer, operator, client = accounts["deployer"], accounts["node"], accounts["client"]
        registry = deploy_contract(w3, deployer, "NodeRegistry", "0x" + "00" * 20, STAKE, 3600, 600, deployer.address)
        court = deploy_contract(w3, deployer, "SLACourt", registry, escrow, BOND)
        reg = w3.eth.contract(address=registry, abi=artifact("NodeRegistry")["abi"])
        reg.functions.setSlasher(court).transact({"from": deployer.address})
        identity = EnclaveIdentity.generate()
        ensure_registered(w3, registry, identity, SimulatedProvider(), operator, endpoint="https://n.example",
                          peer_id=PEER_ID, stake=STAKE, node_version="test")
        node = identity.account
        sla = SLACourtClient(w3, court)
        sla.publish_terms(operator, node.address, MODEL,
                          Terms(response_window=WINDOW, no_response_compensation=5 * 10**16))
        _travel(w3, 2 * 3600)

        # the node answered the request and stored its receipt; the client disputes anyway
        params = channel_params(client.address, operator.address)
        channel = "0x" + params.channel_id(escrow, w3.eth.chain_id).hex()
        body = b'{"model":"tiny","messages":[]}'
        now = w3.eth.get_block("latest")["timestamp"]
        receipt = sign_receipt(Receipt(receiptId="0x" + "01" * 32, requestHash=request_hash(body),
                                       responseHash="0x" + "02" * 32, channelId=channel, modelId=MODEL,
                                       inputTokens=5, outputTokens=20, cost=10**12, cumulativeSpent=10**12,
                                       acceptedAt=now, ttftMs=100, durationMs=900), node, sla.domain)
        store: dict = {}  # the answer is still streaming: its receipt is stored only after the dispute opens
        lookups: list[str] = []

        def lookup(h: str, channel_id: str):
            assert channel_id == channel
            lookups.append(h)
            return store.get(h)

        acc = sign_acceptance(Acceptance(requestHash=request_hash(body), channelId=channel, acceptedAt=now,
                                         deadline=now + 300), node, sla.domain)
        watcher = SlaWatcher(w3, court, node.address, lookup, operator, interval_s=0.1,
                             from_block=w3.eth.block_number)
        watcher.start()
        try:
            _travel(w3, 301)
            stake_before = reg.functions.getNode(node.address).call()[6]
            opened_at = w3.eth.get_block("latest")["timestamp"]
            dispute_id = sla.open_no_response(client, node.address, MODEL, params, acc)
            answer_by = sla.dispute(dispute_id).answer_by
            assert answer_by >= opened_at + WINDOW
            while len(lookups) < 3:  # polled, found no receipt yet, kept watching
                time.sleep(0.05)
            assert sla.dispute(dispute_id).status == DisputeStatus.OPEN
            store[receipt.receipt.request_hash] = receipt
            deadline = time.monotonic() + 20
            while sla.dispute(dispute_id).status == DisputeStatus.OPEN and time.monotonic() < deadline:
                time.sleep(0.1)
        finally:
            watcher.stop()

        assert sla.dispute(dispute_id).status == DisputeStatus.ANSWERED
        assert watcher.answered == [dispute_id]
        assert set(lookups) == {receipt.receipt.request_hash}
        answered = sla.events("DisputeAnswered")[-1]
        assert answered["answeredBy"] == operator.address
        # well inside the window: the answer's block is seconds after the dispute, not minutes
        block = w3.eth.get_block(sla.contract.events.DisputeAnswered().get_logs(from_block=0)[-1]["blockNumber"])
        assert block["timestamp"] <= opened_at + 60 < answer_by
        # the dispute is closed for good and no stake moved
        _travel(w3, WINDOW + 1)
        assert reg.functions.getNode(node.address).call()[6] == stake_before == STAKE
        assert watcher.poll_once() == 0
        assert any("answered with receipt" in r.getMessage() for r in caplog.records)
