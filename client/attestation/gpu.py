"""NVIDIA confidential-computing GPU evidence, verified offline: SPDM report, device chain, RIMs, FWID.

Like a TDX quote checked with supplied collateral: the roots are pinned (shipped in client/attestation/roots/), the time
is an explicit input, and revocation data is optional and reported. Nothing here touches the network.
Every failure is a `GpuResult` with a `GpuReason`; no input, however hostile, makes `verify_gpu` raise.

This module is the verifier and the stapled document (`gpu_evidence`); its parts live beside it:
`gpu_report` (the SPDM report, the reasons), `gpu_certs` (pinned roots, device chain, FWID, revocation),
`gpu_rim` (RIMs). Callers import every name from here.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Literal

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from dcml.client.attestation import gpu_rim
from dcml.client.attestation.gpu_certs import (  # re-exported: callers import the GPU verifier's names from here
    MAX_CHAIN_BYTES,
    MAX_CHAIN_CERTS,
    Revocation,
    certificate_fwids,
    check_revocation,
    device_root,
    load_chain,
    rim_root,
    verify_chain,
)
from dcml.client.attestation.gpu_report import (
    MAX_REPORT_BYTES,
    NVDEC0_MEASUREMENT_INDEX,
    GpuEvidenceError,
    GpuReason,
    MeasurementReport,
    parse_report,
)
from dcml.client.attestation.gpu_rim import MAX_RIM_BYTES, RIM_HASH_NS, SWID_NS, Rim, parse_rim_xml

GPU_NONCE_DOMAIN = b"dcml-gpu-v1"
ARCHITECTURES = {"GH100": "hopper", "GB100": "blackwell", "GB200": "blackwell"}


# --- the verifier -------------------------------------------------------------------------------


@dataclass(frozen=True)
class GpuResult:
    """Outcome for one GPU. `ok` is the verdict; on failure `reason`/`message` (and `indices`) say why."""

    ok: bool
    reason: GpuReason | None = None
    message: str = ""
    indices: tuple[int, ...] = ()  # RIM indices that mismatched
    architecture: str | None = None
    driver_version: str | None = None
    vbios_version: str | None = None
    fwid_checked: bool = False
    rims_checked: bool = False
    revocation_checked: bool = False
    report: MeasurementReport | None = field(default=None, repr=False)

    def describe(self) -> str:
        if self.ok:
            return f"GPU ok ({self.architecture}, driver {self.driver_version}, VBIOS {self.vbios_version})"
        extra = f" at RIM indices {list(self.indices)}" if self.indices else ""
        return f"{self.reason}{extra}: {self.message}"


def verify_rim(xml: bytes | str, now: datetime, root: x509.Certificate | None = None) -> Rim:
    """Verify a RIM (signature, chain to `root`, by default the pinned NVIDIA RIM root) at time `now`."""
    return gpu_rim.verify_rim(xml, now, root or rim_root())


def gpu_nonce(report_data: bytes) -> bytes:
    """The nonce a node collects GPU evidence with: binds its keys and the verifier's nonce (via report_data)."""
    if len(report_data) != 64:
        raise ValueError("report_data must be 64 bytes")
    return hashlib.sha256(GPU_NONCE_DOMAIN + report_data).digest()


def _architecture(leaf: x509.Certificate) -> str:
    chip = gpu_chip(leaf)
    if chip not in ARCHITECTURES:
        raise GpuEvidenceError(GpuReason.CHAIN_INVALID, f"leaf certificate names an unknown GPU {chip!r}")
    return ARCHITECTURES[chip]


def gpu_chip(leaf: x509.Certificate) -> str:
    """The chip a device leaf certificate names (CN "GH100 A01 GSP FMC LF" -> "GH100"); RIMs name the same."""
    try:
        cns = leaf.subject.get_attributes_for_oid(x509.oid.NameOID.COMMON_NAME)
    except Exception:
        return ""
    return str(cns[0].value).split(" ", 1)[0] if cns else ""


def compare_measurements(report: MeasurementReport, rims: Sequence[Rim]) -> tuple[int, ...]:
    """RIM indices whose report value is none of the golden alternatives (RIM index i = SPDM block i + 1)."""
    bad = []
    for rim in rims:
        for index, allowed in sorted(rim.golden.items()):
            if index == NVDEC0_MEASUREMENT_INDEX and report.nvdec0_disabled:
                continue
            got = report.measurements.get(index + 1)
            if got is None or not any(hmac.compare_digest(got, v) for v in allowed):
                bad.append(index)
    return tuple(sorted(set(bad)))


def verify_gpu(
    report: bytes | str,
    cert_chain: bytes | str,
    *,
    nonce: bytes,
    now: datetime,
    driver_rim: bytes | str | Rim | None = None,
    vbios_rim: bytes | str | Rim | None = None,
    require_rims: bool = True,
    revocation: Revocation | None = None,
    device_root_cert: x509.Certificate | None = None,
    rim_root_cert: x509.Certificate | None = None,
) -> GpuResult:
    """Verify one GPU's evidence offline at time `now`; never raises for bad input (see GpuResult).

    RIMs may be passed pre-verified (`Rim`, from verify_rim) so a document verifies each RIM once.
    """
    state: dict = {}
    try:
        _verify_gpu(report, cert_chain, nonce, now, driver_rim, vbios_rim, require_rims, revocation,
                    device_root_cert or device_root(), rim_root_cert or rim_root(), state)
    except GpuEvidenceError as exc:
        return GpuResult(False, exc.reason, exc.message, exc.indices, **state)
    except Exception as exc:
        return GpuResult(False, GpuReason.MALFORMED, f"evidence could not be processed ({type(exc).__name__})",
                         **state)
    return GpuResult(True, **state)


def _verify_gpu(report_bytes, cert_chain, nonce, now, driver_rim, vbios_rim, require_rims, revocation,
                droot, rroot, state) -> None:
    if now.tzinfo is None:
        now = now.replace(tzinfo=UTC)
    if isinstance(report_bytes, str):
        try:
            report_bytes = bytes.fromhex(report_bytes)
        except ValueError as exc:
            raise GpuEvidenceError(GpuReason.MALFORMED, "report is not hex") from exc
    report = parse_report(report_bytes)
    state.update(report=report, driver_version=report.driver_version, vbios_version=report.vbios_version)
    chain = load_chain(cert_chain)
    verify_chain(chain, droot, now, bad=GpuReason.CHAIN_INVALID)
    leaf = chain[0]
    arch = _architecture(leaf)
    state["architecture"] = arch
    try:
        key = leaf.public_key()
    except Exception as exc:  # a garbled SubjectPublicKeyInfo
        raise GpuEvidenceError(GpuReason.CHAIN_INVALID, f"leaf public key does not parse ({exc})") from exc
    if not isinstance(key, ec.EllipticCurvePublicKey) or key.curve.name != "secp384r1":
        raise GpuEvidenceError(GpuReason.CHAIN_INVALID, "leaf key is not ECDSA P-384")
    sig = report.signature
    der = encode_dss_signature(int.from_bytes(sig[:48], "big"), int.from_bytes(sig[48:], "big"))
    try:
        key.verify(der, report.signed_bytes, ec.ECDSA(hashes.SHA384()))
    except InvalidSignature as exc:
        raise GpuEvidenceError(GpuReason.SIGNATURE_INVALID, "report signature does not verify with the leaf key") \
            from exc
    # After the signature: a tampered report says signature_invalid, a genuine but stale one nonce_mismatch.
    if not hmac.compare_digest(report.nonce, nonce):
        raise GpuEvidenceError(GpuReason.NONCE_MISMATCH,
                               f"report answers nonce {report.nonce.hex()}, expected {nonce.hex()} (stale or replayed)")
    if report.fwid is not None:
        if report.fwid not in certificate_fwids(leaf, arch):
            raise GpuEvidenceError(GpuReason.FWID_MISMATCH,
                                   f"report FWID {report.fwid.hex()} is not in the leaf's DICE TcbInfo ({arch} OID)")
        state["fwid_checked"] = True
    if revocation:
        check_revocation(chain, droot, revocation, now)
    if driver_rim is None and vbios_rim is None and not require_rims:
        return
    if driver_rim is None or vbios_rim is None:
        raise GpuEvidenceError(GpuReason.RIM_MISSING, "driver and VBIOS RIMs are both needed to check measurements")
    rims = [r if isinstance(r, Rim) else verify_rim(r, now, rroot) for r in (driver_rim, vbios_rim)]
    if revocation:
        for rim in rims:
            check_revocation(rim.chain, rroot, revocation, now)
    chip = gpu_chip(leaf)
    for rim, want, what in ((rims[0], report.driver_version, "driver"), (rims[1], report.vbios_version, "VBIOS")):
        if rim.version.upper() != (want or "").upper() or rim.product != chip:
            raise GpuEvidenceError(GpuReason.RIM_VERSION_MISMATCH,
                                   f"{what} RIM is for {rim.product} {rim.version}, the report says {chip} {want}")
    bad = compare_measurements(report, rims)
    if bad:
        raise GpuEvidenceError(GpuReason.RIM_MISMATCH, "golden measurements differ from the report", bad)
    state["rims_checked"] = True
    state["revocation_checked"] = bool(revocation)



# --- the document: one report per GPU, RIMs once, revocation data --------------------------------

BUNDLE_FORMAT: Literal["dcml-gpu-v1"] = "dcml-gpu-v1"
MAX_GPUS = 16
MAX_RIMS = 32


class GpuItem(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    report: str = Field(max_length=2 * MAX_REPORT_BYTES)  # hex: SPDM request ‖ signed response
    certificate_chain: str = Field(max_length=MAX_CHAIN_BYTES)  # PEM, leaf first
    driver_rim: int = Field(ge=0, lt=MAX_RIMS)  # index into GpuEvidenceBundle.rims
    vbios_rim: int = Field(ge=0, lt=MAX_RIMS)


class GpuEvidenceBundle(BaseModel):
    """`gpu_evidence` of an attestation document: everything a verifier needs offline, RIMs shared by GPUs."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    format: Literal["dcml-gpu-v1"] = BUNDLE_FORMAT
    gpus: list[GpuItem] = Field(min_length=1, max_length=MAX_GPUS)
    rims: list[str] = Field(max_length=MAX_RIMS)  # RIM XML text
    revocation: dict[str, list[str]] | None = None  # {"ocsp": [base64 DER], "crls": [base64 DER]}


def build_bundle(gpus: Sequence[tuple[bytes, str, str, str]], revocation: Revocation | None = None) -> dict[str, Any]:
    """Staple (report, PEM chain, driver RIM XML, VBIOS RIM XML) per GPU; identical RIMs are stored once."""
    rims: list[str] = []

    def index(xml: str) -> int:
        if xml not in rims:
            rims.append(xml)
        return rims.index(xml)

    items = [GpuItem(report=r.hex(), certificate_chain=c, driver_rim=index(d), vbios_rim=index(v))
             for r, c, d, v in gpus]
    bundle = GpuEvidenceBundle(gpus=items, rims=rims, revocation=revocation.to_json() if revocation else None)
    return bundle.model_dump(exclude_none=True)


def verify_bundle(bundle: dict[str, Any] | GpuEvidenceBundle, *, report_data: bytes, now: datetime,
                  device_root_cert: x509.Certificate | None = None,
                  rim_root_cert: x509.Certificate | None = None) -> list[GpuResult]:
    """Verify every GPU of a stapled bundle against nonce sha256("dcml-gpu-v1" ‖ report_data); each RIM once.

    Raises GpuEvidenceError(MALFORMED) only when the bundle itself does not parse.
    """
    if now.tzinfo is None:
        now = now.replace(tzinfo=UTC)
    try:
        parsed = bundle if isinstance(bundle, GpuEvidenceBundle) else GpuEvidenceBundle.model_validate(bundle)
    except ValidationError as exc:
        raise GpuEvidenceError(GpuReason.MALFORMED, f"gpu_evidence is not a {BUNDLE_FORMAT} bundle: "
                               f"{exc.errors()[0]['msg']} at {exc.errors()[0]['loc']}") from exc
    revocation = Revocation.from_json(parsed.revocation)
    rroot = rim_root_cert or rim_root()
    rims: dict[int, Rim | GpuEvidenceError] = {}
    nonce = gpu_nonce(report_data)
    results = []
    for item in parsed.gpus:
        failed: GpuEvidenceError | None = None
        pair: list[Rim] = []
        for i in (item.driver_rim, item.vbios_rim):
            if i >= len(parsed.rims):
                failed = GpuEvidenceError(GpuReason.RIM_MISSING, f"RIM {i} is not in the bundle")
                break
            if i not in rims:
                try:
                    rims[i] = verify_rim(parsed.rims[i], now, rroot)
                except GpuEvidenceError as exc:
                    rims[i] = exc
                except Exception as exc:
                    rims[i] = GpuEvidenceError(GpuReason.RIM_MALFORMED, f"RIM could not be processed "
                                               f"({type(exc).__name__})")
            got = rims[i]
            if isinstance(got, GpuEvidenceError):
                failed = got
                break
            pair.append(got)
        if failed is not None:
            results.append(GpuResult(False, failed.reason, failed.message, failed.indices))
            continue
        results.append(verify_gpu(item.report, item.certificate_chain, nonce=nonce, now=now,
                                  driver_rim=pair[0], vbios_rim=pair[1],
                                  revocation=revocation, device_root_cert=device_root_cert, rim_root_cert=rroot))
    return results


__all__ = [  # the names callers take from here, wherever they are defined
    "ARCHITECTURES",
    "BUNDLE_FORMAT",
    "GPU_NONCE_DOMAIN",
    "MAX_CHAIN_BYTES",
    "MAX_CHAIN_CERTS",
    "MAX_GPUS",
    "MAX_REPORT_BYTES",
    "MAX_RIMS",
    "MAX_RIM_BYTES",
    "RIM_HASH_NS",
    "SWID_NS",
    "GpuEvidenceBundle",
    "GpuEvidenceError",
    "GpuItem",
    "GpuReason",
    "GpuResult",
    "MeasurementReport",
    "Revocation",
    "Rim",
    "build_bundle",
    "certificate_fwids",
    "check_revocation",
    "compare_measurements",
    "device_root",
    "gpu_chip",
    "gpu_nonce",
    "load_chain",
    "parse_report",
    "parse_rim_xml",
    "rim_root",
    "verify_bundle",
    "verify_chain",
    "verify_gpu",
    "verify_rim",
]
