"""`dcml gateway` end to end: real paid nodes on loopback (anvil), the official `openai` client and curl.

Money: every answer carries a receipt that verifies against the node that served it, and a request that
failed over is paid once: only the node that answered signs a receipt for it.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import threading

import httpx
import openai
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from dcml.client.chain.devnet import free_port
from dcml.client.demo.kit.gateway import start_gateway, start_node
from dcml.client.demo.kit.nodes import MODEL, PRICE_IN, synthetic_node
from dcml.client.wire.receipts import SignedReceipt
from dcml.node.tee.simulated import SimulatedProvider

CHEAP, DEAR = 2 * 10**12, 3 * 10**12


@pytest.fixture(scope="module")
def nodes(w3, deployment, tmp_path_factory):
    """A cheap node, a dearer one, and the cheapest of all whose attestation does not verify."""
    base = tmp_path_factory.mktemp("gw-nodes")
    path = base / "deployment.json"
    deployment.save(path)
    cheap = start_node(w3, path, base / "cheap", CHEAP)
    dear = start_node(w3, path, base / "dear", DEAR)
    forged = start_node(w3, path, base / "forged", 10**12, provider=SimulatedProvider(Ed25519PrivateKey.generate()))
    yield cheap, dear, forged
    for server, _, _ in (cheap, dear, forged):
        server.stop()


def test_openai_client_and_curl_get_paid_verified_answers(nodes, payer, deployment, tmp_path) -> None:
    (cheap, _, _), (dear, _, _), (forged, _, forged_app) = nodes
    server, _ = start_gateway(payer, deployment, tmp_path / "gw", [forged.url, dear.url, cheap.url])
    try:
        oai = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused")
        models = httpx.get(f"{server.url}/v1/models").json()["data"]
        assert [m["id"] for m in models] == [MODEL]
        assert models[0]["dcml"]["price_per_output_token"] == str(CHEAP) and models[0]["dcml"]["nodes"] == 2

        raw = oai.chat.completions.with_raw_response.create(
            model=MODEL, messages=[{"role": "user", "content": "hello there"}], max_tokens=12)
        answer = raw.parse()
        assert answer.choices[0].message.content and answer.usage.completion_tokens == 12
        receipt = SignedReceipt.from_header(raw.headers["x-dcml-receipt"])
        assert raw.headers["x-dcml-node"] == cheap.url  # the cheapest verified node
        assert receipt.receipt.output_tokens == 12 and int(raw.headers["x-dcml-cost"]) == receipt.receipt.cost
        assert receipt.receipt.cost == receipt.receipt.input_tokens * PRICE_IN + 12 * CHEAP

        chunks = list(oai.completions.create(model=MODEL, prompt="count with me", max_tokens=30, stream=True))
        text = "".join(c.choices[0].text for c in chunks if c.choices)
        assert len(text) > 0
        (last,) = [c for c in chunks if getattr(c, "dcml_receipt", None)]
        streamed = SignedReceipt.from_json(json.dumps(last.dcml_receipt))
        assert streamed.receipt.output_tokens == 30 and int(last.dcml_cost) == streamed.receipt.cost

        if shutil.which("curl"):
            body = json.dumps({"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5})
            out = subprocess.run(["curl", "-sS", "-D", "-", f"{server.url}/v1/chat/completions", "-H",
                                  "content-type: application/json", "-d", body], capture_output=True, check=True,
                                 text=True).stdout
            assert "x-dcml-receipt:" in out.lower() and '"completion_tokens":5' in out.replace(" ", "")
            out = subprocess.run(["curl", "-sS", "-N", f"{server.url}/v1/chat/completions", "-H",
                                  "content-type: application/json", "-d", body[:-1] + ', "stream": true}'],
                                 capture_output=True, check=True, text=True).stdout
            assert '"dcml_receipt"' in out and out.rstrip().endswith("data: [DONE]")

        # Every answer verified and stored by the SDK; the node with the forged attestation was never paid.
        spend = httpx.get(f"{server.url}/dcml/spend").json()
        by_url = {n["url"]: n for n in spend["nodes"]}
        assert len(by_url[cheap.url]["receipts"]) == (4 if shutil.which("curl") else 2)
        assert by_url[cheap.url]["violations"] == [] and by_url[forged.url]["channels"] == []
        assert "not usable" in by_url[forged.url]["last_error"]
        assert forged_app.state.node.gate.payments.ledger.channels() == []
        assert by_url[dear.url]["receipts"] == []
    finally:
        server.stop()


def test_spending_limits_are_clear_errors_not_payments(nodes, payer, deployment, tmp_path) -> None:
    (cheap, _, _), _, _ = nodes
    server, _ = start_gateway(payer, deployment, tmp_path / "gw", [cheap.url],
                              limits={"per_request": 100 * CHEAP + 300 * PRICE_IN})
    try:
        oai = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)
        with pytest.raises(openai.APIStatusError) as refused:
            oai.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=500)
        assert refused.value.status_code == 402 and refused.value.code == "spending_limit_per_request"
        assert "Nothing was paid" in refused.value.message
        spend = httpx.get(f"{server.url}/dcml/spend").json()
        assert all(n["channels"] == [] and n["receipts"] == [] for n in spend["nodes"])  # no channel, no voucher
        ok = oai.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=5)
        assert ok.usage.completion_tokens == 5
    finally:
        server.stop()
    server, _ = start_gateway(payer, deployment, tmp_path / "gw2", [cheap.url], limits={"per_hour": 10**15})
    try:
        oai = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)
        oai.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=100)
        with pytest.raises(openai.APIStatusError) as refused:
            for _ in range(20):  # each ~100 tokens x 2e12 + prompt: the hourly 1e15 runs out within a few
                oai.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}],
                                            max_tokens=100)
        assert refused.value.status_code == 402 and refused.value.code == "spending_limit_per_hour"
    finally:
        server.stop()


@pytest.mark.slow
def test_node_killed_before_its_first_token_fails_over_and_is_paid_once(w3, payer, deployment, tmp_path) -> None:
    path = tmp_path / "deployment.json"
    deployment.save(path)
    slow = synthetic_node(w3, path, tmp_path / "slow", free_port(), CHEAP, first_token_ms=4000)  # cheapest
    backup, _, backup_app = start_node(w3, path, tmp_path / "backup", DEAR)
    server, _ = start_gateway(payer, deployment, tmp_path / "gw", [slow.url, backup.url])
    try:
        oai = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)
        killer = threading.Timer(1.5, slow.kill)  # admitted and paid up front, waiting for its first token
        killer.start()
        stream = oai.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "fail over"}],
                                             max_tokens=10, stream=True)
        chunks = list(stream)
        killer.join()
        assert slow.proc.poll() is not None
        (last,) = [c for c in chunks if getattr(c, "dcml_receipt", None)]
        assert last.dcml_node == backup.url
        assert SignedReceipt.from_json(json.dumps(last.dcml_receipt)).receipt.output_tokens == 10
        spend = httpx.get(f"{server.url}/dcml/spend").json()
        by_url = {n["url"]: n for n in spend["nodes"]}
        assert by_url[slow.url]["receipts"] == [] and by_url[slow.url]["failures"] >= 1
        (receipt,) = by_url[backup.url]["receipts"]  # paid once: one receipt, from the node that answered
        assert int(spend["spent_last_hour"]) == int(receipt["cost"])
        (balance,) = backup_app.state.node.gate.payments.ledger.channels()
        assert balance.spent == int(receipt["cost"])  # the node charged exactly what its receipt says
        # The next request goes straight to the backup: the dead node is backed off.
        ok = oai.chat.completions.with_raw_response.create(model=MODEL, messages=[{"role": "user", "content": "x"}],
                                                           max_tokens=3)
        assert ok.headers["x-dcml-node"] == backup.url
    finally:
        slow.kill()
        server.stop()
        backup.stop()


def test_only_registered_nodes_are_used_when_required(w3, deployment, payer, node_account, tmp_path) -> None:
    from dcml.client.chain.devnet import NODE_MIN_STAKE
    from dcml.client.chain.registry import RegistryClient
    from dcml.node.network.registration import ensure_registered

    path = tmp_path / "deployment.json"
    deployment.save(path)
    unregistered, _, _ = start_node(w3, path, tmp_path / "unregistered", CHEAP)  # cheaper, but not staked
    registered, identity, _ = start_node(w3, path, tmp_path / "registered", DEAR)
    ensure_registered(w3, deployment.node_registry, identity, SimulatedProvider(), node_account,
                      endpoint=registered.url, peer_id=bytes.fromhex("002408011220") + b"\x22" * 32,
                      stake=NODE_MIN_STAKE, node_version="test")
    try:
        for name, nodes, cfg in (("static", [unregistered.url, registered.url], {"require_registered": True}),
                                 ("registry", [], {"registry": True})):
            server, _ = start_gateway(payer, deployment, tmp_path / name, nodes, **cfg)
            try:
                oai = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)
                raw = oai.chat.completions.with_raw_response.create(
                    model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=3)
                if name == "static":
                    assert raw.headers["x-dcml-node"] == registered.url
                else:  # other tests' registered nodes may be on the registry too: any active one will do
                    active = {n.endpoint for n in RegistryClient(w3, deployment.node_registry).nodes()
                              if n.status.name == "ACTIVE"}
                    assert raw.headers["x-dcml-node"] in active and registered.url in active
                by_url = {n["url"]: n for n in httpx.get(f"{server.url}/dcml/spend").json()["nodes"]}
                assert unregistered.url not in by_url or by_url[unregistered.url]["channels"] == []
            finally:
                server.stop()
    finally:
        unregistered.stop()
        registered.stop()


def test_dcml_gateway_command_serves_curl(nodes, payer, deployment, tmp_path) -> None:
    """The real `dcml gateway` process, configured by a TOML file and the wallet key in the env."""
    import os
    import sys
    import time

    (cheap, _, _), _, _ = nodes
    if not shutil.which("curl"):
        pytest.skip("curl is not installed")
    path = tmp_path / "deployment.json"
    deployment.save(path)
    port = free_port()
    config = tmp_path / "gateway.toml"
    config.write_text(f'port = {port}\ndeployment = "{path}"\nstore_dir = "{tmp_path / "store"}"\n'
                      f'allow_simulated = true\nnodes = ["{cheap.url}"]\ndeposit = {10**17}\n'
                      f'[limits]\nper_request = {10**16}\n')
    env = {**os.environ, "DCML_WALLET_KEY": "0x" + payer.key.hex().removeprefix("0x")}
    command = [sys.executable, "-c", "from dcml.client.sdk.cli import app; app()", "gateway", "--config", str(config)]
    proc = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None, proc.stdout.read()
            try:
                httpx.get(f"http://127.0.0.1:{port}/v1/models", timeout=2)
                break
            except httpx.TransportError:
                assert time.monotonic() < deadline, "the gateway did not start"
                time.sleep(0.2)
        body = json.dumps({"model": MODEL, "prompt": "curl me", "max_tokens": 4})
        out = subprocess.run(["curl", "-sS", "-D", "-", f"http://127.0.0.1:{port}/v1/completions", "-H",
                              "content-type: application/json", "-d", body], capture_output=True, check=True,
                             text=True).stdout
        assert "x-dcml-receipt:" in out.lower() and f"x-dcml-node: {cheap.url}" in out.lower()
    finally:
        proc.terminate()
        output = proc.communicate(timeout=30)[0]
    assert "verified" in output and "answered by" in output  # its progress, readable in the terminal


def test_malformed_requests_are_clear_4xx_and_cost_nothing(nodes, payer, deployment, tmp_path) -> None:
    (cheap, _, _), _, _ = nodes
    server, _ = start_gateway(payer, deployment, tmp_path / "gw", [cheap.url], limits={"per_hour": 10**16})
    try:
        url = f"{server.url}/v1/chat/completions"
        cases = [b"{not json", b"[1, 2]", b"[" * 100_000 + b"]" * 100_000, json.dumps({"messages": []}).encode(),
                 json.dumps({"model": MODEL, "messages": [], "max_tokens": -5}).encode(),
                 json.dumps({"model": MODEL, "messages": [], "max_tokens": "9"}).encode(),
                 b'{"model": "' + b"x" * (2 << 20) + b'"}']
        for body in cases:
            r = httpx.post(url, content=body, headers={"content-type": "application/json"}, timeout=30)
            assert 400 <= r.status_code < 500 and r.json()["error"]["code"], (body[:40], r.status_code)
        unknown = httpx.post(url, json={"model": "nope", "messages": [{"role": "user", "content": "x"}]})
        assert unknown.status_code == 503 and unknown.json()["error"]["code"] == "no_node"
        spend = httpx.get(f"{server.url}/dcml/spend").json()
        assert spend["in_flight_reserved"] == "0" and spend["spent_last_hour"] == "0"
        assert all(n["receipts"] == [] for n in spend["nodes"])
    finally:
        server.stop()


def test_openai_npm_package_gets_paid_answers(nodes, payer, deployment, tmp_path) -> None:
    from pathlib import Path

    js = Path(__file__).parent / "js"
    if not (shutil.which("node") and (js / "node_modules" / "openai").is_dir()):
        import os

        if os.environ.get("CI"):
            pytest.fail("the openai npm package is missing: make test runs `npm ci` in tests/js")
        pytest.skip("cd tests/js && npm ci")
    (cheap, _, _), _, _ = nodes
    server, _ = start_gateway(payer, deployment, tmp_path / "gw", [cheap.url])
    try:
        out = subprocess.run(["node", str(js / "gateway_client.mjs"), f"{server.url}/v1", MODEL],
                             capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, out.stderr
        result = json.loads(out.stdout)
        assert result["answer"] and result["usage"]["completion_tokens"] == 6
        assert SignedReceipt.from_header(result["receiptHeader"]).receipt.output_tokens == 6
        assert result["streamedText"]
        assert SignedReceipt.from_json(json.dumps(result["streamedReceipt"])).receipt.output_tokens == 9
        spend = httpx.get(f"{server.url}/dcml/spend").json()
        assert len(spend["nodes"][0]["receipts"]) == 2 and spend["nodes"][0]["violations"] == []
    finally:
        server.stop()


def test_concurrent_streams_each_paid_on_their_own_channel(nodes, payer, deployment, tmp_path) -> None:
    import asyncio

    (cheap, _, _), _, _ = nodes
    server, _ = start_gateway(payer, deployment, tmp_path / "gw", [cheap.url], channels_per_node=3)
    oai = openai.AsyncOpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)

    async def one(i: int) -> SignedReceipt:
        stream = await oai.completions.create(model=MODEL, prompt=f"together {i}", max_tokens=20, stream=True)
        receipt = None
        async for chunk in stream:
            receipt = getattr(chunk, "dcml_receipt", None) or receipt
        return SignedReceipt.from_json(json.dumps(receipt))

    async def run() -> list[SignedReceipt]:
        return await asyncio.gather(*(one(i) for i in range(8)))

    try:
        receipts = asyncio.run(run())
        assert all(r.receipt.output_tokens == 20 for r in receipts)
        (node,) = httpx.get(f"{server.url}/dcml/spend").json()["nodes"]
        assert len(node["receipts"]) == 8 and node["violations"] == [] and 1 <= len(node["channels"]) <= 3
        assert len({r.receipt.receipt_id for r in receipts}) == 8
    finally:
        server.stop()
