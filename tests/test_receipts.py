"""Proof of Response receipts: the EIP-712 wire format, the durable store, and what a live node hands out."""

from __future__ import annotations

import asyncio
import base64
import json
import sqlite3
from types import SimpleNamespace

import httpx
import openai
import pytest
from eth_account import Account
from eth_hash.auto import keccak

from dcml.client.wire.receipts import (
    ZERO32,
    Acceptance,
    Price,
    ReceiptDomain,
    ReceiptError,
    ReceiptReason,
    SignedReceipt,
    acceptance_digest,
    acceptance_signable,
    hex32,
    model_id_for,
    parse_sse_stream,
    receipt_digest,
    receipt_signable,
    request_hash,
    sign_acceptance,
    sign_receipt,
    stream_response_hash,
    verify_acceptance,
    verify_signed_receipt,
)
from dcml.node.api.app import create_app
from dcml.node.api.server import BackgroundServer
from dcml.node.config import load_settings
from dcml.node.engine.synthetic import SyntheticEngine
from dcml.node.identity import EnclaveIdentity
from dcml.node.receipts.store import ReceiptStore
from dcml.node.tee.simulated import SimulatedProvider
from tests.receipt_helpers import NODE_KEY, REQUEST, RESPONSE, make_receipt

MODEL = "synthetic"
def check(signed: SignedReceipt, **kw) -> None:
    args = dict(expected_signer=NODE_KEY.address, request_bytes=REQUEST, response_bytes=RESPONSE)
    verify_signed_receipt(signed, **{**args, **kw})


def reason_of(fn) -> ReceiptReason:
    with pytest.raises(ReceiptError) as info:
        fn()
    return info.value.reason


# ---- wire format ------------------------------------------------------------------------------

def test_sign_and_verify_round_trip():
    signed = sign_receipt(make_receipt(), NODE_KEY)
    check(signed, price=Price(3, 11), previous_cumulative=1000 - 92)
    assert SignedReceipt.from_header(signed.to_header()) == signed


def test_typehash_is_the_documented_struct():
    typed = receipt_signable(make_receipt())
    assert typed.version == b"\x01"
    expected = keccak(b"Receipt(bytes32 receiptId,bytes32 requestHash,bytes32 responseHash,bytes32 channelId,"
                      b"bytes32 modelId,uint32 inputTokens,uint32 outputTokens,uint128 cost,"
                      b"uint128 cumulativeSpent,uint64 acceptedAt,uint32 ttftMs,uint32 durationMs)")
    r = make_receipt()
    enc = b"".join([expected] + [bytes.fromhex(h[2:]) for h in (r.receipt_id, r.request_hash, r.response_hash,
                                                                  r.channel_id, r.model_id)]
                   + [v.to_bytes(32, "big") for v in (r.input_tokens, r.output_tokens, r.cost, r.cumulative_spent,
                                                      r.accepted_at, r.ttft_ms, r.duration_ms)])
    assert receipt_signable(r).body == keccak(enc)
    for domain in (ReceiptDomain(), ReceiptDomain(8453, "0x" + "ab" * 20)):
        m = receipt_signable(r, domain)
        assert receipt_digest(r, domain) == keccak(b"\x19" + m.version + m.header + m.body)
    acc = Acceptance(requestHash=r.request_hash, channelId=ZERO32, acceptedAt=1, deadline=5)
    m = acceptance_signable(acc)
    assert acceptance_digest(acc) == keccak(b"\x19" + m.version + m.header + m.body)


def test_signature_interoperates_with_eth_account():
    r = make_receipt()
    ours = sign_receipt(r, NODE_KEY)
    theirs = NODE_KEY.sign_message(receipt_signable(r))
    assert ours.signature == "0x" + bytes(theirs.signature).hex()  # RFC 6979: deterministic, identical
    assert Account.recover_message(receipt_signable(r), signature=bytes.fromhex(ours.signature[2:])) == NODE_KEY.address


def test_tampered_receipt_is_rejected():
    signed = sign_receipt(make_receipt(), NODE_KEY)
    more_tokens = make_receipt(**{**signed.receipt.model_dump(by_alias=True), "outputTokens": 8})
    forged = SignedReceipt(receipt=more_tokens, signature=signed.signature, signer=signed.signer)
    assert reason_of(lambda: check(forged)) is ReceiptReason.WRONG_SIGNER


def test_response_altered_by_one_byte_is_rejected():
    signed = sign_receipt(make_receipt(), NODE_KEY)
    altered = RESPONSE[:-2] + bytes([RESPONSE[-2] ^ 1]) + RESPONSE[-1:]
    assert reason_of(lambda: check(signed, response_bytes=altered)) is ReceiptReason.RESPONSE_HASH_MISMATCH
    assert reason_of(lambda: check(signed, request_bytes=REQUEST + b" ")) is ReceiptReason.REQUEST_HASH_MISMATCH


def test_receipt_signed_by_another_key_is_rejected():
    other = sign_receipt(make_receipt(), Account.create())
    assert reason_of(lambda: check(other)) is ReceiptReason.WRONG_SIGNER


def test_other_domain_and_junk_signatures_are_rejected():
    signed = sign_receipt(make_receipt(), NODE_KEY, ReceiptDomain(chain_id=1))
    assert reason_of(lambda: check(signed)) is ReceiptReason.WRONG_SIGNER
    check(signed, domain=ReceiptDomain(chain_id=1))
    for bad in ("0x" + "11" * 64, "0x" + "11" * 64 + "1d", "0x" + "11" * 32 + "ff" * 32 + "1b", "zz"):
        junk = SignedReceipt(receipt=signed.receipt, signature=bad, signer=signed.signer)
        assert reason_of(lambda junk=junk: check(junk)) is ReceiptReason.BAD_SIGNATURE


def test_cost_must_match_price_and_cumulative():
    signed = sign_receipt(make_receipt(), NODE_KEY)
    assert reason_of(lambda: check(signed, price=Price(3, 12))) is ReceiptReason.COST_MISMATCH
    assert reason_of(lambda: check(signed, previous_cumulative=0)) is ReceiptReason.CUMULATIVE_MISMATCH


def test_stream_hash_definition():
    payloads = [b'{"a":1}', b'{"b":2}', b"[DONE]"]
    import hashlib

    assert stream_response_hash(payloads) == hex32(hashlib.sha256(b'{"a":1}\n{"b":2}\n[DONE]\n').digest())
    assert stream_response_hash(payloads[:-1]) != stream_response_hash(payloads)  # truncation shows


def test_acceptance_round_trip():
    acc = Acceptance(requestHash=request_hash(REQUEST), channelId=ZERO32, acceptedAt=1_700_000_000,
                     deadline=1_700_000_100)
    signed = sign_acceptance(acc, NODE_KEY)
    verify_acceptance(signed.acceptance, signed.signature, expected_signer=NODE_KEY.address)
    with pytest.raises(ReceiptError):
        verify_acceptance(acc.model_copy(update={"deadline": 1}), signed.signature, expected_signer=NODE_KEY.address)


def test_malformed_wire_values():
    with pytest.raises(ValueError):
        make_receipt(requestHash="0x1234")
    with pytest.raises(ValueError):
        make_receipt(inputTokens=2**32)
    assert reason_of(lambda: SignedReceipt.from_header("not base64!")) is ReceiptReason.MALFORMED


# ---- durable store ----------------------------------------------------------------------------

def test_store_is_durable_and_wal(tmp_path):
    path = tmp_path / "receipts.sqlite"
    signed = [sign_receipt(make_receipt(), NODE_KEY) for _ in range(20)]

    async def write():
        store = ReceiptStore(path)
        store.open()
        await asyncio.gather(*(store.put(s) for s in signed))  # grouped into few commits
        await store.close()

    asyncio.run(write())
    assert sqlite3.connect(path).execute("PRAGMA journal_mode").fetchone()[0] == "wal"

    async def read():
        store = ReceiptStore(path)
        store.open()
        try:
            return [await store.get(s.receipt.receipt_id) for s in signed], await store.get(ZERO32)
        finally:
            await store.close()

    got, missing = asyncio.run(read())
    assert got == signed and missing is None


# ---- a live node ------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def node(tmp_path_factory):
    identity = EnclaveIdentity.generate()
    settings = load_settings(None, data_dir=tmp_path_factory.mktemp("node"),
                             receipts={"chain_id": 8453, "verifying_contract": "0x" + "ab" * 20})
    app = create_app(settings, engine=SyntheticEngine(model_name=MODEL), identity=identity,
                     provider=SimulatedProvider())
    with BackgroundServer(app) as srv:
        yield SimpleNamespace(url=srv.url, address=identity.address,
                              domain=ReceiptDomain(8453, "0x" + "ab" * 20))


def test_sdk_non_streamed_receipt_verifies(node):
    sdk = openai.OpenAI(base_url=node.url + "/v1", api_key="x", max_retries=0)
    raw = sdk.chat.completions.with_raw_response.create(
        model=MODEL, messages=[{"role": "user", "content": "receipt please"}], max_tokens=6)
    completion = raw.parse()
    sent, received = raw.http_response.request.content, raw.http_response.content
    signed = SignedReceipt.from_header(raw.headers["x-dcml-receipt"])
    assert signed.receipt.receipt_id == raw.headers["x-dcml-receipt-id"]
    verify_signed_receipt(signed, expected_signer=node.address, request_bytes=sent, response_bytes=received,
                          domain=node.domain)
    r = signed.receipt
    assert (r.input_tokens, r.output_tokens) == (completion.usage.prompt_tokens, completion.usage.completion_tokens)
    assert r.model_id == model_id_for(MODEL) and r.channel_id == ZERO32 and r.cost == 0
    # the same receipt is stored and served again
    stored = httpx.get(f"{node.url}/v1/receipts/{r.receipt_id}")
    assert SignedReceipt.model_validate_json(stored.content) == signed
    # one flipped byte in what was delivered breaks it
    with pytest.raises(ReceiptError):
        verify_signed_receipt(signed, expected_signer=node.address, request_bytes=sent,
                              response_bytes=received.replace(b'"usage"', b'"usagE"'), domain=node.domain)


def test_streamed_receipt_verifies_over_sse_payloads(node):
    body = json.dumps({"model": MODEL, "messages": [{"role": "user", "content": "stream it"}], "max_tokens": 9,
                       "stream": True, "stream_options": {"include_usage": True}}).encode()
    r = httpx.post(node.url + "/v1/chat/completions", content=body, headers={"content-type": "application/json"})
    payloads, signed = parse_sse_stream(r.content)
    assert signed is not None
    verify_signed_receipt(signed, expected_signer=node.address, request_bytes=body, sse_payloads=payloads,
                          domain=node.domain)
    assert signed.receipt.output_tokens == 9
    for bad in (payloads[:-1], [*payloads[:1], payloads[1][:-1] + b" ", *payloads[2:]], payloads[::-1]):
        with pytest.raises(ReceiptError) as info:
            verify_signed_receipt(signed, expected_signer=node.address, request_bytes=body, sse_payloads=bad,
                                  domain=node.domain)
        assert info.value.reason is ReceiptReason.RESPONSE_HASH_MISMATCH
    stored = httpx.get(f"{node.url}/v1/receipts/{r.headers['x-dcml-receipt-id']}").json()
    assert stored["receipt"]["responseHash"] == signed.receipt.response_hash


def test_receipt_ids_are_chosen_by_the_node(node):
    body = {"model": MODEL, "prompt": "x", "max_tokens": 1, "request_id": "0x" + "00" * 32}
    ids = {httpx.post(node.url + "/v1/completions", json=body, headers={"X-Request-Id": "mine"})
           .headers["x-dcml-receipt-id"] for _ in range(3)}
    assert len(ids) == 3 and "0x" + "00" * 32 not in ids


def test_receipt_route_errors(node):
    assert httpx.get(f"{node.url}/v1/receipts/{ZERO32}").status_code == 404
    r = httpx.get(f"{node.url}/v1/receipts/nope")
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_receipt_id"


def test_header_is_base64_json(node):
    r = httpx.post(node.url + "/v1/completions", json={"model": MODEL, "prompt": "x", "max_tokens": 1})
    decoded = json.loads(base64.b64decode(r.headers["x-dcml-receipt"]))
    assert set(decoded) == {"receipt", "signature", "signer"} and decoded["signer"] == node.address
