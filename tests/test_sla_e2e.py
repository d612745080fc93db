"""The SLA court end to end: node daemons started as processes (`python -m dcml.node.cli run`, synthetic engine,
registry and SLA on), the SDK and `dcml disputes` as the client, the devnet's SLACourt on a real anvil.

- a node that answered is challenged anyway: its watcher posts the receipt, the dispute closes, no stake moves
  (and a client that hung up mid-stream finds the node's receipt for what was served instead of disputing);
- a node killed after accepting: the client's dispute (not opened while the answer was still streaming) is
  finalized after the window, the node's stake is slashed and the client compensated, to the wei;
- a receipt that breaks the TTFT term: compensated once, the second claim refused; forged and altered receipts
  and acceptances, another key, another chain id: all refused on-chain.

Each test runs its own anvil: the chain's clock is moved past deadlines and windows, and requests must be
accepted (node wall clock) after the terms took effect (chain clock).
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from eth_account import Account
from eth_account.signers.local import LocalAccount
from typer.testing import CliRunner
from web3 import Web3

from dcml.client.chain.channel import find_params
from dcml.client.chain.contracts import contract
from dcml.client.chain.deployment import Deployment
from dcml.client.chain.devnet import SLA_DISPUTE_BOND, Devnet, free_port
from dcml.client.chain.registry import RegistryClient
from dcml.client.chain.sla import Broken, DisputeStatus, SLACourtClient, SLAError
from dcml.client.demo.kit.nodes import MODEL, PRICE_IN, PRICE_OUT, NodeProcess, fund
from dcml.client.sdk.cli import app as cli_app
from dcml.client.sdk.client import Client
from dcml.client.wire.access import auth_header, receipts_resource
from dcml.client.wire.receipts import (
    ReceiptDomain,
    SignedReceipt,
    model_id_for,
    request_hash,
    sign_acceptance,
    sign_receipt,
)
from dcml.node.identity import EnclaveIdentity

REPO = Path(__file__).resolve().parents[1]
MODEL_ID = model_id_for(MODEL)
DEADLINE_S = 10  # the node's acceptances promise an answer within this
WINDOW_S = 600  # the node's response window in the court
NO_RESPONSE = 5 * 10**16
BREACH_FIXED = 10**15


@dataclass
class Chain:
    deployment: Deployment
    file: Path
    w3: Web3
    court: SLACourtClient
    payer: LocalAccount
    operator: LocalAccount

    def travel(self, seconds: int) -> None:
        self.w3.provider.make_request("evm_increaseTime", [seconds])
        self.w3.provider.make_request("evm_mine", [])

    def stake(self, node: str) -> int:
        return RegistryClient(self.w3, self.deployment.node_registry).node(node).stake

    def dusd(self, who: str) -> int:
        return contract(self.w3, "TestToken", self.deployment.token).functions.balanceOf(who).call()


@pytest.fixture
def chain(tmp_path: Path) -> Iterator[Chain]:
    with Devnet() as net:
        dep = net.deployment
        assert dep is not None and dep.sla_court
        path = tmp_path / "deployment.json"
        dep.save(path)
        w3 = Web3(Web3.HTTPProvider(dep.rpc_url, request_kwargs={"timeout": 30}))
        yield Chain(dep, path, w3, SLACourtClient(w3, dep.sla_court),
                    Account.from_key(dep.accounts["client"].private_key),
                    Account.from_key(dep.accounts["node"].private_key))


class SlaNode:
    """`dcml-node run` with registry and SLA on; the operator key comes from the environment."""

    def __init__(self, chain: Chain, data: Path, *, engine: dict, sla: dict) -> None:
        self.identity = EnclaveIdentity.load_or_create_dev_seed(data)  # the process finds and uses this seed
        fund(chain.w3, self.identity.address)
        port = free_port()
        options = "\n".join(f"{k} = {v}" for k, v in engine.items())
        terms = "\n".join(f"{k} = {json.dumps(v)}" for k, v in sla.items())
        config = data.parent / f"{data.name}.toml"
        config.write_text(f"""
data_dir = "{data}"
[server]
port = {port}
graceful_shutdown_s = 2
[logging]
level = "warning"
[engine]
kind = "synthetic"
served_model_name = "{MODEL}"
[engine.options]
{options}
[payments]
enabled = true
deployment = "{chain.file}"
prepay_tokens = 0
credit_tokens = 8
response_deadline_s = {DEADLINE_S}
settle_threshold = 1000000000000000000000000
[payments.prices.{MODEL}]
price_per_input_token = {PRICE_IN}
price_per_output_token = {PRICE_OUT}
[registry]
enabled = true
[sla]
enabled = true
response_window_s = {WINDOW_S}
no_response_compensation = {NO_RESPONSE}
breach_fixed = {BREACH_FIXED}
benchmark_runs = 1
benchmark_max_tokens = 4
watch_interval_s = 0.2
{terms}
""")
        self.process = NodeProcess(config, port, env={"DCML_OPERATOR_KEY": "0x" + bytes(chain.operator.key).hex()})
        self.url, self.proc = self.process.url, self.process.proc
        (terms_v0,) = chain.court.terms_versions(self.identity.address, MODEL_ID)
        while time.time() < terms_v0.valid_from + 1:  # requests must be accepted once the terms are in force
            time.sleep(0.1)

    @property
    def address(self) -> str:
        return self.identity.address

    def kill(self) -> None:
        self.process.kill()

    def stop(self) -> None:
        self.process.stop()


def _client(chain: Chain, node: SlaNode, store: Path) -> Client:
    return Client(node.url, chain.payer, deployment=chain.deployment, allow_simulated=True, w3=chain.w3,
                  store=store, deposit=10**17)


def _dcml(chain: Chain, store: Path, *args: str) -> list[dict]:
    result = CliRunner().invoke(cli_app, ["--deployment", str(chain.file), "--store", str(store), "--json", *args],
                                env={"DCML_WALLET_KEY": "0x" + bytes(chain.payer.key).hex()})
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout.strip().splitlines()[-1])


def _receipt_by_request(node: SlaNode, req: str, channel: str, payer: LocalAccount,
                        timeout: float = 10.0) -> SignedReceipt:
    deadline = time.monotonic() + timeout
    while True:  # for the payer only (client.access)
        r = httpx.get(f"{node.url}/v1/receipts", params={"request_hash": req, "channel_id": channel}, timeout=5,
                      headers=auth_header(payer, node.address, receipts_resource(req, channel)))
        if r.status_code == 200:
            return SignedReceipt.from_json(r.content)
        assert r.status_code == 404 and time.monotonic() < deadline, r.text
        time.sleep(0.1)


def test_answering_node_is_challenged_and_its_watcher_closes_the_dispute(chain: Chain, tmp_path: Path) -> None:
    node = SlaNode(chain, tmp_path / "node", engine={"tokens_per_second": 40}, sla={"max_ttft_ms": 2000})
    store = tmp_path / "client.sqlite"
    try:
        with _client(chain, node, store) as client:
            answered = client.chat([{"role": "user", "content": "answer me"}], MODEL, max_tokens=6)
            assert answered.receipt is not None and answered.sla_broken == Broken.NONE
            # A client that hangs up mid-stream: the node still keeps a receipt for what it served.
            stream = iter(client.chat([{"role": "user", "content": "long one"}], MODEL, max_tokens=400, stream=True))
            assert next(stream) and next(stream)
            stream.close()
            acceptances = {a.request_hash: a for a in client.store.acceptances()}
            assert len(acceptances) == 2
            (hung_up,) = [h for h, a in acceptances.items() if a.receipt_id is None]
            partial = _receipt_by_request(node, hung_up, acceptances[hung_up].channel_id, chain.payer)
            assert 1 <= partial.receipt.output_tokens < 400

            # Past the deadline the client's own remedies find nothing to dispute: it fetches the receipt.
            chain.travel(DEADLINE_S + 5)
            assert [(r.kind, r.status) for r in client.disputes.open_due()] == [("no_response", "received")]
            assert chain.court.events("NoResponseDisputeOpened") == []
            signed_acceptances = [a.signed for a in client.store.acceptances()]
            channel_id = bytes.fromhex(answered.channel_id[2:])

        # A cheating payer disputes both answers anyway: the node's watcher answers with its stored receipts.
        stake = chain.stake(node.address)
        params = find_params(contract(chain.w3, "PaymentChannels", chain.deployment.payment_channels), channel_id,
                             chain_id=chain.deployment.chain_id, from_block=chain.deployment.start_block)
        ids = [chain.court.open_no_response(chain.payer, node.address, MODEL_ID, params, a)
               for a in signed_acceptances]
        deadline = time.monotonic() + 20
        while any(chain.court.dispute(i).status == DisputeStatus.OPEN for i in ids) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert [chain.court.dispute(i).status for i in ids] == [DisputeStatus.ANSWERED] * 2
        answers = chain.court.events("DisputeAnswered")
        assert {a["answeredBy"] for a in answers} == {chain.operator.address}  # the operator took both bonds
        assert {"0x" + bytes(a["receiptId"]).hex() for a in answers} == {answered.receipt.receipt.receipt_id,
                                                                        partial.receipt.receipt_id}
        assert chain.stake(node.address) == stake  # no stake moved
        assert chain.w3.eth.get_balance(chain.court.address) == 0
        chain.travel(WINDOW_S + 1)
        with pytest.raises(SLAError) as refused:
            chain.court.finalize(chain.payer, ids[0])
        assert refused.value.reason == "DisputeNotOpen"
    finally:
        node.stop()


def test_node_killed_after_accepting_is_slashed_and_the_client_compensated_to_the_wei(chain: Chain,
                                                                                        tmp_path: Path) -> None:
    node = SlaNode(chain, tmp_path / "node", engine={"tokens_per_second": 5}, sla={"max_ttft_ms": 2000})
    store = tmp_path / "client.sqlite"
    try:
        with _client(chain, node, store) as client:
            stream = iter(client.chat([{"role": "user", "content": "then die"}], MODEL, max_tokens=100, stream=True))
            assert next(stream)
            (accepted,) = client.store.acceptances()
            assert accepted.receipt_id is None and accepted.node_url == node.url
            chain.travel(DEADLINE_S + 5)
            assert client.disputes.open_due() == []  # still streaming: the node would answer with its receipt
            node.kill()  # SIGKILL after accepting, mid-answer: no receipt is ever signed
            with pytest.raises(Exception):  # noqa: B017 - the connection dies; its exact type is httpx's business
                for _ in stream:
                    pass
            assert [r.status for r in client.disputes.list()] == ["due"]
    finally:
        node.stop()

    (due,) = _dcml(chain, store, "disputes", "list", "--due")
    assert (due["kind"], due["status"], due["request_hash"]) == ("no_response", "due", accepted.request_hash)
    eth_before = chain.w3.eth.get_balance(chain.payer.address)
    (opened,) = _dcml(chain, store, "disputes", "open")  # the node is gone: nobody serves its receipt
    assert (opened["kind"], opened["status"], opened["expected"]) == ("no_response", "open", str(NO_RESPONSE))
    assert _dcml(chain, store, "disputes", "finalize") == []  # the window is still open: nothing to do yet

    stake, dusd = chain.stake(node.address), chain.dusd(chain.payer.address)
    chain.travel(WINDOW_S + 1)
    (final,) = _dcml(chain, store, "disputes", "finalize")
    assert (final["status"], final["amount"]) == ("finalized", str(NO_RESPONSE))
    assert chain.stake(node.address) == stake - NO_RESPONSE
    assert chain.dusd(chain.payer.address) == dusd + NO_RESPONSE
    gas = sum(_fee(chain.w3, row["tx"]) for row in (opened, final))
    assert chain.w3.eth.get_balance(chain.payer.address) == eth_before - gas  # the bond came back
    assert _dcml(chain, store, "disputes", "finalize") == []  # paid once


def _fee(w3: Web3, tx: str) -> int:
    receipt = w3.eth.get_transaction_receipt(tx)
    return receipt["gasUsed"] * receipt["effectiveGasPrice"]


def test_ttft_breach_is_paid_once_and_forgeries_are_refused_on_chain(chain: Chain, tmp_path: Path) -> None:
    # The operator promises 100 ms to the first token on an engine that takes 300: `warn` publishes anyway.
    node = SlaNode(chain, tmp_path / "node", engine={"first_token_ms": 300},
                       sla={"max_ttft_ms": 100, "breach_cost_bps": 20_000, "on_unmet": "warn"})
    store = tmp_path / "client.sqlite"
    try:
        with _client(chain, node, store) as client:
            slow = client.chat([{"role": "user", "content": "slow start"}], MODEL, max_tokens=4)
            assert slow.sla_broken == Broken.TTFT and slow.receipt.receipt.ttft_ms >= 300
            assert [v.reason for v in client.violations()] == ["sla_ttft"]
            (acceptance,) = [a.signed for a in client.store.acceptances()]
            channel_id = bytes.fromhex(slow.channel_id[2:])
    finally:
        node.stop()
    signed = slow.receipt
    owed = BREACH_FIXED + signed.receipt.cost * 20_000 // 10_000
    stake, dusd = chain.stake(node.address), chain.dusd(chain.payer.address)
    (claim,) = _dcml(chain, store, "disputes", "open")
    assert (claim["kind"], claim["status"], claim["amount"]) == ("breach", "claimed", str(owed))
    assert chain.stake(node.address) == stake - owed and chain.dusd(chain.payer.address) == dusd + owed
    assert _dcml(chain, store, "disputes", "open") == []  # nothing left to claim

    court, payer, node_key = chain.court, chain.payer, node.identity.account
    params = find_params(contract(chain.w3, "PaymentChannels", chain.deployment.payment_channels), channel_id,
                         chain_id=chain.deployment.chain_id, from_block=chain.deployment.start_block)

    def refused(fn, *args) -> str:
        with pytest.raises(SLAError) as exc:
            fn(payer, node.address, *args)
        return exc.value.reason

    assert refused(court.claim_breach, params, signed) == "AlreadyClaimed"  # the same receipt twice
    r = signed.receipt
    altered = signed.model_copy(update={"receipt": r.model_copy(update={"ttft_ms": r.ttft_ms + 1})})
    assert refused(court.claim_breach, params, altered) == "WrongSigner"
    other_key = sign_receipt(r, Account.create(), court.domain)
    assert refused(court.claim_breach, params, other_key) == "WrongSigner"
    # A fresh breaking receipt signed by the node's own key, but for another chain: refused; for this one: paid.
    fresh = r.model_copy(update={"request_hash": request_hash(b"another request"), "receipt_id": "0x" + "ab" * 32})
    assert refused(court.claim_breach, params,
                   sign_receipt(fresh, node_key, ReceiptDomain(1, court.address))) == "WrongSigner"
    court.claim_breach(payer, node.address, params, sign_receipt(fresh, node_key, court.domain))

    # Acceptances: altered, another key, another chain id: refused; the genuine one opens (after its deadline).
    chain.travel(DEADLINE_S + 5)
    a = acceptance.acceptance
    later = acceptance.model_copy(update={"acceptance": a.model_copy(update={"deadline": a.deadline - 1})})
    assert refused(court.open_no_response, MODEL_ID, params, later) == "WrongSigner"
    assert refused(court.open_no_response, MODEL_ID, params, sign_acceptance(a, Account.create(),
                                                                               court.domain)) == "WrongSigner"
    assert refused(court.open_no_response, MODEL_ID, params,
                   sign_acceptance(a, node_key, ReceiptDomain(1, court.address))) == "WrongSigner"
    dispute = court.open_no_response(payer, node.address, MODEL_ID, params, acceptance)
    assert court.dispute(dispute).bond == SLA_DISPUTE_BOND
