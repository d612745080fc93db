"""Issue 19 attack tests (SLA, registry, credit, settlement), each written as the attacker would play it against a
real node on loopback, real vouchers and the devnet's contracts on anvil.

- trickled body / withheld voucher (finding 1): the receipt's figures measure the node, so no breach is claimable;
- a paid node without SLA terms in force (finding 10) signs no acceptance the court could not judge;
"""

from __future__ import annotations

import json
import time

import httpx
import pytest

from client.receipts import parse_sse_stream
from client.sla import Broken, Terms, broken_terms
from client.x402 import ACCEPTANCE_HEADER, PAYMENT_SIGNATURE
from node.engine.synthetic import SyntheticEngine
from tests.paid_helpers import MODEL, PRICE_IN, PRICE_OUT, RawPayer, start_paid_node

# The terms of the review's victim node: TTFT 1 s, 3 s per answer, 5 tokens/s.
TERMS = Terms(max_ttft_ms=1000, min_tokens_per_sec=5, max_duration_ms=3000, response_window=600)


@pytest.fixture
def deployment_file(deployment, tmp_path):
    path = tmp_path / "deployment.json"
    deployment.save(path)
    return path


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
    from node.api.app import create_app
    from node.api.server import BackgroundServer
    from node.config import load_settings
    from node.identity import EnclaveIdentity
    from node.tee.simulated import SimulatedProvider

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
