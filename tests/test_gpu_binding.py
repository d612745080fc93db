"""GPU evidence bound to the node's quote, stapled by the node and enforced by policy (SDK, CLI, key broker).

The GPUs are dcml.client.demo.kit.fake_gpu (real signatures under test roots pinned here in place of NVIDIA's); the
real NVIDIA vectors check the verifier itself in test_gpu_evidence.py.
"""

from __future__ import annotations

import base64
import hashlib
import os
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.x509 import ocsp
from eth_account import Account
from fastapi.testclient import TestClient
from typer.testing import CliRunner

import dcml.client.attestation.gpu as gpu_evidence
from dcml.client.attestation.gpu import GpuReason, Revocation, build_bundle, gpu_nonce, load_chain, verify_bundle
from dcml.client.attestation.verify import (
    AttestationDocument,
    AttestationError,
    GpuPolicy,
    Policy,
    Reason,
    verify_attestation,
)
from dcml.client.demo.kit.fake_gpu import DRIVER, VBIOS_TEXT, FakeGpuMachine
from dcml.client.publisher.key_broker import AuditLog, KeyBroker, ModelEntry, create_app, measurement_id
from dcml.node.config import GpuTeeConfig, load_settings
from dcml.node.identity import EnclaveIdentity
from dcml.node.tee.base import TeeError
from dcml.node.tee.document import build_attestation_document
from dcml.node.tee.gpu import GpuAttestingProvider, with_gpu_evidence
from dcml.node.tee.simulated import SimulatedProvider

GPU_POLICY = Policy(allow_simulated=True, gpu=GpuPolicy(required=True, allowed_vbios_versions=[VBIOS_TEXT]))
IDENT = EnclaveIdentity.generate()


@pytest.fixture
def machine(monkeypatch) -> FakeGpuMachine:
    m = FakeGpuMachine(n=8)
    monkeypatch.setattr(gpu_evidence, "device_root", lambda: m.device_root)  # pin the test roots
    monkeypatch.setattr(gpu_evidence, "rim_root", lambda: m.rim_root)
    return m


def _rim_dir(tmp_path: Path, m: FakeGpuMachine, vbios: str | None = None) -> Path:
    d = tmp_path / "rims"
    d.mkdir(exist_ok=True)
    (d / "driver.swidtag").write_text(m.driver_rim())
    (d / "vbios.swidtag").write_text(vbios or m.vbios_rim())
    return d


@pytest.fixture
def provider(machine, tmp_path) -> GpuAttestingProvider:
    return with_gpu_evidence(SimulatedProvider(), GpuTeeConfig(enabled=True, rim_dir=_rim_dir(tmp_path, machine)),
                             collector=machine)


def _doc(provider, nonce: bytes, ident: EnclaveIdentity = IDENT) -> AttestationDocument:
    return build_attestation_document(ident, provider, nonce, node_version="t")


def _refused(doc, nonce, policy=GPU_POLICY) -> AttestationError:
    with pytest.raises(AttestationError) as exc:
        verify_attestation(doc, nonce=nonce, policy=policy)
    return exc.value


def test_node_staples_eight_gpus_and_the_client_verifies_offline(provider):
    nonce = os.urandom(32)
    doc = _doc(provider, nonce)
    assert len(doc.gpu_evidence["gpus"]) == 8 and len(doc.gpu_evidence["rims"]) == 2  # RIMs stored once
    node = verify_attestation(doc, nonce=nonce, policy=GPU_POLICY)
    assert node.gpu_evidence_verified and len(node.gpus) == 8
    assert all(g.ok and g.fwid_checked and g.rims_checked and not g.revocation_checked for g in node.gpus)
    # the report's nonce is sha256("dcml-gpu-v1" || report_data of the quote)
    report_data = bytes.fromhex(doc.report_data)
    assert node.gpus[0].report.nonce == gpu_nonce(report_data) == hashlib.sha256(b"dcml-gpu-v1" + report_data).digest()


def test_evidence_for_another_quote_is_refused_even_though_valid(provider):
    n1, n2 = os.urandom(32), os.urandom(32)
    fresh, other = _doc(provider, n1), _doc(provider, n2)
    assert verify_attestation(other, nonce=n2, policy=GPU_POLICY).gpu_evidence_verified  # valid on its own
    replayed = fresh.model_copy(update={"gpu_evidence": other.gpu_evidence})
    err = _refused(replayed, n1)
    assert (err.reason, err.gpu_reason, err.gpu_index) == (Reason.GPU_EVIDENCE, "nonce_mismatch", 0)
    # evidence of another node (another identity, same nonce) does not transfer either
    theirs = _doc(provider, n1, EnclaveIdentity.generate())
    assert _refused(fresh.model_copy(update={"gpu_evidence": theirs.gpu_evidence}), n1).gpu_reason == "nonce_mismatch"


def test_real_nvidia_evidence_stapled_to_a_quote_is_refused_by_its_nonce(tmp_path):
    vec = Path(gpu_evidence.__file__).resolve().parents[3] / "shared" / "vectors" / "nvidia" / "hopper-545"
    bundle = build_bundle([(bytes.fromhex((vec / "attestationReport.txt").read_text().strip()),
                            (vec / "gpuAkCertChain.txt").read_text(),
                            (vec / "Driver_RIM_test_no_gpu.swidtag").read_text(),
                            (vec / "1010_0200_882_96005E0001_test_no_gpu.swidtag").read_text())])
    pinned = datetime(2024, 6, 1, tzinfo=UTC)
    # the same bundle passes when its own nonce is what report_data derives, i.e. only the binding fails
    (r,) = verify_bundle(bundle, report_data=bytes(64), now=pinned)
    assert r.reason == GpuReason.NONCE_MISMATCH
    nonce = os.urandom(32)
    doc = _doc(SimulatedProvider(), nonce).model_copy(update={"gpu_evidence": bundle})
    policy = Policy(allow_simulated=True, gpu=GpuPolicy(allowed_vbios_versions=["*"]))
    with pytest.raises(AttestationError) as exc:
        verify_attestation(doc, nonce=nonce, policy=policy, now=int(pinned.timestamp()))
    assert exc.value.gpu_reason == "nonce_mismatch"


def test_policy_requiring_gpus_refuses_a_document_without(provider):
    nonce = os.urandom(32)
    bare = _doc(SimulatedProvider(), nonce)
    assert _refused(bare, nonce).reason == Reason.GPU_EVIDENCE_MISSING
    assert verify_attestation(bare, nonce=nonce, policy=Policy(allow_simulated=True)).gpus == ()


def test_policy_rules_architecture_driver_vbios_revocation(provider):
    nonce = os.urandom(32)
    doc = _doc(provider, nonce)

    def with_gpu(**kw) -> Policy:
        return Policy(allow_simulated=True, gpu=GpuPolicy(**{"allowed_vbios_versions": [VBIOS_TEXT], **kw}))

    assert verify_attestation(doc, nonce=nonce, policy=with_gpu(min_driver_version=DRIVER)).gpu_evidence_verified
    for policy, words in [
        (with_gpu(allowed_architectures=["blackwell"]), "architecture hopper"),
        (with_gpu(min_driver_version="555.0"), "older than"),
        (with_gpu(allowed_vbios_versions=["96.00.5E.00.01"]), "VBIOS 96.00.9F.00.01"),
        (with_gpu(allowed_vbios_versions=[]), "allowed_vbios_versions"),
        (with_gpu(revocation_required=True), "revocation"),
    ]:
        err = _refused(doc, nonce, policy)
        assert err.reason == Reason.GPU_NOT_ALLOWED and words in str(err), str(err)


def test_policy_toml_gpu_section_loads():
    policy = Policy.load(Path(__file__).resolve().parents[1] / "configs" / "policy.toml")
    assert policy.gpu.required is False and policy.gpu.allowed_vbios_versions == []
    p = Policy.from_toml('[gpu]\nrequired = true\nmin_driver_version = "550.54.15"\nallowed_vbios_versions = '
                         '["96.00.9f.00.01"]\n')
    assert p.gpu.required and p.gpu.allowed_vbios_versions == ["96.00.9F.00.01"]
    with pytest.raises(ValueError):
        Policy.from_toml('[gpu]\nmin_driver_version = "five"\n')
    with pytest.raises(ValueError):
        Policy.from_toml('[gpu]\nrequird = true\n')


def test_mismatching_vbios_rim_is_refused_at_node_start(machine, tmp_path):
    bad = machine.vbios_rim(golden={1: os.urandom(48)})
    provider = with_gpu_evidence(SimulatedProvider(), GpuTeeConfig(enabled=True, rim_dir=_rim_dir(tmp_path, machine,
                                                                                                   bad)),
                                 collector=machine)
    nonce = os.urandom(32)
    err = _refused(_doc(provider, nonce), nonce)
    assert err.gpu_reason == "rim_mismatch" and "[1]" in str(err)


def test_missing_rims_fail_at_start(machine, tmp_path):
    with pytest.raises(TeeError, match="rim_dir"):
        with_gpu_evidence(SimulatedProvider(), GpuTeeConfig(enabled=True, rim_dir=tmp_path / "none"), collector=machine)
    (tmp_path / "only").mkdir()
    (tmp_path / "only" / "driver.swidtag").write_text(machine.driver_rim())
    with pytest.raises(TeeError, match="no VBIOS RIM"):
        with_gpu_evidence(SimulatedProvider(), GpuTeeConfig(enabled=True, rim_dir=tmp_path / "only"),
                          collector=machine)


def test_node_without_gpu_cc_refuses_to_start_with_a_clear_error(tmp_path):
    # this machine has no NVIDIA driver: NVML cannot start, and the node says so instead of serving
    cause = r"\[tee.gpu\] is enabled but (NVML cannot start|the driver|GPU conf|nvidia-ml-py)"
    with pytest.raises(TeeError, match=cause):
        with_gpu_evidence(SimulatedProvider(), GpuTeeConfig(enabled=True, rim_dir=tmp_path))
    cfg = tmp_path / "node.toml"
    cfg.write_text(f'data_dir = "{tmp_path}"\n[engine]\nkind = "synthetic"\n[tee.gpu]\nenabled = true\n')
    assert load_settings(cfg).tee.gpu.enabled
    from dcml.node.cli import app

    result = CliRunner().invoke(app, ["run", "--config", str(cfg)])
    assert result.exit_code == 1 and "[tee.gpu] is enabled but" in result.output, result.output
    result = CliRunner().invoke(app, ["fetch-rims", "--config", str(cfg)])
    assert result.exit_code == 1 and "[tee.gpu] is enabled but" in result.output, result.output


# --- the key broker: a publisher can require GPU evidence before releasing a model key ----------


def test_key_broker_requires_gpu_evidence(provider, tmp_path):
    nonce0 = os.urandom(32)
    mid = measurement_id(verify_attestation(_doc(provider, nonce0), nonce=nonce0, policy=GPU_POLICY))
    model = bytes.fromhex("cd" * 32)
    broker = KeyBroker(models={model: ModelEntry(model_id=model, key=b"K" * 32, allowed_measurements=frozenset({mid}))},
                       policy=GPU_POLICY, audit=AuditLog(tmp_path / "audit.sqlite"), allow_simulated=True)
    client = TestClient(create_app(broker))
    url = f"/v1/models/0x{model.hex()}"

    def ask(prov) -> dict:
        nonce = bytes.fromhex(client.get(url + "/nonce", params={"node": IDENT.address}).json()["nonce"])
        doc = _doc(prov, nonce)
        return client.post(url + "/key", json={"nonce": nonce.hex(), "attestation": doc.model_dump(mode="json")})

    refused = ask(SimulatedProvider())
    assert refused.status_code == 403 and "gpu_evidence_missing" in refused.text, refused.text
    released = ask(provider)
    assert released.status_code == 200, released.text
    assert [e["outcome"] for e in broker.audit.entries()] == ["refused", "released"]


# --- the SDK and `dcml node attest` against a real node serving GPU evidence ---------------------


def test_sdk_and_cli_enforce_gpu_policy_against_a_live_node(provider, tmp_path, deployment):
    from dcml.client.sdk.cli import app as dcml
    from dcml.client.sdk.client import Client
    from dcml.node.api.app import create_app as node_app
    from dcml.node.api.server import BackgroundServer

    settings = load_settings(None, data_dir=tmp_path / "node", engine={"kind": "synthetic"})
    policy_file = tmp_path / "policy.toml"
    policy_file.write_text(f'allow_simulated = true\n[gpu]\nrequired = true\n'
                           f'allowed_vbios_versions = ["{VBIOS_TEXT}"]\n')
    for prov, ok in ((provider, True), (SimulatedProvider(), False)):
        with BackgroundServer(node_app(settings, provider=prov, identity=IDENT)) as server:
            with Client(server.url, Account.create(), deployment=deployment, policy=Policy.load(policy_file),
                        allow_simulated=True, store=tmp_path / f"spend{ok}.sqlite", deposit=1) as c:
                if ok:
                    assert len(c.attest().gpus) == 8
                else:
                    with pytest.raises(AttestationError, match="gpu_evidence_missing"):
                        c.attest()
            result = CliRunner().invoke(dcml, ["--policy", str(policy_file), "--allow-simulated", "node", "attest",
                                               server.url])
            assert (result.exit_code == 0) == ok, result.output


# --- revocation data: OCSP responses and CRLs under the pinned roots -----------------------------


def _crl(issuer: x509.Certificate, key, revoked: list[int], *, fresh: bool = True) -> bytes:
    now = datetime.now(UTC)
    b = (x509.CertificateRevocationListBuilder().issuer_name(issuer.subject)
         .last_update(now - timedelta(days=3)).next_update(now + timedelta(days=1 if fresh else -1)))
    for serial in revoked:
        b = b.add_revoked_certificate(x509.RevokedCertificateBuilder().serial_number(serial)
                                      .revocation_date(now - timedelta(hours=2)).build())
    return b.sign(key, hashes.SHA384()).public_bytes(serialization.Encoding.DER)


def _ocsp(cert: x509.Certificate, issuer: x509.Certificate, key, status=ocsp.OCSPCertStatus.GOOD) -> bytes:
    now = datetime.now(UTC)
    b = ocsp.OCSPResponseBuilder().add_response(
        cert=cert, issuer=issuer, algorithm=hashes.SHA1(), cert_status=status, this_update=now - timedelta(hours=1),
        next_update=now + timedelta(days=1), revocation_time=now if status == ocsp.OCSPCertStatus.REVOKED else None,
        revocation_reason=None).responder_id(ocsp.OCSPResponderEncoding.HASH, issuer)
    return b.sign(key, hashes.SHA384()).public_bytes(serialization.Encoding.DER)


def _verify_with(machine, revocation: Revocation):
    nonce = os.urandom(32)
    reports = machine.collect(gpu_nonce(nonce * 2))
    bundle = build_bundle([(r.report, r.cert_chain, machine.driver_rim(), machine.vbios_rim()) for r in reports[:2]],
                          revocation)
    return verify_bundle(bundle, report_data=nonce * 2, now=datetime.now(UTC))


def test_revocation_checked_with_crls_and_ocsp(machine):
    leaf0 = load_chain(machine.gpus[0].chain)[0]
    leaf1 = load_chain(machine.gpus[1].chain)[0]
    rim_crl = _crl(machine.rim_root, machine.rim_root_key, [])
    good = Revocation(crls=(_crl(machine.device_root, machine.device_root_key, []), rim_crl))
    assert all(r.ok and r.revocation_checked for r in _verify_with(machine, good))
    by_ocsp = Revocation(ocsp=(_ocsp(leaf0, machine.device_root, machine.device_root_key),
                               _ocsp(leaf1, machine.device_root, machine.device_root_key),
                               _ocsp(machine.rim_signer, machine.rim_root, machine.rim_root_key)))
    assert all(r.ok and r.revocation_checked for r in _verify_with(machine, by_ocsp))
    revoked = Revocation(crls=(_crl(machine.device_root, machine.device_root_key, [leaf1.serial_number]), rim_crl))
    assert [r.reason for r in _verify_with(machine, revoked)] == [None, GpuReason.REVOKED]
    revoked1 = _ocsp(leaf1, machine.device_root, machine.device_root_key, ocsp.OCSPCertStatus.REVOKED)
    ocsp_revoked = Revocation(ocsp=(by_ocsp.ocsp[0], revoked1, *by_ocsp.ocsp[2:]))
    assert [r.reason for r in _verify_with(machine, ocsp_revoked)] == [None, GpuReason.REVOKED]


def test_stale_forged_or_partial_revocation_data_is_refused(machine):
    other = FakeGpuMachine()
    rim_crl = _crl(machine.rim_root, machine.rim_root_key, [])
    for data in [
        Revocation(crls=(_crl(machine.device_root, machine.device_root_key, [], fresh=False), rim_crl)),  # stale
        Revocation(crls=(_crl(machine.device_root, other.device_root_key, []), rim_crl)),  # wrong signer
        Revocation(crls=(_crl(machine.device_root, machine.device_root_key, []),)),  # RIM chain not covered
        Revocation(crls=(b"garbage",)),
    ]:
        assert {r.reason for r in _verify_with(machine, data)} == {GpuReason.REVOCATION_INVALID}
    bundle = build_bundle([(machine.collect(bytes(32))[0].report, machine.gpus[0].chain, "x", "y")])
    bundle["revocation"] = {"crls": ["%%%"]}
    with pytest.raises(gpu_evidence.GpuEvidenceError):
        verify_bundle(bundle, report_data=bytes(64), now=datetime.now(UTC))
    assert Revocation.from_json(Revocation(crls=(rim_crl,)).to_json()).crls == (rim_crl,)


@pytest.mark.parametrize("bundle", [
    {}, {"gpus": []}, {"gpus": [{"report": "00"}], "rims": []}, {"format": "other", "gpus": [], "rims": []},
    {"gpus": [{"report": "zz", "certificate_chain": "", "driver_rim": 0, "vbios_rim": 0}], "rims": ["<a/>"]},
    {"gpus": [{"report": "00", "certificate_chain": "", "driver_rim": 5, "vbios_rim": 0}], "rims": []},
    {"gpus": [{"report": "00" * 20000, "certificate_chain": "", "driver_rim": 0, "vbios_rim": 0}], "rims": []},
])
def test_malformed_bundles_are_typed_refusals(bundle):
    nonce = os.urandom(32)
    doc = _doc(SimulatedProvider(), nonce).model_copy(update={"gpu_evidence": bundle})
    err = _refused(doc, nonce)
    assert err.reason == Reason.GPU_EVIDENCE and err.gpu_reason, str(err)


# --- the operator fetches RIMs ahead of time (NVIDIA's RIM service API, served on loopback) -------


def test_fetch_rims_from_a_rim_service(tmp_path):
    from fastapi import FastAPI, HTTPException

    from dcml.node.api.server import BackgroundServer
    from dcml.node.tee.gpu import GpuReport, fetch_rims, load_rims, rim_ids

    vec = Path(gpu_evidence.__file__).resolve().parents[3] / "shared" / "vectors" / "nvidia" / "hopper-545"
    served = {"NV_GPU_DRIVER_GH100_545.00": (vec / "Driver_RIM_test_no_gpu.swidtag").read_bytes(),
              "NV_GPU_VBIOS_1010_0200_882_96005E0001": (vec / "1010_0200_882_96005E0001_test_no_gpu.swidtag")
              .read_bytes()}
    calls: list[str] = []
    service = FastAPI()

    @service.get("/v1/rim/{rim_id}")
    def rim(rim_id: str) -> dict:
        calls.append(rim_id)
        if rim_id not in served:
            raise HTTPException(404)
        return {"id": rim_id, "rim": base64.b64encode(served[rim_id]).decode(), "rim_format": "TCG"}

    gpu = GpuReport(bytes.fromhex((vec / "attestationReport.txt").read_text().strip()),
                    (vec / "gpuAkCertChain.txt").read_text())
    assert rim_ids(gpu) == tuple(served)
    pinned = datetime(2024, 6, 1, tzinfo=UTC)
    with BackgroundServer(service) as server:
        saved = fetch_rims([gpu, gpu], tmp_path / "rims", service=server.url, now=pinned)
        assert sorted(p.name for p in saved) == sorted(f"{i}.swidtag" for i in served)
        assert fetch_rims([gpu], tmp_path / "rims", service=server.url, now=pinned) == []  # cached
        assert len(calls) == 2
        # a forged RIM from the service is not saved; an unknown id is a clear error
        served["NV_GPU_DRIVER_GH100_545.00"] = served["NV_GPU_DRIVER_GH100_545.00"].replace(b"True", b"False", 1)
        with pytest.raises(TeeError, match="does not verify"):
            fetch_rims([gpu], tmp_path / "other", service=server.url, now=pinned)
        assert not list((tmp_path / "other").iterdir())
        del served["NV_GPU_VBIOS_1010_0200_882_96005E0001"]
        served["NV_GPU_DRIVER_GH100_545.00"] = (vec / "Driver_RIM_test_no_gpu.swidtag").read_bytes()
        with pytest.raises(TeeError, match="HTTP 404"):
            fetch_rims([gpu], tmp_path / "third", service=server.url, now=pinned)
    assert len(load_rims(tmp_path / "rims", pinned)) == 2


def test_report_fwid_not_in_the_leaf_is_fwid_mismatch(machine):
    gpu = machine.gpus[0]
    genuine = gpu.fwid
    gpu.fwid = os.urandom(48)  # the device reports a FWID its certificate does not carry
    report = machine.report(gpu, bytes(32))
    gpu.fwid = genuine
    result = gpu_evidence.verify_gpu(report, gpu.chain, nonce=bytes(32), now=datetime.now(UTC), require_rims=False)
    assert result.reason == GpuReason.FWID_MISMATCH
    assert gpu_evidence.verify_gpu(machine.report(gpu, bytes(32)), gpu.chain, nonce=bytes(32), now=datetime.now(UTC),
                                   require_rims=False).fwid_checked


def test_rim_ids_from_a_hostile_report_are_refused(machine):
    from dcml.node.tee.gpu import GpuReport, rim_ids

    gpu = machine.gpus[0]
    assert rim_ids(GpuReport(machine.report(gpu, bytes(32)), gpu.chain)) == (
        f"NV_GPU_DRIVER_GH100_{DRIVER}", "NV_GPU_VBIOS_1010_0200_882_96009F0001")
    machine.driver = "../../etc/x"
    with pytest.raises(TeeError, match="unusable RIM id"):
        rim_ids(GpuReport(machine.report(gpu, bytes(32)), gpu.chain))
