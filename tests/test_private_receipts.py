"""Issue 19, finding 7, played by the attacker: a stranger guesses prompts against a node's receipts (the
receipt's requestHash is sha256 of the request body) and reads other payers' channel balances."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from eth_account import Account
from web3 import Web3

from dcml.client.chain.deployment import Deployment
from dcml.client.demo.kit.nodes import MODEL, PaidNode, start_paid_node
from dcml.client.demo.kit.raw_payer import RawPayer
from dcml.client.wire.access import AUTH_HEADER, auth_header, channel_resource, receipts_resource
from dcml.client.wire.receipts import SignedReceipt, request_hash


@pytest.fixture(scope="module")
def node(w3: Web3, deployment: Deployment, tmp_path_factory) -> Iterator[PaidNode]:
    path = tmp_path_factory.mktemp("dep") / "deployment.json"
    deployment.save(path)
    paid = start_paid_node(w3, path, tmp_path_factory.mktemp("node"))
    paid.app.state.node.gate.terms_in_force_from[MODEL] = 0  # as if SLA terms were in force: it signs acceptances
    yield paid
    paid.server.stop()


@pytest.fixture(scope="module")
def served(node: PaidNode, w3: Web3, deployment: Deployment, payer) -> tuple:
    victim = RawPayer(w3, deployment, payer, node.url, node.identity.address)
    answer = victim.ask("my diagnosis is", max_tokens=4)
    assert answer.status == 200
    return victim, request_hash(answer.request), answer.receipt, answer


def _guess(prompt: str) -> str:
    """What an attacker computes for a guessed prompt: the exact body layout is public."""
    body = {"model": MODEL, "prompt": prompt, "max_tokens": 4, "stream": True,
            "stream_options": {"include_usage": True}}
    return request_hash(json.dumps(body).encode())


def _find(node: PaidNode, h: str, cid: str, headers: dict | None = None) -> httpx.Response:
    return httpx.get(f"{node.url}/v1/receipts", params={"request_hash": h, "channel_id": cid}, headers=headers or {},
                     timeout=10)


def test_receipt_guessing_reveals_nothing(node: PaidNode, served, payer) -> None:
    victim, h, receipt, _ = served
    right, wrong = _guess("my diagnosis is"), _guess("my diagnosis is not")
    cid = "0x" + victim.channel_id.hex()  # channel ids are public on chain
    assert right == h  # the guess is right: on the old node this was a 200 with channel, cost and time
    stranger = Account.create()
    for headers in ({}, {AUTH_HEADER: "1:0x00"}, {AUTH_HEADER: "garbage"}):
        a, b = _find(node, right, cid, headers), _find(node, wrong, cid, headers)
        assert a.status_code == b.status_code == 401 and a.json()["error"]["code"] == "auth_required"
    # a well-formed signature by someone who does not pay the channel: the same 404 as for a wrong guess
    a = _find(node, right, cid, auth_header(stranger, node.identity.address, receipts_resource(right, cid)))
    b = _find(node, wrong, cid, auth_header(stranger, node.identity.address, receipts_resource(wrong, cid)))
    assert a.status_code == b.status_code == 404
    assert a.json()["error"]["message"].replace(right, "H") == b.json()["error"]["message"].replace(wrong, "H")
    # the payer's own signature, replayed for another hash, another node, or too late, is worth nothing
    # (a signature over another message recovers to some unrelated address: treated as a stranger's)
    sig = victim.auth(receipts_resource(wrong, cid))
    assert _find(node, right, cid, sig).status_code == 404
    other_node = auth_header(victim.session, Account.create().address, receipts_resource(right, cid))
    assert _find(node, right, cid, other_node).status_code == 404
    stale = auth_header(victim.session, node.identity.address, receipts_resource(right, cid), now=1_000_000)
    assert _find(node, right, cid, stale).status_code == 401
    # the payer (its session key, or its wallet) gets its receipt
    for signer in (victim.session, payer):
        r = _find(node, right, cid, auth_header(signer, node.identity.address, receipts_resource(right, cid)))
        assert r.status_code == 200 and SignedReceipt.from_json(r.content) == receipt


def test_channel_state_is_for_its_payer_only(node: PaidNode, served) -> None:
    victim, *_ = served
    cid = "0x" + victim.channel_id.hex()
    url = f"{node.url}/v1/payments/channels/{cid}"
    assert httpx.get(url).status_code == 401
    stranger = auth_header(Account.create(), node.identity.address, channel_resource(cid))
    r = httpx.get(url, headers=stranger)
    assert r.status_code == 404 and "spent" not in r.text and r.json()["error"]["code"] == "unknown_channel"
    held = httpx.get(url, headers=victim.auth(channel_resource(cid)))
    assert held.status_code == 200 and int(held.json()["accepted"]) == victim.cumulative


def test_receipt_by_id_stays_a_capability(node: PaidNode, served) -> None:
    _, _, receipt, _ = served
    rid = receipt.receipt.receipt_id
    assert httpx.get(f"{node.url}/v1/receipts/{rid}").status_code == 200  # handed only to the requester
    assert httpx.get(f"{node.url}/v1/receipts/0x{'11' * 32}").status_code == 404


def test_disputes_fetch_the_receipt_with_the_payers_signature(node: PaidNode, served, w3: Web3,
                                                               deployment: Deployment, payer, tmp_path: Path) -> None:
    """dcml.client.sdk.disputes asks for the receipt before disputing; with the new authorisation it still gets it."""
    import base64

    from dcml.client.sdk.disputes import Disputes
    from dcml.client.sdk.spend_store import SpendStore
    from dcml.client.wire.receipts import SignedAcceptance

    _, h, receipt, answer = served
    signed = SignedAcceptance.model_validate_json(base64.b64decode(answer.headers["x-dcml-acceptance"]))
    store = SpendStore(tmp_path / "s.sqlite")
    try:
        store.record_acceptance(signed, node_address=node.identity.address, node_url=node.url,
                                model_id="0x" + "00" * 32)
        (acceptance,) = store.acceptances(request_hash=h)
        disputes = Disputes(w3, deployment, payer, store, domain=node.app.state.node.signer.domain)
        got = disputes.fetch_receipt(acceptance)
        assert got is not None and got.receipt == receipt.receipt
    finally:
        store.close()
