"""The dstack provider through dstack-sdk against a stand-in guest agent on a Unix socket."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from dcml.client.attestation.measurements import parse_tdx_quote
from dcml.client.attestation.verify import (
    AttestationError,
    DstackPolicy,
    MeasurementPolicy,
    Policy,
    Reason,
    verify_attestation,
)
from dcml.client.demo.kit.vectors import DSTACK, DSTACK_COMPOSE_HASH, collateral, dstack_vector, ts
from dcml.node.identity import EnclaveIdentity
from dcml.node.tee.base import TeeError
from dcml.node.tee.document import build_attestation_document
from dcml.node.tee.dstack import DstackProvider
from tests.fakes.dstack_agent import FakeDstackAgent


@pytest.fixture
def agent() -> Iterator[FakeDstackAgent]:
    tmp = tempfile.mkdtemp(prefix="dstack-", dir="/tmp")  # AF_UNIX paths must stay under 108 bytes
    try:
        with FakeDstackAgent(Path(tmp) / "dstack.sock") as a:
            yield a
    finally:
        shutil.rmtree(tmp)


def test_get_quote_returns_vector_and_sends_our_report_data(agent):
    provider = DstackProvider(agent.socket_path)
    rd = os.urandom(64)
    evidence = provider.quote(rd)
    quote, events, _ = dstack_vector()
    assert evidence.quote == quote and evidence.event_log == events
    assert ("GetQuote", {"report_data": rd.hex()}) in agent.calls
    app_info = evidence.extra["app_info"]
    assert app_info["compose_hash"] == DSTACK_COMPOSE_HASH
    assert "app_compose" in app_info["tcb_info"] and "app_cert" not in app_info


def test_document_from_dstack_provider_verifies_only_with_expected_report_data(agent):
    identity = EnclaveIdentity.generate()
    nonce = os.urandom(32)
    doc = build_attestation_document(identity, DstackProvider(agent.socket_path), nonce, node_version="t")
    assert doc.tee_type == "dstack" and doc.report_data == "01" * 64
    m = parse_tdx_quote(bytes.fromhex(doc.quote)).measurements()
    policy = Policy(
        measurements=MeasurementPolicy(mrtd=[m.mrtd], rtmr0=[m.rtmr0], rtmr1=[m.rtmr1], rtmr2=[m.rtmr2]),
        dstack=DstackPolicy(compose_hashes=[DSTACK_COMPOSE_HASH]),
    )
    kwargs = dict(nonce=nonce, policy=policy, collateral=collateral(DSTACK / "quote_collateral.json"),
                  now=ts("2025-09-03T00:00:00Z"))
    with pytest.raises(AttestationError) as err:  # the agent's fixed quote does not bind our keys
        verify_attestation(doc, **kwargs)
    assert err.value.reason is Reason.REPORT_DATA_MISMATCH
    node = verify_attestation(doc, expected_report_data=b"\x01" * 64, **kwargs)
    assert node.compose_hash == DSTACK_COMPOSE_HASH and node.tcb_status == "UpToDate"


def test_identity_seed_from_kms_survives_restart(agent):
    first = EnclaveIdentity.from_seed(DstackProvider(agent.socket_path).derive_identity_seed())
    again = EnclaveIdentity.from_seed(DstackProvider(agent.socket_path).derive_identity_seed())
    assert first.address == again.address
    assert any(method == "GetKey" and body["path"] == "dcml/identity/v1" for method, body in agent.calls)


def test_missing_socket():
    with pytest.raises(TeeError, match=r"dstack\.sock"):
        DstackProvider("/nonexistent/dstack.sock")
