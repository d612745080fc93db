"""Receipts on hang-up (issue 12, item 5): exactly one receipt per request whoever hangs up when, every
charged token inside it, and metrics counting each token once. A real paid node (synthetic engine) on
loopback, a real anvil, the official `openai` client and raw clients that cut the stream at random bytes."""

from __future__ import annotations

import json
import logging
import random
import re
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from web3 import Web3

from dcml.client.chain.deployment import Deployment
from dcml.client.demo.kit.nodes import MODEL, PaidNode, funded_wallet, node_receipts, start_paid_node
from dcml.client.demo.kit.raw_payer import RawPayer
from dcml.client.sdk.client import Client
from dcml.client.wire.x402 import PAYMENT_SIGNATURE


@pytest.fixture(scope="module")
def node(w3: Web3, deployment_file: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[PaidNode]:
    # prepay 0: what the node may settle is exactly what its receipts charge.
    paid = start_paid_node(w3, deployment_file, tmp_path_factory.mktemp("node"), prepay_tokens=0, credit_tokens=4)
    yield paid
    paid.server.stop()


def metric(node: PaidNode, name: str) -> float:
    text = httpx.get(f"{node.url}/metrics").text
    return sum(float(m.group(1)) for m in re.finditer(rf"^{name}\{{[^}}]*\}} (\S+)$", text, re.M))


def test_official_openai_client_30_streams_one_receipt_each_no_error(
        node: PaidNode, w3: Web3, deployment: Deployment, tmp_path: Path, caplog: pytest.LogCaptureFixture,
        capfd: pytest.CaptureFixture) -> None:
    caplog.set_level(logging.WARNING)
    capfd.readouterr()
    before_receipts, before_tokens = len(node_receipts(node)), metric(node, "dcml_output_tokens_total")
    with Client(node.url, funded_wallet(w3, deployment), deployment=deployment, allow_simulated=True,
                store=tmp_path / "spend.sqlite", deposit=10**17, w3=w3) as client:
        oai = client.openai()
        for i in range(30):  # the SDK stops reading at [DONE] and closes: the node sees a hang-up each time
            stream = oai.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": f"q{i}"}],
                                                 max_tokens=5 + i % 7, stream=True)
            assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
        assert client.violations() == []
        assert len(client.receipts()) == 30
    time.sleep(0.3)  # the node's side of the last hang-up
    new = node_receipts(node)[before_receipts:]
    assert len(new) == 30
    assert metric(node, "dcml_output_tokens_total") - before_tokens == sum(r.receipt.output_tokens for r in new)
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]  # stdlib logging (uvicorn, settlement)
    assert errors == [], [r.getMessage() for r in errors]
    out = "\n".join(capfd.readouterr())  # the node's structlog events, rendered to the console
    for bad in ("[error", "[critical", "Traceback", "UNIQUE", "receipt_after_disconnect_failed"):
        assert bad not in out, out[-2000:]


def _cut_stream(payer: RawPayer, url: str, prompt: str, cut: int) -> bool:
    """Pay up front and read `cut` bytes of the answer, then hang up. True if the node admitted it."""
    body = json.dumps({"model": MODEL, "prompt": prompt, "max_tokens": 30, "stream": True}).encode()
    voucher = payer.voucher(payer.cumulative + 60 * 3 * 10**12)
    with httpx.Client(timeout=30) as http, http.stream(
            "POST", f"{url}/v1/completions", content=body,
            headers={"content-type": "application/json", PAYMENT_SIGNATURE: voucher.to_header()}) as r:
        if r.status_code != 200:
            return False
        got = 0
        for piece in r.iter_raw(64):
            got += len(piece)
            if got >= cut:
                break
    return True


def test_hang_up_at_random_bytes_every_charge_in_one_receipt(node: PaidNode, w3: Web3, deployment: Deployment
                                                              ) -> None:
    payer = RawPayer(w3, deployment, funded_wallet(w3, deployment), node.url, node.identity.address)
    rng = random.Random(12)
    admitted = sum(_cut_stream(payer, node.url, f"cut {i}", rng.randrange(1, 3000)) for i in range(25))
    assert admitted == 25
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        mine = [r for r in node_receipts(node) if r.receipt.channel_id == "0x" + payer.channel_id.hex()]
        if len(mine) == admitted:
            break
        time.sleep(0.1)
    assert len(mine) == admitted and len({r.receipt.request_hash for r in mine}) == admitted  # one per request
    balance = node.ledger.get("0x" + payer.channel_id.hex())
    # Every charge is inside a receipt: the ledger's spent is the sum of the receipts, to the wei.
    assert sum(r.receipt.cost for r in mine) == balance.spent == max(r.receipt.cumulative_spent for r in mine)
    for r in mine:
        assert r.receipt.cost == r.receipt.input_tokens * 10**12 + r.receipt.output_tokens * 3 * 10**12


def test_plain_openai_client_hangs_up_after_done_one_receipt_each(tmp_path: Path, capfd: pytest.CaptureFixture
                                                                   ) -> None:
    """The official client, straight at a free node: it stops reading at [DONE] and closes while the node is
    storing the receipt (the hang-up that used to insert a second receipt under the same id)."""
    import openai

    from dcml.node.api.app import create_app
    from dcml.node.api.server import BackgroundServer
    from dcml.node.config import load_settings
    from dcml.node.engine.synthetic import SyntheticEngine
    from dcml.node.identity import EnclaveIdentity
    from dcml.node.tee.simulated import SimulatedProvider

    settings = load_settings(None, data_dir=tmp_path, engine={"kind": "synthetic", "served_model_name": MODEL,
                                                              "model_dir": None})
    app = create_app(settings, engine=SyntheticEngine(model_name=MODEL), identity=EnclaveIdentity.generate(),
                     provider=SimulatedProvider())
    srv = BackgroundServer(app).start()
    free = PaidNode(srv, None, app)
    try:
        capfd.readouterr()
        oai = openai.OpenAI(base_url=srv.url + "/v1", api_key="x")
        for i in range(30):
            stream = oai.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": f"q{i}"}],
                                                 max_tokens=3 + i % 5, stream=True)
            assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
        time.sleep(0.3)
        receipts = node_receipts(free)
        assert len(receipts) == 30 and len({r.receipt.request_hash for r in receipts}) == 30
        assert metric(free, "dcml_output_tokens_total") == sum(r.receipt.output_tokens for r in receipts)
    finally:
        srv.stop()
    out = "\n".join(capfd.readouterr())
    for bad in ("[error", "Traceback", "UNIQUE", "receipt_after_disconnect_failed"):
        assert bad not in out, out[-2000:]


def test_a_duplicate_receipt_fails_alone_not_its_batch(tmp_path: Path) -> None:
    import asyncio

    from dcml.client.wire.receipts import sign_receipt
    from dcml.node.receipts.store import ReceiptStore
    from tests.receipt_helpers import NODE_KEY, make_receipt

    signed = [sign_receipt(make_receipt(), NODE_KEY) for _ in range(8)]

    async def run() -> list:
        store = ReceiptStore(tmp_path / "receipts.sqlite")
        store.open()
        try:
            await store.put(signed[0])
            # One commit group: seven new receipts and a second write under an id already stored.
            results = await asyncio.gather(*(store.put(s) for s in [*signed[1:4], signed[0], *signed[4:]]),
                                           return_exceptions=True)
            return [results, [await store.get(s.receipt.receipt_id) for s in signed]]
        finally:
            await store.close()

    results, stored = asyncio.run(run())
    assert [isinstance(r, Exception) for r in results] == [False, False, False, True, False, False, False, False]
    assert stored == signed
