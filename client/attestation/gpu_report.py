"""NVIDIA GPU evidence, part 1: the SPDM 1.1 measurement report a GPU signs, parsed with bounds checks,
and the reasons every GPU evidence check reports (`GpuReason`, `GpuEvidenceError`)."""

from __future__ import annotations

import struct
from dataclasses import dataclass

from dcml.client.wire.errors import DcmlError, ErrorType, GpuReason

MAX_REPORT_BYTES = 16 * 1024  # a real report is ~4 KiB

# SPDM 1.1 GET_MEASUREMENTS: request = 11 E0 <attrs> <op=FF: all blocks> nonce(32) slot(1).
SPDM_REQUEST_LEN = 37
SIGNATURE_LEN = 96  # ECDSA P-384 raw r || s
DIGEST_LEN = 48  # SHA-384 measurement values

# Opaque field types in NVIDIA's MEASUREMENTS response.
OPAQUE_DRIVER_VERSION = 3
OPAQUE_VBIOS_VERSION = 6
OPAQUE_NVDEC0_STATUS = 11
OPAQUE_CHIP_SKU = 15
OPAQUE_PROJECT = 17
OPAQUE_PROJECT_SKU = 18
OPAQUE_FWID = 20
NVDEC0_DISABLED = 0x55
NVDEC0_MEASUREMENT_INDEX = 35  # RIM index not compared while NVDEC0 is disabled




class GpuEvidenceError(DcmlError, ValueError):
    """A check failed; `reason` is machine-readable and `indices` names mismatching RIM measurements."""

    error_type = ErrorType.ATTESTATION
    reason_in_str = True
    reason: GpuReason

    def __init__(self, reason: GpuReason, message: str, indices: tuple[int, ...] = ()) -> None:
        super().__init__(message, reason=reason)
        self.indices = indices



# --- SPDM report --------------------------------------------------------------------------------


@dataclass(frozen=True)
class MeasurementReport:
    """A parsed SPDM GET_MEASUREMENTS request + signed response (NVIDIA GPU attestation report)."""

    request: bytes
    response: bytes
    nonce: bytes  # the requester's nonce (what binds the report to the verifier)
    responder_nonce: bytes
    measurements: dict[int, bytes]  # SPDM block index (1-based) -> value
    opaque: dict[int, bytes]
    signature: bytes  # 96 bytes raw r || s

    @property
    def signed_bytes(self) -> bytes:
        return self.request + self.response[: -SIGNATURE_LEN]

    def _text(self, kind: int) -> str | None:
        v = self.opaque.get(kind)
        return None if v is None else v.split(b"\0", 1)[0].decode("ascii", "replace")

    @property
    def driver_version(self) -> str | None:
        return self._text(OPAQUE_DRIVER_VERSION)

    @property
    def vbios_version(self) -> str | None:
        v = self.opaque.get(OPAQUE_VBIOS_VERSION)
        if v is None or len(v) < 5:
            return None
        return ".".join(f"{b:02X}" for b in (v[3], v[2], v[1], v[0], v[4]))

    @property
    def project(self) -> str | None:
        return self._text(OPAQUE_PROJECT)

    @property
    def project_sku(self) -> str | None:
        return self._text(OPAQUE_PROJECT_SKU)

    @property
    def chip_sku(self) -> str | None:
        return self._text(OPAQUE_CHIP_SKU)

    @property
    def nvdec0_disabled(self) -> bool:
        return self.opaque.get(OPAQUE_NVDEC0_STATUS) == bytes([NVDEC0_DISABLED])

    @property
    def fwid(self) -> bytes | None:
        return self.opaque.get(OPAQUE_FWID)


def _take(buf: bytes, off: int, n: int, what: str) -> tuple[bytes, int]:
    if n < 0 or off + n > len(buf):
        raise GpuEvidenceError(GpuReason.MALFORMED, f"report truncated in {what}")
    return buf[off : off + n], off + n


def parse_report(data: bytes) -> MeasurementReport:
    """Parse request (37 bytes) ‖ MEASUREMENTS response; bounds-checked, raises GpuEvidenceError(MALFORMED)."""
    if len(data) > MAX_REPORT_BYTES:
        raise GpuEvidenceError(GpuReason.MALFORMED, f"report is {len(data)} bytes (limit {MAX_REPORT_BYTES})")
    request, off = _take(data, 0, SPDM_REQUEST_LEN, "request")
    if request[0] != 0x11 or request[1] != 0xE0:
        raise GpuEvidenceError(GpuReason.MALFORMED, "request is not an SPDM 1.1 GET_MEASUREMENTS")
    response = data[off:]
    header, roff = _take(response, 0, 8, "response header")
    if header[0] != 0x11 or header[1] != 0x60:
        raise GpuEvidenceError(GpuReason.MALFORMED, "response is not an SPDM 1.1 MEASUREMENTS")
    count, record_len = header[4], int.from_bytes(header[5:8], "little")
    record, roff = _take(response, roff, record_len, "measurement record")
    measurements: dict[int, bytes] = {}
    pos = 0
    for _ in range(count):
        head, pos = _take(record, pos, 4, "measurement block")
        index, size = head[0], int.from_bytes(head[2:4], "little")
        body, pos = _take(record, pos, size, "measurement block")
        if size < 3 or int.from_bytes(body[1:3], "little") != size - 3:
            raise GpuEvidenceError(GpuReason.MALFORMED, f"measurement block {index} has inconsistent sizes")
        if index in measurements:
            raise GpuEvidenceError(GpuReason.MALFORMED, f"measurement block {index} appears twice")
        measurements[index] = body[3:]
    if pos != len(record):
        raise GpuEvidenceError(GpuReason.MALFORMED, "measurement record length disagrees with its blocks")
    responder_nonce, roff = _take(response, roff, 32, "responder nonce")
    opaque_len_b, roff = _take(response, roff, 2, "opaque length")
    opaque_raw, roff = _take(response, roff, int.from_bytes(opaque_len_b, "little"), "opaque data")
    signature, roff = _take(response, roff, SIGNATURE_LEN, "signature")
    if roff != len(response):
        raise GpuEvidenceError(GpuReason.MALFORMED, f"{len(response) - roff} trailing bytes after the signature")
    opaque: dict[int, bytes] = {}
    pos = 0
    while pos < len(opaque_raw):
        head, pos = _take(opaque_raw, pos, 4, "opaque field")
        kind, size = struct.unpack("<HH", head)
        if kind in opaque:
            raise GpuEvidenceError(GpuReason.MALFORMED, f"opaque field {kind} appears twice")
        opaque[kind], pos = _take(opaque_raw, pos, size, f"opaque field {kind}")
    return MeasurementReport(request, response, request[4:36], responder_nonce, measurements, opaque, signature)

