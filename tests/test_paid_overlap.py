"""The paid path overlaps the engine with the admission's durable commit (issue 17, `openai._start`): a checked
request's funds are reserved before the engine starts, so concurrent requests never share them and a refused
one never reaches the engine; a commit that fails after the engine started stops it and charges nothing.
And the voucher route served before FastAPI (`node.api.voucher_route`) keeps the app's limits and metrics.
Anvil, a real node on loopback, real signatures."""

from __future__ import annotations

import asyncio
import contextlib
import json
import sqlite3

import httpx
import pytest

from dcml.client.demo.kit.nodes import MODEL, start_paid_node
from dcml.client.demo.kit.raw_payer import RawPayer
from dcml.client.wire.x402 import PAYMENT_REQUIRED, PAYMENT_SIGNATURE, PaymentRequired
from dcml.node.engine.synthetic import SyntheticEngine


class CountingEngine(SyntheticEngine):
    """The synthetic engine, counting the streams it actually started (a generator's body runs on first pull)."""

    def __init__(self) -> None:
        super().__init__(model_name=MODEL, first_token_ms=20, tokens_per_second=100)
        self.started = 0

    async def stream(self, request):
        self.started += 1
        async with contextlib.aclosing(super().stream(request)) as inner:  # closed with this one, not by the GC
            async for chunk in inner:
                yield chunk


@pytest.fixture
def engine() -> CountingEngine:
    return CountingEngine()


@pytest.fixture
def node(w3, deployment_file, tmp_path, engine):
    paid = start_paid_node(w3, deployment_file, tmp_path / "node", engine=engine)
    yield paid
    paid.server.stop()


BODY = json.dumps({"model": MODEL, "prompt": "one two three", "max_tokens": 4, "stream": True}).encode()
JSON = {"content-type": "application/json"}


def exact_voucher(client: RawPayer) -> str:
    """A voucher for exactly what one request needs up front (the 402's amount): funds for one request only."""
    r = httpx.post(f"{client.node_url}/v1/completions", content=BODY, headers=JSON)
    assert r.status_code == 402
    need = int(PaymentRequired.from_header(r.headers[PAYMENT_REQUIRED]).accepts[0].amount)
    return client.voucher(need).to_header()


def test_concurrent_requests_never_share_funds_and_the_refused_never_reach_the_engine(
        w3, deployment, payer, node, engine) -> None:
    client = RawPayer(w3, deployment, payer, node.url, node.identity.address)
    header = exact_voucher(client)

    async def burst() -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=node.url, timeout=30) as http:
            return list(await asyncio.gather(*(
                http.post("/v1/completions", content=BODY, headers={**JSON, PAYMENT_SIGNATURE: header})
                for _ in range(12))))

    answers = asyncio.run(burst())
    statuses = sorted(r.status_code for r in answers)
    assert statuses == [200] + [402] * 11, statuses
    assert {r.json()["error"]["code"] for r in answers if r.status_code == 402} == {"insufficient_funds"}
    assert engine.started == 1  # the eleven refused were refused before any compute
    balance = node.ledger.get("0x" + client.channel_id.hex())
    assert balance.spent <= balance.accepted + 4 * 10**10  # within the credit window, as for one request


def test_a_commit_that_fails_after_the_engine_started_stops_it_and_charges_nothing(
        w3, deployment, payer, node, engine, monkeypatch) -> None:
    client = RawPayer(w3, deployment, payer, node.url, node.identity.address)
    header = exact_voucher(client)
    writer = node.app.state.node.gate.writer

    async def disk_error(ops):
        await asyncio.sleep(0.05)  # the engine is running by now
        raise sqlite3.OperationalError("disk I/O error")

    monkeypatch.setattr(writer, "write_many", disk_error)
    r = httpx.post(f"{node.url}/v1/completions", content=BODY, headers={**JSON, PAYMENT_SIGNATURE: header})
    assert r.status_code == 500 and r.json()["error"]["code"] == "internal_error"
    assert "disk" not in r.text  # the cause is for the operator's log, not the client
    assert engine.started == 1 and engine._inflight == 0  # it ran, and its slot is free again
    assert node.ledger.get("0x" + client.channel_id.hex()) is None  # nothing recorded, nothing charged
    monkeypatch.undo()
    # the reservation went with the failed commit: the same voucher still admits one request
    r = httpx.post(f"{node.url}/v1/completions", content=BODY, headers={**JSON, PAYMENT_SIGNATURE: header})
    assert r.status_code == 200 and b"[DONE]" in r.content


def test_the_voucher_route_keeps_the_apps_limits_errors_and_metrics(w3, deployment, payer, node) -> None:
    client = RawPayer(w3, deployment, payer, node.url, node.identity.address)
    http = httpx.Client(base_url=node.url, timeout=30)
    assert client.post_voucher(10**15).json() == {"channelId": "0x" + client.channel_id.hex(),
                                                  "accepted": str(10**15), "spent": "0"}
    stranger = {**client.voucher(10**15).to_wire(), "channelId": "0x" + "77" * 32}
    r = http.post("/v1/payments/vouchers", json=stranger)
    assert r.status_code == 402 and r.json()["error"]["code"] == "unknown_channel"
    r = http.post("/v1/payments/vouchers", content=b'{"channelId": "' + b"a" * 6000 + b'"}', headers=JSON)
    assert r.status_code == 400 and r.json()["error"]["code"] == "malformed"  # past a voucher's 4 KiB
    limit = node.app.state.node.settings.limits.max_body_bytes
    r = http.post("/v1/payments/vouchers", content=b" " * (limit + 1), headers=JSON)
    assert r.status_code == 413 and r.json()["error"]["code"] == "body_too_large"
    r = http.post("/v1/payments/vouchers", content=iter([b" " * 65536] * (limit // 65536 + 2)), headers=JSON)
    assert r.status_code == 413  # chunked, no Content-Length: counted as it arrives
    assert http.get("/v1/payments/vouchers").status_code == 405  # other methods: FastAPI's answer
    assert "/v1/payments/vouchers" in http.get("/openapi.json").json()["paths"]
    metrics = http.get("/metrics").text
    for status, count in (("200", 1), ("402", 1), ("400", 1), ("413", 2)):
        line = f'dcml_http_requests_total{{method="POST",route="/v1/payments/vouchers",status="{status}"}} {count}.0'
        assert line in metrics, (status, [x for x in metrics.splitlines() if "vouchers" in x])
