"""SDK concurrency (issue 12, item 8): one `Client` (and one `client.openai()`) carries many concurrent
streams over one channel without errors; then the receipts are checked against the chain to the wei.
A real paid node (synthetic engine, prepay 0, a small credit window so streams pause for vouchers), anvil."""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from web3 import Web3

from dcml.client.chain.deployment import Deployment
from dcml.client.demo.kit.nodes import (
    MODEL,
    PRICE_IN,
    PRICE_OUT,
    PaidNode,
    funded_wallet,
    node_receipts,
    start_paid_node,
)
from dcml.client.sdk.client import ChatStream, Client

STREAMS = 64


@pytest.fixture(scope="module")
def node(w3: Web3, deployment_file: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[PaidNode]:
    paid = start_paid_node(w3, deployment_file, tmp_path_factory.mktemp("node"), prepay_tokens=0, credit_tokens=4,
                           voucher_timeout_s=20)
    yield paid
    paid.server.stop()


def _settled_matches_receipts(client: Client, node: PaidNode) -> None:
    (ch,) = client.channels()
    mine = [r for r in node_receipts(node) if r.receipt.channel_id == ch.channel_id]
    total = sum(r.receipt.cost for r in mine)
    assert total == sum(r.cost for r in client.receipts()) > 0
    for r in mine:
        assert r.receipt.cost == r.receipt.input_tokens * PRICE_IN + r.receipt.output_tokens * PRICE_OUT
    node.app.state.node.gate.payments.worker.run_once(flush=True)  # settle now, on-chain
    state = client.channel_state(ch.channel_id)
    balance = node.ledger.get(ch.channel_id)
    assert balance.spent == total
    assert state.settled == balance.accepted == total  # the chain holds exactly the receipts, to the wei


def test_64_concurrent_streams_through_one_client(node: PaidNode, w3: Web3, deployment: Deployment,
                                                  tmp_path: Path) -> None:
    with Client(node.url, funded_wallet(w3, deployment), deployment=deployment, allow_simulated=True,
                store=tmp_path / "spend.sqlite", deposit=10**17, w3=w3) as client:
        client.open_channel(MODEL)

        def one(i: int) -> int:
            s = client.chat([{"role": "user", "content": f"question {i}"}], MODEL, stream=True, max_tokens=12 + i % 9)
            assert isinstance(s, ChatStream)
            assert "".join(s)
            assert s.result is not None and s.result.receipt is not None
            return s.result.receipt.receipt.output_tokens

        with ThreadPoolExecutor(STREAMS) as pool:
            outputs = list(pool.map(one, range(STREAMS)))
        assert outputs == [12 + i % 9 for i in range(STREAMS)]
        assert client.violations() == []
        assert len(client.receipts()) == STREAMS
        _settled_matches_receipts(client, node)


def test_concurrent_streams_through_one_openai_client(node: PaidNode, w3: Web3, deployment: Deployment,
                                                      tmp_path: Path) -> None:
    with Client(node.url, funded_wallet(w3, deployment), deployment=deployment, allow_simulated=True,
                store=tmp_path / "spend.sqlite", deposit=10**17, w3=w3) as client:
        oai = client.openai()

        def one(i: int) -> str:
            stream = oai.completions.create(model=MODEL, prompt=f"tell me {i}", max_tokens=10, stream=True)
            return "".join(c.choices[0].text for c in stream if c.choices)

        with ThreadPoolExecutor(16) as pool:
            assert all(pool.map(one, range(16)))
        assert client.violations() == []
        assert len(client.receipts()) == 16
        _settled_matches_receipts(client, node)
