"""A verifier that fails closed, typed, and only for the quote at hand (issue 12, item 9), on the shared
Intel TDX and dstack vectors: absent RTMR3 digests are recomputed (a wrong one still refused); a corrupted
PCK certificate is an AttestationError on every path, the key broker's included; someone else's bad quote
never evicts a platform's cached collateral, and only newer valid collateral replaces it."""

from __future__ import annotations

import copy
import json

import pytest
from fastapi.testclient import TestClient

import dcml.client.attestation.verify as att
from dcml.client.attestation.measurements import parse_tdx_quote
from dcml.client.attestation.verify import AttestationError, Policy, Reason, cache_collateral, verify_attestation
from dcml.client.demo.kit.vectors import DSTACK, TDX, collateral, dstack_vector, tdx_quote
from dcml.client.publisher.key_broker import AuditLog, KeyBroker, ModelEntry, NonceStore, create_app
from tests.vector_docs import (
    DSTACK_NOW,
    IDENTITY,
    NONCE,
    ONES,
    TDX_NOW,
    _doc,
    _dstack_doc,
    _policy_for,
)


@pytest.fixture
def tdx(monkeypatch: pytest.MonkeyPatch) -> tuple[bytes, dict]:
    monkeypatch.setattr(att, "_collateral_cache", {})  # each test starts with nothing cached
    return tdx_quote("tdx_quote"), collateral(TDX / "tdx_quote_collateral.json")


def _kwargs(quote: bytes) -> dict:
    return dict(nonce=NONCE, policy=_policy_for(quote), now=TDX_NOW,
                expected_report_data=parse_tdx_quote(quote).report_data)


def _corrupt_pck(quote: bytes) -> bytes:
    """The same quote with one character of its PCK certificate (PEM, in the certification data) broken."""
    at = quote.index(b"-----BEGIN CERTIFICATE-----") + 100
    return quote[:at] + b"!" + quote[at + 1:]


def _bad_signature(quote: bytes) -> bytes:
    """Same platform (FMSPC), but the quote's signature no longer verifies: a bad quote from anyone."""
    at = 48 + 584 + 4 + 10  # v4: header, TD report, signature length, then inside the ECDSA signature
    return quote[:at] + bytes([quote[at] ^ 0xFF]) + quote[at + 1:]


# -- RTMR3 digests ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def dstack():
    quote, events, app_info = dstack_vector()
    return quote, events, app_info, collateral(DSTACK / "quote_collateral.json")


def _verify_dstack(quote, events, app_info, col):
    return verify_attestation(_dstack_doc(quote, events, app_info), nonce=NONCE, policy=_policy_for(quote),
                              collateral=col, now=DSTACK_NOW, expected_report_data=ONES)


@pytest.mark.parametrize("blank", ["", None])
def test_absent_rtmr3_digests_are_recomputed(dstack, blank) -> None:
    quote, events, app_info, col = dstack
    events = copy.deepcopy(events)
    rtmr3 = [e for e in events if e["imr"] == 3]
    assert rtmr3
    for e in rtmr3:
        if blank is None:
            del e["digest"]
        else:
            e["digest"] = blank
    assert _verify_dstack(quote, events, app_info, col).tee_type == "dstack"


def test_a_present_rtmr3_digest_that_disagrees_is_still_refused(dstack) -> None:
    quote, events, app_info, col = dstack
    events = copy.deepcopy(events)
    ev = next(e for e in events if e["imr"] == 3)
    ev["digest"] = "00" * 48
    with pytest.raises(AttestationError) as err:
        _verify_dstack(quote, events, app_info, col)
    assert err.value.reason is Reason.EVENT_LOG_INVALID


# -- typed failures --------------------------------------------------------------------------------


def test_corrupted_pck_certificate_is_a_typed_error_on_every_path(tdx) -> None:
    quote, col = tdx
    bad = _corrupt_pck(quote)
    cache_collateral(quote, col, now=TDX_NOW)
    for extra in ({}, {"collateral": col}):  # the cached-collateral path (SDK, key broker) and the explicit one
        with pytest.raises(AttestationError) as err:
            verify_attestation(_doc(bad), **_kwargs(quote), **extra)
        assert err.value.reason in (Reason.QUOTE_MALFORMED, Reason.QUOTE_INVALID)
    with pytest.raises(AttestationError):
        cache_collateral(bad, col, now=TDX_NOW)
    assert verify_attestation(_doc(quote), **_kwargs(quote)).tcb_status == "UpToDate"  # the honest one still does


@pytest.mark.parametrize("mangle", [lambda q: q[:600], lambda q: q[:1300], lambda q: q[:-200],
                                    lambda q: b"\x03\x00" + q[2:], lambda q: q[:48] + bytes(len(q) - 48)])
def test_mangled_quotes_are_typed_errors(tdx, mangle) -> None:
    quote, col = tdx
    cache_collateral(quote, col, now=TDX_NOW)
    with pytest.raises(AttestationError):
        verify_attestation(_doc(quote).model_copy(update={"quote": mangle(quote).hex()}), **_kwargs(quote))


def test_key_broker_refuses_a_corrupted_quote_without_crashing(tdx, tmp_path) -> None:
    quote, col = tdx
    cache_collateral(quote, col, now=TDX_NOW)
    model = bytes.fromhex("ab" * 32)
    broker = KeyBroker(models={model: ModelEntry(model_id=model, key=b"k" * 32, allowed_measurements=frozenset())},
                       policy=Policy(), audit=AuditLog(tmp_path / "audit.sqlite"), nonces=NonceStore(60))
    client = TestClient(create_app(broker), raise_server_exceptions=True)
    url = f"/v1/models/0x{model.hex()}"
    nonce = client.get(url + "/nonce", params={"node": IDENTITY.address}).json()["nonce"]
    doc = _doc(_corrupt_pck(quote), nonce=nonce)
    r = client.post(url + "/key", json={"nonce": nonce, "attestation": json.loads(doc.model_dump_json())})
    assert r.status_code == 403, r.text
    assert broker.audit.entries()[-1]["outcome"] == "refused"


# -- collateral cache ------------------------------------------------------------------------------


def test_bad_quote_does_not_evict_the_platforms_collateral(tdx) -> None:
    quote, col = tdx
    cache_collateral(quote, col, now=TDX_NOW)
    bad = _bad_signature(quote)
    assert att.dcap_qvl.Quote.parse(bad).fmspc() == att.dcap_qvl.Quote.parse(quote).fmspc()  # same platform
    with pytest.raises(AttestationError) as err:
        verify_attestation(_doc(bad), **_kwargs(quote))
    assert err.value.reason is Reason.QUOTE_INVALID
    # The honest node on the same platform still verifies from the cache.
    assert verify_attestation(_doc(quote), **_kwargs(quote)).tcb_status == "UpToDate"


def test_collateral_replaced_only_by_newer_valid_collateral(tdx) -> None:
    quote, col = tdx
    fmspc = att.dcap_qvl.Quote.parse(quote).fmspc()
    assert cache_collateral(quote, col, now=TDX_NOW)
    kept = att._collateral_cache[fmspc]
    older = json.loads(json.dumps(col))
    tcb = json.loads(older["tcb_info"])
    tcb["issueDate"] = "2000-01-01T00:00:00Z"
    older["tcb_info"] = json.dumps(tcb)  # its signature no longer matches either: invalid as well as older
    with pytest.raises(AttestationError):
        cache_collateral(quote, older, now=TDX_NOW)
    assert att._collateral_cache[fmspc] is kept
    with pytest.raises(AttestationError):  # expired at that time: not valid, not cached
        cache_collateral(quote, col, now=TDX_NOW + 10 * 365 * 86400)
    assert att._collateral_cache[fmspc] is kept
    assert verify_attestation(_doc(quote), **_kwargs(quote)).tcb_status == "UpToDate"
