"""End-to-end sealed requests (HPKE ML-KEM-768+X25519) and sealed answers, plain and streamed."""

from __future__ import annotations

import base64
import json
from types import SimpleNamespace

import httpx
import pytest

from dcml.client.wire.e2e import (
    SALT_HEADER,
    SEALED_CONTENT_TYPE,
    E2EError,
    E2EReason,
    StreamOpener,
    open_request,
    open_response,
    open_stream_chunk,
    seal_request,
)
from dcml.client.wire.receipts import SignedReceipt, verify_signed_receipt
from dcml.node.api.app import create_app
from dcml.node.api.server import BackgroundServer
from dcml.node.config import load_settings
from dcml.node.engine.synthetic import SyntheticEngine
from dcml.node.identity import EnclaveIdentity
from dcml.node.tee.simulated import SimulatedProvider

MODEL = "synthetic"
NODE = EnclaveIdentity.generate()
PATH = "/v1/chat/completions"


def chat_body(**extra) -> bytes:
    return json.dumps({"model": MODEL, "messages": [{"role": "user", "content": "a secret prompt"}],
                       "max_tokens": 8, **extra}).encode()


def _sse(raw: bytes) -> tuple[list[bytes], bytes | None]:
    """Unnamed data payloads in order, and the (sealed) dcml-receipt event's payload."""
    payloads, receipt = [], None
    for block in raw.split(b"\n\n"):
        lines = block.split(b"\n")
        data = b"\n".join(line[6:] for line in lines if line.startswith(b"data: "))
        if any(line.startswith(b"event: dcml-receipt") for line in lines):
            receipt = data
        elif data and not any(line.startswith(b"event:") for line in lines):
            payloads.append(data)
    return payloads, receipt


# ---- wire format ------------------------------------------------------------------------------

def test_round_trip_in_process():
    sealed = seal_request(b"hello", NODE.hpke_public_bytes(), path=PATH)
    assert b"hello" not in sealed.body and sealed.headers["Content-Type"] == SEALED_CONTENT_TYPE
    opened = open_request(sealed.body, NODE.hpke_private_key, NODE.hpke_public_bytes(), path=PATH)
    assert opened.body == b"hello"
    key, salt = opened.response_key()
    client_key = sealed.key_for({SALT_HEADER: salt.hex()})
    assert open_response(client_key, key.seal(b"answer", 0, True)) == b"answer"
    chunks = [key.seal(p, i, p == b"[DONE]") for i, p in enumerate([b"a", b"b", b"[DONE]"])]
    opener = StreamOpener(client_key)
    assert [opener.open(c) for c in chunks] == [b"a", b"b", b"[DONE]"]
    assert opener.finish() == [b"a", b"b", b"[DONE]"]


def test_reorder_truncation_and_tampering_are_detected():
    sealed = seal_request(b"x", NODE.hpke_public_bytes(), path=PATH)
    key, salt = open_request(sealed.body, NODE.hpke_private_key, NODE.hpke_public_bytes(), path=PATH).response_key()
    client_key = sealed.key_for({SALT_HEADER: salt.hex()})
    c0, c1, done = key.seal(b"a", 0, False), key.seal(b"b", 1, False), key.seal(b"[DONE]", 2, True)
    with pytest.raises(E2EError) as info:
        open_stream_chunk(client_key, c1, 0)
    assert info.value.reason is E2EReason.OUT_OF_ORDER
    forged = json.loads(c1)
    forged["seq"] = 0
    with pytest.raises(E2EError) as info:  # renumbering does not help: seq is bound as AAD and nonce
        open_stream_chunk(client_key, json.dumps(forged), 0)
    assert info.value.reason is E2EReason.DECRYPT_FAILED
    flipped = json.loads(c1)
    flipped["final"] = True  # pretending the stream ended here
    with pytest.raises(E2EError):
        open_stream_chunk(client_key, json.dumps(flipped), 1)
    opener = StreamOpener(client_key)
    opener.open(c0)
    opener.open(c1)
    with pytest.raises(E2EError) as info:
        opener.finish()
    assert info.value.reason is E2EReason.TRUNCATED
    assert open_stream_chunk(client_key, done, 2) == (b"[DONE]", True)


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
def node_app(tmp_path_factory):
    settings = load_settings(None, data_dir=tmp_path_factory.mktemp("node"))
    return create_app(settings, engine=SyntheticEngine(model_name=MODEL), identity=NODE, provider=SimulatedProvider())


@pytest.fixture(scope="module")
def node(node_app):
    with BackgroundServer(node_app) as srv:
        yield SimpleNamespace(url=srv.url, http=httpx.Client(base_url=srv.url))


@pytest.fixture
def node_state(node, node_app):
    return node_app.state.node


def test_sealed_non_streamed_round_trip(node):
    inner = chat_body(seed=3)
    sealed = seal_request(inner, NODE.hpke_public_bytes(), path=PATH)
    r = node.http.post(PATH, content=sealed.body, headers=sealed.headers)
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == SEALED_CONTENT_TYPE and r.headers["x-dcml-sealed"] == "1"
    plain = open_response(sealed.key_for(r.headers), r.content)
    plain_answer = node.http.post(PATH, content=inner, headers={"content-type": "application/json"}).json()
    sealed_answer = json.loads(plain)
    assert sealed_answer["choices"] == plain_answer["choices"]
    assert sealed_answer["choices"][0]["message"]["content"].encode() not in r.content
    # requestHash covers the opened inner body, responseHash the opened plaintext
    assert "x-dcml-receipt-id" not in r.headers  # the receipt (and its id) travel sealed only
    receipt = SignedReceipt.from_json(sealed.key_for(r.headers).open_aux(
        "receipt", base64.b64decode(r.headers["x-dcml-receipt"])))
    verify_signed_receipt(receipt, expected_signer=NODE.address, request_bytes=inner, response_bytes=plain)


def test_sealed_stream_round_trip(node):
    inner = chat_body(stream=True, stream_options={"include_usage": True})
    sealed = seal_request(inner, NODE.hpke_public_bytes(), path=PATH)
    r = node.http.post(PATH, content=sealed.body, headers=sealed.headers)
    assert r.status_code == 200 and r.headers["x-dcml-sealed"] == "1"
    assert "x-dcml-receipt-id" not in r.headers and b"requestHash" not in r.content
    payloads, sealed_receipt = _sse(r.content)
    key = sealed.key_for(r.headers)
    receipt = SignedReceipt.from_json(key.open_aux("receipt", sealed_receipt))
    opener = StreamOpener(key)
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
    assert json.loads(open_response(sealed.key_for(r.headers), r.content))["error"]["code"] == "model_not_found"


# ---- issue 19, finding 2: replaying a victim's sealed request ----------------------------------

def _stream(node, body: bytes, headers: dict) -> httpx.Response:
    return node.http.post(PATH, content=body, headers=headers)


def test_replayed_sealed_request_is_refused(node):
    sealed = seal_request(chat_body(stream=True), NODE.hpke_public_bytes(), path=PATH)
    assert _stream(node, sealed.body, sealed.headers).status_code == 200
    r = _stream(node, sealed.body, sealed.headers)  # the attacker replays the captured bytes
    assert r.status_code == 400 and r.json()["error"]["code"] == "sealed_replayed"
    stale = seal_request(chat_body(), NODE.hpke_public_bytes(), path=PATH, sealed_at=0)
    r = _stream(node, stale.body, stale.headers)
    assert r.status_code == 400 and r.json()["error"]["code"] == "sealed_expired"


def test_replay_the_cache_forgot_gives_nothing_about_the_victims_answer(node, request):
    """Even when the node answers a replay (its replay cache lost: a restart), the replay is sealed under a
    key with fresh enclave randomness: its chunks do not open in the victim's stream, and XOR of the two
    ciphertexts is not XOR of the two plaintexts (no keystream reuse, unlike v1's request-only key)."""
    from dcml.node.api.sealing import ReplayCache

    state = request.getfixturevalue("node_state")
    inner = chat_body(stream=True, temperature=1.0)
    sealed = seal_request(inner, NODE.hpke_public_bytes(), path=PATH)
    victim = _stream(node, sealed.body, sealed.headers)
    state.replay = ReplayCache()  # the node restarted: the attacker replays inside the window
    replay = _stream(node, sealed.body, sealed.headers)
    assert victim.status_code == replay.status_code == 200
    assert victim.headers[SALT_HEADER] != replay.headers[SALT_HEADER]
    v_payloads, _ = _sse(victim.content)
    r_payloads, _ = _sse(replay.content)
    victim_key = sealed.key_for(victim.headers)
    v_plain = [victim_key.open(p, i)[0] for i, p in enumerate(v_payloads)]
    # the replay's own chunks, cut into the victim's stream at the same position, do not authenticate
    for i, p in enumerate(r_payloads):
        with pytest.raises(E2EError) as info:
            victim_key.open(p, i)
        assert info.value.reason is E2EReason.DECRYPT_FAILED
    # the attacker knows the replay's layout (and here even its plaintext): it still reveals nothing
    r_plain = [sealed.key_for(replay.headers).open(p, i)[0] for i, p in enumerate(r_payloads)]
    for i in range(min(len(v_payloads), len(r_payloads))):
        vc = base64.b64decode(json.loads(v_payloads[i])["ct"])
        rc = base64.b64decode(json.loads(r_payloads[i])["ct"])
        n = min(len(v_plain[i]), len(r_plain[i]))
        assert bytes(a ^ b for a, b in zip(vc[:n], rc[:n], strict=True)) != \
            bytes(a ^ b for a, b in zip(v_plain[i][:n], r_plain[i][:n], strict=True))


def test_replay_cache_is_bounded_and_never_accepts_twice():
    from dcml.node.api.sealing import ReplayCache

    cache = ReplayCache(past_s=300, future_s=60, max_entries=3)
    now = 1_000_000.0
    for i in range(3):
        cache.check(bytes([i]), now - 10 + i, now=now)
    with pytest.raises(E2EError):
        cache.check(bytes([1]), now - 9, now=now)
    cache.check(b"new", now, now=now)  # full: the earliest (sealed now-10) is dropped, the floor rises to it
    assert len(cache) == 3
    with pytest.raises(E2EError) as info:
        cache.check(bytes([0]), now - 10, now=now)  # the dropped one, replayed: stale, not accepted again
    assert info.value.reason is E2EReason.EXPIRED
    with pytest.raises(E2EError):
        cache.check(b"future", now + 61, now=now)
