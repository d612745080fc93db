"""Verifier behaviour on documents built by the node: simulated TEE, nonce freshness, binding, NRAS, policy."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from dcml.client.attestation.measurements import build_simulated_quote, dev_signer
from dcml.client.attestation.nras import parse_nras_response
from dcml.client.attestation.verify import (
    SIMULATED_MARKER,
    AttestationDocument,
    AttestationError,
    Policy,
    Reason,
    SimulatedPolicy,
    verify_attestation,
)
from dcml.client.demo.kit.vectors import DSTACK
from dcml.node.identity import EnclaveIdentity
from dcml.node.tee.document import build_attestation_document
from dcml.node.tee.simulated import SimulatedProvider

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def identity() -> EnclaveIdentity:
    return EnclaveIdentity.from_seed(b"attestation-tests".ljust(32, b"\0"))


@pytest.fixture(scope="module")
def nonce() -> bytes:
    return os.urandom(32)


@pytest.fixture(scope="module")
def sim_doc(identity, nonce) -> AttestationDocument:
    return build_attestation_document(identity, SimulatedProvider(), nonce, node_version="0.1.0")


def test_simulated_provider_warns_loudly(caplog):
    with caplog.at_level(logging.WARNING):
        SimulatedProvider()
    assert "SIMULATED TEE — NOT CONFIDENTIAL" in caplog.text


def test_simulated_refused_by_default(sim_doc, nonce):
    with pytest.raises(AttestationError) as err:
        verify_attestation(sim_doc, nonce=nonce, policy=Policy())
    assert err.value.reason is Reason.SIMULATED_REFUSED and SIMULATED_MARKER in str(err.value)


def test_simulated_accepted_when_allowed(sim_doc, nonce, identity):
    for kwargs in ({"allow_simulated": True, "policy": Policy()}, {"policy": Policy(allow_simulated=True)}):
        node = verify_attestation(sim_doc, nonce=nonce, **kwargs)
        assert node.simulated and node.marker == SIMULATED_MARKER and node.tcb_status == "Simulated"
        assert node.signing_address == identity.address
        assert node.hpke_public_key == identity.hpke_public_bytes()


def test_document_json_round_trip(sim_doc, nonce):
    again = AttestationDocument.model_validate_json(sim_doc.model_dump_json())
    assert verify_attestation(again, nonce=nonce, policy=Policy(), allow_simulated=True).simulated


def test_simulated_signed_by_other_key_rejected(identity, nonce):
    doc = build_attestation_document(
        identity, SimulatedProvider(Ed25519PrivateKey.generate()), nonce, node_version="0.1.0"
    )
    with pytest.raises(AttestationError) as err:
        verify_attestation(doc, nonce=nonce, policy=Policy(), allow_simulated=True)
    assert err.value.reason is Reason.SIMULATED_INVALID and "untrusted" in str(err.value)


def test_simulated_pinned_signer(identity, nonce, sim_doc):
    mine = Ed25519PrivateKey.generate()
    policy = Policy(simulated=SimulatedPolicy(signers=[mine.public_key().public_bytes_raw().hex()]))
    doc = build_attestation_document(identity, SimulatedProvider(mine), nonce, node_version="0.1.0")
    assert verify_attestation(doc, nonce=nonce, policy=policy, allow_simulated=True).simulated
    with pytest.raises(AttestationError):  # the well-known dev key is no longer enough
        verify_attestation(sim_doc, nonce=nonce, policy=policy, allow_simulated=True)


def test_simulated_quote_body_tampering_rejected(identity, nonce, sim_doc):
    quote = bytearray(bytes.fromhex(sim_doc.quote))
    quote[48 + 136] ^= 1  # MRTD
    doc = sim_doc.model_copy(update={"quote": bytes(quote).hex()})
    with pytest.raises(AttestationError) as err:
        verify_attestation(doc, nonce=nonce, policy=Policy(), allow_simulated=True)
    assert err.value.reason is Reason.SIMULATED_INVALID


def test_stale_nonce_rejected(sim_doc):
    with pytest.raises(AttestationError) as err:
        verify_attestation(sim_doc, nonce=os.urandom(32), policy=Policy(), allow_simulated=True)
    assert err.value.reason is Reason.NONCE_MISMATCH


def test_replayed_quote_with_edited_nonce_rejected(sim_doc):
    # An attacker replays an old quote but rewrites the JSON nonce: the quote body still has the old one.
    fresh = os.urandom(32)
    doc = sim_doc.model_copy(update={"nonce": fresh.hex(), "report_data": "00" * 64})
    with pytest.raises(AttestationError) as err:
        verify_attestation(doc, nonce=fresh, policy=Policy(), allow_simulated=True)
    assert err.value.reason is Reason.REPORT_DATA_MISMATCH


def test_swapped_keys_rejected(sim_doc, nonce):
    other = EnclaveIdentity.generate()
    for update in ({"signing_address": other.address}, {"hpke_public_key": other.hpke_public_bytes().hex()}):
        with pytest.raises(AttestationError) as err:
            verify_attestation(sim_doc.model_copy(update=update), nonce=nonce, policy=Policy(), allow_simulated=True)
        assert err.value.reason is Reason.REPORT_DATA_MISMATCH


def test_bad_documents(sim_doc, nonce):
    with pytest.raises(AttestationError) as err:
        verify_attestation(sim_doc, nonce=nonce[:16], policy=Policy(), allow_simulated=True)
    assert err.value.reason is Reason.NONCE_MISMATCH
    for update in ({"quote": "zz"}, {"hpke_public_key": "00" * 32}, {"signing_address": "0x1234"}):
        with pytest.raises(AttestationError) as err:
            verify_attestation(sim_doc.model_copy(update=update), nonce=nonce, policy=Policy(), allow_simulated=True)
        assert err.value.reason is Reason.BAD_DOCUMENT


def test_simulated_quote_is_not_a_real_tdx_quote(sim_doc, nonce):
    # Relabelling a simulated document as "tdx" sends it through DCAP, which has no Intel chain for it.
    doc = sim_doc.model_copy(update={"tee_type": "tdx"})
    with pytest.raises(AttestationError) as err:
        verify_attestation(doc, nonce=nonce, policy=Policy(), collateral={})
    assert err.value.reason is Reason.QUOTE_INVALID


def test_dev_signer_is_stable():
    rd = bytes(64)
    assert build_simulated_quote(rd, dev_signer()) == build_simulated_quote(rd, dev_signer())


def test_shipped_policy_is_fail_closed():
    policy = Policy.load(REPO / "configs" / "policy.toml")
    # Defaults (UpToDate only, empty allow-lists, no simulated), except the hashes of the composes docker/ ships
    # (tests/test_compose_hash.py), never the wildcard.
    assert policy.model_copy(update={"dstack": Policy().dstack}) == Policy()
    assert "*" not in policy.dstack.compose_hashes
    assert not policy.allow_simulated and policy.tcb.allowed_statuses == ["UpToDate"]


def test_policy_rejects_typos():
    with pytest.raises(ValueError):
        Policy.from_toml("[measurements]\nmrtd = ['not-hex']\n")
    with pytest.raises(ValueError):
        Policy.from_toml("allow_simulatd = true\n")


# --- NVIDIA NRAS results (claims only: signatures need NVIDIA's keys, which are not available here) ---


@pytest.fixture(scope="module")
def nras() -> dict:
    return json.loads((DSTACK / "nras_responses.json").read_text())


def test_nras_single_gpu_claims(nras):
    nonce = bytes.fromhex("56f5c2c4f23fda73db0536276f39a266569e1517de34023817ce455a79efb6d7")
    claims = parse_nras_response(nras["single_gpu"], nonce)
    assert list(claims) == ["GPU-0"]
    assert (claims["GPU-0"].measres, claims["GPU-0"].dbgstat, claims["GPU-0"].secboot) == ("success", "disabled", True)


def test_nras_eight_gpus(nras):
    nonce = bytes.fromhex("d6a4f9aa17f488cfe8163dcb47cc4f778d3f1c52d42a1f9e6de5e43077ce05cd")
    assert len(parse_nras_response(nras["eight_gpu_ppcie"], nonce)) == 8


def test_nras_wrong_nonce_or_swapped_token(nras):
    with pytest.raises(AttestationError, match="different nonce"):
        parse_nras_response(nras["single_gpu"], os.urandom(32))
    overall, gpus = nras["eight_gpu_ppcie"]
    swapped = [overall, {**gpus, "GPU-0": gpus["GPU-1"]}]
    nonce = bytes.fromhex("d6a4f9aa17f488cfe8163dcb47cc4f778d3f1c52d42a1f9e6de5e43077ce05cd")
    with pytest.raises(AttestationError, match="GPU-0 token"):
        parse_nras_response(swapped, nonce)
