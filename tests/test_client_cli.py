"""`dcml` through typer's CliRunner with --json, against a real paid node and anvil."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from eth_account import Account
from typer.testing import CliRunner
from web3 import Web3

from dcml.client.chain.contracts import contract
from dcml.client.chain.deployment import Deployment
from dcml.client.chain.tx import send
from dcml.client.demo.kit.nodes import MODEL, PaidNode, start_paid_node
from dcml.client.sdk.cli import app

runner = CliRunner()


@pytest.fixture(scope="module")
def node(w3: Web3, deployment_file: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[PaidNode]:
    paid = start_paid_node(w3, deployment_file, tmp_path_factory.mktemp("node"), prepay_tokens=0)
    yield paid
    paid.server.stop()


@pytest.fixture
def dcml(w3: Web3, deployment: Deployment, deployment_file: Path, tmp_path: Path):
    wallet = Account.create()
    w3.provider.make_request("anvil_setBalance", [wallet.address, hex(10**20)])
    donor = Account.from_key(deployment.accounts["client"].private_key)
    send(w3, donor, contract(w3, "TestToken", deployment.token).functions.transfer(wallet.address, 10**19),
         action="fund")
    env = {"DCML_WALLET_KEY": "0x" + bytes(wallet.key).hex()}
    base = ["--deployment", str(deployment_file), "--store", str(tmp_path / "spend.sqlite"), "--allow-simulated"]

    def run(*args: str, ok: bool = True, human: bool = False):
        result = runner.invoke(app, [*base, *([] if human else ["--json"]), *args], env=env)
        assert (result.exit_code == 0) == ok, result.output
        return result if human else json.loads(result.stdout.strip().splitlines()[-1])

    return run


def test_attest_chat_channels_receipts(dcml, node: PaidNode) -> None:
    attested = dcml("node", "attest", node.url)
    assert attested["signing_address"] == node.identity.address and attested["simulated"]

    answer = dcml("chat", "--node", node.url, "--model", MODEL, "--max-tokens", "6", "hello")
    assert answer["text"] and int(answer["cost"]) > 0 and answer["receipt_id"] and answer["sla_broken"] == []
    assert answer["sealed"] is True  # end to end by default (issue 19, finding 12)

    (ch,) = dcml("channel", "list", "--chain")
    assert ch["channel_id"] == answer["channel_id"] and ch["payee"] == node.identity.address
    assert int(ch["spent"]) == int(answer["cost"]) and ch["finalized"] is False

    (rec,) = dcml("receipts", "list")
    assert rec["receipt_id"] == answer["receipt_id"] and rec["cost"] == answer["cost"]
    verified = dcml("receipts", "verify")
    assert verified == {"receipts": [{"receipt_id": rec["receipt_id"], "ok": True, "problem": None}],
                        "violations": 0}

    topped = dcml("channel", "topup", ch["channel_id"], "1000")
    assert int(topped["deposit"]) == int(ch["deposit"]) + 1000
    closing = dcml("channel", "close", ch["channel_id"])
    assert closing["status"] == "closing"
    # The node settles and refunds on the payer's request; withdraw then only claims the refund.
    payments = node.app.state.node.gate.payments
    payments.chain.sync(max_age=0.0)  # the index sees the close request now, not at its next poll
    payments.worker.run_once()
    done = dcml("channel", "withdraw", ch["channel_id"])
    assert done["status"] == "closed"
    (after,) = dcml("channel", "list", "--chain")
    assert after["finalized"] is True and int(after["onchain_settled"]) == int(answer["cost"])


def test_channel_open_and_readable_errors(dcml, node: PaidNode, tmp_path: Path) -> None:
    opened = dcml("channel", "open", "--node", node.url, "--model", MODEL, "--deposit", "12345")
    assert opened["deposit"] == "12345" and opened["status"] == "open"
    err = dcml("channel", "open", "--node", node.url, "--model", MODEL, "--max-price", "1", ok=False)
    assert err["type"] == "UntrustedTerms" and "max_price_per_token" in err["error"]
    err = dcml("channel", "close", "0x" + "00" * 32, ok=False)
    assert "dcml channel list" in err["error"]
    # Expected failures are one readable line, no traceback.
    result = runner.invoke(app, ["--store", str(tmp_path / "x.sqlite"), "node", "attest", node.url], env={})
    assert result.exit_code == 1 and "allow_simulated" in result.output and "Traceback" not in result.output
    result = runner.invoke(app, ["--store", str(tmp_path / "x.sqlite"), "channel", "list"], env={})
    assert result.exit_code == 1 and "DCML_WALLET_KEY" in result.output and "Traceback" not in result.output


def test_chat_streams_to_the_terminal(dcml, node: PaidNode) -> None:
    result = dcml("chat", "--node", node.url, "--model", MODEL, "--max-tokens", "25", "tell me", human=True)
    assert "paid" in result.stderr and "verified" in result.stderr
    assert len(result.stdout.split()) >= 20  # the streamed words
    (rec,) = dcml("receipts", "list")
    assert rec["output_tokens"] == "25"  # a decimal string, as every uint in --json


def test_disputes_after_an_answered_chat(dcml, node: PaidNode) -> None:
    dcml("chat", "--node", node.url, "--model", MODEL, "--max-tokens", "3", "hi")
    # the acceptance was kept and matched with its receipt; the node published no terms to break
    assert dcml("disputes", "list") == []
    assert dcml("disputes", "open") == [] and dcml("disputes", "finalize") == []
    assert "no claims or disputes yet" in dcml("disputes", "list", human=True).stdout
