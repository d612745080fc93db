"""NVIDIA GPU evidence on the node: collected through NVML and stapled to every quote.

Each GPU's SPDM report is requested with nonce sha256("dcml-gpu-v1" ‖ report_data), so it is bound to the
quote, the node's keys and the verifier's nonce at once. The matching RIMs (and any OCSP responses or CRLs)
come from directories the operator fills ahead of time, so a client verifies everything offline.
"""

from __future__ import annotations

import base64
import os
import re
import threading
from collections.abc import Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol

import httpx

from dcml.client.attestation.gpu import (
    MAX_RIM_BYTES,
    GpuEvidenceError,
    Revocation,
    Rim,
    build_bundle,
    gpu_chip,
    gpu_nonce,
    load_chain,
    parse_report,
    verify_rim,
)
from dcml.node.tee.base import AttestationProvider, Evidence, TeeError

RIM_SUFFIXES = (".swidtag", ".xml")
RIM_SERVICE = "https://rim.attestation.nvidia.com"  # NVIDIA's RIM service: GET /v1/rim/{id} -> {"rim": base64}
RIM_ID = re.compile(r"NV_GPU_(DRIVER|VBIOS)_[A-Za-z0-9_.\-]{1,96}")  # ids become file names and URL paths


@dataclass(frozen=True)
class GpuReport:
    report: bytes  # SPDM GET_MEASUREMENTS request ‖ signed response
    cert_chain: str  # PEM, leaf first


class GpuCollector(Protocol):
    def collect(self, nonce: bytes) -> list[GpuReport]: ...


class NvmlCollector:
    """Reads attestation reports and device certificates through NVML (nvidia-ml-py, extra `gpu`)."""

    def __init__(self, devices: Sequence[int] = ()) -> None:
        try:
            import pynvml
        except ImportError as exc:
            raise TeeError("[tee.gpu] is enabled but nvidia-ml-py is not installed: pip install 'dcml[gpu]'") from exc
        self._nvml = pynvml
        try:
            pynvml.nvmlInit()
        except pynvml.NVMLError as exc:
            raise TeeError(f"[tee.gpu] is enabled but NVML cannot start ({exc}): is the NVIDIA driver loaded "
                           "inside the CVM?") from exc
        try:
            state = pynvml.nvmlSystemGetConfComputeState()
        except (pynvml.NVMLError, AttributeError) as exc:
            raise TeeError(f"[tee.gpu] is enabled but the driver lacks the confidential-computing calls ({exc}); "
                           "it needs an R535+ driver with CC support") from exc
        if state.ccFeature != pynvml.NVML_CC_SYSTEM_FEATURE_ENABLED:
            raise TeeError("[tee.gpu] is enabled but GPU confidential-computing mode is off (ccFeature="
                           f"{state.ccFeature}, environment={state.environment}): enable CC mode on the host "
                           "(nvtrust's gpu_cc_tool.py --set-cc-mode on) and reboot the CVM")
        if state.devToolsMode != pynvml.NVML_CC_SYSTEM_DEVTOOLS_MODE_OFF:
            raise TeeError("[tee.gpu] GPU CC devtools mode is on: GPU memory is not protected")
        count = pynvml.nvmlDeviceGetCount()
        self.devices = list(devices) or list(range(count))
        if not self.devices:
            raise TeeError("[tee.gpu] is enabled but NVML sees no GPU")
        self._lock = threading.Lock()  # NVML calls on one device are not meant to interleave

    def collect(self, nonce: bytes) -> list[GpuReport]:
        nv = self._nvml
        out = []
        with self._lock:
            for index in self.devices:
                try:
                    handle = nv.nvmlDeviceGetHandleByIndex(index)
                    rep = nv.nvmlDeviceGetConfComputeGpuAttestationReport(handle, nonce)
                    cert = nv.nvmlDeviceGetConfComputeGpuCertificate(handle)
                except nv.NVMLError as exc:
                    raise TeeError(f"GPU {index}: NVML attestation call failed ({exc})") from exc
                report = bytes(rep.attestationReport[: rep.attestationReportSize])
                chain = bytes(cert.attestationCertChain[: cert.attestationCertChainSize])
                out.append(GpuReport(report, _pem(chain)))
        return out


def _pem(chain: bytes) -> str:
    """NVML returns the attestation chain as PEM text; re-encode it so what we staple is canonical."""
    from cryptography.hazmat.primitives.serialization import Encoding

    try:
        return "".join(c.public_bytes(Encoding.PEM).decode() for c in load_chain(chain))
    except GpuEvidenceError as exc:
        raise TeeError(f"NVML returned a certificate chain that does not parse ({exc.message})") from exc


def load_rims(rim_dir: Path, now: datetime | None = None) -> list[tuple[str, Rim]]:
    """Every RIM in `rim_dir`, verified now (an expired or forged RIM fails at start, not at a client)."""
    if not rim_dir.is_dir():
        raise TeeError(f"[tee.gpu] rim_dir {rim_dir} does not exist: fetch the driver and VBIOS RIMs for these "
                       "GPUs (NVIDIA's RIM service) into it ahead of time")
    out = []
    for path in sorted(rim_dir.iterdir()):
        if path.suffix not in RIM_SUFFIXES:
            continue
        text = path.read_text()
        try:
            out.append((text, verify_rim(text, now or datetime.now(UTC))))
        except GpuEvidenceError as exc:
            raise TeeError(f"RIM {path} does not verify: {exc}") from exc
    return out


def rim_ids(item: GpuReport) -> tuple[str, str]:
    """NVIDIA RIM service ids of a GPU's driver and VBIOS RIMs, read from its report and leaf certificate."""
    try:
        r = parse_report(item.report)
        chip = gpu_chip(load_chain(item.cert_chain)[0])
    except GpuEvidenceError as exc:
        raise TeeError(f"the GPU returned evidence that does not parse ({exc})") from exc
    vbios = (r.vbios_version or "").replace(".", "")
    ids = (f"NV_GPU_DRIVER_{chip}_{r.driver_version}",
           f"NV_GPU_VBIOS_{r.project}_{r.project_sku}_{r.chip_sku}_{vbios}".upper())
    for rim_id in ids:
        if not RIM_ID.fullmatch(rim_id) or ".." in rim_id:
            raise TeeError(f"the GPU's report yields an unusable RIM id {rim_id!r}")
    return ids


def fetch_rims(reports: Sequence[GpuReport], rim_dir: Path, *, service: str = RIM_SERVICE,
               http: httpx.Client | None = None, now: datetime | None = None) -> list[Path]:
    """Operator tool, run ahead of time: fetch the RIMs these GPUs need into `rim_dir` (cached by id).

    What is saved must verify (signature and chain to the pinned RIM root): the service is only a transport.
    """
    rim_dir.mkdir(parents=True, exist_ok=True)
    client = http or httpx.Client(timeout=30)
    saved = []
    try:
        for rim_id in dict.fromkeys(i for item in reports for i in rim_ids(item)):
            path = rim_dir / f"{rim_id}.swidtag"
            if path.exists():
                continue
            response = client.get(f"{service.rstrip('/')}/v1/rim/{rim_id}")
            if response.status_code != 200 or len(response.content) > 2 * MAX_RIM_BYTES:
                raise TeeError(f"RIM service: {rim_id} -> HTTP {response.status_code} ({len(response.content)} bytes)")
            try:
                xml = base64.b64decode(response.json()["rim"], validate=True)
            except (ValueError, KeyError, TypeError) as exc:
                raise TeeError(f"RIM service: {rim_id} is not {{\"rim\": base64}}") from exc
            try:
                verify_rim(xml, now or datetime.now(UTC))
            except GpuEvidenceError as exc:
                raise TeeError(f"RIM {rim_id} from {service} does not verify: {exc}") from exc
            tmp = path.with_suffix(".tmp")
            tmp.write_bytes(xml)
            os.replace(tmp, path)
            saved.append(path)
    finally:
        if http is None:
            client.close()
    return saved


def load_revocation(directory: Path | None) -> Revocation | None:
    """DER OCSP responses (*.ocsp) and CRLs (*.crl) the operator fetched; None when none are configured."""
    if directory is None:
        return None
    data = Revocation(tuple(p.read_bytes() for p in sorted(directory.glob("*.ocsp"))),
                      tuple(p.read_bytes() for p in sorted(directory.glob("*.crl"))))
    return data or None


class GpuEvidenceSource:
    """Collects one report per GPU for a quote's report_data and staples the matching RIMs."""

    def __init__(self, collector: GpuCollector, rims: list[tuple[str, Rim]], revocation: Revocation | None = None):
        self.collector = collector
        self.rims = rims
        self.revocation = revocation

    def _rim_for(self, product: str, version: str | None, what: str) -> str:
        for text, rim in self.rims:
            if rim.product == product and rim.version.upper() == (version or "").upper():
                return text
        raise TeeError(f"no {what} RIM for {product} {version} in [tee.gpu] rim_dir: fetch it ahead of time")

    def bundle(self, report_data: bytes) -> dict[str, Any]:
        gpus = []
        for item in self.collector.collect(gpu_nonce(report_data)):
            try:
                report = parse_report(item.report)
                leaf = load_chain(item.cert_chain)[0]
            except GpuEvidenceError as exc:
                raise TeeError(f"the GPU returned evidence that does not parse ({exc})") from exc
            product = gpu_chip(leaf)
            gpus.append((item.report, item.cert_chain, self._rim_for(product, report.driver_version, "driver"),
                         self._rim_for(product, report.vbios_version, "VBIOS")))
        return build_bundle(gpus, self.revocation)

    def check(self) -> None:
        """At start: collect once with a throwaway nonce, so a missing RIM is a start-up error."""
        self.bundle(bytes(64))


def with_gpu_evidence(provider: AttestationProvider, config: Any,
                      collector: GpuCollector | None = None) -> GpuAttestingProvider:
    """Wrap `provider` per `[tee.gpu]` (node.config.GpuTeeConfig); every failure is a start-up TeeError."""
    collector = collector or NvmlCollector(config.devices)  # first: CC mode off is the likeliest failure
    source = GpuEvidenceSource(collector, load_rims(config.rim_dir), load_revocation(config.revocation_dir))
    source.check()
    return GpuAttestingProvider(provider, source)


class GpuAttestingProvider:
    """Wraps a TEE provider: every quote carries GPU evidence bound to its report_data."""

    def __init__(self, inner: AttestationProvider, source: GpuEvidenceSource) -> None:
        self._inner = inner
        self.source = source
        self.tee_type = inner.tee_type

    def quote(self, report_data: bytes) -> Evidence:
        evidence = self._inner.quote(report_data)
        return replace(evidence, extra={**evidence.extra, "gpu_evidence": self.source.bundle(report_data)})

    def __getattr__(self, name: str) -> Any:  # e.g. dstack's derive_identity_seed
        return getattr(self._inner, name)
