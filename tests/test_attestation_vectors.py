"""Every row of shared/vectors/tdx/README.md and the dstack vector give exactly their documented result."""

from __future__ import annotations

import copy
import hashlib

import dcap_qvl
import pytest

from dcml.client.attestation.measurements import (
    BODY_TD10,
    BODY_TD15,
    EventLogEntry,
    compose_hash_from_events,
    expected_mr_config_id,
    parse_tdx_quote,
    replay_rtmrs,
    runtime_event_digest,
)
from dcml.client.attestation.verify import (
    ANY,
    AttestationError,
    MeasurementPolicy,
    Policy,
    Reason,
    cache_collateral,
    dcap_verify,
    verify_attestation,
)
from dcml.client.demo.kit.vectors import DSTACK, DSTACK_COMPOSE_HASH, TDX, collateral, dstack_vector, tdx_quote, ts
from tests.vector_docs import DSTACK_NOW, NONCE, ONES, TDX_NOW, _doc, _dstack_doc, _policy_for

# --- shared/vectors/tdx ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tdx() -> tuple[bytes, dict]:
    return tdx_quote("tdx_quote"), collateral(TDX / "tdx_quote_collateral.json")


def test_tdx_quote_verifies_up_to_date(tdx):
    quote, col = tdx
    parsed = parse_tdx_quote(quote)
    assert parsed.version == 4 and parsed.body_type == BODY_TD10
    assert parsed.report_data.hex().startswith("9a9d48e7f6799642")
    assert parsed.body["mr_td"].hex().startswith("91eb2b44d141d4ec")
    assert not parsed.debug
    node = verify_attestation(
        _doc(quote), nonce=NONCE, policy=_policy_for(quote), collateral=col, now=TDX_NOW,
        expected_report_data=parsed.report_data,
    )
    assert (node.tcb_status, node.advisory_ids, node.simulated) == ("UpToDate", (), False)
    assert node.measurements.mrtd.startswith("91eb2b44d141d4ec")


def test_tdx_quote_without_key_binding_is_refused(tdx):
    quote, col = tdx
    with pytest.raises(AttestationError) as err:
        verify_attestation(_doc(quote), nonce=NONCE, policy=_policy_for(quote), collateral=col, now=TDX_NOW)
    assert err.value.reason is Reason.REPORT_DATA_MISMATCH


@pytest.mark.parametrize(
    ("when", "message"),
    [("2025-07-30T00:00:00Z", "TCBInfo expired"), ("2025-06-01T00:00:00Z", "issue date is in the future")],
)
def test_tdx_quote_outside_collateral_window(tdx, when, message):
    quote, col = tdx
    with pytest.raises(AttestationError) as err:
        verify_attestation(_doc(quote), nonce=NONCE, policy=_policy_for(quote), collateral=col, now=ts(when))
    assert err.value.reason is Reason.QUOTE_INVALID and message in str(err.value)


@pytest.mark.parametrize("offset", [0, 136, 328, 520, 583])  # TEE_TCB_SVN, MRTD, RTMR0, REPORTDATA, last
def test_tdx_quote_flipped_body_byte_breaks_signature(tdx, offset):
    quote, col = tdx
    tampered = bytearray(quote)
    tampered[48 + offset] ^= 0x01
    with pytest.raises(AttestationError) as err:
        verify_attestation(
            _doc(bytes(tampered)), nonce=NONCE, policy=Policy(measurements=MeasurementPolicy(
                mrtd=[ANY], rtmr0=[ANY], rtmr1=[ANY], rtmr2=[ANY], rtmr3=[ANY])),
            collateral=col, now=TDX_NOW, expected_report_data=parse_tdx_quote(bytes(tampered)).report_data,
        )
    assert err.value.reason is Reason.QUOTE_INVALID
    assert "report signature is invalid" in str(err.value)


def test_v5_outdated_quote_rejected_but_body_parsed():
    quote = tdx_quote("tdx_quote_outdated")
    parsed = parse_tdx_quote(quote)
    assert (parsed.version, parsed.body_type) == (5, BODY_TD15)
    ref = dcap_qvl.Quote.parse(quote).report  # cross-check our parser against dcap-qvl's
    for field in ("mr_td", "rt_mr0", "rt_mr3", "report_data", "mr_config_id", "td_attributes"):
        assert parsed.body[field] == getattr(ref, field)
    assert parsed.body["mr_service_td"] == ref.mr_service_td
    assert parsed.body["tee_tcb_svn2"] == ref.tee_tcb_svn2
    with pytest.raises(AttestationError) as err:
        verify_attestation(
            _doc(quote), nonce=NONCE, policy=_policy_for(quote),
            collateral=collateral(TDX / "tdx_quote_outdated_collateral.json"), now=ts("2026-02-19T10:58:51Z"),
        )
    assert err.value.reason is Reason.QUOTE_INVALID and "No matching TCB level" in str(err.value)


def test_v4_parser_matches_dcap_qvl(tdx):
    quote, _ = tdx
    parsed, ref = parse_tdx_quote(quote), dcap_qvl.Quote.parse(quote).report
    for field, value in parsed.body.items():
        assert value == getattr(ref, field), field


def test_sgx_quote_verifies_as_sgx_but_is_refused_as_not_tdx():
    quote, col = tdx_quote("sgx_quote"), collateral(TDX / "sgx_quote_collateral.json")
    result = dcap_verify(quote, col, ts("2025-06-20T10:56:11Z"))
    assert result.status == "ConfigurationAndSWHardeningNeeded"
    assert sorted(result.advisory_ids) == ["INTEL-SA-00289", "INTEL-SA-00615"]
    fake_doc = _doc(tdx_quote("tdx_quote")).model_copy(update={"quote": quote.hex()})
    with pytest.raises(AttestationError) as err:
        verify_attestation(fake_doc, nonce=NONCE, policy=Policy(), collateral=col, now=ts("2025-06-20T10:56:11Z"))
    assert err.value.reason is Reason.NOT_TDX


def test_measurements_not_allowed_and_empty_policy_refuses(tdx):
    quote, col = tdx
    rd = parse_tdx_quote(quote).report_data
    with pytest.raises(AttestationError) as err:  # shipped default: empty lists refuse real quotes
        verify_attestation(_doc(quote), nonce=NONCE, policy=Policy(), collateral=col, now=TDX_NOW,
                           expected_report_data=rd)
    assert err.value.reason is Reason.MEASUREMENT_NOT_ALLOWED and "mrtd" in str(err.value)
    policy = _policy_for(quote)
    policy = policy.model_copy(update={"measurements": policy.measurements.model_copy(update={"rtmr1": ["00" * 48]})})
    with pytest.raises(AttestationError, match="RTMR1"):
        verify_attestation(_doc(quote), nonce=NONCE, policy=policy, collateral=col, now=TDX_NOW,
                           expected_report_data=rd)


def test_tcb_status_is_gated_by_policy(tdx):
    quote, col = tdx
    policy = _policy_for(quote, allowed_statuses=["OutOfDate"])
    with pytest.raises(AttestationError) as err:
        verify_attestation(_doc(quote), nonce=NONCE, policy=policy, collateral=col, now=TDX_NOW,
                           expected_report_data=parse_tdx_quote(quote).report_data)
    assert err.value.reason is Reason.TCB_STATUS


def test_collateral_cache(tdx, monkeypatch):
    import dcml.client.attestation.verify as att

    monkeypatch.setattr(att, "_collateral_cache", {})
    quote, col = tdx
    kwargs = dict(nonce=NONCE, policy=_policy_for(quote), now=TDX_NOW,
                  expected_report_data=parse_tdx_quote(quote).report_data)
    with pytest.raises(AttestationError) as err:
        verify_attestation(_doc(quote), **kwargs)
    assert err.value.reason is Reason.COLLATERAL_MISSING and "fetch_collateral" in str(err.value)
    cache_collateral(quote, col, now=TDX_NOW)  # only collateral that verifies the quote is cached
    assert verify_attestation(_doc(quote), **kwargs).tcb_status == "UpToDate"


# --- shared/vectors/dstack ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def dstack():
    quote, events, app_info = dstack_vector()
    return quote, events, app_info, collateral(DSTACK / "quote_collateral.json")



def test_dstack_vector_up_to_date_with_replay_and_compose_hash(dstack):
    quote, events, app_info, col = dstack
    parsed = parse_tdx_quote(quote)
    assert parsed.report_data == ONES
    entries = [EventLogEntry.model_validate(e) for e in events]
    assert replay_rtmrs(entries) == parsed.rtmrs
    compose = compose_hash_from_events(entries)
    assert compose.hex() == DSTACK_COMPOSE_HASH == app_info["compose_hash"]
    assert hashlib.sha256(app_info["tcb_info"]["app_compose"].encode()).digest() == compose
    assert parsed.body["mr_config_id"] == expected_mr_config_id(compose)

    node = verify_attestation(_dstack_doc(quote, events, app_info), nonce=NONCE, policy=_policy_for(quote),
                              collateral=col, now=DSTACK_NOW, expected_report_data=ONES)
    assert (node.tcb_status, node.advisory_ids, node.tee_type) == ("UpToDate", (), "dstack")
    assert node.compose_hash == DSTACK_COMPOSE_HASH


def test_dstack_vector_refused_without_binding(dstack):
    quote, events, app_info, col = dstack
    with pytest.raises(AttestationError) as err:
        verify_attestation(_dstack_doc(quote, events, app_info), nonce=NONCE, policy=_policy_for(quote),
                           collateral=col, now=DSTACK_NOW)
    assert err.value.reason is Reason.REPORT_DATA_MISMATCH


def test_dstack_compose_hash_not_allowed(dstack):
    quote, events, app_info, col = dstack
    with pytest.raises(AttestationError) as err:
        verify_attestation(_dstack_doc(quote, events, app_info), nonce=NONCE,
                           policy=_policy_for(quote, compose_hashes=[]), collateral=col, now=DSTACK_NOW,
                           expected_report_data=ONES)
    assert err.value.reason is Reason.COMPOSE_HASH_NOT_ALLOWED and DSTACK_COMPOSE_HASH in str(err.value)


def _compose_index(events) -> int:
    return next(i for i, e in enumerate(events) if e["event"] == "compose-hash")


def _alter_payload_consistently(events):
    """Swap the compose hash and recompute its digest: the log is self-consistent, the quote disagrees."""
    i = _compose_index(events)
    ev = events[i]
    ev["event_payload"] = "ff" * 32
    ev["digest"] = runtime_event_digest(ev["event_type"], ev["event"], bytes.fromhex(ev["event_payload"])).hex()


def _set(index_of, key, value):
    def alter(events):
        events[index_of(events)][key] = value
    return alter


@pytest.mark.parametrize(
    ("alter", "reason"),
    [
        (_set(_compose_index, "event_payload", "ff" * 32), Reason.EVENT_LOG_INVALID),  # digest no longer matches
        (_set(_compose_index, "digest", "00" * 48), Reason.EVENT_LOG_INVALID),
        (_alter_payload_consistently, Reason.EVENT_LOG_MISMATCH),
        (_set(lambda ev: 0, "digest", "00" * 48), Reason.EVENT_LOG_MISMATCH),  # an RTMR0 event
        (lambda ev: ev.pop(_compose_index(ev)), Reason.EVENT_LOG_INVALID),  # dropped compose-hash event
        (lambda ev: ev.append({**ev[-1], "imr": 4}), Reason.EVENT_LOG_INVALID),
    ],
)
def test_dstack_altered_event_log_rejected(dstack, alter, reason):
    quote, events, app_info, col = dstack
    events = copy.deepcopy(events)
    alter(events)
    with pytest.raises(AttestationError) as err:
        verify_attestation(_dstack_doc(quote, events, app_info), nonce=NONCE, policy=_policy_for(quote),
                           collateral=col, now=DSTACK_NOW, expected_report_data=ONES)
    assert err.value.reason is reason


def test_dstack_app_info_must_match_measured_compose(dstack):
    quote, events, app_info, col = dstack
    forged = copy.deepcopy(app_info)
    forged["tcb_info"]["app_compose"] += " "
    with pytest.raises(AttestationError) as err:
        verify_attestation(_dstack_doc(quote, events, forged), nonce=NONCE, policy=_policy_for(quote),
                           collateral=col, now=DSTACK_NOW, expected_report_data=ONES)
    assert err.value.reason is Reason.COMPOSE_HASH_MISMATCH


def test_dstack_without_event_log_rejected(dstack):
    quote, _, app_info, col = dstack
    with pytest.raises(AttestationError) as err:
        verify_attestation(_dstack_doc(quote, None, app_info), nonce=NONCE, policy=_policy_for(quote),
                           collateral=col, now=DSTACK_NOW, expected_report_data=ONES)
    assert err.value.reason is Reason.EVENT_LOG_INVALID


def test_debug_bit_is_read_from_td_attributes():
    quote = bytearray(tdx_quote("tdx_quote"))
    assert not parse_tdx_quote(bytes(quote)).debug
    quote[48 + 120] |= 0x01
    assert parse_tdx_quote(bytes(quote)).debug


def test_truncated_quote_is_malformed(tdx):
    quote, col = tdx
    with pytest.raises(AttestationError) as err:
        verify_attestation(_doc(quote).model_copy(update={"quote": quote[:600].hex()}), nonce=NONCE,
                           policy=Policy(), collateral=col, now=TDX_NOW)
    assert err.value.reason is Reason.QUOTE_MALFORMED
