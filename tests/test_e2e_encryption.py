"""End-to-end sealed requests (HPKE ML-KEM-768+X25519) and sealed answers, plain and streamed."""

from __future__ import annotations

import json
from types import SimpleNamespace

import httpx
import pytest

from client.e2e import (
    SEALED_CONTENT_TYPE,
    E2EError,
    E2EReason,
    StreamOpener,
    open_request,
    open_response,
    open_stream_chunk,
    seal_request,
)
from client.receipts import SignedReceipt, parse_sse_stream, verify_signed_receipt
from node.api.app import create_app
from node.api.server import BackgroundServer
from node.config import load_settings
from node.engine.synthetic import SyntheticEngine
from node.identity import EnclaveIdentity
from node.tee.simulated import SimulatedProvider

MODEL = "synthetic"
NODE = EnclaveIdentity.generate()
PATH = "/v1/chat/completions"


def chat_body(**extra) -> bytes:
    return json.dumps({"model": MODEL, "messages": [{"role": "user", "content": "a secret prompt"}],
                       "max_tokens": 8, **extra}).encode()


# ---- wire format ------------------------------------------------------------------------------

def test_round_trip_in_process():
    sealed = seal_request(b"hello", NODE.hpke_public_bytes(), path=PATH)
    assert b"hello" not in sealed.body and sealed.headers["Content-Type"] == SEALED_CONTENT_TYPE
    body, key = open_request(sealed.body, NODE.hpke_private_key, NODE.hpke_public_bytes(), path=PATH)
    assert body == b"hello"
    assert open_response(sealed.key, key.seal(b"answer", 0, True)) == b"answer"
    chunks = [key.seal(p, i, p == b"[DONE]") for i, p in enumerate([b"a", b"b", b"[DONE]"])]
    opener = StreamOpener(sealed.key)
    assert [opener.open(c) for c in chunks] == [b"a", b"b", b"[DONE]"]
    assert opener.finish() == [b"a", b"b", b"[DONE]"]


def test_reorder_truncation_and_tampering_are_detected():
    sealed = seal_request(b"x", NODE.hpke_public_bytes(), path=PATH)
    _, key = open_request(sealed.body, NODE.hpke_private_key, NODE.hpke_public_bytes(), path=PATH)
    c0, c1, done = key.seal(b"a", 0, False), key.seal(b"b", 1, False), key.seal(b"[DONE]", 2, True)
    with pytest.raises(E2EError) as info:
        open_stream_chunk(sealed.key, c1, 0)
    assert info.value.reason is E2EReason.OUT_OF_ORDER
    forged = json.loads(c1)
    forged["seq"] = 0
    with pytest.raises(E2EError) as info:  # renumbering does not help: seq is bound as AAD and nonce
        open_stream_chunk(sealed.key, json.dumps(forged), 0)
    assert info.value.reason is E2EReason.DECRYPT_FAILED
    flipped = json.loads(c1)
    flipped["final"] = True  # pretending the stream ended here
    with pytest.raises(E2EError):
        open_stream_chunk(sealed.key, json.dumps(flipped), 1)
    opener = StreamOpener(sealed.key)
    opener.open(c0)
    opener.open(c1)
    with pytest.raises(E2EError) as info:
        opener.finish()
    assert info.value.reason is E2EReason.TRUNCATED
    assert open_stream_chunk(sealed.key, done, 2) == (b"[DONE]", True)


def test_sealed_for_another_path_or_key_does_not_open():
    sealed = seal_request(b"x", NODE.hpke_public_bytes(), path="/v1/completions")
    with pytest.raises(E2EError) as info:
        open_request(sealed.body, NODE.hpke_private_key, NODE.hpke_public_bytes(), path=PATH)
    assert info.value.reason is E2EReason.DECRYPT_FAILED
    other = EnclaveIdentity.generate()
    sealed = seal_request(b"x", other.hpke_public_bytes(), path=PATH)
    with pytest.raises(E2EError) as info:
        open_request(sealed.body, NODE.hpke_private_key, NODE.hpke_public_bytes(), path=PATH)
    assert info.value.reason is E2EReason.WRONG_RECIPIENT


# ---- against a live node ----------------------------------------------------------------------

@pytest.fixture(scope="module")
def node(tmp_path_factory):
    settings = load_settings(None, data_dir=tmp_path_factory.mktemp("node"))
    app = create_app(settings, engine=SyntheticEngine(model_name=MODEL), identity=NODE, provider=SimulatedProvider())
    with BackgroundServer(app) as srv:
        yield SimpleNamespace(url=srv.url, http=httpx.Client(base_url=srv.url))


def test_sealed_non_streamed_round_trip(node):
    inner = chat_body(seed=3)
    sealed = seal_request(inner, NODE.hpke_public_bytes(), path=PATH)
    r = node.http.post(PATH, content=sealed.body, headers=sealed.headers)
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == SEALED_CONTENT_TYPE and r.headers["x-dcml-sealed"] == "1"
    plain = open_response(sealed.key, r.content)
    plain_answer = node.http.post(PATH, content=inner, headers={"content-type": "application/json"}).json()
    sealed_answer = json.loads(plain)
    assert sealed_answer["choices"] == plain_answer["choices"]
    assert sealed_answer["choices"][0]["message"]["content"].encode() not in r.content
    # requestHash covers the opened inner body, responseHash the opened plaintext
    verify_signed_receipt(SignedReceipt.from_header(r.headers["x-dcml-receipt"]), expected_signer=NODE.address,
                          request_bytes=inner, response_bytes=plain)


def test_sealed_stream_round_trip(node):
    inner = chat_body(stream=True, stream_options={"include_usage": True})
    sealed = seal_request(inner, NODE.hpke_public_bytes(), path=PATH)
    r = node.http.post(PATH, content=sealed.body, headers=sealed.headers)
    assert r.status_code == 200 and r.headers["x-dcml-sealed"] == "1"
    payloads, receipt = parse_sse_stream(r.content)
    opener = StreamOpener(sealed.key)
    plain = [opener.open(p) for p in payloads]
    opener.finish()
    assert plain[-1] == b"[DONE]"
    chunks = [json.loads(p) for p in plain[:-1]]
    assert chunks[-1]["usage"]["completion_tokens"] == 8
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"])
    assert text and text.encode() not in r.content
    verify_signed_receipt(receipt, expected_signer=NODE.address, request_bytes=inner, sse_payloads=plain)


def test_sealed_to_another_key_is_refused(node):
    other = EnclaveIdentity.generate()
    sealed = seal_request(chat_body(), other.hpke_public_bytes(), path=PATH)
    r = node.http.post(PATH, content=sealed.body, headers=sealed.headers)
    assert r.status_code == 400
    err = r.json()["error"]
    assert err["code"] == "sealed_to_other_key" and "/v1/attestation" in err["message"]


def test_garbage_envelope_is_400(node):
    r = node.http.post(PATH, content=b"{not json", headers={"Content-Type": SEALED_CONTENT_TYPE})
    assert r.status_code == 400 and r.json()["error"]["code"] == "sealed_malformed"


def test_errors_after_opening_are_sealed(node):
    sealed = seal_request(chat_body(model="nope"), NODE.hpke_public_bytes(), path=PATH)
    r = node.http.post(PATH, content=sealed.body, headers=sealed.headers)
    assert r.status_code == 404 and r.headers["content-type"] == SEALED_CONTENT_TYPE
    assert json.loads(open_response(sealed.key, r.content))["error"]["code"] == "model_not_found"
