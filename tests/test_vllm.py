"""The node in front of a REAL vLLM (CPU build, started once for the session by the `vllm` fixture).

Each answer through the node is compared with the same request sent to vLLM directly: same seed, same text and
usage; fields the node does not use itself (ignore_eos, min_tokens, logprobs, response_format, ...) change vLLM's
output the same way. Paid answers are receipted and settle to the wei. The last two tests kill vLLM mid-stream and
bring it back from an encrypted model decrypted into tmpfs: keep them last (they end the session's vLLM).
"""

from __future__ import annotations

import functools
import json
import time
from pathlib import Path

import httpx
import pytest

from dcml.client.demo.kit.nodes import PRICE_IN, PRICE_OUT, serve_node
from dcml.client.demo.kit.raw_payer import RawPayer
from dcml.client.publisher.key_broker import create_app as create_broker_app
from dcml.client.wire.receipts import Price, ReceiptDomain, SignedReceipt, parse_sse_stream, verify_signed_receipt
from dcml.node.api.app import create_app
from dcml.node.api.server import BackgroundServer
from dcml.node.config import load_settings
from dcml.node.identity import EnclaveIdentity
from dcml.node.model_source import filesystem_type
from dcml.node.tee.simulated import SimulatedProvider
from tests.model_helpers import PUBLISHER, make_bundle, sim_broker

MODEL = "dcml-demo"
DEMO = Path(__file__).resolve().parent.parent / "models" / "demo"
MESSAGES = [{"role": "user", "content": "Tell me of the king and the sea."}]


def engine_config(server, **extra) -> dict:
    # base_url with the /v1 suffix that the config's help once suggested: it must still work
    return {"kind": "openai", "served_model_name": MODEL, "base_url": server.base_url + "/v1", "model_dir": DEMO,
            **extra}


@pytest.fixture(scope="module")
def node(vllm, tmp_path_factory):
    settings = load_settings(None, data_dir=tmp_path_factory.mktemp("node"), engine=engine_config(vllm))
    app = create_app(settings, identity=EnclaveIdentity.generate(), provider=SimulatedProvider())
    with BackgroundServer(app) as srv:
        yield srv


def paid_node(vllm, w3, deployment, tmp: Path, prepay: int = 8, credit: int = 4
              ) -> tuple[BackgroundServer, EnclaveIdentity, object]:
    deployment_file = tmp / "deployment.json"
    deployment.save(deployment_file)
    settings = load_settings(None, data_dir=tmp / "node", engine=engine_config(vllm), payments={
        "enabled": True, "deployment": deployment_file, "prepay_tokens": prepay, "credit_tokens": credit,
        "voucher_timeout_s": 10.0, "settle_threshold": 10**30, "settle_interval_s": 0.3,
        "prices": {MODEL: {"price_per_input_token": PRICE_IN, "price_per_output_token": PRICE_OUT}}})
    node = serve_node(w3, settings)  # the vLLM engine its config names
    return node.server, node.identity, node.app


def direct(vllm, path: str, body: dict) -> httpx.Response:
    return httpx.post(vllm.base_url + path, json={"model": MODEL, **body}, timeout=120)


def via_node(node, path: str, body: dict) -> httpx.Response:
    return httpx.post(node.url + path, json={"model": MODEL, **body}, timeout=120)


def counts(usage: dict) -> tuple[int, int, int]:
    return usage["prompt_tokens"], usage["completion_tokens"], usage["total_tokens"]


def text_of(obj: dict) -> str:
    choice = obj["choices"][0]
    return choice["text"] if "text" in choice else choice["message"]["content"]


def streamed(node, path: str, body: dict) -> tuple[str, dict, list[dict], object]:
    """(text, usage, choice chunks, receipt) of a streamed answer through the node."""
    r = via_node(node, path, {**body, "stream": True, "stream_options": {"include_usage": True}})
    assert r.status_code == 200, r.text
    payloads, receipt = parse_sse_stream(r.content)
    assert payloads[-1] == b"[DONE]" and receipt is not None
    objs = [json.loads(p) for p in payloads[:-1]]
    usage = objs[-1]["usage"]
    chunks = [o["choices"][0] for o in objs if o["choices"]]
    text = "".join(c.get("text") or (c.get("delta") or {}).get("content") or "" for c in chunks)
    return text, usage, chunks, receipt


def test_model_and_context_come_from_vllm(node):
    (model,) = httpx.get(node.url + "/v1/models").json()["data"]
    assert model["id"] == MODEL and model["max_model_len"] == 512  # vLLM's --max-model-len, not a default
    assert httpx.get(node.url + "/health").json()["status"] == "ok"


@pytest.mark.parametrize("path,body", [
    ("/v1/completions", {"prompt": "The king"}),
    ("/v1/chat/completions", {"messages": MESSAGES}),
])
def test_same_seed_same_answer_as_vllm_and_defaults_left_to_it(vllm, node, path, body):
    # no temperature/top_p: vLLM applies the model's generation_config (0.8 / 0.95) on both paths
    body = {**body, "max_tokens": 24, "seed": 11}
    want = direct(vllm, path, body).json()
    got = via_node(node, path, body)
    assert got.status_code == 200 and got.headers["x-dcml-receipt"]
    assert text_of(got.json()) == text_of(want)
    assert counts(got.json()["usage"]) == counts(want["usage"])  # the node's own prompt count agrees with vLLM's
    assert got.json()["choices"][0]["finish_reason"] == want["choices"][0]["finish_reason"]
    text, usage, _, _ = streamed(node, path, body)
    assert (text, counts(usage)) == (text_of(want), counts(want["usage"]))


def test_vllm_only_fields_pass_through(vllm, node):
    # ignore_eos reaches max_tokens; min_tokens, top_k and repetition_penalty change sampling the same way
    body = {"prompt": "The sea", "max_tokens": 80, "seed": 5, "ignore_eos": True, "min_tokens": 10, "top_k": 20,
            "repetition_penalty": 1.3}
    want = direct(vllm, "/v1/completions", body).json()
    assert want["usage"]["completion_tokens"] == 80
    text, usage, chunks, receipt = streamed(node, "/v1/completions", body)
    assert text == text_of(want) and counts(usage) == counts(want["usage"])
    assert receipt.receipt.output_tokens == 80 and chunks[-1]["finish_reason"] == "length"


def test_logprobs_as_vllm_sends_them(vllm, node):
    body = {"prompt": "The king", "max_tokens": 12, "seed": 3, "logprobs": 2}
    want = direct(vllm, "/v1/completions", body).json()["choices"][0]["logprobs"]
    got = via_node(node, "/v1/completions", body).json()["choices"][0]["logprobs"]
    assert got["tokens"] == want["tokens"] and len(got["top_logprobs"]) == 12
    assert got["token_logprobs"] == pytest.approx(want["token_logprobs"], abs=1e-4)
    _, _, chunks, _ = streamed(node, "/v1/chat/completions", {"messages": MESSAGES, "max_tokens": 6, "seed": 3,
                                                               "logprobs": True, "top_logprobs": 2})
    entries = [e for c in chunks if c["logprobs"] for e in c["logprobs"]["content"]]
    assert len(entries) == 6 and all(len(e["top_logprobs"]) == 2 for e in entries)


@functools.cache
def no_blanks() -> dict[str, int]:
    """logit_bias banning whitespace-only tokens: xgrammar lets JSON have any whitespace, and this small model
    loves newlines (it would spend max_tokens on them)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(DEMO)
    return {str(i): -100 for i in range(tok.vocab_size) if not tok.decode([i]).strip()}


def test_json_schema_gives_valid_json(vllm, node):
    blank = no_blanks()
    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"],
              "additionalProperties": False}
    body = {"messages": MESSAGES, "max_tokens": 40, "seed": 1, "logit_bias": blank,
            "response_format": {"type": "json_schema", "json_schema": {"name": "answer", "schema": schema}}}
    got = via_node(node, "/v1/chat/completions", body)
    assert got.status_code == 200, got.text
    assert isinstance(json.loads(text_of(got.json()))["ok"], bool)
    assert text_of(got.json()) == text_of(direct(vllm, "/v1/chat/completions", body).json())


def test_stop_string_finish_and_stop_reason_as_sent(vllm, node):
    free = text_of(direct(vllm, "/v1/completions", {"prompt": "The king", "max_tokens": 30, "seed": 2,
                                                    "ignore_eos": True}).json())
    word = free.split()[3]
    body = {"prompt": "The king", "max_tokens": 30, "seed": 2, "ignore_eos": True, "stop": [word]}
    want = direct(vllm, "/v1/completions", body).json()["choices"][0]
    assert (want["finish_reason"], want["stop_reason"]) == ("stop", word)
    got = via_node(node, "/v1/completions", body).json()["choices"][0]
    assert (got["text"], got["finish_reason"], got["stop_reason"]) == (want["text"], "stop", word)
    _, _, chunks, _ = streamed(node, "/v1/completions", body)
    assert (chunks[-1]["finish_reason"], chunks[-1]["stop_reason"]) == ("stop", word)


def test_vllm_400_comes_back_as_400_with_its_message(vllm, node):
    body = {"prompt": "The king", "max_tokens": 5, "min_tokens": 9}  # vLLM refuses min_tokens > max_tokens
    want = direct(vllm, "/v1/completions", body)
    assert want.status_code == 400
    for stream in (False, True):
        got = via_node(node, "/v1/completions", {**body, "stream": stream})
        assert got.status_code == 400
        err = got.json()["error"]
        assert set(err) == {"message", "type", "param", "code"}
        assert err["message"] == want.json()["error"]["message"] and err["type"] == "invalid_request_error"


def test_tool_calls_as_vllm_sends_them_streamed_or_not(vllm, node):
    # A named tool_choice (the session's vLLM runs with a tool-call parser): vLLM constrains the arguments to the
    # tool's schema and answers with tool_calls. The node streams from vLLM in both cases; its non-streamed answer
    # merges the streamed deltas into message.tool_calls, as vLLM's own non-streamed answer has them.
    tool = {"type": "function", "function": {"name": "get_weather", "parameters": {
        "type": "object", "properties": {"unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
        "required": ["unit"], "additionalProperties": False}}}
    body = {"messages": MESSAGES, "max_tokens": 40, "seed": 1, "logit_bias": no_blanks(), "tools": [tool],
            "tool_choice": {"type": "function", "function": {"name": "get_weather"}}}
    want = direct(vllm, "/v1/chat/completions", body).json()["choices"][0]
    (call,) = want["message"]["tool_calls"]
    assert call["function"]["name"] == "get_weather" and json.loads(call["function"]["arguments"])["unit"]

    def without_ids(calls: list[dict]) -> list[dict]:  # vLLM draws a fresh id per answer
        return [{k: v for k, v in c.items() if k != "id"} for c in calls]

    sent = json.dumps({"model": MODEL, **body}).encode()
    got = httpx.post(node.url + "/v1/chat/completions", content=sent, headers={"content-type": "application/json"},
                     timeout=120)
    assert got.status_code == 200, got.text
    choice = got.json()["choices"][0]
    assert without_ids(choice["message"]["tool_calls"]) == without_ids(want["message"]["tool_calls"])
    assert choice["message"]["tool_calls"][0]["id"].startswith("chatcmpl-tool-")
    assert (choice["message"]["content"], choice["finish_reason"]) == ("", want["finish_reason"])
    # the receipt hashes exactly the bytes received, tool_calls included
    receipt = SignedReceipt.from_header(got.headers["x-dcml-receipt"])
    verify_signed_receipt(receipt, expected_signer=httpx.get(node.url + "/health").json()["address"],
                          request_bytes=sent, response_bytes=got.content)
    assert receipt.receipt.output_tokens == got.json()["usage"]["completion_tokens"]

    _, _, chunks, _ = streamed(node, "/v1/chat/completions", body)
    deltas = [c["delta"]["tool_calls"] for c in chunks if c["delta"].get("tool_calls")]
    assert deltas[0][0]["function"]["name"] == "get_weather"
    args = "".join(d[0]["function"].get("arguments") or "" for d in deltas)
    assert args == call["function"]["arguments"] and chunks[-1]["finish_reason"] == want["finish_reason"]


def test_paid_answers_are_receipted_and_settle_to_the_wei(vllm, w3, deployment, payer, tmp_path):
    srv, identity, app = paid_node(vllm, w3, deployment, tmp_path)
    client = RawPayer(w3, deployment, payer, srv.url, identity.address, model=MODEL)
    domain = ReceiptDomain(deployment.chain_id, deployment.sla_court)
    total = 0
    try:
        for stream in (True, False):
            answer = client.ask("The king", max_tokens=40, stream=stream, seed=4, ignore_eos=True)
            assert answer.status == 200 and not answer.timed_out
            want = direct(vllm, "/v1/completions", {"prompt": "The king", "max_tokens": 40, "seed": 4,
                                                    "ignore_eos": True}).json()
            r = answer.receipt.receipt
            assert (r.input_tokens, r.output_tokens) == (want["usage"]["prompt_tokens"], 40)
            assert r.cost == r.input_tokens * PRICE_IN + 40 * PRICE_OUT
            verify_signed_receipt(answer.receipt, expected_signer=identity.address, request_bytes=answer.request,
                                  sse_payloads=answer.payloads if stream else None,
                                  response_bytes=None if stream else answer.raw, price=Price(PRICE_IN, PRICE_OUT),
                                  domain=domain)
            if stream:
                assert answer.need_events >= 1  # 40 tokens > prepay 8 + credit 4: paid while streaming
                objs = [json.loads(p) for p in answer.payloads[:-1]]
                assert "".join(o["choices"][0]["text"] for o in objs if o["choices"]) == text_of(want)
            else:
                assert text_of(json.loads(answer.raw)) == text_of(want)
            total += r.cost
            if r.cumulative_spent > client.cumulative:  # settle up what the credit window served
                assert client.post_voucher(r.cumulative_spent).status_code == 200
        assert app.state.node.gate.payments.ledger.get("0x" + client.channel_id.hex()).spent == total
    finally:
        srv.stop()  # graceful: the worker settles everything before exiting
    assert client.channels.get(client.channel_id).settled == total


def test_vllm_killed_mid_stream_error_event_receipt_exact_charge_and_503(vllm, node, w3, deployment, payer,
                                                                         tmp_path):
    # Deterministic, however loaded the machine: vLLM sends the first 4 pieces of this 500-token answer and holds
    # the rest back for good (tests/vllm_hold.py, keyed by `user`, which the node passes on as it passes every
    # field). Killing it at any moment after that cannot race its last chunk. With credit 1 and nothing prepaid
    # the node asks for a voucher at the 2nd token; vLLM is SIGKILLed once that voucher is acknowledged.
    hold = 4
    srv, identity, app = paid_node(vllm, w3, deployment, tmp_path, prepay=0, credit=1)
    client = RawPayer(w3, deployment, payer, srv.url, identity.address, model=MODEL)

    def kill_once() -> None:
        client.on_paid = None
        vllm.kill()  # SIGKILL vLLM's whole process group (its engine core too)

    client.on_paid = kill_once
    try:
        answer = client.ask("The king", max_tokens=500, ignore_eos=True, seed=1, user=f"hold-after-{hold}")
        assert answer.status == 200 and answer.need_events >= 1 and not answer.timed_out
        assert client.on_paid is None and vllm.proc.poll() is not None  # paid mid-stream, then killed
        objs = [json.loads(p) for p in answer.payloads[:-1]]
        errors = [o["error"] for o in objs if "error" in o]
        assert len(errors) == 1 and errors[0]["code"] == "engine_failed"
        served = sum(1 for o in objs if o.get("choices") and o["choices"][0]["text"])
        r = answer.receipt.receipt
        assert 2 <= r.output_tokens == served <= hold  # what was sent, and only that, is in the receipt ...
        assert r.cost == r.input_tokens * PRICE_IN + served * PRICE_OUT  # ... and charged
        assert objs[-1]["usage"]["completion_tokens"] == served
        verify_signed_receipt(answer.receipt, expected_signer=identity.address, request_bytes=answer.request,
                              sse_payloads=answer.payloads, price=Price(PRICE_IN, PRICE_OUT),
                              domain=ReceiptDomain(deployment.chain_id, deployment.sla_court))
        assert app.state.node.gate.payments.ledger.get("0x" + client.channel_id.hex()).spent == r.cumulative_spent
    finally:
        srv.stop()
    # down: /health says so and new requests get 503 until vLLM is back (the next test brings it back)
    health = httpx.get(node.url + "/health")
    assert health.status_code == 503 and health.json()["status"] == "unavailable"
    refused = via_node(node, "/v1/completions", {"prompt": "The king", "max_tokens": 4})
    assert refused.status_code == 503 and refused.json()["error"]["code"] == "engine_unavailable"


def test_encrypted_model_decrypted_into_tmpfs_for_vllm_and_the_node_recovers(vllm, node, tmp_path):
    """vLLM comes back (on the killed one's port), started by a node from an encrypted bundle: decrypted into
    /dev/shm, loaded, the clear copy deleted; no clear weights anywhere on disk. The first node sees it back."""
    shm = Path("/dev/shm")
    if not shm.is_dir() or filesystem_type(shm) != "tmpfs":
        pytest.skip("no tmpfs at /dev/shm")
    # The kill test before this one leaves the session's vLLM dead; run alone (-k), it is still up on the port
    # this test's node reuses: stop it the same way.
    vllm.stop()
    clear, bundle_dir, key, signed = make_bundle(tmp_path / "src")
    broker = sim_broker(key, tmp_path / "audit.sqlite")
    tmpfs_dir = shm / f"dcml-test-vllm-{tmp_path.name}"
    data_dir = tmp_path / "node2"
    with BackgroundServer(create_broker_app(broker)) as broker_srv:
        settings = load_settings(None, data_dir=data_dir, engine=engine_config(
            vllm, vllm={"log_file": tmp_path / "vllm2.log"},
            encrypted={"bundle_dir": bundle_dir, "broker_url": broker_srv.url, "tmpfs_dir": tmpfs_dir,
                       "publisher": PUBLISHER.address, "manifest_hash": "0x" + signed.manifest_hash.hex()}))
        app = create_app(settings, provider=SimulatedProvider())
        srv = BackgroundServer(app).start(timeout=600)  # decrypt, start vLLM, wait until it serves
    try:
        assert not tmpfs_dir.exists()  # vLLM loaded the weights: the clear copy is gone from tmpfs too
        got = via_node(srv, "/v1/completions", {"prompt": "The king", "max_tokens": 8, "seed": 3})
        assert got.status_code == 200 and got.json()["usage"]["completion_tokens"] == 8
        deadline = time.monotonic() + 30  # the first node probes its upstream until it is back
        while httpx.get(node.url + "/health").status_code != 200:
            assert time.monotonic() < deadline, "the node did not see vLLM back"
            time.sleep(0.5)
        again = via_node(node, "/v1/completions", {"prompt": "The king", "max_tokens": 8, "seed": 3})
        assert again.status_code == 200 and text_of(again.json()) == text_of(got.json())
        needles = []
        for shard in sorted(clear.glob("*.safetensors")):
            blob = shard.read_bytes()
            needles += [blob[i:i + 64] for i in range(len(blob) // 2, len(blob), len(blob) // 8)]
        for root in (data_dir, bundle_dir):
            for path in Path(root).rglob("*"):
                if path.is_file():
                    assert not any(n in path.read_bytes() for n in needles), f"clear weights in {path}"
    finally:
        srv.stop(timeout=60)
    assert not tmpfs_dir.exists()
    with pytest.raises(httpx.HTTPError):  # the node stopped the vLLM it started
        httpx.get(vllm.base_url + "/v1/models", timeout=2)
