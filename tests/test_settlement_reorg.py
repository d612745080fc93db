"""Settlement that cannot be blocked (issue 12, item 6): channels are trusted only after the configured
confirmations; an opening reorganised away (anvil evm_snapshot / evm_revert) gets no more vouchers, and its
failure to settle is logged with its reason, backed off, and blocks no other channel, at a flush included."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from web3 import Web3

from dcml.client.chain.deployment import Deployment
from dcml.client.demo.kit.nodes import PaidNode, funded_wallet, start_paid_node
from dcml.client.demo.kit.raw_payer import RawPayer


@pytest.fixture(scope="module")
def node(w3: Web3, deployment_file: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[PaidNode]:
    paid = start_paid_node(w3, deployment_file, tmp_path_factory.mktemp("node"), prepay_tokens=0, credit_tokens=4,
                           confirmations=2, settle_interval_s=0.2)
    yield paid
    paid.server.stop()


def mine(w3: Web3, blocks: int = 1) -> None:
    for _ in range(blocks):
        w3.provider.make_request("evm_mine", [])


def code(response) -> str:
    return response.json()["error"]["code"]


def test_unconfirmed_opening_is_refused_then_trusted(node: PaidNode, w3: Web3, deployment: Deployment) -> None:
    payer = RawPayer(w3, deployment, funded_wallet(w3, deployment), node.url, node.identity.address)
    r = payer.post_voucher(10**15)  # the opening is mined (1 confirmation) but 2 are required
    assert r.status_code == 402 and code(r) == "channel_unconfirmed"
    mine(w3)
    assert payer.post_voucher(10**15).status_code == 200


def test_reorganised_opening_refused_and_other_channels_still_settle(
        node: PaidNode, w3: Web3, deployment: Deployment, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.ERROR, logger="dcml.settlement")
    good = RawPayer(w3, deployment, funded_wallet(w3, deployment), node.url, node.identity.address)
    mine(w3)
    assert good.ask("a confirmed channel", max_tokens=6, stream=False).status == 200

    doomed_wallet = funded_wallet(w3, deployment)
    snapshot = w3.provider.make_request("evm_snapshot", [])["result"]
    doomed = RawPayer(w3, deployment, doomed_wallet, node.url, node.identity.address)
    mine(w3, 2)
    assert doomed.ask("a channel about to vanish", max_tokens=6, stream=False).status == 200
    doomed_id = "0x" + doomed.channel_id.hex()
    assert node.ledger.get(doomed_id).accepted > 0
    assert w3.provider.make_request("evm_revert", [snapshot])["result"] is True  # the opening is gone

    # The worker re-reads open channels every round: soon the node refuses vouchers on the vanished channel.
    deadline = time.monotonic() + 10
    while (r := doomed.post_voucher(doomed.cumulative + 10**12)).status_code == 200:
        assert time.monotonic() < deadline, "vouchers on a reorganised-away channel are still accepted"
        time.sleep(0.2)
    assert r.status_code == 402 and code(r) == "unknown_channel"

    worker = node.app.state.node.gate.payments.worker
    worker.run_once(flush=True)  # what a shutdown does: every channel it can
    good_id = "0x" + good.channel_id.hex()
    assert good.channels.get(good.channel_id).settled == node.ledger.get(good_id).accepted > 0
    assert node.ledger.get(good_id).settled == node.ledger.get(good_id).accepted
    assert worker.failing().get(doomed_id, 0) >= 1
    logged = [rec.getMessage() for rec in caplog.records if doomed_id in rec.getMessage()]
    assert logged and "ChannelGone" in logged[-1] and "reorganised away" in logged[-1]

    # A later channel keeps settling although the vanished one still fails every round.
    late = RawPayer(w3, deployment, funded_wallet(w3, deployment), node.url, node.identity.address)
    mine(w3)
    assert late.ask("after the reorg", max_tokens=4, stream=False).status == 200
    worker.run_once(flush=True)
    assert late.channels.get(late.channel_id).settled == node.ledger.get("0x" + late.channel_id.hex()).accepted > 0
