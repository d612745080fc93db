"""The operator status page on a real paid node (anvil, loopback, a paid request): the token gate, the CSP,
the JSON figures against the chain and /metrics, and the page itself in a real headless chromium.

The screenshot lands in $DCML_TEST_ARTIFACTS (default: test-artifacts/) as status_page.png.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from dcml.client.demo.kit.nodes import MODEL, paid_settings, serve_node
from dcml.client.demo.kit.raw_payer import RawPayer
from dcml.node.api.app import create_app
from dcml.node.api.server import BackgroundServer
from dcml.node.config import StatusConfig
from dcml.node.engine.synthetic import SyntheticEngine
from dcml.node.identity import EnclaveIdentity
from dcml.node.tee.simulated import SimulatedProvider

TOKEN = "operator-token-" + "x7" * 12
ARTIFACTS = Path(os.environ.get("DCML_TEST_ARTIFACTS", "test-artifacts"))


@pytest.fixture
def node(w3, deployment, tmp_path):
    path = tmp_path / "deployment.json"
    deployment.save(path)
    settings = paid_settings(path, tmp_path / "node", settle_threshold=1, settle_interval_s=0.2)
    settings = settings.model_copy(update={"status": StatusConfig(token=TOKEN)})
    node = serve_node(w3, settings)
    server = node.server
    yield server, node.identity, node.app
    server.stop()


@pytest.fixture
def paid(w3, deployment, payer, node):
    """One paid, streamed request, its vouchers settled on-chain; returns the channel id (0x hex), its chain
    state and the receipt."""
    server, identity, app = node
    client = RawPayer(w3, deployment, payer, server.url, identity.address)
    answer = client.ask("status page check", max_tokens=20)
    assert answer.status == 200 and answer.receipt is not None
    channel = "0x" + client.channel_id.hex()
    payments = app.state.node.gate.payments
    chain, accepted = payments.chain, payments.ledger.get(channel).accepted
    assert accepted > 0
    deadline = time.monotonic() + 30
    while chain.channel(client.channel_id, fresh=True).settled < accepted:
        assert time.monotonic() < deadline, "the settlement worker never settled the paid request"
        time.sleep(0.2)
    return channel, chain.channel(client.channel_id, fresh=True), answer.receipt.receipt


def test_refused_without_the_token_and_strict_csp(node) -> None:
    server, _, _ = node
    for headers in ({}, {"authorization": "Bearer wrong-token-wrong-token"}, {"cookie": "dcml_status=abc"}):
        r = httpx.get(f"{server.url}/status/data", headers=headers)
        assert r.status_code == 401 and r.json()["error"]["code"] == "status_unauthorized"
        assert "wei" not in r.text and "channel" not in r.text
    page = httpx.get(f"{server.url}/status")
    assert page.status_code == 401 and 'name="token"' in page.text and "channels" not in page.text.lower()
    csp = page.headers["content-security-policy"]
    assert "default-src 'none'" in csp and "script-src 'self'" in csp and "unsafe-inline" not in csp
    assert "<script>" not in page.text and "style=" not in page.text
    wrong = httpx.post(f"{server.url}/status/login", data={"token": "nope"}, follow_redirects=False)
    assert wrong.status_code == 401 and "set-cookie" not in wrong.headers
    ok = httpx.post(f"{server.url}/status/login", data={"token": TOKEN}, follow_redirects=False)
    assert ok.status_code == 303 and TOKEN not in ok.headers["set-cookie"]
    assert "httponly" in ok.headers["set-cookie"].lower() and "samesite=strict" in ok.headers["set-cookie"].lower()
    assert httpx.get(f"{server.url}/status", cookies=ok.cookies).status_code == 200


def test_status_off_without_a_token(w3, deployment, tmp_path) -> None:
    path = tmp_path / "deployment.json"
    deployment.save(path)
    app = create_app(paid_settings(path, tmp_path / "node"), engine=SyntheticEngine(model_name=MODEL),
                     identity=EnclaveIdentity.generate(), provider=SimulatedProvider())
    server = BackgroundServer(app).start()
    try:
        assert httpx.get(f"{server.url}/status/data", headers={"authorization": f"Bearer {TOKEN}"}).status_code == 404
        assert httpx.post(f"{server.url}/status/login", data={"token": ""}).status_code == 404
    finally:
        server.stop()


def test_json_figures_equal_the_chain_and_metrics(node, paid, deployment) -> None:
    server, identity, _ = node
    channel, state, receipt = paid
    s = httpx.get(f"{server.url}/status/data", headers={"authorization": f"Bearer {TOKEN}"}).json()
    assert s["identity"]["address"] == identity.address and s["identity"]["tee_type"] == "simulated"
    assert len(s["identity"]["measurements"]["mrtd"]) == 96
    (ch,) = [c for c in s["payments"]["channels"] if c["channel_id"] == channel]
    assert int(ch["settled"]) == state.settled == int(ch["accepted"]) > 0
    assert int(ch["deposit"]) == state.deposit and int(ch["spent"]) == receipt.cumulative_spent
    assert ch["model"] == MODEL and ch["finalized"] is False and s["payments"]["pending_closes"] == []
    royalty = state.settled * state.params.publisher_bps // 10_000
    assert int(s["payments"]["earnings_by_model"][MODEL]) == state.settled - royalty
    metrics = {(sample.name, sample.labels.get("model")): sample.value
               for family in text_string_to_metric_families(httpx.get(f"{server.url}/metrics").text)
               for sample in family.samples}
    assert s["load"]["output_tokens"] == metrics[("dcml_output_tokens_total", MODEL)] == receipt.output_tokens


def _chromium():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    browser, driver = shutil.which("chromium"), shutil.which("chromedriver")
    if not (browser and driver):
        if os.environ.get("CI"):
            pytest.fail("chromium and chromium-driver are missing (make test installs them)")
        pytest.skip("chromium/chromium-driver not installed: apt-get install -y chromium chromium-driver")
    options = webdriver.ChromeOptions()
    options.binary_location = browser
    profile = tempfile.mkdtemp(prefix="dcml-chromium-")
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-dev-shm-usage",
                 "--window-size=1400,1800", f"--user-data-dir={profile}"):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    return webdriver.Chrome(options=options, service=Service(driver)), profile


def test_status_page_in_headless_chromium(node, paid) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    server, identity, _ = node
    channel, state, _ = paid
    browser, profile = _chromium()
    try:
        browser.get(f"{server.url}/status")  # no token: the sign-in form, no figures
        assert browser.find_elements(By.ID, "token") and not browser.find_elements(By.ID, "channels")
        browser.find_element(By.ID, "token").send_keys("not-the-token")
        browser.find_element(By.ID, "sign-in").click()
        # the form posts and the page reloads: wait for the answer rather than race it on a loaded machine
        WebDriverWait(browser, 30).until(lambda b: b.find_elements(By.ID, "login-error"))
        assert "Wrong token" in browser.find_element(By.ID, "login-error").text
        browser.find_element(By.ID, "token").send_keys(TOKEN)
        browser.find_element(By.ID, "sign-in").click()

        def cell(field: str) -> str:
            found = browser.find_elements(By.CSS_SELECTOR, f'#channels tr[data-channel="{channel}"] '
                                                           f'td[data-field="{field}"]')
            return found[0].text if found else ""

        WebDriverWait(browser, 20).until(lambda _: cell("settled"))
        assert cell("settled") == str(state.settled) and cell("deposit") == str(state.deposit)
        earnings = browser.find_element(By.CSS_SELECTOR, f'#earnings tr[data-key="{MODEL}"] td').text
        royalty = state.settled * state.params.publisher_bps // 10_000
        assert earnings == str(state.settled - royalty)
        assert identity.address in browser.find_element(By.ID, "identity").text
        assert browser.find_element(By.ID, "error").text == ""
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        assert browser.save_screenshot(str(ARTIFACTS / "status_page.png"))
        # The CSP let our own script and style through and nothing was refused.
        refused = [e for e in browser.get_log("browser") if "Content Security Policy" in e.get("message", "")]
        assert not refused, refused
    finally:
        browser.quit()
        shutil.rmtree(profile, ignore_errors=True)


def test_dcml_node_status_prints_the_same(node, paid) -> None:
    import json

    from typer.testing import CliRunner

    from dcml.node.cli import app

    server, identity, _ = node
    channel, state, _ = paid
    runner = CliRunner()
    raw = runner.invoke(app, ["status", "--url", server.url, "--json"], env={"DCML_NODE__STATUS__TOKEN": TOKEN})
    assert raw.exit_code == 0, raw.output
    (ch,) = [c for c in json.loads(raw.output)["payments"]["channels"] if c["channel_id"] == channel]
    assert int(ch["settled"]) == state.settled
    shown = runner.invoke(app, ["status", "--url", server.url, "--token", TOKEN], env={"COLUMNS": "300"})
    assert shown.exit_code == 0, shown.output
    assert identity.address in shown.output and channel in shown.output and str(state.settled) in shown.output
    refused = runner.invoke(app, ["status", "--url", server.url, "--token", "wrong-token-wrong-token"])
    assert refused.exit_code == 1 and "401" in refused.output


def test_registry_status_and_stake_come_from_the_chain(w3, deployment, node_account, tmp_path, monkeypatch) -> None:
    from dcml.client.chain.devnet import NODE_MIN_STAKE
    from dcml.client.chain.registry import RegistryClient
    from dcml.node.config import RegistryConfig

    path = tmp_path / "deployment.json"
    deployment.save(path)
    monkeypatch.setenv("DCML_OPERATOR_KEY", "0x" + node_account.key.hex().removeprefix("0x"))
    settings = paid_settings(path, tmp_path / "node").model_copy(update={
        "status": StatusConfig(token=TOKEN), "registry": RegistryConfig(enabled=True, stake=NODE_MIN_STAKE)})
    node = serve_node(w3, settings)  # registers on chain at start (NodePresence)
    server, identity = node.server, node.identity
    try:
        s = httpx.get(f"{server.url}/status/data", headers={"authorization": f"Bearer {TOKEN}"}).json()
        record = RegistryClient(w3, deployment.node_registry).node(identity.address)
        r = s["registry"]
        assert r["status"] == "active" and int(r["stake"]) == record.stake == NODE_MIN_STAKE
        assert r["last_attested_at"] == record.attested_at > 0 and r["operator"] == node_account.address
        assert s["identity"]["attestation_hash"] == "0x" + record.attestation_hash.hex()
    finally:
        server.stop()


def test_pending_close_shows_its_deadline_from_the_chain(w3, deployment, payer, tmp_path) -> None:
    path = tmp_path / "deployment.json"
    deployment.save(path)
    settings = paid_settings(path, tmp_path / "node", settle_interval_s=1000).model_copy(
        update={"status": StatusConfig(token=TOKEN)})  # the worker sleeps: the close stays pending
    node = serve_node(w3, settings)
    server, identity = node.server, node.identity
    try:
        client = RawPayer(w3, deployment, payer, server.url, identity.address)
        assert client.ask("close me", max_tokens=5, stream=False).status == 200
        client.channels.request_close(client.channel_id)
        state = client.channels.get(client.channel_id)
        s = httpx.get(f"{server.url}/status/data", headers={"authorization": f"Bearer {TOKEN}"}).json()
        (pending,) = s["payments"]["pending_closes"]
        assert pending["channel_id"] == "0x" + client.channel_id.hex()
        assert pending["close_requested_at"] == state.close_requested_at > 0
        assert pending["close_deadline"] == state.close_requested_at + deployment.close_grace_period
        assert pending["close_in_s"] == pending["close_deadline"] - s["payments"]["chain_time"]
    finally:
        server.stop()
