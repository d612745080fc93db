"""The node's non-OpenAI surface: /health, Prometheus /metrics, /v1/attestation, config loading."""

from __future__ import annotations

import os
from types import SimpleNamespace

import httpx
import pytest

from dcml.client.attestation.verify import AttestationDocument, Policy, verify_attestation
from dcml.client.wire.receipts import ReceiptDomain
from dcml.node import __version__
from dcml.node.api.app import create_app
from dcml.node.api.server import BackgroundServer
from dcml.node.config import ConfigError, load_settings, resolve_receipt_domain
from dcml.node.engine.synthetic import SyntheticEngine
from dcml.node.identity import EnclaveIdentity
from dcml.node.tee.simulated import SimulatedProvider

MODEL = "synthetic"


@pytest.fixture(scope="module")
def node(tmp_path_factory):
    identity = EnclaveIdentity.generate()
    settings = load_settings(None, data_dir=tmp_path_factory.mktemp("node"))
    app = create_app(settings, engine=SyntheticEngine(model_name=MODEL), identity=identity,
                     provider=SimulatedProvider())
    with BackgroundServer(app) as srv:
        yield SimpleNamespace(url=srv.url, http=httpx.Client(base_url=srv.url), identity=identity)


def test_health(node):
    h = node.http.get("/health").json()
    assert h == {"status": "ok", "model": MODEL, "address": node.identity.address, "tee": "simulated",
                 "version": __version__}


def test_metrics_expose_the_counters(node):
    chat = {"model": MODEL, "messages": [{"role": "user", "content": "count me"}], "max_tokens": 5}
    node.http.post("/v1/chat/completions", json=chat)
    node.http.post("/v1/chat/completions", json={**chat, "stream": True})
    node.http.post("/v1/chat/completions", json={**chat, "model": "nope"})
    node.http.get(f"/v1/receipts/0x{'00' * 32}")
    text = node.http.get("/metrics").text
    assert 'dcml_http_requests_total{method="POST",route="/v1/chat/completions",status="200"} 2.0' in text
    assert 'dcml_http_requests_total{method="POST",route="/v1/chat/completions",status="404"} 1.0' in text
    assert 'route="/v1/receipts/{receipt_id}"' in text  # the template, never the id
    assert f'dcml_time_to_first_token_seconds_count{{model="{MODEL}"}} 2.0' in text
    assert f'dcml_output_tokens_total{{model="{MODEL}"}} 10.0' in text
    assert f'dcml_generation_duration_seconds_count{{model="{MODEL}"}} 2.0' in text
    assert 'dcml_errors_total{kind="http_404"}' in text
    assert "dcml_engine_queue_depth 0.0" in text and "dcml_in_flight_requests" in text


def test_attestation_document_verifies(node):
    nonce = os.urandom(32)
    r = node.http.get("/v1/attestation", params={"nonce": nonce.hex()})
    assert r.status_code == 200
    doc = AttestationDocument.model_validate_json(r.content)
    assert doc.node_version == __version__ and doc.signing_address == node.identity.address
    verified = verify_attestation(doc, nonce=nonce, policy=Policy(allow_simulated=True), allow_simulated=True)
    assert verified.signing_address == node.identity.address
    assert verified.hpke_public_key == node.identity.hpke_public_bytes()


@pytest.mark.parametrize("query", ["", "?nonce=", "?nonce=abcd", "?nonce=" + "zz" * 32, "?nonce=" + "00" * 33])
def test_attestation_bad_nonce_is_400(node, query):
    r = node.http.get("/v1/attestation" + query)
    assert r.status_code == 400 and r.json()["error"]["param"] == "nonce"


def test_config_file_and_environment(tmp_path, monkeypatch):
    cfg = tmp_path / "node.toml"
    cfg.write_text('[server]\nport = 9100\n[engine]\nkind = "synthetic"\nserved_model_name = "m"\n')
    monkeypatch.setenv("DCML_NODE__SERVER__PORT", "9200")
    monkeypatch.setenv("DCML_NODE__LIMITS__MAX_TOKENS_CAP", "77")
    s = load_settings(cfg)
    assert (s.server.port, s.engine.kind, s.engine.served_model_name, s.limits.max_tokens_cap) == (
        9200, "synthetic", "m", 77)
    assert s.receipts.chain_id is None and resolve_receipt_domain(s) == ReceiptDomain()  # no court: the default
    with pytest.raises(ConfigError):
        load_settings(tmp_path / "missing.toml")
    cfg.write_text("[server]\nprot = 1\n")
    with pytest.raises(ValueError):
        load_settings(cfg)
    # SLA terms are backed by the registry stake and judge paid requests: both must be on
    cfg.write_text("[sla]\nenabled = true\n[payments]\nenabled = true\n")
    with pytest.raises(ValueError, match=r"\[sla\] enabled needs \[registry\]"):
        load_settings(cfg)
    # a receipts domain names its chain with its contract
    cfg.write_text('[receipts]\nverifying_contract = "0x' + "11" * 20 + '"\n')
    with pytest.raises(ValueError, match="set chain_id too"):
        load_settings(cfg)


def test_example_config_loads():
    s = load_settings(os.path.join(os.path.dirname(__file__), "..", "configs", "node.toml"))
    assert s.engine.kind == "embedded" and s.tee.provider == "simulated"
