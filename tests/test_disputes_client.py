"""The payer's SLA remedies (`client.disputes`, the SDK's checks, `dcml disputes`) against a real anvil and the
SLACourt the devnet deploys (NodeRegistry's slasher, dUSD stake): breach claims paid once, to the wei;
no-response disputes opened after the deadline and finalized after the window; a receipt the node serves
when asked prevents a dispute. Receipts and acceptances are signed here with a registered enclave key.

The module runs its own anvil: it moves the chain's clock.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from eth_account import Account
from eth_account.signers.local import LocalAccount
from fastapi import FastAPI
from fastapi.responses import Response
from typer.testing import CliRunner
from web3 import Web3

from dcml.client.chain.channel import ChannelClient
from dcml.client.chain.contracts import contract
from dcml.client.chain.deployment import Deployment
from dcml.client.chain.devnet import NODE_MIN_STAKE, SLA_DISPUTE_BOND, Devnet, dev_accounts
from dcml.client.chain.registry import RegistryClient
from dcml.client.chain.sla import Broken, DisputeStatus, SLACourtClient, Terms
from dcml.client.demo.kit.nodes import MODEL as SERVED
from dcml.client.demo.kit.nodes import fund, paid_settings
from dcml.client.sdk.cli import app as cli_app
from dcml.client.sdk.client import Client
from dcml.client.sdk.disputes import Disputes
from dcml.client.sdk.spend_store import SpendStore
from dcml.client.wire.receipts import (
    Acceptance,
    Receipt,
    ReceiptDomain,
    SignedAcceptance,
    SignedReceipt,
    model_id_for,
    request_hash,
    sign_acceptance,
    sign_receipt,
)
from dcml.node.api.app import create_app
from dcml.node.api.server import BackgroundServer
from dcml.node.engine.synthetic import SyntheticEngine
from dcml.node.identity import EnclaveIdentity
from dcml.node.network.registration import ensure_registered
from dcml.node.tee.simulated import SimulatedProvider

MODEL = model_id_for("tiny")
PEER_ID = bytes.fromhex("002408011220") + b"\x11" * 32
WINDOW = 600
TERMS = Terms(max_ttft_ms=2000, min_tokens_per_sec=10, max_duration_ms=60_000, response_window=WINDOW,
              breach_cost_bps=20_000, breach_fixed=10**16, no_response_compensation=5 * 10**16)
UNREACHABLE = "http://127.0.0.1:9"  # discard port: the node is gone


def _travel(w3: Web3, seconds: int) -> None:
    w3.provider.make_request("evm_increaseTime", [seconds])
    w3.provider.make_request("evm_mine", [])


def _now(w3: Web3) -> int:
    return w3.eth.get_block("latest")["timestamp"]


def register_node(w3: Web3, deployment: Deployment, operator: LocalAccount,
                  identity: EnclaveIdentity | None = None) -> EnclaveIdentity:
    identity = identity or EnclaveIdentity.generate()
    ensure_registered(w3, deployment.node_registry, identity, SimulatedProvider(), operator,
                      endpoint="https://n.example", peer_id=PEER_ID, stake=2 * NODE_MIN_STAKE, node_version="test")
    return identity


def open_channel(w3: Web3, deployment: Deployment, payer: LocalAccount, node: str) -> str:
    channel = ChannelClient(w3, deployment, payer).open(node, 10**18, session_key=Account.create().address,
                                                        model_id=bytes.fromhex(MODEL[2:]))
    return "0x" + channel.hex()


@pytest.fixture(scope="module")
def env() -> Iterator[dict]:
    with Devnet() as net:
        assert net.deployment is not None
        dep = net.deployment
        w3 = Web3(Web3.HTTPProvider(dep.rpc_url, request_kwargs={"timeout": 30}))
        accounts = dev_accounts()
        operator, payer, payer2 = accounts["node"], accounts["client"], accounts["client2"]
        node = register_node(w3, dep, operator).account
        court = SLACourtClient(w3, dep.sla_court)
        court.publish_terms(operator, node.address, MODEL, TERMS)
        _travel(w3, 10)  # terms apply from the second after publishing
        yield dict(w3=w3, deployment=dep, court=court, node=node, operator=operator, payer=payer, payer2=payer2,
                   registry=RegistryClient(w3, dep.node_registry), token=contract(w3, "TestToken", dep.token),
                   channel=open_channel(w3, dep, payer, node.address),
                   channel2=open_channel(w3, dep, payer2, node.address))


def _domain(env: dict) -> ReceiptDomain:
    return ReceiptDomain(env["deployment"].chain_id, env["deployment"].sla_court)


def _receipt(env: dict, body: bytes, *, signer: LocalAccount | None = None, channel: str | None = None,
             **kw) -> SignedReceipt:
    fields = dict(receiptId=request_hash(b"receipt:" + body + (channel or "").encode()),
                  requestHash=request_hash(body), responseHash="0x" + "02" * 32,
                  channelId=channel or env["channel"], modelId=MODEL, inputTokens=5, outputTokens=101, cost=10**15,
                  cumulativeSpent=10**15, acceptedAt=_now(env["w3"]) - 5, ttftMs=400, durationMs=5400)
    return sign_receipt(Receipt(**{**fields, **kw}), signer or env["node"], _domain(env))


def _acceptance(env: dict, body: bytes) -> SignedAcceptance:
    now = _now(env["w3"])
    return sign_acceptance(Acceptance(requestHash=request_hash(body), channelId=env["channel"], acceptedAt=now,
                                      deadline=now + 300), env["node"], _domain(env))


def _record(store: SpendStore, env: dict, signed: SignedAcceptance, node_url: str = UNREACHABLE) -> None:
    store.record_acceptance(signed, node_address=env["node"].address, node_url=node_url, model_id=MODEL)


def _disputes(env: dict, store: SpendStore, payer: str = "payer") -> Disputes:
    return Disputes(env["w3"], env["deployment"], env[payer], store)


def _stake(env: dict) -> int:
    return env["registry"].node(env["node"].address).stake


def _dusd(env: dict, who: LocalAccount) -> int:
    return env["token"].functions.balanceOf(who.address).call()


def _gas(w3: Web3, tx_hash: str) -> int:
    tx = w3.eth.get_transaction_receipt(tx_hash)
    return tx["gasUsed"] * tx["effectiveGasPrice"]


# -- broken terms -----------------------------------------------------------------------------------


def test_breach_is_claimed_once_and_paid_to_the_wei(env: dict, tmp_path: Path) -> None:
    store = SpendStore(tmp_path / "spend.sqlite")
    disputes = _disputes(env, store)
    signed = _receipt(env, b"slow first token", ttftMs=2500, durationMs=7500)
    assert disputes.check_receipt(signed, node_address=env["node"].address, node_url=UNREACHABLE) == Broken.TTFT
    assert disputes.check_receipt(signed, node_address=env["node"].address, node_url=UNREACHABLE) == Broken.TTFT
    (violation,) = store.violations()  # recorded once, with the signed receipt as evidence
    assert violation.reason == "sla_ttft" and SignedReceipt.from_json(violation.evidence) == signed
    expected = TERMS.compensation(signed.receipt)
    (row,) = disputes.list()
    assert (row.kind, row.status, row.due, row.expected, row.broken) == ("breach", "pending", True, expected,
                                                                         ("ttft",))

    stake, balance = _stake(env), _dusd(env, env["payer"])
    (row,) = disputes.open_due()
    assert (row.status, row.amount, row.reason) == ("claimed", expected, None)
    # NodeRegistry.slash pays the payer in the registry's stake token (dUSD), to the wei
    assert _stake(env) == stake - expected
    assert _dusd(env, env["payer"]) == balance + expected
    assert env["court"].breach_claimed(env["node"].address, signed.receipt.request_hash)

    assert disputes.open_due() == []  # nothing pending: no second claim is sent
    forced = disputes.claim(signed.receipt.receipt_id)  # sent anyway: the court refuses, nothing moves
    assert (forced.status, forced.reason, forced.amount) == ("claimed", "AlreadyClaimed", expected)
    assert _stake(env) == stake - expected and _dusd(env, env["payer"]) == balance + expected


def test_claim_paid_to_another_payer_is_refused_and_not_retried(env: dict, tmp_path: Path) -> None:
    body = b"the same request on two channels"
    first = SpendStore(tmp_path / "one.sqlite")
    signed = _receipt(env, body, ttftMs=3000)
    _disputes(env, first).check_receipt(signed, node_address=env["node"].address, node_url=UNREACHABLE)
    assert _disputes(env, first).open_due()[0].status == "claimed"

    # The court pays once per (node, request): the second payer's claim for the same request is refused.
    second = SpendStore(tmp_path / "two.sqlite")
    disputes = _disputes(env, second, "payer2")
    copy = _receipt(env, body, channel=env["channel2"], ttftMs=3000)
    disputes.check_receipt(copy, node_address=env["node"].address, node_url=UNREACHABLE)
    balance = _dusd(env, env["payer2"])
    (row,) = disputes.open_due()
    assert (row.status, row.reason, row.amount, row.due) == ("refused", "AlreadyClaimed", None, False)
    assert disputes.open_due() == []
    assert _dusd(env, env["payer2"]) == balance


def test_receipt_within_terms_records_nothing(env: dict, tmp_path: Path) -> None:
    store = SpendStore(tmp_path / "spend.sqlite")
    disputes = _disputes(env, store)
    signed = _receipt(env, b"a fine answer")
    assert disputes.check_receipt(signed, node_address=env["node"].address, node_url=UNREACHABLE) == Broken.NONE
    assert store.breach_claims() == [] and store.violations() == [] and disputes.list() == []


def test_claims_go_only_from_the_channels_payer(env: dict, tmp_path: Path) -> None:
    store = SpendStore(tmp_path / "spend.sqlite")
    signed = _receipt(env, b"claimed by the wrong wallet", outputTokens=1001, durationMs=70_000)
    _disputes(env, store).check_receipt(signed, node_address=env["node"].address, node_url=UNREACHABLE)
    (row,) = _disputes(env, store, "payer2").open_due()  # payer2 does not pay this channel
    assert row.status == "pending" and row.reason.startswith("NotPayer") and row.broken == ("duration",)


# -- no response ------------------------------------------------------------------------------------


def test_overdue_acceptance_is_disputed_and_finalized_to_the_wei(env: dict, tmp_path: Path) -> None:
    w3, court, payer = env["w3"], env["court"], env["payer"]
    store = SpendStore(tmp_path / "spend.sqlite")
    disputes = _disputes(env, store)
    acc = _acceptance(env, b"never answered")
    _record(store, env, acc)
    assert disputes.open_due() == [] and disputes.list() == []  # before the deadline: nothing to do

    _travel(w3, 301)
    (row,) = disputes.list()
    assert (row.kind, row.status, row.due, row.id) == ("no_response", "due", True, acc.acceptance.request_hash)
    eth = w3.eth.get_balance(payer.address)
    (row,) = disputes.open_due()
    dispute_id = court.dispute_id(env["node"].address, acc.acceptance.request_hash)
    assert (row.status, row.id, row.expected, row.due) == ("open", "0x" + dispute_id.hex(),
                                                           TERMS.no_response_compensation, False)
    assert row.answer_by == court.dispute(dispute_id).answer_by
    assert w3.eth.get_balance(payer.address) == eth - SLA_DISPUTE_BOND - _gas(w3, row.tx)
    assert disputes.open_due() == []  # disputed once

    assert disputes.finalize_due() == []  # the node's window is still open
    _travel(w3, WINDOW + 1)
    assert disputes.list()[0].due
    stake, balance, eth = _stake(env), _dusd(env, payer), w3.eth.get_balance(payer.address)
    (row,) = disputes.finalize_due()
    assert (row.status, row.amount) == ("finalized", TERMS.no_response_compensation)
    assert _stake(env) == stake - TERMS.no_response_compensation
    assert _dusd(env, payer) == balance + TERMS.no_response_compensation
    assert w3.eth.get_balance(payer.address) == eth + SLA_DISPUTE_BOND - _gas(w3, row.tx)  # the bond came back
    assert court.dispute(dispute_id).status == DisputeStatus.FINALIZED
    assert disputes.finalize_due() == []


def test_dispute_the_node_answered_is_recorded_as_lost(env: dict, tmp_path: Path) -> None:
    w3, court = env["w3"], env["court"]
    store = SpendStore(tmp_path / "spend.sqlite")
    disputes = _disputes(env, store)
    body = b"answered on-chain"
    _record(store, env, _acceptance(env, body))
    _travel(w3, 301)
    (row,) = disputes.open_due()
    court.answer(env["operator"], bytes.fromhex(row.id[2:]), _receipt(env, body))  # the node's watcher answers
    _travel(w3, WINDOW + 1)
    (row,) = disputes.finalize_due()
    assert row.status == "answered" and row.amount is None and "bond" in row.reason
    assert disputes.finalize_due() == []


def test_dispute_finalized_by_someone_else_is_recorded(env: dict, tmp_path: Path) -> None:
    w3, court = env["w3"], env["court"]
    store = SpendStore(tmp_path / "spend.sqlite")
    disputes = _disputes(env, store)
    _record(store, env, _acceptance(env, b"finalized by a stranger"))
    _travel(w3, 301)
    (row,) = disputes.open_due()
    _travel(w3, WINDOW + 1)
    court.finalize(env["payer2"], bytes.fromhex(row.id[2:]))  # anyone may
    (row,) = disputes.finalize_due()
    assert (row.status, row.amount) == ("finalized", TERMS.no_response_compensation) and row.tx


@pytest.fixture
def receipt_server() -> Iterator[tuple[str, dict[str, SignedReceipt]]]:
    """A stand-in node on loopback serving `GET /v1/receipts?request_hash=` from a dict."""
    served: dict[str, SignedReceipt] = {}
    app = FastAPI()

    @app.get("/v1/receipts")
    def find(request_hash: str) -> Response:
        signed = served.get(request_hash)
        if signed is None:
            return Response(status_code=404)
        return Response(signed.model_dump_json(by_alias=True), media_type="application/json")

    server = BackgroundServer(app).start()
    yield server.url, served
    server.stop()


def test_receipt_the_node_serves_prevents_the_dispute(env: dict, tmp_path: Path, receipt_server) -> None:
    w3, court, node = env["w3"], env["court"], env["node"]
    url, served = receipt_server
    store = SpendStore(tmp_path / "spend.sqlite")
    disputes = _disputes(env, store)
    answered, forged, missing = b"stream broke, receipt kept", b"forged receipt", b"really unanswered"
    for body in (answered, forged, missing):
        _record(store, env, _acceptance(env, body), node_url=url)
    slow = _receipt(env, answered, ttftMs=2500)
    served[slow.receipt.request_hash] = slow  # the node answered, slowly; the client never saw the receipt
    served[request_hash(forged)] = _receipt(env, forged, signer=Account.create())
    _travel(w3, 301)

    rows = {(r.kind, r.request_hash): r for r in disputes.open_due()}
    assert rows["no_response", request_hash(answered)].status == "received"
    assert court.dispute(court.dispute_id(node.address, request_hash(answered))).status == DisputeStatus.NONE
    assert store.receipts()[0].signed == slow
    assert store.acceptances(request_hash=request_hash(answered))[0].receipt_id == slow.receipt.receipt_id
    # the fetched receipt is checked against the terms like any other: its breach is claimed in the same pass
    assert rows["breach", request_hash(answered)].status == "claimed"
    # a receipt not signed by the node answers nothing: disputed, and the forgery recorded
    assert rows["no_response", request_hash(forged)].status == rows["no_response", request_hash(missing)].status
    assert rows["no_response", request_hash(missing)].status == "open"
    assert "wrong_receipt" in [v.reason for v in store.violations()]


# -- the SDK ----------------------------------------------------------------------------------------


def test_client_defaults_to_the_courts_domain_and_disputes_automatically(env: dict, tmp_path: Path) -> None:
    w3, dep = env["w3"], env["deployment"]
    store_path = tmp_path / "spend.sqlite"
    acc = _acceptance(env, b"disputed by the background thread")
    store = SpendStore(store_path)
    _record(store, env, acc)
    store.close()
    _travel(w3, 301)
    with Client(UNREACHABLE, env["payer"], deployment=dep, store=store_path, deposit=1, w3=w3, auto_dispute=True,
                dispute_interval_s=0.2) as client:
        assert client.receipt_domain == ReceiptDomain(dep.chain_id, dep.sla_court)
        deadline = time.monotonic() + 20
        while client.store.acceptances()[0].dispute_status != "open" and time.monotonic() < deadline:
            time.sleep(0.1)
        (row,) = client.disputes.list()
        assert row.status == "open"
    with Client(UNREACHABLE, env["payer"], deployment=dep.model_copy(update={"sla_court": None}),
                store=tmp_path / "other.sqlite", deposit=1, w3=w3) as courtless:
        assert courtless.receipt_domain == ReceiptDomain()
        with pytest.raises(ValueError, match="no sla_court"):
            courtless.disputes  # noqa: B018


def test_sdk_keeps_acceptances_and_claims_a_slow_first_token(tmp_path: Path) -> None:
    """A real paid node (synthetic engine, 300 ms to the first token) that promised 100 ms: the answer is paid
    and returned, marked `sla_broken`, and its claim pays the payer. Its own anvil: the chain's clock must be
    the node's (receipts carry the node's wall-clock acceptedAt)."""
    slow = Terms(max_ttft_ms=100, response_window=WINDOW, breach_fixed=10**15)
    with Devnet() as net:
        assert net.deployment is not None
        dep, accounts = net.deployment, dev_accounts()
        w3 = Web3(Web3.HTTPProvider(dep.rpc_url, request_kwargs={"timeout": 30}))
        deployment_file = tmp_path / "deployment.json"
        dep.save(deployment_file)
        identity = register_node(w3, dep, accounts["node"])
        fund(w3, identity.address)
        court = SLACourtClient(w3, dep.sla_court)
        court.publish_terms(accounts["node"], identity.address, model_id_for(SERVED), slow)
        valid_from = court.terms_versions(identity.address, model_id_for(SERVED))[0].valid_from
        while time.time() < valid_from + 1:
            time.sleep(0.1)
        app = create_app(paid_settings(deployment_file, tmp_path / "node", prepay_tokens=0),
                         engine=SyntheticEngine(model_name=SERVED, first_token_ms=300), identity=identity,
                         provider=SimulatedProvider())
        app.state.node.gate.terms_in_force_from[SERVED] = valid_from  # what [sla] on does after publishing
        server = BackgroundServer(app).start()
        try:
            with Client(server.url, accounts["client"], deployment=dep, allow_simulated=True, w3=w3,
                        store=tmp_path / "spend.sqlite", deposit=10**17) as client:
                result = client.chat([{"role": "user", "content": "hello"}], SERVED, max_tokens=4)
                assert result.text and result.sla_broken == Broken.TTFT
                stream = client.chat([{"role": "user", "content": "stream it"}], SERVED, max_tokens=4, stream=True)
                assert "".join(stream) and stream.result is not None and stream.result.sla_broken == Broken.TTFT
                # every acceptance was kept, then matched with its receipt: nothing to dispute
                accepted = client.store.acceptances()
                assert [a.receipt_id for a in accepted] == [result.receipt.receipt.receipt_id,
                                                            stream.result.receipt.receipt.receipt_id]
                assert {a.node_url for a in accepted} == {server.url}
                assert [v.reason for v in client.violations()] == ["sla_ttft", "sla_ttft"]
                balance = contract(w3, "TestToken", dep.token).functions.balanceOf(client.wallet.address).call()
                rows = client.disputes.open_due()
                assert [(r.kind, r.status, r.amount) for r in rows] == [("breach", "claimed", 10**15)] * 2
                after = contract(w3, "TestToken", dep.token).functions.balanceOf(client.wallet.address).call()
                assert after == balance + 2 * 10**15
        finally:
            server.stop()


# -- the CLI ----------------------------------------------------------------------------------------


def test_cli_lists_opens_and_finalizes(env: dict, tmp_path: Path) -> None:
    w3 = env["w3"]
    deployment_file = tmp_path / "deployment.json"
    env["deployment"].save(deployment_file)
    store_path = tmp_path / "spend.sqlite"
    store = SpendStore(store_path)
    breach = _receipt(env, b"cli: slow", ttftMs=4000)
    _disputes(env, store).check_receipt(breach, node_address=env["node"].address, node_url=UNREACHABLE)
    acc = _acceptance(env, b"cli: unanswered")
    _record(store, env, acc)
    store.close()
    runner = CliRunner()
    key = {"DCML_WALLET_KEY": "0x" + bytes(env["payer"].key).hex()}

    def dcml(*args: str, human: bool = False):
        result = runner.invoke(cli_app, ["--deployment", str(deployment_file), "--store", str(store_path),
                                         *([] if human else ["--json"]), *args], env=key)
        assert result.exit_code == 0, result.output
        return result.stdout if human else json.loads(result.stdout.strip().splitlines()[-1])

    (claim,) = dcml("disputes", "list")
    assert (claim["kind"], claim["status"], claim["expected"]) == ("breach", "pending",
                                                                   str(TERMS.compensation(breach.receipt)))
    _travel(w3, 301)
    assert [r["status"] for r in dcml("disputes", "list", "--due")] == ["pending", "due"]
    table = dcml("disputes", "list", human=True)
    assert "breach" in table and "no_response" in table and "ttft" in table

    # one item at a time: the filters narrow the batch
    (opened,) = dcml("disputes", "open", "--receipt", breach.receipt.receipt_id)
    assert (opened["status"], opened["amount"]) == ("claimed", str(TERMS.compensation(breach.receipt)))
    (opened,) = dcml("disputes", "open", "--node", env["node"].address)
    assert opened["status"] == "open" and opened["kind"] == "no_response"
    assert dcml("disputes", "open") == []

    assert dcml("disputes", "finalize") == []
    _travel(w3, WINDOW + 1)
    (done,) = dcml("disputes", "finalize", opened["id"])
    assert (done["status"], done["amount"]) == ("finalized", str(TERMS.no_response_compensation))
    assert [r["status"] for r in dcml("disputes", "list")] == ["claimed", "finalized"]

    result = runner.invoke(cli_app, ["--deployment", str(deployment_file), "--store", str(store_path), "--json",
                                     "disputes", "finalize", "0x" + "00" * 32], env=key)
    assert result.exit_code == 1 and "dcml disputes list" in json.loads(result.stdout)["error"]
