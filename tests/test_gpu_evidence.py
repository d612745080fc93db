"""Every row of shared/vectors/nvidia/README.md gives exactly its expected result, offline, plus hostile input."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from dcml.client.attestation.gpu import (
    GpuEvidenceError,
    GpuReason,
    certificate_fwids,
    compare_measurements,
    device_root,
    load_chain,
    parse_report,
    rim_root,
    verify_chain,
    verify_gpu,
    verify_rim,
)
from dcml.client.demo.kit.vectors import VECTORS

NV = VECTORS / "nvidia"
H545 = NV / "hopper-545"
EV = NV / "evidence"
PINNED = datetime(2024, 6, 1, tzinfo=UTC)
NONCE_545 = bytes.fromhex("4cff7f5380ead8fad8ec2c531c110aca4302a88f603792801a8ca29ee151af2e")
NONCE_EV = bytes.fromhex("931d8dd0add203ac3d8b4fbde75e115278eefcdceac5b87671a748f32364dfcb")
REPORT = bytes.fromhex((H545 / "attestationReport.txt").read_text().strip())
CHAIN = (H545 / "gpuAkCertChain.txt").read_bytes()
DRIVER_RIM = (H545 / "Driver_RIM_test_no_gpu.swidtag").read_bytes()
VBIOS_RIM = (H545 / "1010_0200_882_96005E0001_test_no_gpu.swidtag").read_bytes()
PROD_RIM = (H545 / "1010_0200_882_96005E0001_PROD.swidtag").read_bytes()


def _ev(name: str) -> bytes:
    return bytes.fromhex((EV / name).read_text().strip())


def _verify(report: bytes = REPORT, chain: bytes = CHAIN, *, nonce: bytes = NONCE_545, now: datetime = PINNED,
            driver: bytes | None = DRIVER_RIM, vbios: bytes | None = VBIOS_RIM, **kw):
    return verify_gpu(report, chain, nonce=nonce, now=now, driver_rim=driver, vbios_rim=vbios, **kw)


# --- hopper-545: the complete set --------------------------------------------------------------


def test_pinned_roots_are_the_vectors_roots():
    assert device_root() == x509.load_pem_x509_certificate((H545 / "verifier_device_root.pem").read_bytes())
    assert rim_root() == x509.load_pem_x509_certificate((H545 / "verifier_RIM_root.pem").read_bytes())
    assert load_chain(CHAIN)[-1] == device_root()


def test_report_layout_as_documented():
    r = parse_report(REPORT)
    assert len(REPORT) == 4049 and len(r.request) == 37
    assert r.nonce == NONCE_545
    assert sorted(r.measurements) == list(range(1, 65)) and all(len(v) == 48 for v in r.measurements.values())
    assert (r.driver_version, r.vbios_version) == ("545.00", "96.00.5E.00.01")
    assert (r.project, r.project_sku, r.chip_sku) == ("1010", "0200", "882")
    assert r.nvdec0_disabled and r.fwid is None and len(r.signature) == 96


@pytest.mark.parametrize("now", [PINNED, datetime(2023, 6, 27, 12, tzinfo=UTC), datetime(2025, 6, 22, tzinfo=UTC)])
def test_complete_h100_set_passes(now):
    result = _verify(now=now)
    assert result.ok, result.describe()
    assert (result.architecture, result.driver_version, result.vbios_version) == ("hopper", "545.00", "96.00.5E.00.01")
    assert result.rims_checked and not result.revocation_checked  # no revocation data supplied: said plainly


def test_rims_verify_and_carry_33_active_measurements():
    driver, vbios = verify_rim(DRIVER_RIM, PINNED), verify_rim(VBIOS_RIM, PINNED)
    assert (driver.version, vbios.version, driver.product) == ("545.00", "96.00.5E.00.01", "GH100")
    assert (len(driver.golden), len(vbios.golden)) == (21, 12)
    assert driver.chain[-1] == rim_root()
    assert compare_measurements(parse_report(REPORT), [driver, vbios]) == ()


def test_prod_vbios_rim_mismatches_at_1_2_3_9():
    result = _verify(vbios=PROD_RIM)
    assert (result.ok, result.reason, result.indices) == (False, GpuReason.RIM_MISMATCH, (1, 2, 3, 9))
    assert "[1, 2, 3, 9]" in result.describe()


def test_wrong_nonce_refused():
    assert _verify(nonce=bytes(32)).reason == GpuReason.NONCE_MISMATCH


# Offsets of the report's structure (request 37 bytes; response header 8; 64 blocks of 55; then the
# responder nonce, the opaque length and the opaque fields). A flip there may also make the report unparsable.
STRUCTURE = {0, 1, 37, 38, 41, 42, 43, 44} | {45 + 55 * i + k for i in range(64) for k in (0, 2, 3, 5, 6)} \
    | {45 + 3520 + 32, 45 + 3520 + 33}


def test_every_flipped_byte_in_the_signed_part_breaks_the_signature():
    """Flip the whole request, then every 7th byte (7 is coprime with the 55-byte blocks: every field's offsets)."""
    malformed = 0
    opaque_start = 45 + 3520 + 34
    for pos in sorted(set(range(37)) | set(range(37, len(REPORT) - 96, 7))):
        bad = bytearray(REPORT)
        bad[pos] ^= 0x01
        result = _verify(bytes(bad), driver=None, vbios=None, require_rims=False)
        if result.reason == GpuReason.MALFORMED and (pos in STRUCTURE or pos >= opaque_start):
            malformed += 1  # a length or type field: rejected before any signature check
            continue
        assert result.reason == GpuReason.SIGNATURE_INVALID, (pos, result.describe())
    assert malformed < 60


def test_flipped_measurement_byte_is_a_signature_failure_not_a_mismatch():
    bad = bytearray(REPORT)
    bad[37 + 8 + 7 + 10] ^= 0xFF  # inside measurement block 1's value
    assert _verify(bytes(bad)).reason == GpuReason.SIGNATURE_INVALID


def test_flipped_signature_byte_breaks_it():
    bad = bytearray(REPORT)
    bad[-1] ^= 0x01
    assert _verify(bytes(bad)).reason == GpuReason.SIGNATURE_INVALID


def test_today_the_rim_chain_is_expired_so_time_is_an_input():
    result = _verify(now=datetime(2026, 12, 3, tzinfo=UTC))
    assert result.reason == GpuReason.EXPIRED and "HCC RIM L4 Signer" in result.message
    # the intermediate expires 2026-11-11 even with a still-valid signer
    with pytest.raises(GpuEvidenceError) as exc:
        verify_chain(verify_rim(DRIVER_RIM, PINNED).chain[1:], rim_root(), datetime(2026, 11, 12, tzinfo=UTC),
                     bad=GpuReason.RIM_CHAIN_INVALID)
    assert exc.value.reason == GpuReason.EXPIRED and "L3 GH100" in exc.value.message
    assert _verify(now=datetime(2023, 6, 26, tzinfo=UTC)).reason == GpuReason.EXPIRED  # before the signer


def test_rims_must_match_the_report_versions():
    assert _verify(driver=VBIOS_RIM, vbios=DRIVER_RIM).reason == GpuReason.RIM_VERSION_MISMATCH
    assert _verify(driver=None).reason == GpuReason.RIM_MISSING
    assert _verify(driver=None, vbios=None, require_rims=False).ok


def test_device_chain_must_end_at_the_pinned_root():
    certs = load_chain(CHAIN)
    pem = b"".join(c.public_bytes(Encoding.PEM) for c in certs[:-1])
    assert _verify(chain=pem).ok  # the root may be left out: it is pinned
    swapped = b"".join(c.public_bytes(Encoding.PEM) for c in [certs[0], certs[2], certs[3]])
    assert _verify(chain=swapped).reason == GpuReason.CHAIN_INVALID
    assert _verify(chain=CHAIN, device_root_cert=rim_root()).reason == GpuReason.CHAIN_INVALID


def test_rim_signed_under_another_root_refused():
    assert verify_gpu(REPORT, CHAIN, nonce=NONCE_545, now=PINNED, driver_rim=DRIVER_RIM, vbios_rim=VBIOS_RIM,
                      rim_root_cert=device_root()).reason == GpuReason.RIM_CHAIN_INVALID


# --- evidence/: reports with FWIDs, and the broken signature -----------------------------------


def test_nvtrust_hopper_fwid_matches_the_leaf_tcbinfo():
    result = verify_gpu(_ev("nvtrust-hopperAttestationReport.txt"), (EV / "nvtrust-hopperCertChain.txt").read_bytes(),
                        nonce=NONCE_EV, now=PINNED, require_rims=False)
    assert result.ok and result.fwid_checked, result.describe()
    assert (result.driver_version, result.vbios_version) == ("550.90.07", "96.00.9F.00.01")
    leaf = load_chain((EV / "nvtrust-hopperCertChain.txt").read_bytes())[0]
    assert parse_report(_ev("nvtrust-hopperAttestationReport.txt")).fwid in certificate_fwids(leaf, "hopper")
    assert certificate_fwids(leaf, "blackwell") == []  # the OIDs differ per architecture


def test_blackwell_fwid_under_the_blackwell_oid():
    result = verify_gpu(_ev("asdk-blackwellAttestationReport.txt"), (EV / "asdk-blackwellCertChain.txt").read_bytes(),
                        nonce=NONCE_EV, now=PINNED, require_rims=False)
    assert result.ok and result.fwid_checked and result.architecture == "blackwell", result.describe()
    assert (result.driver_version, result.vbios_version) == ("575.32", "97.00.88.00.0F")
    leaf = load_chain((EV / "asdk-blackwellCertChain.txt").read_bytes())[0]
    assert certificate_fwids(leaf, "hopper") == []


def test_fwid_of_another_gpu_is_refused():
    # the nvtrust report (FWID A) against another H100's chain (FWID B): the signature fails first, so
    # check the FWID step directly with the same GPU's chain but a forged FWID in the parsed report
    leaf = load_chain((EV / "nvtrust-hopperCertChain.txt").read_bytes())[0]
    other = load_chain((EV / "asdk-hopperCertChainExpired.txt").read_bytes())[0]
    fwid = parse_report(_ev("nvtrust-hopperAttestationReport.txt")).fwid
    assert fwid in certificate_fwids(leaf, "hopper") and fwid not in certificate_fwids(other, "hopper")


def test_broken_signature_report_chain_passes_signature_fails():
    chain = (EV / "asdk-hopperCertChainExpired.txt").read_bytes()
    verify_chain(load_chain(chain), device_root(), PINNED, bad=GpuReason.CHAIN_INVALID)  # the chain verifies
    result = verify_gpu(_ev("asdk-hopperAttestationReportInvalidSignature.txt"), chain, nonce=NONCE_EV, now=PINNED,
                        require_rims=False)
    assert result.reason == GpuReason.SIGNATURE_INVALID


# --- malformed and hostile input: typed failures, never an exception or a hang -------------------


@pytest.mark.parametrize("cut", [0, 1, 36, 37, 40, 44, 45, 100, 3565, 3600, 3900, 4000, 4048])
def test_truncated_report_is_malformed(cut):
    assert _verify(REPORT[:cut]).reason == GpuReason.MALFORMED


@pytest.mark.parametrize("report", [b"", b"\x00" * 37, REPORT + b"\x00", REPORT * 5, bytes(20000), "zz", "11e0"])
def test_garbage_reports_are_malformed(report):
    assert _verify(report).reason == GpuReason.MALFORMED


def test_wrong_lengths_are_malformed():
    bad = bytearray(REPORT)
    bad[37 + 5] = 0xFF  # record length
    assert _verify(bytes(bad)).reason == GpuReason.MALFORMED
    bad = bytearray(REPORT)
    bad[37 + 8 + 2] = 0x40  # block size 64 with value size 48
    assert _verify(bytes(bad)).reason == GpuReason.MALFORMED


@pytest.mark.parametrize("chain", [b"", b"not a pem", b"-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n",
                                   CHAIN * 3, CHAIN[:2000], b"\xff" * 40000])
def test_garbage_certificates_are_typed(chain):
    result = _verify(chain=chain)
    assert result.reason == GpuReason.CHAIN_INVALID, result.describe()


BILLION_LAUGHS = b"""<?xml version="1.0"?>
<!DOCTYPE lolz [<!ENTITY lol "lol"><!ENTITY lol2 "&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;">
<!ENTITY lol3 "&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;">
<!ENTITY lol4 "&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;">
<!ENTITY lol9 "&lol4;&lol4;&lol4;&lol4;&lol4;&lol4;&lol4;&lol4;&lol4;&lol4;">]>
<SoftwareIdentity xmlns="http://standards.iso.org/iso/19770/-2/2015/schema.xsd">&lol9;</SoftwareIdentity>"""
XXE = b"""<?xml version="1.0"?><!DOCTYPE r [<!ENTITY x SYSTEM "file:///etc/passwd">]>
<SoftwareIdentity xmlns="http://standards.iso.org/iso/19770/-2/2015/schema.xsd">&x;</SoftwareIdentity>"""


def _with_doctype(rim: bytes, doctype: bytes) -> bytes:
    return doctype + rim


@pytest.mark.parametrize("rim", [
    BILLION_LAUGHS, XXE,
    _with_doctype(DRIVER_RIM, b'<!DOCTYPE SoftwareIdentity [<!ENTITY x SYSTEM "http://127.0.0.1:9/x">]>\n'),
    b"", b"<a>", b"<a/>", b"\x00\xff", DRIVER_RIM[:5000], DRIVER_RIM * 20,
    b"<SoftwareIdentity xmlns='http://standards.iso.org/iso/19770/-2/2015/schema.xsd'/>",
    b"<a>" * 100_000,
])
def test_hostile_or_malformed_rim_is_typed(rim):
    result = _verify(driver=rim)
    assert not result.ok and result.reason in (GpuReason.RIM_MALFORMED, GpuReason.RIM_CHAIN_INVALID), result.describe()


def test_tampered_rim_signature_refused():
    forged = VBIOS_RIM.replace(b'index="1" active="True"', b'index="1" active="False"', 1)
    assert forged != VBIOS_RIM
    assert _verify(vbios=forged).reason == GpuReason.RIM_SIGNATURE_INVALID
    golden = verify_rim(PROD_RIM, PINNED).golden[1][0].hex().encode()
    ours = verify_rim(VBIOS_RIM, PINNED).golden[1][0].hex().encode()
    assert _verify(vbios=VBIOS_RIM.replace(ours, golden)).reason == GpuReason.RIM_SIGNATURE_INVALID


def test_rim_with_a_wrapped_unsigned_payload_refused():
    # signature wrapping: a second Payload outside what the signature covers must not be read
    wrapped = VBIOS_RIM.replace(b"</SoftwareIdentity>", b"<Extra/></SoftwareIdentity>")
    assert _verify(vbios=wrapped).reason == GpuReason.RIM_SIGNATURE_INVALID


def test_random_corruption_of_chain_rim_and_report_is_always_typed():
    import base64
    import random

    rng = random.Random(16)
    der = [base64.b64encode(c.public_bytes(Encoding.DER)) for c in load_chain(CHAIN)]
    for _ in range(150):
        # a certificate whose DER has a flipped byte, re-wrapped as valid PEM/base64
        i = rng.randrange(len(der))
        raw = bytearray(base64.b64decode(der[i]))
        raw[rng.randrange(len(raw))] ^= 1 << rng.randrange(8)
        pems = [base64.b64decode(d) if j != i else bytes(raw) for j, d in enumerate(der)]
        chain = b"".join(b"-----BEGIN CERTIFICATE-----\n" + base64.encodebytes(p) + b"-----END CERTIFICATE-----\n"
                         for p in pems)
        assert not _verify(chain=chain, driver=None, vbios=None, require_rims=False).ok
        rim = bytearray(DRIVER_RIM)
        for _ in range(rng.randrange(1, 4)):
            rim[rng.randrange(len(rim))] = rng.randrange(256)
        assert not _verify(driver=bytes(rim)).ok or bytes(rim) == DRIVER_RIM
        report = bytearray(REPORT)
        report[rng.randrange(len(report))] = rng.randrange(256)
        result = _verify(bytes(report))
        assert result.ok == (bytes(report) == REPORT) and (result.ok or result.reason is not None)


def test_garbage_rim_signer_certificate_is_typed():
    start = DRIVER_RIM.index(b"<ds:X509Certificate>") + len(b"<ds:X509Certificate>")
    end = DRIVER_RIM.index(b"</ds:X509Certificate>")
    for junk in (b"AAAA", b"!!!", b""):
        assert _verify(driver=DRIVER_RIM[:start] + junk + DRIVER_RIM[end:]).reason == GpuReason.RIM_CHAIN_INVALID
