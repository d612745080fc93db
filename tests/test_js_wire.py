"""A second language verifies our wire: `tests/js/check_wire.mjs` (Node.js + ethers, installed by `make setup`)
pays a real node on anvil with a voucher above 2**53, fetches the receipt with plain fetch().json(), verifies
its signature against the attested address, recomputes its hashes, and posts a voucher the node accepts."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
from eth_account import Account

from dcml.client.chain.channel import ChannelClient
from dcml.client.demo.kit.nodes import MODEL, start_paid_node
from dcml.client.wire.receipts import model_id_for

JS = Path(__file__).parent / "js"


@pytest.fixture
def node(w3, deployment, tmp_path):
    path = tmp_path / "deployment.json"
    deployment.save(path)
    paid = start_paid_node(w3, path, tmp_path / "node")
    yield paid
    paid.server.stop()


def test_javascript_verifies_a_receipt_and_signs_an_accepted_voucher(w3, deployment, payer, node) -> None:
    node_bin = shutil.which("node")
    assert node_bin, "Node.js is required (it is already needed for Foundry)"
    assert (JS / "node_modules" / "ethers").is_dir(), "run `make setup` (npm ci in tests/js)"
    session = Account.create()
    channels = ChannelClient(w3, deployment, payer)
    channel_id = channels.open(node.identity.address, 10**17, session_key=session.address,
                               model_id=bytes.fromhex(model_id_for(MODEL)[2:]))
    env = {**os.environ, "NODE_URL": node.url, "CHAIN_ID": str(deployment.chain_id),
           "ESCROW": deployment.payment_channels, "SLA_COURT": deployment.sla_court,
           "SESSION_KEY": "0x" + session.key.hex().removeprefix("0x"), "CHANNEL_ID": "0x" + channel_id.hex(),
           "EXPECTED_SIGNER": node.identity.address, "MODEL": MODEL}
    done = subprocess.run([node_bin, "check_wire.mjs"], cwd=JS, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr + done.stdout
    result = json.loads(done.stdout.strip().splitlines()[-1])
    balance = node.ledger.get("0x" + channel_id.hex())
    assert balance.accepted == int(result["accepted"]) > 2**53  # the node holds the JS voucher to the wei
    assert balance.spent == int(result["cumulativeSpent"])
